"""splitstems: split music into stems with Deezer's Spleeter models, in PyTorch.

Public API: :class:`Separator`, :func:`load_model`, :func:`list_models`, the errors.
Nothing heavy is imported until it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from splitstems.errors import (
    AudioError,
    CheckpointError,
    ConfigError,
    DownloadError,
    ModelError,
    OutputError,
    SplitstemsError,
)

__version__ = "0.1.0"

__all__ = [
    "Separator",
    "load_model",
    "list_models",
    "SplitstemsError",
    "AudioError",
    "ModelError",
    "ConfigError",
    "CheckpointError",
    "DownloadError",
    "OutputError",
    "__version__",
]

if TYPE_CHECKING:
    from splitstems.hub import list_models
    from splitstems.separator import Separator, load_model


def __getattr__(name: str) -> Any:
    if name in ("Separator", "load_model"):
        from splitstems import separator

        return getattr(separator, name)
    if name == "list_models":
        from splitstems import hub

        return hub.list_models
    raise AttributeError(f"module 'splitstems' has no attribute {name!r}")

"""Training checkpoints: the model as safetensors + JSON config, the optimizer beside it.

A model folder written by training holds

- ``config.json``: the Spleeter JSON config (training keys included);
- ``model.safetensors``: the weights (BatchNorm statistics included), loadable by
  :func:`splitstems.separator.load_model` and ``splitstems separate -p <folder>``; its
  metadata records the step;
- ``training_state.pt``: the step and Adam's state, written with ``torch.save`` and read
  back with ``torch.load(weights_only=True)`` (tensors, numbers and strings only: nothing
  is unpickled);
- ``train_log.jsonl``: one JSON object per line (training loss, validation loss and SDR).

Files are written to temporary names and renamed, weights first and the training state
last; a resume checks that both name the same step.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from splitstems.config import ModelConfig
from splitstems.errors import CheckpointError

__all__ = [
    "WEIGHTS",
    "CONFIG",
    "STATE",
    "LOG",
    "model_state",
    "save_checkpoint",
    "saved_step",
    "load_checkpoint",
]

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "training_state.pt"
LOG = "train_log.jsonl"
_STATE_VERSION = 1


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return the weights and BatchNorm statistics as contiguous CPU tensors."""
    return {
        name: tensor.detach().to("cpu", copy=True).contiguous()
        for name, tensor in model.state_dict().items()
        if not name.endswith("num_batches_tracked")
    }


def _temp(folder: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the model from other users
    return Path(tmp)


def _write(folder: Path, name: str, writer: Callable[[Path], None]) -> Path:
    tmp = _temp(folder, name)
    try:
        writer(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def save_checkpoint(
    folder: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: ModelConfig,
    *,
    step: int,
    info: dict[str, str] | None = None,
) -> Path:
    """Write config, weights and optimizer state of ``step`` into ``folder``; return it."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "step": str(step), "model": config.name, **(info or {})}
    config_text = json.dumps(config.to_json_dict(), indent=2) + "\n"
    state = {"version": _STATE_VERSION, "step": step, "optimizer": optimizer.state_dict()}
    tmp_config = _write(out, CONFIG, lambda p: p.write_text(config_text, encoding="utf-8"))
    tmp_weights = _write(
        out, WEIGHTS, lambda p: save_file(model_state(model), str(p), metadata=metadata)
    )
    tmp_state = _write(out, STATE, lambda p: torch.save(state, p))
    os.replace(tmp_config, out / CONFIG)
    os.replace(tmp_weights, out / WEIGHTS)
    os.replace(tmp_state, out / STATE)
    return out


def saved_step(folder: str | os.PathLike[str]) -> int | None:
    """Return the step of the training run saved in ``folder``, or None if there is none."""
    path = Path(folder) / STATE
    if not path.is_file():
        return None
    return _read_state(path)["step"]


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a bad checkpoint
        raise CheckpointError(f"{path}: unreadable training state ({exc})") from None
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
        raise CheckpointError(f"{path}: not a splitstems training state")
    return state


def load_checkpoint(
    folder: str | os.PathLike[str],
) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(step, weights, optimizer_state)`` of the run saved in ``folder``.

    Raises:
        CheckpointError: files missing, unreadable, or of different steps.
    """
    out = Path(folder)
    state = _read_state(out / STATE)
    weights_path = out / WEIGHTS
    try:
        with safe_open(str(weights_path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        weights = load_file(str(weights_path))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{weights_path}: cannot read weights ({exc})") from None
    if metadata.get("step") != str(state["step"]):
        raise CheckpointError(
            f"{out}: weights (step {metadata.get('step')}) and training state "
            f"(step {state['step']}) differ: the last save was interrupted"
        )
    return int(state["step"]), weights, state["optimizer"]

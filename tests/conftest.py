"""Shared fixtures: the ``../shared`` data folder, a per-session model cache, small configs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_path() -> Path:
    return Path(os.environ.get("SPLITSTEMS_SHARED", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data folder (``SPLITSTEMS_SHARED``, default ``<repo>/../shared``).

    Missing → skip with the reason, except under CI (``CI=true``) where it fails.
    """
    path = _shared_path()
    if not (path / "models").is_dir() or not (path / "audio").is_dir():
        message = f"shared data folder not found at {path} (set SPLITSTEMS_SHARED)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache shared by the tests of one session (converted weights are reused)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def model_env(shared_dir: Path, session_cache: Path) -> dict[str, str]:
    """Environment for using the shared 2stems checkpoint offline through a session cache."""
    return {
        "SPLITSTEMS_MODEL_DIR": str(shared_dir / "models" / "spleeter"),
        "SPLITSTEMS_CACHE": str(session_cache),
        "SPLITSTEMS_DOWNLOAD_URL": "http://127.0.0.1:9/unreachable",
    }


@pytest.fixture()
def use_shared_models(model_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Point model lookups at the shared checkpoint for one test."""
    for key, value in model_env.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def separator_2stems(model_env: dict[str, str]):
    """A CPU Separator for spleeter:2stems from the shared checkpoint (built once)."""
    from splitstems.separator import Separator

    saved = {k: os.environ.get(k) for k in model_env}
    os.environ.update(model_env)
    try:
        separator = Separator("spleeter:2stems", device="cpu", progress=False)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return separator


@pytest.fixture()
def rng() -> np.random.Generator:
    """A seeded random generator."""
    return np.random.default_rng(1234)

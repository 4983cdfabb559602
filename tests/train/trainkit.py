"""Helpers of the training tests (importable: ``from trainkit import ...``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from splitstems import audio

#: Two of the shared MUSDB18 preview train tracks (7 s each).
TRACKS = ("Music Delta - Beatles", "Aimee Norwich - Child")
#: U-Nets with 1/16 of the released parameters on 64x128 crops: ~10 steps/s on 2 cores.
TINY: dict[str, Any] = {
    "mix_name": "mix",
    "instrument_list": ["vocals", "accompaniment"],
    "sample_rate": 44100,
    "frame_length": 512,
    "frame_step": 128,
    "T": 64,
    "F": 128,
    "n_channels": 2,
    "learning_rate": 1e-3,
    "batch_size": 4,
    "train_max_steps": 300,
    "save_checkpoints_steps": 100,
    "save_summary_steps": 10,
    "random_seed": 7,
    "n_chunks_per_song": 2,
    "chunk_duration": 20,
    # Batch statistics and dropout: trains the fresh tiny U-Net fastest, and makes the
    # resume test cover dropout's random numbers and the moving averages too.
    "batch_norm": "batch",
    "model": {"type": "unet.unet", "params": {"conv_n_filters": [4, 8, 16, 32, 64, 128]}},
}


def write_config(folder: Path, data_root: Path, **changes: Any) -> Path:
    """Write the tiny config (CSV paths absolute) with ``changes``; return its path."""
    config = {
        **TINY,
        "train_csv": str(data_root / "train.csv"),
        "validation_csv": str(data_root / "train.csv"),
        "model_dir": str(folder / "model"),
        **changes,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def noise_wav(path: Path, seconds: float, seed: int = 0) -> Path:
    """Write a stereo noise WAV of ``seconds``."""
    rng = np.random.default_rng(seed)
    data = (0.1 * rng.standard_normal((int(seconds * 44100), 2))).astype(np.float32)
    audio.save(path, data, sample_rate=44100)
    return path


def mixed_csv(previews: Path, folder: Path) -> Path:
    """A CSV of one good song, a missing file, a text file and a 0.05 s song."""
    good = previews / TRACKS[0].replace(" ", "_")
    bad = folder / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    (bad / "notes.wav").write_text("this is not audio")
    short = noise_wav(bad / "short.wav", 0.05)
    rows = [
        f"{good}/mix.wav,{good}/vocals.wav,{good}/accompaniment.wav,6.8",
        f"{bad}/missing.wav,{good}/vocals.wav,{good}/accompaniment.wav,6.8",
        f"{bad}/notes.wav,{good}/vocals.wav,{good}/accompaniment.wav,",
        f"{short},{short},{short},0.05",
    ]
    csv = folder / "mixed.csv"
    csv.write_text("mix_path,vocals_path,accompaniment_path,duration\n" + "\n".join(rows) + "\n")
    return csv

"""Fixtures of the training tests: two MUSDB18 previews as WAV files."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainkit import TRACKS

from splitstems import audio


@pytest.fixture(scope="session")
def previews(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with two previews as float WAVs (mix, vocals, accompaniment) + train.csv."""
    root = tmp_path_factory.mktemp("previews")
    rows = []
    for name in TRACKS:
        path = shared_dir / "audio" / "musdb7" / "train" / f"{name}.stem.mp4"
        mix, drums, bass, other, vocals = (audio.load(path, stream=k) for k in range(5))
        n = min(x.shape[0] for x in (mix, drums, bass, other, vocals))
        folder = root / name.replace(" ", "_")
        stems = {"mix": mix, "vocals": vocals, "accompaniment": drums + bass + other}
        for stem, data in stems.items():
            audio.save(folder / f"{stem}.wav", data[:n], sample_rate=44100, bit_depth="32f")
        rows.append(
            f"{folder.name}/mix.wav,{folder.name}/vocals.wav,{folder.name}/accompaniment.wav,"
            f"{n / 44100:.3f}"
        )
    header = "mix_path,vocals_path,accompaniment_path,duration\n"
    (root / "train.csv").write_text(header + "\n".join(rows) + "\n")
    return root

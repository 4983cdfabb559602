"""``splitstems separate`` on damaged files: one line, exit 1, no output, the batch goes on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from splitstems import audio
from splitstems.cli import main


def _visible_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.usefixtures("use_shared_models")
def test_truncated_inputs_fail_alone_and_leave_no_output(tmp_path, shared_dir, capsys):
    reference = shared_dir / "audio" / "reference" / "inputs" / "BKS_Too_Much.wav"
    data = reference.read_bytes()
    inputs = tmp_path / "in"
    inputs.mkdir()
    head, half, good = inputs / "a_head.wav", inputs / "b_half.wav", inputs / "c_good.wav"
    head.write_bytes(data[:3000])
    half.write_bytes(data[: len(data) // 2])
    good.write_bytes(data)
    out = tmp_path / "out"
    assert main(["separate", "-o", str(out), str(head), str(half), str(good)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {head}: truncated: decodes to 0.017 s of the 6.803 s its header gives",
        f"error: {half}: truncated: decodes to 3.401 s of the 6.803 s its header gives",
    ]
    visible = [p for p in _visible_files(out) if not Path(p).name.startswith(".")]
    assert visible == ["c_good/accompaniment.wav", "c_good/vocals.wav"]
    assert not list(out.rglob("*.part*"))
    assert len(audio.load(out / "c_good" / "vocals.wav")) == len(audio.load(good))


@pytest.mark.usefixtures("use_shared_models")
def test_a_nan_in_a_float_file_is_a_warning_and_finite_stems(tmp_path, rng, caplog):
    x = rng.uniform(-0.3, 0.3, (4 * 44100, 2)).astype(np.float32)
    x[2 * 44100, 1] = np.nan
    audio.save(tmp_path / "nan.wav", x, sample_rate=44100, bit_depth="32f")
    with caplog.at_level("WARNING", logger="splitstems"):
        assert main(["separate", "-o", str(tmp_path / "out"), str(tmp_path / "nan.wav")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"{tmp_path / 'nan.wav'}: 1 non-finite sample replaced by 0 (first at 2.000 s)"
    ]
    for stem in ("vocals", "accompaniment"):
        y = audio.load(tmp_path / "out" / "nan" / f"{stem}.wav")
        assert len(y) == len(x) and np.abs(y[2 * 44100 - 4410 : 2 * 44100 + 4410]).max() > 0

"""``splitstems separate`` on damaged files: one line, exit 1, no output, the batch goes on."""

from __future__ import annotations

import re
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
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING" and r.name.startswith("splitstems")
    ]
    assert warnings == [
        f"{tmp_path / 'nan.wav'}: 1 non-finite sample replaced by 0 (first at 2.000 s)"
    ]
    for stem in ("vocals", "accompaniment"):
        y = audio.load(tmp_path / "out" / "nan" / f"{stem}.wav")
        assert len(y) == len(x) and np.abs(y[2 * 44100 - 4410 : 2 * 44100 + 4410]).max() > 0


@pytest.mark.usefixtures("use_shared_models")
def test_short_lossless_files_and_a_cut_ogg_are_truncated(tmp_path, shared_dir, capsys):
    # A WAV missing 100 bytes, a FLAC missing its last 100, a WAV cut right after its
    # header and an Ogg cut inside a page all passed (or said "zero-length audio")
    reference = shared_dir / "audio" / "reference" / "inputs" / "BKS_Too_Much.wav"
    x = audio.load(reference)
    inputs = tmp_path / "in"
    inputs.mkdir()
    wav, flac, ogg = reference.read_bytes(), inputs / "full.flac", inputs / "full.ogg"
    audio.save(flac, x, sample_rate=44100)
    audio.save(ogg, x, sample_rate=44100)
    cuts = {
        "a_short.wav": wav[:-100],
        "b_head.wav": wav[: wav.index(b"data") + 8],  # the header, not a sample
        "c_short.flac": flac.read_bytes()[:-100],
        "d_cut.ogg": ogg.read_bytes()[:-100],
    }
    for name, data in cuts.items():
        (inputs / name).write_bytes(data)
    flac.unlink()
    ogg.unlink()
    out = tmp_path / "out"
    assert main(["separate", "-o", str(out), *sorted(map(str, inputs.iterdir()))]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    header = r"of the 6\.803 s its header gives"  # with more decimals where they differ
    patterns = [
        r"a_short\.wav: truncated: decodes to 6\.8029 s of the 6\.8034 s its header gives",
        rf"b_head\.wav: truncated: decodes to 0\.000 s {header}",
        rf"c_short\.flac: truncated: decodes to 6\.7\d\d s {header}",
        r"d_cut\.ogg: truncated: decodes to \d\.\d{3} s, then the file ends inside an Ogg page "
        r"\(Ogg headers give no total length\)",
    ]
    assert len(errors) == len(patterns)
    for line, pattern in zip(errors, patterns, strict=True):
        assert re.fullmatch(rf"error: {re.escape(str(inputs))}/{pattern}", line), line
    assert not out.exists() or not _visible_files(out)


@pytest.mark.usefixtures("use_shared_models")
def test_an_offset_in_the_part_cut_off_says_truncated(tmp_path, shared_dir, capsys):
    # "offset 5 s is beyond the end of the audio (3.401 s)" hid that the file is damaged
    data = (shared_dir / "audio" / "reference" / "inputs" / "BKS_Too_Much.wav").read_bytes()
    (tmp_path / "half.wav").write_bytes(data[: len(data) // 2])
    assert (
        main(["separate", "-s", "5", "-o", str(tmp_path / "out"), str(tmp_path / "half.wav")]) == 1
    )
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path / 'half.wav'}: truncated: decodes to 3.401 s of the 6.803 s its "
        "header gives"
    ]

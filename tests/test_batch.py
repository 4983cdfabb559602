"""Many files: folders and globs, skipping finished work, a summary, failures isolated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from splitstems import audio
from splitstems.batch import expand_inputs, separate_files
from splitstems.cli import main


@pytest.fixture()
def library(tmp_path: Path) -> Path:
    """A folder of short songs, nested, plus a non-audio file."""
    root = tmp_path / "library"
    t = np.arange(44100) / 44100
    for i, name in enumerate(["a.wav", "sub/b.flac", "sub/deeper/c.mp3"]):
        tone = (0.2 * np.sin(2 * np.pi * (220 + 110 * i) * t)).astype(np.float32)
        audio.save(root / name, np.stack([tone, tone], 1), sample_rate=44100)
    (root / "notes.txt").write_text("not audio")
    return root


def test_expand_folders_globs_and_keep_missing(library, tmp_path):
    files = expand_inputs([library])
    assert [p.name for p in files] == ["a.wav", "b.flac", "c.mp3"]
    assert [p.name for p in expand_inputs([str(library / "**" / "*.flac")])] == ["b.flac"]
    # Duplicates collapse, order is kept, a missing name survives to be reported.
    missing = tmp_path / "nope.mp3"
    got = expand_inputs([library / "a.wav", library, missing])
    assert [p.name for p in got] == ["a.wav", "b.flac", "c.mp3", "nope.mp3"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert expand_inputs([empty]) == [empty]


def test_batch_skips_done_work_and_isolates_failures(separator_2stems, library, tmp_path):
    out = tmp_path / "out"
    files = [*expand_inputs([library]), tmp_path / "missing.wav"]
    seen = []
    report = separate_files(separator_2stems, files, out, progress=False, on_result=seen.append)
    assert [r.status for r in report.results] == ["done", "done", "done", "failed"]
    assert "missing.wav" in report.failed[0].reason
    assert len(seen) == 4
    assert report.summary().startswith("3 done, 0 skipped, 1 failed (3.0 s of audio")
    vocals = out / "a" / "vocals.wav"
    stamp = vocals.stat().st_mtime_ns
    again = separate_files(separator_2stems, files[:3], out, progress=False)
    assert [r.status for r in again.results] == ["skipped"] * 3
    assert vocals.stat().st_mtime_ns == stamp
    redo = separate_files(separator_2stems, files[:1], out, progress=False, overwrite=True)
    assert [r.status for r in redo.results] == ["done"]
    assert vocals.stat().st_mtime_ns != stamp


@pytest.mark.usefixtures("use_shared_models")
def test_cli_folder_input_summary_and_exit_code(library, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["separate", "-o", str(out), str(library)]) == 0
    text = capsys.readouterr().out
    assert "3 done, 0 skipped, 0 failed" in text
    assert main(["separate", "-o", str(out), str(library), str(tmp_path / "x.mp3")]) == 1
    captured = capsys.readouterr()
    assert "0 done, 3 skipped, 1 failed" in captured.out
    assert "x.mp3: file not found" in captured.err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["separate", "-o", str(out), str(empty)]) == 1
    assert "folder holds no audio files" in capsys.readouterr().err

"""Many files: folders and globs, skipping finished work, a summary, failures isolated."""

from __future__ import annotations

import json
import wave
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


def test_expand_glob_that_matches_folders(library, tmp_path):
    # 'music/*' matches the folder sub/ and the files a.wav, notes.txt: the folder is
    # expanded as if given directly (it used to be dropped silently).
    got = expand_inputs([str(library / "*")])
    assert [p.relative_to(library).as_posix() for p in got] == [
        "a.wav",
        "notes.txt",
        "sub/b.flac",
        "sub/deeper/c.mp3",
    ]
    (library / "empty").mkdir()
    assert library / "empty" in expand_inputs([str(library / "e*")])  # reported, not dropped


def _separate(separator, files, out, **kwargs):
    return separate_files(separator, files, out, progress=False, **kwargs)


def test_batch_isolates_failures_and_reruns_overwrite(separator_2stems, library, tmp_path):
    out = tmp_path / "out"
    files = [*expand_inputs([library]), tmp_path / "missing.wav"]
    seen = []
    report = _separate(separator_2stems, files, out, on_result=seen.append)
    assert [r.status for r in report.results] == ["done", "done", "done", "failed"]
    assert "missing.wav" in report.failed[0].reason
    assert len(seen) == 4
    assert report.summary().startswith("3 done, 0 skipped, 1 failed (3.0 s of audio")
    # A second run overwrites, as Spleeter: with other settings (-d) too, and where a
    # stem is empty (both used to be "skipped", keeping the old stems).
    vocals = out / "a" / "vocals.wav"
    (out / "b" / "vocals.wav").write_bytes(b"")
    again = _separate(separator_2stems, files[:3], out, duration=0.5)
    assert [r.status for r in again.results] == ["done"] * 3
    assert audio.load(vocals).shape == (22050, 2)
    assert audio.load(out / "b" / "vocals.wav").shape == (22050, 2)


def _record(out: Path, name: str = "a") -> dict:
    return json.loads((out / name / ".vocals.wav.splitstems.json").read_text())


def test_resume_keeps_only_complete_stems_of_the_same_settings(separator_2stems, library, tmp_path):
    out = tmp_path / "out"
    song = library / "a.wav"
    vocals, accompaniment = out / "a" / "vocals.wav", out / "a" / "accompaniment.wav"

    def resume(**kwargs):
        (result,) = _separate(separator_2stems, [song], out, resume=True, **kwargs).results
        return result

    first = resume()
    assert first.status == "done" and not first.redone  # nothing there: not a redo
    record = _record(out)
    assert record["input"]["path"] == str(song.resolve())
    assert record["n_samples"] == 44100 and record["settings"]["duration"] is None
    assert len(record["settings"]["model_sha256"]) == 16
    assert not list(out.rglob("*.tmp"))  # written through a temp file, then renamed
    stamp = vocals.stat().st_mtime_ns
    same = resume()
    assert same.status == "skipped" and vocals.stat().st_mtime_ns == stamp

    other = resume(duration=0.5)
    assert other.status == "done" and other.redone_kind == "settings differ"
    assert other.redone == "settings differ (duration none -> 0.5)"
    assert audio.load(vocals).shape == (22050, 2)
    back = resume()
    assert back.redone == "settings differ (duration 0.5 -> none)"

    vocals.unlink()
    assert resume().redone == "a/vocals.wav is missing"
    accompaniment.write_bytes(accompaniment.read_bytes()[:3000])  # truncated after the run
    truncated = resume()
    assert truncated.redone.startswith("a/accompaniment.wav is damaged (truncated: ")
    audio.save(accompaniment, audio.load(accompaniment)[:22050], sample_rate=44100)
    assert resume().redone == "a/accompaniment.wav decodes to 0.50 s of 1.00 s"
    accompaniment.write_bytes(b"")
    assert resume().redone == "a/accompaniment.wav is damaged (empty file)"
    assert resume().status == "skipped"

    # The input changed (same path, other content): its stems are stale.
    data = audio.load(song)
    audio.save(song, 0.5 * data, sample_rate=44100)
    changed = resume()
    assert changed.redone_kind == "input changed" and changed.status == "done"
    # Stems of an unknown run (e.g. another tool's, or empty files) are not trusted.
    (out / "a" / ".vocals.wav.splitstems.json").unlink()
    unknown = resume()
    assert unknown.redone == "no record of how a/vocals.wav was made"
    assert resume().status == "skipped"


def test_resume_summary_says_why(separator_2stems, library, tmp_path):
    out = tmp_path / "out"
    files = expand_inputs([library])
    _separate(separator_2stems, files, out)  # a default run leaves records too
    (out / "a" / "vocals.wav").unlink()
    report = _separate(separator_2stems, files, out, resume=True)
    assert [r.status for r in report.results] == ["done", "skipped", "skipped"]
    assert report.summary().startswith("1 done (1 redone: 1 stem missing), 2 skipped, 0 failed")
    report = _separate(separator_2stems, files, out, resume=True, duration=0.5)
    assert report.summary().startswith("3 done (3 redone: 3 settings differ), 0 skipped")


@pytest.mark.parametrize(
    "layout", ["{instrument}/{filename}.{codec}", "{foldername}-{filename}_{instrument}.{codec}"]
)
def test_resume_with_custom_filename_formats(separator_2stems, library, tmp_path, layout):
    out = tmp_path / "out"
    other = tmp_path / "other" / "a.wav"  # same file name, another folder
    other.parent.mkdir()
    audio.save(other, 0.5 * audio.load(library / "a.wav"), sample_rate=44100)
    files = [library / "a.wav", library / "sub" / "b.flac"]
    if "{foldername}" in layout:
        files.append(other)
    first = _separate(separator_2stems, files, out, filename_format=layout, resume=True)
    assert {r.status for r in first.results} == {"done"}
    records = sorted(p.name for p in out.rglob("*.splitstems.json"))
    assert len(records) == len(files)  # one per input, none shared
    again = _separate(separator_2stems, files, out, filename_format=layout, resume=True)
    assert {r.status for r in again.results} == {"skipped"}


def test_a_failed_redo_leaves_no_record(separator_2stems, library, tmp_path):
    out = tmp_path / "out"
    song = tmp_path / "song.wav"
    song.write_bytes((library / "a.wav").read_bytes())
    _separate(separator_2stems, [song], out)
    assert (out / "song" / ".vocals.wav.splitstems.json").is_file()
    with wave.open(str(song), "wb") as w:  # now a file without a sample: it fails
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
    (result,) = _separate(separator_2stems, [song], out).results
    assert result.status == "failed" and "zero-length" in result.reason
    assert not (out / "song" / ".vocals.wav.splitstems.json").exists()
    song.write_bytes((library / "a.wav").read_bytes())
    (again,) = _separate(separator_2stems, [song], out, resume=True).results
    assert again.status == "done" and again.redone.startswith("no record of how")


@pytest.mark.usefixtures("use_shared_models")
def test_cli_folder_input_summary_and_exit_code(library, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["separate", "-o", str(out), str(library)]) == 0
    text = capsys.readouterr().out
    assert "3 done, 0 skipped, 0 failed" in text
    assert main(["separate", "-o", str(out), str(library), str(tmp_path / "x.mp3")]) == 1
    captured = capsys.readouterr()
    # one summary line, on stderr since something failed (it used to be on both)
    assert "3 done, 0 skipped, 1 failed" in captured.err
    assert "failed" not in captured.out and "files failed" not in captured.err
    assert "x.mp3: file not found" in captured.err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["separate", "-o", str(out), str(empty)]) == 1
    assert "folder holds no audio files" in capsys.readouterr().err


# --------------------------------------------------------------------------- clashes


def _tone(path: Path, seconds: float = 1.0, freq: float = 330.0) -> Path:
    t = np.arange(int(44100 * seconds)) / 44100
    tone = (0.2 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    audio.save(path, np.stack([tone, tone], 1), sample_rate=44100)
    return path


def test_an_unreadable_input_does_not_claim_the_stems_of_a_good_one(separator_2stems, tmp_path):
    # song.flac (junk) sorts first; it used to claim out/song/ and block song.wav.
    coll = tmp_path / "coll"
    coll.mkdir()
    (coll / "song.flac").write_text("junk\n")
    _tone(coll / "song.wav")
    out = tmp_path / "out"
    report = _separate(separator_2stems, expand_inputs([coll]), out)
    assert [(r.path.name, r.status) for r in report.results] == [
        ("song.flac", "failed"),
        ("song.wav", "done"),
    ]
    assert report.results[0].reason == f"{coll / 'song.flac'}: not an audio file (no sample rate)"
    assert audio.load(out / "song" / "vocals.wav").shape == (44100, 2)


def test_an_input_that_fails_late_hands_its_stems_to_the_next(separator_2stems, tmp_path):
    # A truncated file is readable up front and fails as it is decoded: the input that
    # waited for its stems is separated in its place.
    coll = tmp_path / "coll"
    coll.mkdir()
    cut = _tone(coll / "song.flac", seconds=3.0)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    _tone(coll / "song.wav")
    out = tmp_path / "out"
    seen: list[str] = []
    report = _separate(
        separator_2stems, expand_inputs([coll]), out, on_result=lambda r: seen.append(r.status)
    )
    assert [r.status for r in report.results] == ["failed", "done"] == seen
    assert "truncated" in report.results[0].reason
    assert audio.load(out / "song" / "vocals.wav").shape == (44100, 2)


def test_clashing_inputs_get_a_hint_that_fits(separator_2stems, tmp_path):
    out = tmp_path / "out"
    same = [_tone(tmp_path / "coll" / "song.wav"), _tone(tmp_path / "coll" / "song.flac", 0.5)]
    report = _separate(separator_2stems, same, out)
    assert [r.status for r in report.results] == ["done", "failed"]
    assert report.results[1].reason == (
        f"{same[1]}: its stems would overwrite those of {same[0]} in the same batch (both are "
        "in the same folder: rename one of them, or separate them in two runs with different -o)"
    )
    assert audio.load(out / "song" / "vocals.wav").shape == (44100, 2)  # the first's

    apart = [same[0], _tone(tmp_path / "elsewhere" / "song.mp3")]
    (_, failed) = _separate(separator_2stems, apart, out).results
    assert failed.reason.endswith("(add {foldername} to -f, or rename one of them)")

    twins = [same[0], _tone(tmp_path / "b" / "coll" / "song.wav")]
    layout = "{foldername}/{filename}/{instrument}.{codec}"
    (_, failed) = _separate(separator_2stems, twins, out, filename_format=layout).results
    assert failed.reason.endswith(
        "(both folders are named coll: rename one of them, or separate them in two runs "
        "with different -o)"
    )

    flat = [same[0], _tone(tmp_path / "coll" / "other.wav")]
    (_, failed) = _separate(separator_2stems, flat, out, filename_format="{instrument}.wav").results
    assert failed.reason.endswith("(add {filename} to -f, or rename one of them)")


def test_a_clash_with_skipped_stems_fails_at_once(separator_2stems, tmp_path):
    out = tmp_path / "out"
    first = _tone(tmp_path / "a" / "song.wav")
    second = _tone(tmp_path / "b" / "song.wav")
    _separate(separator_2stems, [first], out)
    seen: list[str] = []
    report = _separate(
        separator_2stems,
        [first, second],
        out,
        resume=True,
        on_result=lambda r: seen.append(r.status),
    )
    assert [r.status for r in report.results] == ["skipped", "failed"] == seen
    assert "would overwrite those of" in report.results[1].reason


def test_a_glob_that_matches_nothing_says_so(separator_2stems, tmp_path):
    pattern = str(tmp_path / "nomatch" / "*.wav")
    (result,) = _separate(separator_2stems, expand_inputs([pattern]), tmp_path / "out").results
    assert result.status == "failed"
    assert result.reason == f"{pattern}: no file matches this pattern"


def test_a_stem_folder_that_is_a_file_is_named_as_such(separator_2stems, library, tmp_path):
    # Where a file's stems would go is a regular file: its error names that, not the
    # hidden record of finished stems in it (which cannot exist there); others go on.
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("a file where the stem folder of a.wav would go")
    report = _separate(separator_2stems, [library / "a.wav", library / "sub" / "b.flac"], out)
    assert [r.status for r in report.results] == ["failed", "done"]
    reason = report.failed[0].reason
    assert "is not a directory" in reason and ".splitstems.json" not in reason, reason

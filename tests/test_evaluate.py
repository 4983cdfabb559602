"""Evaluation: MUSDB reading, track scores, records and resume, the CLI end to end."""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from splitstems import audio
from splitstems.cli import main
from splitstems.errors import AudioError, ConfigError, OutputError, SplitstemsError
from splitstems.evaluate import (
    DatasetError,
    evaluate,
    find_tracks,
    reference_for,
    score_track,
    summarize,
)

TWO_TRACKS = ["BKS - Too Much", "Buitraker - Revo X"]


@pytest.fixture(scope="module")
def musdb(shared_dir: Path) -> Path:
    return shared_dir / "audio" / "musdb7"


def test_finds_the_shared_previews(musdb):
    tracks = find_tracks(musdb, "test")
    assert len(tracks) == 15 and tracks[0].name == "BKS - Too Much"
    assert not tracks[0].is_wav
    assert [t.name for t in find_tracks(musdb, "test", names=TWO_TRACKS)] == TWO_TRACKS
    with_suffix = [f"{TWO_TRACKS[0]}.stem.mp4", TWO_TRACKS[1]]
    assert [t.name for t in find_tracks(musdb, "test", names=with_suffix)] == TWO_TRACKS
    # one unknown name among known ones is an error, not a smaller median
    with pytest.raises(DatasetError, match="no track named 'nothing', 'typo'$"):
        find_tracks(musdb, "test", names=["typo", TWO_TRACKS[0], "nothing"])
    with pytest.raises(DatasetError, match="no such folder.*holds tracks itself"):
        find_tracks(musdb / "test", "test")
    with pytest.raises(DatasetError, match="no MUSDB tracks"):
        find_tracks(musdb.parent, "examples")


def test_perfect_estimate_scores_far_higher_than_the_mixture(musdb):
    track = find_tracks(musdb, "test", names=["BKS - Too Much"])[0]
    mixture, sources = track.load_all()
    mixture, sources = mixture[:132300], {k: v[:132300] for k, v in sources.items()}
    truth = {k: reference_for(k, sources) for k in ("vocals", "accompaniment")}
    # a perfect separation as a 16-bit file would hold it (exact zeros give +inf → NaN)
    perfect = {k: np.round(v * 32768) / 32768 for k, v in truth.items()}
    lazy = {k: mixture.copy() for k in truth}
    best = summarize({"t": score_track(perfect, sources)}).scores
    worst = summarize({"t": score_track(lazy, sources)}).scores
    assert best["vocals"]["SDR"] > 60 and best["accompaniment"]["SDR"] > 60
    assert best["vocals"]["SDR"] > worst["vocals"]["SDR"] + 50
    assert worst["vocals"]["SDR"] < 0 < worst["accompaniment"]["SDR"]


@pytest.mark.usefixtures("use_shared_models")
def test_evaluate_command_on_two_previews(musdb, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", "--mus_dir", str(musdb), "-o", str(out), "--tracks", *TWO_TRACKS])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| vocals |" in printed and "| accompaniment |" in printed
    files = sorted((out / "test").glob("*.json"))
    assert [f.stem for f in files] == TWO_TRACKS
    for path in files:
        data = json.loads(path.read_text())
        assert data["museval_version"]
        assert [t["name"] for t in data["targets"]] == ["vocals", "accompaniment"]
        for target in data["targets"]:
            frames = target["frames"]
            assert len(frames) == 6  # 6.8 s previews: 6 whole 1 s windows, as museval
            assert [f["time"] for f in frames] == [float(i) for i in range(6)]
            assert all(f["duration"] == 1.0 for f in frames)
            assert all(set(f["metrics"]) == {"SDR", "SIR", "SAR", "ISR"} for f in frames)
        vocals = np.nanmedian([f["metrics"]["SDR"] for f in data["targets"][0]["frames"]])
        assert 0.0 < vocals < 20.0, path.stem
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["tracks"] == 2 and summary["settings"]["mwf"] is False
    assert 0.0 < summary["scores"]["vocals"]["SDR"] < 20.0
    assert set(summary["tracks"]) == set(TWO_TRACKS)


def test_evaluate_command_reports_a_missing_dataset(tmp_path, capsys):
    code = main(["evaluate", "--mus_dir", str(tmp_path), "-o", str(tmp_path / "out")])
    assert code == 2
    assert "no such folder" in capsys.readouterr().err


def write_hq_track(root: Path, name: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A MUSDB18-HQ track folder of 2.5 s of noise per source (16-bit WAV)."""
    folder = root / "test" / name
    sources = {
        k: (rng.uniform(-0.2, 0.2, (110_250, 2)) * 32768).round() / 32768
        for k in ("drums", "bass", "other", "vocals")
    }
    for k, v in sources.items():
        audio.save(folder / f"{k}.wav", v.astype(np.float32), sample_rate=44100)
    audio.save(folder / "mixture.wav", sum(sources.values()).astype(np.float32), sample_rate=44100)
    return sources


def test_hq_folders_and_5_stems_without_piano_truth(tmp_path, rng):
    truth = {name: write_hq_track(tmp_path, name, rng) for name in ("A", "B")}
    tracks = find_tracks(tmp_path, "test")
    assert [t.name for t in tracks] == ["A", "B"] and tracks[0].is_wav
    mixture, sources = tracks[0].load_all()
    np.testing.assert_allclose(sources["vocals"], truth["A"]["vocals"], atol=1e-7)
    accompaniment = reference_for("accompaniment", sources)
    np.testing.assert_allclose(accompaniment, mixture - sources["vocals"], atol=1e-6)
    assert reference_for("piano", sources) is None

    def five_stems(mix: np.ndarray) -> dict[str, np.ndarray]:
        track = "A" if np.allclose(mix, sum(truth["A"].values()), atol=1e-4) else "B"
        found = {k: v + 0.01 for k, v in truth[track].items()}
        return {"vocals": found["vocals"], "piano": mix * 0, **found}

    summary = evaluate(five_stems, tmp_path, tmp_path / "out", progress=False)
    assert summary.unscored == ["piano"]
    assert list(summary.scores) == ["vocals", "drums", "bass", "other"]
    # noise of power 0.2²/3 against an error of 0.01²: 21.2 dB
    assert all(20.5 < summary.scores[k]["SDR"] < 22 for k in summary.scores)
    data = json.loads((tmp_path / "out" / "test" / "A.json").read_text())
    assert [t["name"] for t in data["targets"]] == ["vocals", "drums", "bass", "other"]
    assert len(data["targets"][0]["frames"]) == 2


def test_a_bad_track_does_not_stop_the_others(tmp_path, rng):
    truth = write_hq_track(tmp_path, "A good", rng)
    write_hq_track(tmp_path, "B no vocals", rng)
    (tmp_path / "test" / "B no vocals" / "vocals.wav").unlink()
    write_hq_track(tmp_path, "C fails to separate", rng)
    (tmp_path / "test" / "D corrupt.stem.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" * 50)
    out = tmp_path / "out"
    (out / "test").mkdir(parents=True)
    (out / "test" / "B no vocals.json").write_text("{}")  # a stale result of an earlier run
    reported: list[str] = []

    def separate(mix: np.ndarray) -> dict[str, np.ndarray]:
        if not np.allclose(mix, sum(truth.values()), atol=1e-4):
            raise ConfigError("the model cannot take this input")
        return {"vocals": truth["vocals"] + 0.01, "accompaniment": mix - truth["vocals"]}

    summary = evaluate(
        separate,
        tmp_path,
        out,
        progress=False,
        on_failure=lambda track, message: reported.append(message),
    )
    assert list(summary.tracks) == ["A good"]
    assert list(summary.failed) == ["B no vocals", "C fails to separate", "D corrupt"]
    assert reported == list(summary.failed.values())
    b, c, d = (summary.failed[k] for k in summary.failed)
    assert "no vocals.wav" in b and str(tmp_path / "test" / "B no vocals") in b
    assert c == f"{tmp_path / 'test' / 'C fails to separate'}: the model cannot take this input"
    assert str(tmp_path / "test" / "D corrupt.stem.mp4") in d and "\n" not in d
    assert sorted(p.name for p in (out / "test").iterdir()) == ["A good.json"]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["failed"] == summary.failed and saved["settings"]["tracks"] == 4
    assert 20.5 < saved["scores"]["vocals"]["SDR"] < 22


@pytest.mark.usefixtures("use_shared_models")
def test_evaluate_command_goes_on_after_a_corrupt_track_and_exits_1(tmp_path, rng, capsys):
    write_hq_track(tmp_path, "good", rng)
    (tmp_path / "test" / "broken.stem.mp4").write_bytes(b"not a video at all" * 100)
    out = tmp_path / "out"
    (out / "test").mkdir(parents=True)
    (out / "test" / "older run.json").write_text("{}")
    code = main(["evaluate", "--mus_dir", str(tmp_path), "-o", str(out)])
    assert code == 1
    captured = capsys.readouterr()
    assert "| vocals |" in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(tmp_path / "test" / "broken.stem.mp4") in errors[0]
    assert "1 of 2 tracks failed" in captured.err
    assert "also holds 1 result file(s) of other tracks, e.g. 'older run.json'" in captured.err
    assert sorted(p.name for p in (out / "test").iterdir()) == ["good.json", "older run.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["mask_extension"] == "zeros" and list(summary["failed"]) == [
        "broken"
    ]


@pytest.mark.usefixtures("use_shared_models")
def test_evaluate_command_refuses_an_unwritable_output_before_separating(tmp_path, rng, capsys):
    write_hq_track(tmp_path, "good", rng)
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    for output in (blocker, blocker / "sub"):
        code = main(["evaluate", "--mus_dir", str(tmp_path), "-o", str(output)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: {blocker}")
        assert "exists and is not a folder" in err or "cannot write there (Not a directory)" in err
    assert main(["evaluate", "--mus_dir", str(tmp_path), "-o", ""]) == 2
    assert capsys.readouterr().err == "error: -o/--output_path is empty\n"
    assert blocker.read_text() == "x"


def test_two_tracks_of_one_name_are_refused(tmp_path, rng):
    write_hq_track(tmp_path, "Same", rng)
    write_hq_track(tmp_path, "Other", rng)
    (tmp_path / "test" / "Same.stem.mp4").write_bytes(b"x")
    with pytest.raises(DatasetError, match="two tracks named 'Same'"):
        find_tracks(tmp_path, "test")
    assert [t.name for t in find_tracks(tmp_path, "test", names=["Other"])] == ["Other"]


def test_a_folder_of_stems_without_mixture_is_a_failed_track(tmp_path, rng):
    write_hq_track(tmp_path, "A", rng)
    write_hq_track(tmp_path, "B", rng)
    (tmp_path / "test" / "B" / "mixture.wav").unlink()
    (tmp_path / "test" / "not a track").mkdir()
    summary = evaluate(lambda mix: {"vocals": mix, "accompaniment": mix * 0.5}, tmp_path)
    assert list(summary.tracks) == ["A"] and list(summary.failed) == ["B"]
    assert summary.failed["B"].endswith("B: no mixture.wav")
    for path in (tmp_path / "test" / "A").iterdir():  # FLAC stems: a failed track, with a hint
        path.rename(path.with_suffix(".flac"))
    summary = evaluate(lambda mix: {"vocals": mix, "accompaniment": mix * 0.5}, tmp_path)
    assert summary.failed["A"].endswith("(found mixture.flac; MUSDB18-HQ uses .wav)")


def test_truncated_or_mismatched_stems_fail_the_track(tmp_path, rng, musdb):
    write_hq_track(tmp_path, "short vocals", rng)
    vocals = tmp_path / "test" / "short vocals" / "vocals.wav"
    audio.save(vocals, audio.load(vocals)[:88_200], sample_rate=44100)
    preview = (musdb / "test" / "BKS - Too Much.stem.mp4").read_bytes()
    (tmp_path / "test" / "cut.stem.mp4").write_bytes(preview[: len(preview) // 3])
    write_hq_track(tmp_path, "cut drums", rng)
    drums = tmp_path / "test" / "cut drums" / "drums.wav"
    drums.write_bytes(drums.read_bytes()[:300_000])  # a WAV cut mid-data: its header says 2.5 s
    cut, cut_drums, short = find_tracks(tmp_path, "test")
    lengths = r"stems differ in length \(mixture 2.50 s, .*vocals 2.00 s"
    with pytest.raises(DatasetError, match=lengths):
        short.load_all()
    # one truncation check for evaluate and separate: the audio layer's
    truncated = r"cut\.stem\.mp4: truncated: decodes to 2\.41\d s of the 6\.800 s its header gives$"
    with pytest.raises(AudioError, match=truncated):
        cut.load_all()
    truncated_wav = r"drums\.wav: truncated: decodes to 1\.700 s of the 2\.500 s its header gives$"
    with pytest.raises(AudioError, match=truncated_wav):
        cut_drums.load_all()
    summary = evaluate(lambda mix: {"vocals": mix, "accompaniment": mix}, tmp_path)
    assert sorted(summary.failed) == ["cut", "cut drums", "short vocals"]
    assert summary.failed["cut drums"].endswith("its header gives")


def test_a_missing_backend_fails_before_any_separation(tmp_path, rng, monkeypatch):
    write_hq_track(tmp_path, "A", rng)
    monkeypatch.setitem(sys.modules, "museval", None)  # import museval -> ImportError
    calls: list[int] = []

    def separate(mix: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(1)
        return {"vocals": mix, "accompaniment": mix}

    with pytest.raises(SplitstemsError, match=r"pip install 'splitstems\[eval\]'"):
        evaluate(separate, tmp_path, tmp_path / "out", backend="museval", progress=False)
    assert calls == [] and not (tmp_path / "out").exists()


def test_summary_json_is_strict_json(tmp_path, rng):
    truth = write_hq_track(tmp_path, "A", rng)
    vocals = truth["vocals"].copy()
    vocals[:88_200] = 0  # sung only after the last whole 1 s window: every window is NaN
    audio.save(tmp_path / "test" / "A" / "vocals.wav", vocals.astype(np.float32), sample_rate=44100)
    mixture = (vocals + truth["drums"] + truth["bass"] + truth["other"]).astype(np.float32)
    audio.save(tmp_path / "test" / "A" / "mixture.wav", mixture, sample_rate=44100)

    def separate(mix: np.ndarray) -> dict[str, np.ndarray]:
        return {"vocals": mix * 0.5, "accompaniment": mix * 0.5}

    summary = evaluate(separate, tmp_path, tmp_path / "out", progress=False)
    assert math.isnan(summary.scores["vocals"]["SDR"])
    text = (tmp_path / "out" / "summary.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    assert data["scores"]["vocals"]["SDR"] is None


def test_resume_scores_only_the_missing_tracks(tmp_path, rng):
    truth = {name: write_hq_track(tmp_path, name, rng) for name in ("A", "B", "C")}
    out = tmp_path / "out"
    separated: list[str] = []

    def separate(mix: np.ndarray) -> dict[str, np.ndarray]:
        name = next(k for k, t in truth.items() if np.allclose(mix, sum(t.values()), atol=1e-4))
        separated.append(name)
        vocals = truth[name]["vocals"]
        return {"vocals": vocals + 0.01, "accompaniment": mix - vocals - 0.01}

    settings = {"model": "test", "mwf": False}
    first = evaluate(separate, tmp_path, out, progress=False, settings=settings)
    assert separated == ["A", "B", "C"]
    assert json.loads((out / "test.settings.json").read_text())["settings"]["mwf"] is False
    (out / "test" / "B.json").unlink()  # as if interrupted before B was written
    (out / "test" / "C.json").write_text('{"targets"')  # or C's file were damaged
    separated.clear()
    again = evaluate(separate, tmp_path, out, progress=False, settings=settings, resume=True)
    assert separated == ["B", "C"] and again.resumed == ["A"]
    assert again.tracks == first.tracks and again.scores == first.scores
    # other settings, or no earlier run: refused before anything is separated
    separated.clear()
    with pytest.raises(DatasetError, match=r"other settings \(mwf false -> true\)"):
        evaluate(
            separate, tmp_path, out, progress=False, settings={**settings, "mwf": True}, resume=True
        )
    with pytest.raises(DatasetError, match="nothing to resume"):
        evaluate(separate, tmp_path, tmp_path / "new", progress=False, resume=True)
    assert separated == []


def _noise_separator(truth: dict[str, dict[str, np.ndarray]], log: list[str]):
    def separate(mix: np.ndarray) -> dict[str, np.ndarray]:
        name = next(k for k, t in truth.items() if np.allclose(mix, sum(t.values()), atol=1e-4))
        log.append(name)
        vocals = truth[name]["vocals"]
        return {"vocals": vocals + 0.01, "accompaniment": mix - vocals - 0.01}

    return separate


def test_resume_keeps_only_results_of_its_own_settings(tmp_path, rng):
    truth = {name: write_hq_track(tmp_path, name, rng) for name in ("A", "B", "C")}
    out = tmp_path / "out"
    log: list[str] = []
    separate = _noise_separator(truth, log)
    evaluate(separate, tmp_path, out, progress=False, settings={"mwf": False})
    # a run with other settings that stopped after one track, then resumed
    evaluate(separate, tmp_path, out, tracks=["A"], progress=False, settings={"mwf": True})
    log.clear()
    summary = evaluate(separate, tmp_path, out, progress=False, settings={"mwf": True}, resume=True)
    assert summary.resumed == ["A"] and log == ["B", "C"]
    # the same track names in another dataset (MUSDB18 vs -HQ, previews vs songs)
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "test", other / "test")
    with pytest.raises(DatasetError, match=r"other settings \(mus_dir "):
        evaluate(separate, other, out, progress=False, settings={"mwf": True}, resume=True)
    # the model's name as typed does not matter when its sha256 is there
    sha = {"model": "a.json", "model_sha256": "0123"}
    evaluate(separate, tmp_path, out, tracks=["A"], progress=False, settings=sha)
    log.clear()
    summary = evaluate(
        separate, tmp_path, out, progress=False, settings={**sha, "model": "./a.json"}, resume=True
    )
    assert summary.resumed == ["A"] and log == ["B", "C"]
    record = out / "test.settings.json"
    record.write_text(record.read_text().replace('"unscored": []', '"unscored": 5'))
    with pytest.raises(DatasetError, match="not a record of a splitstems evaluation"):
        evaluate(separate, tmp_path, out, progress=False, settings=sha, resume=True)


@pytest.mark.parametrize(
    "damage",
    [
        '{"targets": [{"name": "vocals"}]}',
        '{"targets": [{"frames": [{"metrics": {}}]}]}',
        '{"targets": "x"}',
        "only vocals",
        "no frames",
        '{"targets": []}',
        "",
    ],
)
def test_resume_redoes_incomplete_results(tmp_path, rng, damage):
    truth = {name: write_hq_track(tmp_path, name, rng) for name in ("A", "B")}
    out = tmp_path / "out"
    log: list[str] = []
    first = evaluate(_noise_separator(truth, log), tmp_path, out, progress=False)
    path = out / "test" / "B.json"
    data = json.loads(path.read_text())
    if damage == "only vocals":
        data["targets"] = data["targets"][:1]
    elif damage == "no frames":
        for target in data["targets"]:
            target["frames"] = []
    path.write_text(json.dumps(data) if damage in ("only vocals", "no frames") else damage)
    log.clear()
    again = evaluate(_noise_separator(truth, log), tmp_path, out, progress=False, resume=True)
    assert log == ["B"] and again.scores == first.scores


def test_unwritable_results_fail_their_track_or_are_reported(tmp_path, rng):
    truth = {name: write_hq_track(tmp_path, name, rng) for name in ("A", "B")}
    out = tmp_path / "out"
    (out / "test" / "A.json").mkdir(parents=True)  # A's result cannot be written
    (out / "summary.json").mkdir()
    summary = evaluate(_noise_separator(truth, []), tmp_path, out, progress=False)
    assert list(summary.tracks) == ["B"] and list(summary.failed) == ["A"]
    assert "A.json: cannot write" in summary.failed["A"]
    assert summary.write_error is not None and "summary.json: cannot write" in summary.write_error
    assert summary.scores["vocals"]["SDR"] > 20  # the scores are not lost
    (out / "test.settings.json").unlink()
    (out / "test.settings.json").mkdir()
    log: list[str] = []
    with pytest.raises(OutputError, match="test.settings.json: cannot write"):
        evaluate(_noise_separator(truth, log), tmp_path, out, progress=False)
    assert log == []


def test_summary_is_median_over_frames_then_tracks():
    def track(values: list[float]) -> dict:
        frames = [
            {"time": i, "duration": 1, "metrics": dict.fromkeys(("SDR", "SIR", "ISR", "SAR"), v)}
            for i, v in enumerate(values)
        ]
        return {"targets": [{"name": "vocals", "frames": frames}]}

    summary = summarize(
        {"a": track([1.0, 2.0, math.nan]), "b": track([5.0, 7.0, 9.0]), "c": track([0.0])}
    )
    assert summary.tracks["a"]["vocals"]["SDR"] == 1.5
    assert summary.scores["vocals"]["SDR"] == 1.5  # median of 1.5, 7, 0
    assert "| vocals | 1.50 |" in summary.table()


def test_an_interrupt_keeps_finished_results_and_ends_the_scoring_threads(tmp_path, rng):
    truth = {name: write_hq_track(tmp_path, name, rng) for name in ("A", "B", "C")}
    out = tmp_path / "out"
    log: list[str] = []
    separate = _noise_separator(truth, log)

    def stopped_at_c(mix: np.ndarray) -> dict[str, np.ndarray]:
        if len(log) == 2:  # A is scored (one job at a time), B maybe
            raise KeyboardInterrupt
        return separate(mix)

    with pytest.raises(KeyboardInterrupt):
        evaluate(stopped_at_c, tmp_path, out, progress=False)
    for thread in threading.enumerate():  # the fast backend's threads stop at their next step
        if thread.name.startswith("splitstems-eval"):
            thread.join(timeout=60)
            assert not thread.is_alive()
    done = json.loads((out / "test.settings.json").read_text())["done"]
    assert done[0] == "A" and "C" not in done
    assert sorted(p.stem for p in (out / "test").glob("*.json")) == done
    log.clear()
    summary = evaluate(separate, tmp_path, out, progress=False, resume=True)
    assert summary.resumed == done and log == [n for n in "ABC" if n not in done]
    assert sorted(summary.tracks) == ["A", "B", "C"] and not summary.failed


def test_a_killed_scoring_process_is_replaced(tmp_path, rng):
    pytest.importorskip("museval")
    truth = {name: write_hq_track(tmp_path, name, rng) for name in ("A", "B", "C")}
    log: list[str] = []
    separate = _noise_separator(truth, log)
    killed: list[int] = []

    def separate_and_kill(mix: np.ndarray) -> dict[str, np.ndarray]:
        estimates = separate(mix)
        if len(log) == 2:  # as the kernel does when memory runs out, while A is scored
            for worker in multiprocessing.active_children():
                worker.kill()
                worker.join()
                killed.append(worker.pid)
        return estimates

    summary = evaluate(separate_and_kill, tmp_path, tmp_path / "out", backend="museval", jobs=1)
    # one scoring process was killed and is gone (whoever reaped it first: this join or
    # the pool's own watcher, which makes the exit code a race to read)
    assert len(killed) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)
    assert summary.failed == {} and sorted(summary.tracks) == ["A", "B", "C"]


def _musdb_with_a_long_track(root: Path, musdb: Path, seconds: float) -> None:
    """Two previews (links) around a long MUSDB18-HQ track (a preview repeated)."""
    test = root / "test"
    (test / "B long").mkdir(parents=True)
    (test / "A short.stem.mp4").symlink_to(musdb / "test" / "BKS - Too Much.stem.mp4")
    (test / "C short.stem.mp4").symlink_to(musdb / "test" / "Hollow Ground - Ill Fate.stem.mp4")
    preview = find_tracks(musdb, "test", names=["Buitraker - Revo X"])[0]
    n = int(seconds * 44100)
    for name in ("mixture", "drums", "bass", "other", "vocals"):
        x = preview.load(name)
        audio.save(test / "B long" / f"{name}.wav", np.resize(x, (n, 2)), sample_rate=44100)


class _Evaluation:
    """``splitstems evaluate --verbose`` in a session of its own; stderr read as it comes."""

    def __init__(self, env: dict[str, str], *args: object) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "splitstems", "evaluate", "--verbose", *map(str, args)],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def wait_for(self, ready: Callable[[], bool]) -> None:
        for _ in range(6000):  # 5 minutes
            if ready():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.proc.kill()
        raise AssertionError(f"never ready: {self.finish()}")

    def finish(self) -> tuple[int, str, list[str]]:
        """Wait for the end; return the exit code, stdout and stderr without log lines."""
        try:
            code = self.proc.wait(timeout=600)
        finally:
            self.proc.kill()
        assert self.proc.stdout is not None
        stdout = self.proc.stdout.read()
        self.reader.join()
        return code, stdout, [line for line in self.lines if not line.startswith("info: ")]

    def stop(self, signum: int, *, group: bool = False) -> tuple[int, str, list[str], float]:
        """Send ``signum`` (to the whole process group, as a terminal's Ctrl-C does)."""
        start = time.monotonic()
        if group:
            os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)
        code, stdout, stderr = self.finish()
        return code, stdout, stderr, time.monotonic() - start


# museval scores the 50 s track in 10 s on an idle machine, 20-40 s on a loaded one; stopped,
# evaluate ends in 0.3-0.4 s (2 cores, load 10): the bound proves it waits for no job
STOPS_WITHIN_S = 5.0


@pytest.mark.slow
def test_a_signal_while_museval_scores_ends_evaluate_at_once(musdb, tmp_path, model_env):
    pytest.importorskip("museval")
    _musdb_with_a_long_track(tmp_path / "mus", musdb, seconds=50)
    out = tmp_path / "out"
    args = ("--mus_dir", tmp_path / "mus", "-o", out, "--backend", "museval", "--jobs", "2")
    record = out / "test.settings.json"

    def recorded() -> list[str]:
        with contextlib.suppress(OSError):
            return json.loads(record.read_text())["done"]
        return []

    # SIGTERM while the long track is scored, once the first one's result is recorded
    run = _Evaluation(model_env, *args)
    run.wait_for(lambda: run.logged("B long: scoring") and "A short" in recorded())
    code, stdout, stderr, seconds = run.stop(signal.SIGTERM)
    assert (code, stdout, stderr) == (143, "", ["terminated"]) and seconds < STOPS_WITHIN_S
    assert "A short" in recorded() and "B long" not in recorded()
    # Ctrl-C in a terminal: SIGINT to the process group, museval's workers included
    run = _Evaluation(model_env, *args, "--resume")
    run.wait_for(lambda: run.logged("B long: scoring"))
    code, stdout, stderr, seconds = run.stop(signal.SIGINT, group=True)
    assert (code, stdout, stderr) == (130, "", ["interrupted"]) and seconds < STOPS_WITHIN_S
    assert not run.logged("A short: scoring")  # kept from the first run
    # and resumed to the end
    code, stdout, stderr = _Evaluation(model_env, *args, "--resume").finish()
    assert code == 0 and stderr == [] and "| vocals |" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert "A short" in summary["resumed"] and not summary["failed"]
    assert sorted(summary["tracks"]) == ["A short", "B long", "C short"]

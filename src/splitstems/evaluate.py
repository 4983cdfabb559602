"""The MUSDB18 runner: tracks, their truth, separation, scores per track, a summary.

- Datasets: MUSDB18 (``<root>/{train,test}/*.stem.mp4``, audio streams 0 mixture,
  1 drums, 2 bass, 3 other, 4 vocals) and MUSDB18-HQ (``<root>/{train,test}/<track>/``
  with ``mixture.wav``, ``drums.wav``, ``bass.wav``, ``other.wav``, ``vocals.wav``).
- Truth per model instrument: vocals, drums, bass and other are the stems; the 2-stem
  models' accompaniment is drums + bass + other (musdb's definition); piano (5 stems)
  has no truth in MUSDB and is not scored.
- Metrics: BSSEval v4 as museval computes it, from :mod:`splitstems.metrics` (tracks are
  scored like ``museval.eval_mus_track``).
- Output: one JSON per track in museval's layout (``<out>/<subset>/<track>.json``, readable
  by ``museval.EvalStore.add_eval_dir``), a record of the run's settings and finished
  tracks (``<out>/<subset>.settings.json``, for ``resume``), and a summary: the median
  over frames per track, then the median over tracks (the SiSEC 2018 protocol), per
  instrument and metric.
- Scoring runs beside the separation of the next tracks: in threads for the fast
  backend, in worker processes for museval's (pure Python and numpy: processes run in
  parallel, and can be ended). Stopped early (Ctrl-C, an error), :func:`evaluate` cancels
  the queued jobs and returns without waiting for the running ones: museval's workers are
  terminated, the fast backend's threads stop at their next step.

Needs scipy (``pip install 'splitstems[eval]'``, which also brings ``museval`` itself
for ``backend="museval"``: museval computes everything, about 2x slower on 2 sources).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import (
    BrokenExecutor,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splitstems import audio
from splitstems.errors import OutputError, SplitstemsError
from splitstems.files import atomic_write
from splitstems.metrics import METRICS, TARGET_ORDER, check_backend, score_targets

log = logging.getLogger(__name__)

__all__ = [
    "SOURCES",
    "SAMPLE_RATE",
    "DatasetError",
    "Track",
    "find_tracks",
    "reference_for",
    "score_track",
    "Summary",
    "summarize",
    "load_summary",
    "check_resume",
    "evaluate",
]

#: MUSDB's sources, in the order of the streams 1..4 of a ``.stem.mp4``.
SOURCES = ("drums", "bass", "other", "vocals")
_STREAMS = {"mixture": 0, "drums": 1, "bass": 2, "other": 3, "vocals": 4}
#: MUSDB's sample rate: tracks are decoded, separated and scored at it.
SAMPLE_RATE = 44100
#: Largest difference (seconds) tolerated between the stems' lengths (codec priming and
#: padding are ~50 ms); the audio layer's, which also finds truncated files with it.
LENGTH_TOLERANCE = audio.LENGTH_TOLERANCE


class DatasetError(SplitstemsError):
    """A MUSDB folder has no tracks, or a track lacks a stem."""


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class Track:
    """One MUSDB track: a ``.stem.mp4`` file or a MUSDB18-HQ folder of WAV files."""

    name: str
    subset: str
    path: Path

    @property
    def is_wav(self) -> bool:
        """Whether this is a MUSDB18-HQ folder."""
        return self.path.is_dir()

    def load(self, source: str = "mixture") -> np.ndarray:
        """Decode ``source`` ("mixture", "drums", "bass", "other", "vocals") at 44.1 kHz."""
        if source not in _STREAMS:
            raise ValueError(f"unknown source {source!r}")
        if self.is_wav:
            path = self.path / f"{source}.wav"
            if not path.is_file():
                others = sorted(p.name for p in self.path.glob(f"{source}.*"))
                hint = f" (found {', '.join(others)}; MUSDB18-HQ uses .wav)" if others else ""
                raise DatasetError(f"{self.path}: no {source}.wav{hint}")
            return audio.load(path, sample_rate=SAMPLE_RATE)
        return audio.load(self.path, stream=_STREAMS[source], sample_rate=SAMPLE_RATE)

    def load_all(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Return the mixture and the four sources, cut to a common length.

        Raises:
            AudioError: a file decodes shorter than its header says (truncated: the
                audio layer checks every stream it reads to the end).
            DatasetError: the stems' lengths differ by more than :data:`LENGTH_TOLERANCE`.
        """
        mixture = self.load("mixture")
        sources = {name: self.load(name) for name in SOURCES}
        self._check_lengths({"mixture": mixture, **sources})
        n = min(x.shape[0] for x in [mixture, *sources.values()])
        return mixture[:n], {k: v[:n] for k, v in sources.items()}

    def _check_lengths(self, decoded: dict[str, np.ndarray]) -> None:
        seconds = {k: v.shape[0] / SAMPLE_RATE for k, v in decoded.items()}
        if max(seconds.values()) - min(seconds.values()) > LENGTH_TOLERANCE:
            lengths = ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items())
            raise DatasetError(f"{self.path}: the stems differ in length ({lengths})")


def find_tracks(
    root: str | os.PathLike[str], subset: str = "test", *, names: Sequence[str] | None = None
) -> list[Track]:
    """List the tracks of ``root/subset`` (MUSDB18 or MUSDB18-HQ), sorted by name.

    ``names`` keeps only those tracks (by name). Raises :class:`DatasetError` when none
    is found.
    """
    folder = Path(root) / subset
    if not folder.is_dir():
        hint = ""
        if Path(root).is_dir() and _tracks_in(Path(root), subset):
            hint = f"; {root} holds tracks itself: give the folder above it as --mus_dir"
        raise DatasetError(f"{folder}: no such folder (expected MUSDB18's train/ and test/){hint}")
    tracks = _tracks_in(folder, subset)
    if not tracks:
        raise DatasetError(
            f"{folder}: no MUSDB tracks (*.stem.mp4 files, or folders of mixture.wav, "
            "drums.wav, bass.wav, other.wav, vocals.wav)"
        )
    if names is not None:
        wanted = {_track_name(n) for n in names}
        missing = sorted(wanted - {t.name for t in tracks})
        if missing:
            raise DatasetError(f"{folder}: no track named {', '.join(repr(n) for n in missing)}")
        tracks = [t for t in tracks if t.name in wanted]
    seen: dict[str, Track] = {}
    for track in tracks:
        if track.name in seen:
            raise DatasetError(
                f"{folder}: two tracks named {track.name!r} ({seen[track.name].path.name} "
                f"and {track.path.name}); keep one"
            )
        seen[track.name] = track
    return tracks


def _track_name(name: str) -> str:
    """Return a track name given with or without ``.stem.mp4`` as the bare name."""
    return name[: -len(".stem.mp4")] if name.endswith(".stem.mp4") else name


def _tracks_in(folder: Path, subset: str) -> list[Track]:
    """List the ``.stem.mp4`` files and MUSDB18-HQ folders directly in ``folder``."""
    tracks = [
        Track(_track_name(path.name), subset, path)
        for path in folder.glob("*.stem.mp4")
        if path.is_file()
    ]
    # a -HQ folder with any stem is a track (one without mixture.wav then fails loudly)
    tracks += [
        Track(path.name, subset, path)
        for path in folder.iterdir()
        if path.is_dir() and any(any(path.glob(f"{stem}.*")) for stem in _STREAMS)
    ]
    return sorted(tracks, key=lambda t: (t.name, t.path.name))


def reference_for(instrument: str, sources: dict[str, np.ndarray]) -> np.ndarray | None:
    """Return the true signal of a model instrument, or None where MUSDB has none (piano)."""
    if instrument in sources:
        return sources[instrument]
    if instrument == "accompaniment":
        return sources["drums"] + sources["bass"] + sources["other"]
    return None


def score_track(
    estimates: dict[str, np.ndarray],
    sources: dict[str, np.ndarray],
    *,
    window: float = 1.0,
    hop: float = 1.0,
    backend: str = "fast",
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Score one MUSDB track's estimates like ``museval.eval_mus_track``; return its JSON dict.

    ``estimates`` maps model instruments to ``(n_samples, 2)`` arrays, ``sources`` holds
    the track's four stems (:meth:`Track.load_all`); instruments without a truth in MUSDB
    (piano) are skipped. See :func:`splitstems.metrics.score_targets`.
    """
    return score_targets(
        estimates,
        _references(estimates, sources),
        sample_rate=SAMPLE_RATE,
        window=window,
        hop=hop,
        backend=backend,
        device=device,
    )


def _references(
    estimates: dict[str, np.ndarray], sources: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Return the truth of each estimated instrument that has one."""
    found = {k: reference_for(k, sources) for k in estimates}
    return {k: v for k, v in found.items() if v is not None}


# --------------------------------------------------------------------------- summary


def _nanmedian(values: Sequence[float]) -> float:
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0 or np.isnan(data).all():
        return math.nan
    return float(np.nanmedian(data))


@dataclass
class Summary:
    """Scores of an evaluation: per track (median over frames) and overall.

    ``tracks[track][target][metric]`` is the median over the track's frames;
    ``scores[target][metric]`` the median of those over tracks (SiSEC 2018).
    """

    tracks: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    unscored: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)
    write_error: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    elapsed: float = 0.0

    def table(self) -> str:
        """Return the summary as a Markdown table (targets × metrics, dB)."""
        lines = [
            "| target | " + " | ".join(METRICS) + " |",
            "|---|" + "---:|" * len(METRICS),
        ]
        for target, values in self.scores.items():
            cells = " | ".join(f"{values.get(m, math.nan):.2f}" for m in METRICS)
            lines.append(f"| {target} | {cells} |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (NaN where nothing could be scored)."""
        return {
            "protocol": "BSSEval v4 (museval), 1 s windows; median over frames, "
            "then median over tracks",
            "scores": self.scores,
            "tracks": self.tracks,
            "unscored": self.unscored,
            "failed": self.failed,
            "resumed": self.resumed,
            "settings": self.settings,
            "elapsed_s": round(self.elapsed, 2),
        }


def summarize(track_scores: dict[str, dict[str, Any]]) -> Summary:
    """Aggregate museval track dicts (track name → JSON dict) as SiSEC 2018 does."""
    summary = Summary()
    for track, scores in track_scores.items():
        per_target: dict[str, dict[str, float]] = {}
        for target in scores["targets"]:
            per_target[target["name"]] = {
                metric: _nanmedian([float(f["metrics"][metric]) for f in target["frames"]])
                for metric in METRICS
            }
        summary.tracks[track] = per_target
    names: list[str] = []
    for per_target in summary.tracks.values():
        names += [t for t in per_target if t not in names]
    order = {t: i for i, t in enumerate(TARGET_ORDER)}
    for target in sorted(names, key=lambda t: order.get(t, len(order))):
        summary.scores[target] = {
            metric: _nanmedian([v[target][metric] for v in summary.tracks.values() if target in v])
            for metric in METRICS
        }
    return summary


def load_summary(output_dir: str | os.PathLike[str], subset: str = "test") -> Summary:
    """Summarize the per-track JSON files already in ``output_dir/subset``."""
    folder = Path(output_dir) / subset
    scores = {
        path.name[: -len(".json")]: json.loads(path.read_text())
        for path in sorted(folder.glob("*.json"))
    }
    return summarize(scores)


# --------------------------------------------------------------------------- driver


_Loaded = tuple[np.ndarray, dict[str, np.ndarray]]


def _loaded(tracks: Sequence[Track]) -> Iterator[tuple[Track, _Loaded | SplitstemsError]]:
    """Decode each track; a track that cannot be read yields its error instead."""
    for track in tracks:
        try:
            yield track, track.load_all()
        except SplitstemsError as exc:
            yield track, exc


class _Scoring:
    """The scoring jobs of one evaluation, beside the separation of the next tracks.

    The fast backend runs in threads (torch and numpy release the GIL) and stops at its
    next step once :attr:`stop` is set. museval's backend runs in worker processes: it is
    mostly Python, so threads would take turns on the GIL, and a process can be ended in
    the middle of a track. Workers are started with SIGINT blocked and ignore it: a
    Ctrl-C in a terminal (sent to the whole process group) is this process's to handle.
    """

    def __init__(self, backend: str, jobs: int, device: torch.device | str | None) -> None:
        self.backend = backend
        self.jobs = max(1, jobs)
        self.device = device
        self.stop = threading.Event()
        self.pool = self._start()
        self._jobs: dict[Future[dict[str, Any]], tuple[dict[str, np.ndarray], ...]] = {}

    def _start(self) -> Executor:
        if self.backend != "museval":
            return ThreadPoolExecutor(self.jobs, thread_name_prefix="splitstems-eval")
        return ProcessPoolExecutor(
            self.jobs,
            mp_context=multiprocessing.get_context("spawn"),  # this process has threads
            initializer=signal.signal,
            initargs=(signal.SIGINT, signal.SIG_IGN),
        )

    def warm_up(self) -> None:
        """Start museval's workers now: they import it while the first track separates."""
        if isinstance(self.pool, ProcessPoolExecutor):
            for _ in range(self.jobs):
                self._submit(self.pool, check_backend, self.backend)

    @staticmethod
    def _submit(pool: Executor, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Submit to a process pool; a worker it starts inherits SIGINT blocked."""
        if not hasattr(signal, "pthread_sigmask"):
            return pool.submit(fn, *args, **kwargs)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return pool.submit(fn, *args, **kwargs)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def submit(
        self, estimates: dict[str, np.ndarray], references: dict[str, np.ndarray]
    ) -> Future[dict[str, Any]]:
        """Start scoring one track (:func:`splitstems.metrics.score_targets`)."""
        if self.backend != "museval":
            return self.pool.submit(
                score_targets,
                estimates,
                references,
                sample_rate=SAMPLE_RATE,
                backend=self.backend,
                device=self.device,
                stop=self.stop,
            )
        args = (score_targets, estimates, references)
        kwargs = {"sample_rate": SAMPLE_RATE, "backend": self.backend}
        try:
            future = self._submit(self.pool, *args, **kwargs)
        except BrokenExecutor:  # a worker died (e.g. killed for memory): new workers
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._start()
            future = self._submit(self.pool, *args, **kwargs)
        self._jobs[future] = (estimates, references)
        return future

    def result(self, future: Future[dict[str, Any]]) -> dict[str, Any]:
        """Wait for a job's scores.

        A job whose worker process died (killed for memory, or a job beside it was) runs
        once more, on new workers; a second death raises :class:`BrokenExecutor`.
        """
        job = self._jobs.pop(future, None)
        try:
            return future.result()
        except BrokenExecutor:
            if job is None:
                raise
            log.warning("a scoring process ended unexpectedly (out of memory?); scoring again")
            again = self.submit(*job)
            self._jobs.pop(again)
            return again.result()

    def close(self) -> None:
        """Wait for the workers to end (every job has been collected)."""
        self.pool.shutdown(wait=True)

    def abandon(self) -> None:
        """Cancel the queued jobs and end the running ones, without waiting for them.

        museval's workers are terminated; the fast backend's threads (which cannot be
        killed) stop at their next step: one FFT, solve or batch of windows.
        """
        self.stop.set()
        self._jobs.clear()
        if not isinstance(self.pool, ProcessPoolExecutor):
            self.pool.shutdown(wait=False, cancel_futures=True)
            return
        # ProcessPoolExecutor has no public way to end its workers before Python 3.14
        for process in list((getattr(self.pool, "_processes", None) or {}).values()):
            process.terminate()
        # Its manager thread sees the workers gone, fails their jobs and closes its queues
        # (at once: it stops writing to them); else the resource tracker would print
        # warnings about their semaphores after this process has ended.
        self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _RunRecord:
    """What the per-track results in ``<out>/<subset>`` were computed with, and which.

    Saved as ``<out>/<subset>.settings.json`` when a run starts and after every track,
    so that a resumed run keeps exactly the results computed with its settings.
    """

    path: Path
    settings: dict[str, Any]
    done: list[str] = field(default_factory=list)
    targets: list[str] | None = None
    unscored: list[str] = field(default_factory=list)

    def save(self) -> None:
        """Write the record (whole or not at all)."""
        data = {
            "settings": self.settings,
            "done": self.done,
            "targets": self.targets,
            "unscored": self.unscored,
        }
        atomic_write(self.path, json.dumps(data, indent=2))

    def resumed(self) -> _RunRecord:
        """Return the earlier run's record; raise if there is none or it used other settings."""
        out = self.path.parent
        try:
            earlier = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise DatasetError(f"{out}: nothing to resume (no {self.path.name})") from None
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{self.path}: unreadable ({exc})") from None
        ok = isinstance(earlier, dict) and isinstance(earlier.get("settings"), dict)
        done, targets = (earlier.get("done"), earlier.get("targets")) if ok else (None, None)
        if not (
            ok
            and isinstance(done, list)
            and all(isinstance(n, str) for n in done)
            and (targets is None or isinstance(targets, list))
            and isinstance(earlier.get("unscored", []), list)
        ):
            raise DatasetError(f"{self.path}: not a record of a splitstems evaluation")
        if _compared(earlier["settings"]) != _compared(self.settings):
            old, new = _compared(earlier["settings"]), _compared(self.settings)
            changes = [
                f"{k} {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}"
                for k in sorted({*old, *new})
                if old.get(k) != new.get(k)
            ]
            raise DatasetError(
                f"{out}: cannot resume, the earlier run used other settings "
                f"({', '.join(changes)}); use another output folder"
            )
        unscored = [str(n) for n in earlier.get("unscored") or []]
        return _RunRecord(self.path, self.settings, list(done), targets, unscored)

    def result_path(self, name: str) -> Path:
        """Return where the result of track ``name`` is written: ``<out>/<subset>/name.json``."""
        return self.path.parent / self.settings["subset"] / f"{name}.json"

    def kept(self, tracks: Sequence[Track]) -> dict[str, dict[str, Any]]:
        """Read the results of ``tracks`` this record marks done and that are intact."""
        found: dict[str, dict[str, Any]] = {}
        for track in tracks:
            if track.name not in self.done:
                continue
            try:
                scores = json.loads(self.result_path(track.name).read_text())
            except (OSError, ValueError):
                scores = None
            if _intact(scores, self.targets):
                found[track.name] = scores
            else:  # redone
                self.done.remove(track.name)
        return found

    def add(self, name: str, scores: dict[str, Any]) -> None:
        """Mark ``name`` done with ``scores`` and save."""
        if self.targets is None:
            self.targets = [t["name"] for t in scores["targets"]]
        if name not in self.done:
            self.done.append(name)
        self.save()

    def drop(self, name: str) -> None:
        """Mark ``name`` not done (its result is gone) and save."""
        if name in self.done:
            self.done.remove(name)
            self.save()


def _intact(scores: Any, targets: list[str] | None) -> bool:
    """Whether ``scores`` is a whole museval track result (with ``targets``, if given)."""
    if not isinstance(scores, dict) or not isinstance(scores.get("targets"), list):
        return False
    names = []
    for target in scores["targets"]:
        frames = target.get("frames") if isinstance(target, dict) else None
        if not isinstance(frames, list) or not frames or not isinstance(target.get("name"), str):
            return False
        for frame in frames:
            metrics = frame.get("metrics") if isinstance(frame, dict) else None
            if not isinstance(metrics, dict) or not all(
                isinstance(metrics.get(m), int | float) for m in METRICS
            ):
                return False
        names.append(target["name"])
    return bool(names) and (targets is None or names == targets)


def check_resume(
    output_dir: str | os.PathLike[str],
    mus_dir: str | os.PathLike[str],
    subset: str = "test",
    *,
    backend: str = "fast",
    settings: dict[str, Any] | None = None,
) -> None:
    """Raise :class:`DatasetError` unless ``output_dir`` holds a run to resume with these."""
    run = _run_settings(mus_dir, subset, backend, settings)
    _RunRecord(_record_path(Path(output_dir), subset), run).resumed()


def _run_settings(
    mus_dir: str | os.PathLike[str], subset: str, backend: str, settings: dict[str, Any] | None
) -> dict[str, Any]:
    """Return what a run computes with: dataset, subset, metrics and the caller's settings."""
    dataset = str(Path(mus_dir).resolve())
    return {"mus_dir": dataset, "subset": subset, "backend": backend, **(settings or {})}


def _record_path(out: Path, subset: str) -> Path:
    return out / f"{subset}.settings.json"


def _cannot_write(path: Path, exc: OSError) -> OutputError:
    return OutputError(f"{path}: cannot write ({exc.strerror or exc})")


def _compared(settings: dict[str, Any]) -> dict[str, Any]:
    """Return the settings a resume must match.

    A model's name as typed is not compared when the sha256 of its configuration and
    weights is there (``./a.json`` is ``a.json``).
    """
    if "model_sha256" in settings:
        return {k: v for k, v in settings.items() if k != "model"}
    return settings


def _failure_message(track: Track, exc: Exception) -> str:
    """One line naming the track's file and the problem."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    return message if str(track.path) in message else f"{track.path}: {message}"


def evaluate(
    separate: Callable[[np.ndarray], dict[str, np.ndarray]],
    mus_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str] | None = None,
    *,
    subset: str = "test",
    tracks: Sequence[str] | None = None,
    backend: str = "fast",
    jobs: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
    on_failure: Callable[[Track, str], None] | None = None,
    resume: bool = False,
) -> Summary:
    """Separate and score every track of a MUSDB18(-HQ) subset.

    Args:
        separate: mixture ``(n_samples, 2)`` at 44.1 kHz → instrument → estimate, e.g.
            ``Separator(...).separate``.
        mus_dir: the dataset root (holding ``train/`` and ``test/``).
        output_dir: where to write ``<subset>/<track>.json`` and ``summary.json``
            (None: write nothing).
        subset: "test" or "train".
        tracks: only these track names.
        backend: "fast" (:func:`splitstems.metrics.bss_eval`) or "museval" (museval
            itself, slower).
        jobs: tracks scored at the same time while the next tracks are decoded and
            separated: in threads for the fast backend (torch and numpy release the
            GIL), in worker processes for museval's (started with ``spawn``: a script
            calling this needs the usual ``if __name__ == "__main__":`` guard).
        device: where the torch metrics are computed (default: CPU, float64).
        progress: show a progress bar (tqdm, on stderr).
        settings: recorded in the summary (what was evaluated).
        on_failure: called with the track and a one-line message when a track cannot
            be read, separated or scored; the other tracks go on either way.
        resume: keep the per-track results in ``output_dir`` that an earlier run with
            the same ``subset``, ``backend`` and ``settings`` finished (its record,
            ``<subset>.settings.json``, lists them) and score only the other tracks.

    Raises:
        DatasetError: ``resume`` without a record of an earlier run, or with one of other
            settings (nothing is separated then).
        OutputError: the record cannot be written (nothing is separated then). A
            ``summary.json`` that cannot be written is reported in
            :attr:`Summary.write_error` instead, so that the scores are not lost.

    Returns:
        The :class:`Summary`; instruments without a truth (piano) are listed in
        ``unscored``, tracks that failed in ``failed`` (name → message).

    Stopped by an exception (``KeyboardInterrupt`` from Ctrl-C, or one raised by
    ``separate``), it cancels the queued scoring jobs and re-raises without waiting for
    the running ones: museval's workers are terminated, the fast backend's threads stop
    at their next step (a fraction of a second) in the background. Results finished by
    then are saved and recorded first, so that ``resume`` goes on from there.
    """
    from tqdm.auto import tqdm

    from splitstems.readahead import prefetch

    check_backend(backend)
    selected = find_tracks(mus_dir, subset, names=tracks)
    run = _run_settings(mus_dir, subset, backend, settings)
    out = Path(output_dir) if output_dir is not None else None
    results: dict[str, dict[str, Any]] = {}
    unscored: set[str] = set()
    record: _RunRecord | None = None
    if out is not None:
        record = _RunRecord(_record_path(out, subset), run)
        if resume:
            record = record.resumed()
            results = record.kept(selected)
            unscored.update(record.unscored)
        try:
            (out / subset).mkdir(parents=True, exist_ok=True)
            record.save()
        except OSError as exc:
            raise _cannot_write(record.path, exc) from None
    elif resume:
        raise ValueError("resume needs an output_dir")
    start = time.perf_counter()
    failed: dict[str, str] = {}
    pending: list[tuple[Track, Future[dict[str, Any]]]] = []
    todo = [t for t in selected if t.name not in results]
    scoring = _Scoring(backend, jobs, device)
    bar = tqdm(total=len(selected), unit="track", disable=not progress, desc="evaluate")
    resumed = list(results)
    bar.update(len(resumed))

    def fail(track: Track, exc: Exception) -> None:
        failed[track.name] = message = _failure_message(track, exc)
        if record is not None:  # no stale scores beside this summary
            with contextlib.suppress(OSError):
                record.result_path(track.name).unlink(missing_ok=True)
                record.drop(track.name)
        bar.update(1)
        bar.set_postfix_str(f"{track.name[:20]}: failed", refresh=False)
        if on_failure is not None:
            with tqdm.external_write_mode(file=sys.stderr):
                on_failure(track, message)

    def finish(track: Track, future: Future[dict[str, Any]]) -> None:
        """Save the result of a finished job (waiting for it), or fail its track."""
        try:
            scores = scoring.result(future)
        except (SplitstemsError, ValueError) as exc:
            fail(track, exc)
            return
        except BrokenExecutor:
            fail(track, SplitstemsError("its scoring process ended unexpectedly, twice (memory?)"))
            return
        if record is not None:
            path = record.result_path(track.name)
            try:
                atomic_write(path, json.dumps(scores, indent=2, allow_nan=True))
            except OSError as exc:
                fail(track, _cannot_write(path, exc))
                return
            try:
                record.unscored = sorted(unscored)
                record.add(track.name, scores)
            except OSError as exc:
                fail(track, _cannot_write(record.path, exc))
                return
        results[track.name] = scores
        bar.update(1)
        bar.set_postfix_str(f"{track.name[:20]}: {_postfix(scores)}", refresh=False)

    def collect(limit: int) -> None:
        """Save the finished jobs; wait for the oldest while more than ``limit`` run."""
        for item in [p for p in pending if p[1].done()]:
            pending.remove(item)
            finish(*item)
        while len(pending) > limit:
            finish(*pending.pop(0))

    loader = prefetch(_loaded(todo), depth=1)
    try:
        if todo:
            scoring.warm_up()
        for track, loaded in loader:
            bar.set_description_str(f"evaluate {track.name[:30]}")
            try:
                if isinstance(loaded, SplitstemsError):
                    raise loaded
                mixture, sources = loaded
                estimates = separate(mixture)
            except (SplitstemsError, ValueError) as exc:
                fail(track, exc)
                continue
            references = _references(estimates, sources)
            unscored.update(k for k in estimates if k not in references)
            scored = {k: v for k, v in estimates.items() if k in references}
            log.info("%s: scoring (%s backend)", track.name, backend)
            pending.append((track, scoring.submit(scored, references)))
            collect(max(1, jobs))
        collect(0)
    except BaseException:  # Ctrl-C, SIGTERM, a bug: no waiting for the scoring jobs
        scoring.abandon()
        # keep what was scored already: a resumed run does not redo it
        for item in [p for p in pending if _succeeded(p[1])]:
            with contextlib.suppress(Exception):
                finish(*item)
        raise
    finally:
        loader.close()
        bar.close()
    scoring.close()
    summary = summarize({t.name: results[t.name] for t in selected if t.name in results})
    summary.unscored = sorted(unscored)
    summary.failed = dict(sorted(failed.items()))
    summary.resumed = sorted(resumed)
    summary.elapsed = time.perf_counter() - start
    summary.settings = {**run, "tracks": len(selected)}
    if out is not None:
        path = out / "summary.json"
        try:
            atomic_write(path, json.dumps(_nan_to_none(summary.to_json()), indent=2))
        except OSError as exc:
            summary.write_error = str(_cannot_write(path, exc))
    return summary


def _succeeded(future: Future[Any]) -> bool:
    """Whether ``future`` has finished with a result (not failed, not cancelled)."""
    return future.done() and not future.cancelled() and future.exception() is None


def _nan_to_none(value: Any) -> Any:
    """Replace NaN by None (JSON null) throughout: strict JSON for the summary."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value


def _postfix(scores: dict[str, Any]) -> str:
    for target in scores["targets"]:
        if target["name"] == "vocals":
            sdr = _nanmedian([float(f["metrics"]["SDR"]) for f in target["frames"]])
            return f"vocals SDR {sdr:.2f} dB"
    return ""

"""The web server's jobs: a bounded queue, a small worker pool, files under one temp folder.

Every job lives in its own folder ``<root>/<id>/`` named by a random id (never by anything
a user sent): ``input`` (the upload, as received) and ``stems/<instrument>.wav``. Jobs go
through :class:`~splitstems.separator.Separator` (``separate_to_file``), one separator per
model and settings, loaded the first time a job asks for it and kept; a lock per
separator lets one job at a time use it. Finished jobs are deleted ``keep_seconds`` after
they end; :meth:`JobManager.stop` cancels what runs and removes the whole root.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from splitstems import audio
from splitstems.errors import ModelError, SplitstemsError
from splitstems.separator import Separator

__all__ = [
    "FINAL_STATES",
    "Job",
    "JobGone",
    "JobManager",
    "JobOptions",
    "QueueFull",
    "valid_id",
]

log = logging.getLogger("splitstems.web")

#: States a job does not leave.
FINAL_STATES = frozenset({"done", "failed", "cancelled"})
#: Points of the waveform drawn for each stem.
N_PEAKS = 800
_ID_BYTES = 16
_INPUT = "input"
_STEMS = "stems"


def valid_id(text: str) -> bool:
    """Whether ``text`` has the form of a job id (32 lowercase hex digits)."""
    return len(text) == 2 * _ID_BYTES and all(c in "0123456789abcdef" for c in text)


class QueueFull(SplitstemsError):
    """The queue holds as many jobs as it may; the caller should try again later."""


class JobGone(SplitstemsError):
    """The job was deleted (or expired) while one of its files was being made."""


class _Cancelled(Exception):
    """Raised from the progress callback to stop a running separation."""


@dataclass(frozen=True)
class JobOptions:
    """What a job computes: the model and the quality settings of ``splitstems separate``."""

    model: str = "spleeter:2stems"
    mwf: bool = False
    fast: bool = False

    def separator_kwargs(self) -> dict[str, object]:
        """Return the :class:`Separator` keywords these options stand for."""
        return {"MWF": self.mwf, "precision": "fast" if self.fast else "float32"}


@dataclass(eq=False)
class Job:
    """One uploaded song and what became of it (read by the HTTP layer, written by a worker)."""

    id: str
    name: str
    options: JobOptions
    folder: Path
    duration: float | None = None
    state: str = "queued"
    progress: float = 0.0
    error: str | None = None
    instruments: tuple[str, ...] = ()
    sample_rate: int = 0
    n_samples: int = 0
    peaks: dict[str, list[float]] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    finished: float | None = None
    version: int = 0
    cancel_requested: bool = False

    @property
    def input_path(self) -> Path:
        """Where the upload is stored."""
        return self.folder / _INPUT

    def stem_path(self, instrument: str, codec: str = "wav") -> Path:
        """Return the file of one stem (``instrument`` must be one of :attr:`instruments`)."""
        if instrument not in self.instruments:
            raise KeyError(instrument)
        return self.folder / _STEMS / f"{instrument}.{codec}"

    def touch(self, **changes: object) -> None:
        """Set attributes and bump :attr:`version` (event streams send each version)."""
        for key, value in changes.items():
            setattr(self, key, value)
        self.version += 1

    def to_json(self) -> dict[str, object]:
        """Return the job as the JSON API shows it (no server paths)."""
        data: dict[str, object] = {
            "id": self.id,
            "name": self.name,
            "model": self.options.model,
            "mwf": self.options.mwf,
            "fast": self.options.fast,
            "state": self.state,
            "progress": round(self.progress, 4),
            "duration": self.duration,
            "error": self.error,
            "created": self.created,
            "finished": self.finished,
        }
        if self.state == "done":
            base = f"/api/jobs/{self.id}"
            data["sample_rate"] = self.sample_rate
            data["n_samples"] = self.n_samples
            data["stems"] = [
                {
                    "name": name,
                    "url": f"{base}/stems/{name}",
                    "peaks": self.peaks.get(name, []),
                }
                for name in self.instruments
            ]
            data["zip"] = f"{base}/zip"
            data["mix"] = f"{base}/mix"
        return data


class JobManager:
    """The jobs of one server: create, queue, run, cancel, expire and clean up.

    Args:
        root: folder for the jobs' files (default: a fresh temp folder, removed by
            :meth:`stop`; a given root is emptied but kept).
        workers: separations that may run at the same time.
        queue_size: most jobs queued or running at once; more raise :class:`QueueFull`.
        keep_seconds: how long a finished job's files are kept.
        separator_kwargs: passed to every :class:`Separator` (``model_dir``, ``device``,
            ``threads``...).
        separator_factory: builds a separator (tests or other backends may pass theirs).
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        workers: int = 1,
        queue_size: int = 16,
        keep_seconds: float = 3600.0,
        separator_kwargs: dict[str, object] | None = None,
        separator_factory: Callable[..., Separator] = Separator,
    ) -> None:
        if workers < 1 or queue_size < 1 or keep_seconds <= 0:
            raise ValueError("workers and queue_size must be >= 1, keep_seconds > 0")
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="splitstems-web-")) if root is None else root
        self.root.mkdir(parents=True, exist_ok=True)
        self.n_workers = workers
        self.queue_size = queue_size
        self.keep_seconds = keep_seconds
        self._separator_kwargs = {"progress": False, **(separator_kwargs or {})}
        self._factory = separator_factory
        self._jobs: dict[str, Job] = {}
        self._waiting: list[Job] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._separators: dict[JobOptions, tuple[Separator, threading.Lock]] = {}
        self._separators_lock = threading.Lock()
        #: Models that could not be loaded (their error is in the log); the page marks them.
        self.unavailable: set[str] = set()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the workers and the expiry sweep."""
        for i in range(self.n_workers):
            thread = threading.Thread(target=self._work, name=f"splitstems-web-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        sweeper = threading.Thread(target=self._sweep, name="splitstems-web-expiry", daemon=True)
        sweeper.start()
        self._threads.append(sweeper)

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel running jobs, stop the workers and delete every job's files."""
        self._stopping.set()
        with self._wake:
            for job in self._jobs.values():
                job.cancel_requested = True
            self._wake.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._jobs.clear()
            self._waiting.clear()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            for child in list(self.root.iterdir()):
                shutil.rmtree(child, ignore_errors=True)

    # ------------------------------------------------------------------ jobs

    def new_job(self, name: str, options: JobOptions) -> Job:
        """Make a job and its folder (not queued yet: store the upload, then :meth:`submit`).

        Raises:
            QueueFull: ``queue_size`` jobs are queued or running already.
        """
        with self._lock:
            self._check_room()
            job_id = secrets.token_hex(_ID_BYTES)
            folder = self.root / job_id
            folder.mkdir()
            job = Job(id=job_id, name=name, options=options, folder=folder, state="uploading")
            self._jobs[job_id] = job
        return job

    def submit(self, job: Job, *, duration: float | None) -> None:
        """Queue a job whose upload is stored and checked."""
        with self._wake:
            if job.cancel_requested:  # deleted while its upload was arriving
                return
            job.touch(state="queued", duration=duration)
            self._waiting.append(job)
            self._wake.notify()

    def _check_room(self) -> None:
        busy = sum(job.state not in FINAL_STATES for job in self._jobs.values())
        if busy >= self.queue_size:
            raise QueueFull(
                f"the queue is full ({busy} {'song' if busy == 1 else 'songs'} waiting or "
                "running); try again when one is done"
            )

    def get(self, job_id: str) -> Job | None:
        """Return the job with this id, or None (also for anything that is not an id)."""
        if not valid_id(job_id):
            return None
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        """All jobs, oldest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda job: job.created)

    def delete(self, job_id: str) -> bool:
        """Cancel a job if it runs and delete it with its files; False if there is none."""
        with self._lock:
            job = self._jobs.pop(job_id, None) if valid_id(job_id) else None
            if job is None:
                return False
            if job in self._waiting:
                self._waiting.remove(job)
            running = job.state == "running"
            job.cancel_requested = True
            if job.state not in FINAL_STATES:
                job.touch(state="cancelled", finished=time.time())
        if not running:  # a running job's worker removes the folder when it stops
            shutil.rmtree(job.folder, ignore_errors=True)
        return True

    def discard(self, job: Job) -> None:
        """Forget a job whose upload was refused, and remove its folder."""
        with self._lock:
            self._jobs.pop(job.id, None)
        shutil.rmtree(job.folder, ignore_errors=True)

    # ------------------------------------------------------------------ workers

    def _next(self) -> Job | None:
        with self._wake:
            while not self._waiting and not self._stopping.is_set():
                self._wake.wait()
            if self._stopping.is_set():
                return None
            job = self._waiting.pop(0)
            job.touch(state="running")
            return job

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._run(job)
            except _Cancelled:
                job.touch(state="cancelled", finished=time.time())
            except ModelError:  # the operator's problem (logged by separator()), not the user's
                message = (
                    f"{job.name}: the model {job.options.model} is not available on this server"
                )
                job.touch(state="failed", error=message, finished=time.time())
            except SplitstemsError as exc:
                message = str(exc).replace(str(job.input_path), job.name)
                if not message.startswith(f"{job.name}: "):  # a model error, say
                    message = f"{job.name}: {message}"
                job.touch(state="failed", error=message, finished=time.time())
            except Exception as exc:  # a bug: the job fails, the server keeps going
                log.exception("job %s (%s) failed", job.id, job.name)
                job.touch(
                    state="failed",
                    error=f"{job.name}: internal error ({exc})",
                    finished=time.time(),
                )
            if job.cancel_requested:
                with self._lock:
                    gone = job.id not in self._jobs
                if gone:
                    shutil.rmtree(job.folder, ignore_errors=True)

    def separator(self, options: JobOptions) -> tuple[Separator, threading.Lock]:
        """Return the separator for ``options`` (built once) and the lock guarding it.

        Raises:
            ModelError: the model cannot be loaded; it is logged with the hint for the
                operator and listed in :attr:`unavailable` until it loads.
        """
        with self._separators_lock:
            found = self._separators.get(options)
            if found is None:
                try:
                    separator = self._factory(
                        options.model, **options.separator_kwargs(), **self._separator_kwargs
                    )
                except ModelError as exc:
                    log.warning("model %s cannot be loaded: %s", options.model, exc)
                    self.unavailable.add(options.model)
                    raise
                self.unavailable.discard(options.model)
                found = self._separators[options] = (separator, threading.Lock())
            return found

    def _run(self, job: Job) -> None:
        done = 0.0

        def on_progress(seconds: float) -> None:  # seconds of audio just separated
            nonlocal done
            if job.cancel_requested:
                raise _Cancelled
            done += seconds
            if job.duration:
                job.touch(progress=min(0.99, done / job.duration))

        separator, lock = self.separator(job.options)
        with lock:
            if job.cancel_requested:
                raise _Cancelled
            stems = separator.separate_to_file(
                job.input_path,
                job.folder / _STEMS,
                filename_format="{instrument}.{codec}",
                on_progress=on_progress,
            )
        peaks = {
            name: _peaks(path, stems.n_samples, stems.sample_rate) for name, path in stems.items()
        }
        job.touch(
            state="done",
            progress=1.0,
            instruments=tuple(stems),
            sample_rate=stems.sample_rate,
            n_samples=stems.n_samples,
            peaks=peaks,
            finished=time.time(),
        )

    # ------------------------------------------------------------------ expiry

    def _sweep(self) -> None:
        interval = min(30.0, self.keep_seconds / 2)
        while not self._stopping.wait(interval):
            self.expire()

    def expire(self, now: float | None = None) -> list[str]:
        """Delete the jobs that finished more than ``keep_seconds`` ago; return their ids."""
        now = time.time() if now is None else now
        with self._lock:
            old = [
                job.id
                for job in self._jobs.values()
                if job.finished is not None and now - job.finished > self.keep_seconds
            ]
        for job_id in old:
            self.delete(job_id)
        return old

    # ------------------------------------------------------------------ outputs

    @contextlib.contextmanager
    def _making(self, job: Job) -> Iterator[None]:
        """Guard the making of one of ``job``'s files against the job's deletion.

        Raises:
            JobGone: the job is not (or no longer) there; a folder the writer made
                again after the deletion removed it is removed.
        """
        if self.get(job.id) is None:
            raise JobGone(f"{job.name}: removed from this server")
        try:
            yield
        finally:
            gone = self.get(job.id) is None
            if gone:
                shutil.rmtree(job.folder, ignore_errors=True)
        if gone:
            raise JobGone(f"{job.name}: removed from this server")

    def stem_file(self, job: Job, instrument: str, codec: str) -> Path:
        """Return the stem in ``codec``, encoded from the WAV the first time it is asked.

        Raises:
            JobGone: the job was deleted before or while it was encoded.
        """
        wav = job.stem_path(instrument)
        target = job.stem_path(instrument, codec)
        with self._making(job):
            if codec != "wav" and not target.is_file():
                _encode(wav, target, job.sample_rate, codec=codec, gains=None)
        return target

    def mix_file(self, job: Job, gains: dict[str, float], codec: str) -> Path:
        """Write the stems summed with ``gains`` to a new file (the caller deletes it).

        Raises:
            JobGone: the job was deleted before or while it was mixed.
        """
        target = job.folder / f"mix-{secrets.token_hex(8)}.{codec}"
        sources = {name: job.stem_path(name) for name in job.instruments}
        with self._making(job):
            _encode(sources, target, job.sample_rate, codec=codec, gains=gains)
        return target

    def zip_file(self, job: Job) -> Path:
        """Return a zip of every stem as WAV (built once; stored: WAV hardly compresses).

        Raises:
            JobGone: the job was deleted before or while it was zipped.
        """
        target = job.folder / "stems.zip"
        with self._making(job):
            if not target.is_file():
                part = target.with_name(f".stems.{secrets.token_hex(4)}.part")
                try:
                    with zipfile.ZipFile(part, "w", zipfile.ZIP_STORED) as archive:
                        for name in job.instruments:
                            archive.write(job.stem_path(name), f"{name}.wav")
                    part.replace(target)
                finally:
                    part.unlink(missing_ok=True)
        return target


def _chunks(path: Path, sample_rate: int, size: int) -> Iterator[np.ndarray]:
    return audio.stream(path, chunk_samples=size, sample_rate=sample_rate, n_channels=2)


def _peaks(path: Path, n_samples: int, sample_rate: int) -> list[float]:
    """Largest absolute sample in each of :data:`N_PEAKS` spans of the file (for drawing)."""
    span = max(1, -(-n_samples // N_PEAKS))
    out: list[float] = []
    for chunk in _chunks(path, sample_rate, span * 256):  # a multiple of span: spans align
        amplitude = np.abs(chunk).max(axis=1)
        out.extend(np.maximum.reduceat(amplitude, np.arange(0, len(amplitude), span)).tolist())
    return [round(float(x), 3) for x in out]


def _encode(
    source: Path | dict[str, Path],
    target: Path,
    sample_rate: int,
    *,
    codec: str,
    gains: dict[str, float] | None,
) -> None:
    """Encode one WAV, or the gain-weighted sum of several, into ``target`` chunk by chunk."""
    sources = {"": source} if isinstance(source, Path) else source
    weights = gains or {}
    size = sample_rate * 10
    with contextlib.ExitStack() as stack:
        streams = {name: _chunks(path, sample_rate, size) for name, path in sources.items()}
        writer = stack.enter_context(
            audio.AudioWriter(target, sample_rate=sample_rate, n_channels=2, codec=codec)
        )
        for parts in zip(*streams.values(), strict=True):
            mix = np.zeros_like(parts[0])
            for name, part in zip(streams, parts, strict=True):
                mix += np.float32(weights.get(name, 1.0)) * part
            writer.write(mix)

"""A catalogue on a Ray cluster: a pool of model-holding actors, retries, a manifest.

The driver (the machine running ``splitstems separate --ray``) only lists the inputs and
hands them out; the audio never goes through it. Each actor of the pool loads the model
once and runs :func:`splitstems.batch.separate_files` on the inputs it is given, so a
file is decoded, separated and encoded on the worker, its stems are written atomically
(temp file, then rename) with their record, and ``resume`` means exactly what it means
on one machine. Inputs whose stems would land on the same paths go to one actor
together, where the batch's own rules settle the clash.

Faults: a worker that dies (a killed process, a lost node) has its inputs handed to
another worker, at most ``retries`` times, while the others go on; a dead actor is
replaced. An input that fails for its own reasons (bad audio, an unwritable output) is
not retried: it ends as ``failed`` with its one-line reason.

Every input gets a line in ``manifest.jsonl`` in the output folder as it ends (status,
stems, audio seconds, compute seconds, worker, attempts, error), so a run stopped at any
point, driver included, leaves the lines of what finished. At the end the manifest is
rewritten with one line per input, the latest, and ``--resume`` skips what is complete.

For pipelines, :class:`SeparateStems` is a Ray Data block (``Dataset.map_batches``).
Ray is imported only when these functions are used (``pip install 'splitstems[cluster]'``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import signal
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import numpy as np

from splitstems import audio
from splitstems.audio import DEFAULT_BIT_DEPTH, DEFAULT_BITRATE
from splitstems.batch import BatchReport, FileResult, record_path, separate_files
from splitstems.config import load_config
from splitstems.errors import ConfigError, ModelError, OutputError, SplitstemsError
from splitstems.files import atomic_write, remove_stale_temps
from splitstems.separator import DEFAULT_FILENAME_FORMAT, Separator, output_paths

__all__ = [
    "DEFAULT_RETRIES",
    "MANIFEST",
    "ClusterReport",
    "ClusterResult",
    "SeparateStems",
    "connect",
    "disconnect",
    "pool_size",
    "read_manifest",
    "separate_on_ray",
]

log = logging.getLogger(__name__)

#: The manifest's name, in the output folder.
MANIFEST = "manifest.jsonl"
#: How many times an input is handed to another worker after its worker died.
DEFAULT_RETRIES = 3
#: Environment variables the driver passes on to its workers (model lookup, cache).
_FORWARDED_ENV = ("MODEL_PATH",)
_FORWARDED_PREFIX = "SPLITSTEMS_"
#: How often the progress bar is refreshed while no input ends (seconds).
_TICK = 1.0
#: How long a stopped run waits for its killed workers before removing their temp files.
_KILL_WAIT = 10.0
#: Signals whose handlers :func:`connect` keeps (``ray.init`` replaces them).
_KEPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: What a skipped input's manifest line keeps of the line of the run that made its stems.
_CARRIED = ("compute_seconds", "worker", "attempts", "finished")
#: How long :func:`connect` waits for a TCP answer at a Ray address before giving up.
_PROBE_TIMEOUT = 5.0


def _ray() -> Any:  # noqa: ANN401 - the ray module
    """Import ray, or say which extra installs it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'splitstems[cluster]'") from None
    return ray


def connect(address: str | None = None, *, verbose: bool = False) -> None:
    """Connect to a Ray cluster (``ray.init(address=...)``), unless already connected.

    ``address``: ``auto``, ``host:port``, ``ray://host:port``, ``local`` (a new Ray on
    this machine) or None (a Ray already running on this machine, else a new one).
    As with ``ray.init``, ``RAY_ADDRESS`` stands in for None and ``auto``, and a Ray
    started with ``ray start`` here is found through its ``ray_current_cluster`` file.

    Before Ray is asked, the address is tried with a plain TCP connection
    (:data:`_PROBE_TIMEOUT` seconds): Ray itself would retry an address with nothing
    behind it for many minutes, deaf to Ctrl-C. With None, a recorded Ray that no
    longer answers (a stopped head leaves its file behind) is passed over and a new
    Ray is started here, as when none is recorded.

    ``verbose``: show the raylet's reports (a dead worker's, many lines) as Ray prints
    them; otherwise they go to this module's logger at debug level, and
    :func:`separate_on_ray` says in one line what happened. The workers' own output is
    shown either way.

    Raises:
        ConfigError: Ray is not installed, or no cluster answers at ``address``.
    """
    ray = _ray()
    if ray.is_initialized():
        return
    target = _reachable_address(address)
    main = threading.current_thread() is threading.main_thread()
    handlers = {n: signal.getsignal(n) for n in _KEPT_SIGNALS} if main else {}
    try:
        ray.init(address=target, logging_level="WARNING", log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where = f" at {address}" if address else ""
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot connect to Ray{where}: {message}") from None
    finally:  # Ray's driver exits at once on SIGTERM; the caller's handlers stay
        for number, handler in handlers.items():
            if callable(handler):
                signal.signal(number, _Relay(handler))
            elif handler is not None:
                signal.signal(number, handler)
    if not verbose:
        _quiet_raylet_messages()


def _reachable_address(address: str | None) -> str | None:
    """Return what to pass to ``ray.init`` once a TCP connection shows a Ray may answer.

    Raises:
        ConfigError: nothing answers at the address given, at ``RAY_ADDRESS``, or (for
            ``auto``) at the address of ``ray_current_cluster``.
    """
    if address == "local":
        return address
    if address in (None, "", "auto"):
        from_env = os.environ.get("RAY_ADDRESS", "")
        if from_env:
            _probe(from_env, f"{from_env} (RAY_ADDRESS)")
            return from_env
        recorded, file = _recorded_address()
        if recorded is None:
            return address or None  # Ray starts one (None) or looks for one (auto)
        try:
            _probe(recorded, f"{recorded}, the Ray recorded in {file}")
        except ConfigError:
            if address == "auto":
                raise
            log.warning(
                "the Ray recorded in %s (%s) does not answer: starting a new one here",
                file,
                recorded,
            )
            return "local"
        return recorded
    _probe(address, address)
    return address


def _recorded_address() -> tuple[str | None, str]:
    """Return the address in Ray's ``ray_current_cluster`` file (None: none) and its path."""
    try:
        from ray._common.utils import get_ray_address_file

        file = get_ray_address_file(None)
    except (ImportError, AttributeError):  # as Ray 2.60 finds it
        base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
        file = os.path.join(base, "ray", "ray_current_cluster")
    try:
        with open(file, encoding="utf-8") as fh:
            return fh.read().strip() or None, file
    except OSError:
        return None, file


def _probe(address: str, shown: str) -> None:
    """Open (and close) a TCP connection to ``address``'s host and port.

    Raises:
        ConfigError: ``cannot connect to Ray at <shown>: ...`` when nothing answers.
    """
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        return  # not host:port: Ray says what is wrong with it
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT):
            pass
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise ConfigError(f"cannot connect to Ray at {shown}: {why}") from None


def _quiet_raylet_messages() -> None:
    """Send the raylet's error reports (a dead worker's, many lines) to the debug log.

    Ray's driver prints them in colour on its standard output; :func:`separate_on_ray`
    says what happened in one line of its own. Ray's private hook is left alone if it
    is not where Ray 2.60 has it.
    """
    with contextlib.suppress(ImportError, AttributeError):
        from ray._private import worker

        printer = worker.print_to_stdstream
        if getattr(printer, "_splitstems_quiet", False):
            return

        def quiet(data: dict[str, Any], ignore_prefix: bool) -> None:
            if data.get("pid") == "raylet":
                for line in data.get("lines", []):
                    log.debug("ray: %s", line)
                return
            printer(data, ignore_prefix)

        quiet._splitstems_quiet = True  # type: ignore[attr-defined]
        worker.print_to_stdstream = quiet


class _Relay:
    """A signal handler that remembers what the caller's handler raised.

    Ray's waits turn an exception raised in a signal handler into a plain
    ``KeyboardInterrupt``; :func:`separate_on_ray` raises the original again (the
    command's own SIGTERM exception, exit 143 rather than 130).
    """

    raised: BaseException | None = None

    def __init__(self, handler: Callable[[int, Any], Any]) -> None:
        self.handler = handler

    def __call__(self, signum: int, frame: Any) -> None:  # noqa: ANN401
        try:
            self.handler(signum, frame)
        except BaseException as exc:
            _Relay.raised = exc
            raise


def disconnect() -> None:
    """Leave the Ray cluster; a Ray that :func:`connect` started here is stopped."""
    ray = _ray()
    if ray.is_initialized():
        ray.shutdown()


def pool_size(
    resources: Mapping[str, float],
    *,
    cpus_per_worker: float,
    gpus_per_worker: float,
    n_tasks: int,
) -> int:
    """Return how many actors fit the cluster's ``resources`` (at most one per task).

    Raises:
        ConfigError: not one worker fits (no GPU for ``gpus_per_worker``, say).
    """
    fits = [math.inf]
    if cpus_per_worker > 0:
        fits.append(math.floor(resources.get("CPU", 0.0) / cpus_per_worker + 1e-9))
    if gpus_per_worker > 0:
        fits.append(math.floor(resources.get("GPU", 0.0) / gpus_per_worker + 1e-9))
    size = min(fits)
    if size < 1:
        have = ", ".join(f"{resources.get(k, 0):g} {k}" for k in ("CPU", "GPU"))
        raise ConfigError(
            f"the Ray cluster ({have}) has no room for one worker of {cpus_per_worker:g} CPU "
            f"and {gpus_per_worker:g} GPU (--ray-cpus-per-worker, --ray-gpus-per-worker)"
        )
    return int(max(1, min(size, n_tasks)))


@dataclass
class ClusterResult(FileResult):
    """A :class:`~splitstems.batch.FileResult` with where and how often it ran."""

    worker: str = ""
    attempts: int = 0


@dataclass
class ClusterReport(BatchReport):
    """The results of a cluster run, its wall time and pool size."""

    wall: float = 0.0
    workers: int = 0

    def summary(self) -> str:
        """One line: done / skipped / failed, audio hours and the run's throughput."""
        audio_s = sum(r.seconds for r in self.results if r.status == "done")
        n_done = self.count("done")
        speed = ""
        if self.wall > 0:
            speed = (
                f": {n_done / self.wall:.2f} files/s, {audio_s / self.wall:.1f} h of audio per hour"
            )
        return (
            f"{n_done} done, {self.count('skipped')} skipped, {self.count('failed')} failed "
            f"({audio_s:.1f} s of audio in {self.wall:.1f} s on {self.workers} Ray "
            f"worker{'s' if self.workers != 1 else ''}{speed})"
        )


class _Worker:
    """A Ray actor: one Separator, loaded once, running one batch of inputs at a time."""

    def __init__(self, params: str, options: dict[str, Any], env: dict[str, str]) -> None:
        import ray

        os.environ.update(env)
        self.name = f"{ray.util.get_node_ip_address()}:{os.getpid()}"
        self.error: str | None = None
        try:
            self.separator: Separator | None = Separator(params, progress=False, **options)
        except SplitstemsError as exc:  # told to the driver by ready(), not a crash
            self.separator, self.error = None, f"a Ray worker ({self.name}): {exc}"

    def ready(self) -> tuple[str, str | None]:
        """Return this worker's ``ip:pid`` and None, or why the model could not be loaded."""
        return self.name, self.error

    def run(
        self, paths: list[str], destination: str, settings: dict[str, Any], resume: bool
    ) -> list[dict[str, Any]]:
        """Separate ``paths`` as one batch; return a plain record per input, in order."""
        assert self.separator is not None
        report = separate_files(
            self.separator,
            [Path(p) for p in paths],
            destination,
            resume=resume,
            progress=False,
            **settings,
        )
        return [self._row(result) for result in report.results]

    def _row(self, result: FileResult) -> dict[str, Any]:
        seconds = result.seconds
        if result.status == "skipped":
            seconds = _recorded_seconds(result.outputs)
        return {
            "path": str(result.path),
            "status": result.status,
            "reason": result.reason,
            "seconds": seconds,
            "elapsed": result.elapsed,
            "outputs": {name: str(path) for name, path in result.outputs.items()},
            "redone": result.redone,
            "redone_kind": result.redone_kind,
            "worker": self.name,
        }


def _recorded_seconds(outputs: Mapping[str, Path]) -> float:
    """Audio seconds of complete stems, as their record says (0 if unreadable)."""
    try:
        record = json.loads(record_path(outputs).read_text())
        return int(record["n_samples"]) / int(record["sample_rate"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError, StopIteration):
        return 0.0


def _forwarded_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k.startswith(_FORWARDED_PREFIX) or k in _FORWARDED_ENV
    }


def _groups(
    files: Sequence[Path],
    destination: Path,
    instruments: tuple[str, ...],
    *,
    codec: str,
    filename_format: str,
) -> list[list[int]]:
    """Group the inputs whose stems would share a path (union-find), in input order."""
    parent = list(range(len(files)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[Path, int] = {}
    for index, path in enumerate(files):
        try:
            targets = output_paths(
                path, destination, instruments, codec=codec, filename_format=filename_format
            )
        except SplitstemsError:
            continue  # the worker reports it
        for target in targets.values():
            if target in owner:
                a, b = find(owner[target]), find(index)
                parent[max(a, b)] = min(a, b)
            else:
                owner[target] = index
    members: dict[int, list[int]] = {}
    for index in range(len(files)):
        members.setdefault(find(index), []).append(index)
    return list(members.values())


class _Manifest:
    """``manifest.jsonl``: a line per input as it ends; one line per input at the end."""

    def __init__(self, root: Path) -> None:
        self.path = root / MANIFEST
        self.earlier = read_manifest(self.path)
        self.lines: dict[str, tuple[int, dict[str, Any]]] = {}  # path → (input's index, line)
        self.made = [p for p in (root, *root.parents) if not p.exists()]  # folders made here
        try:
            root.mkdir(parents=True, exist_ok=True)
            self.fh: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write ({exc.strerror or exc})") from None

    def add(self, index: int, line: dict[str, Any]) -> None:
        """Append the line of input ``index`` (flushed: a killed driver leaves it).

        A ``skipped`` input keeps the figures of the run that made its stems (compute
        seconds, worker, attempts, finished), as its earlier line has them.
        """
        earlier = self.earlier.get(line["path"], {})
        if line["status"] == "skipped" and earlier.get("status") in ("done", "skipped"):
            line.update({k: earlier[k] for k in _CARRIED if k in earlier})
        self.lines[line["path"]] = (index, line)
        if self.fh is not None:
            self.fh.write(json.dumps(line) + "\n")
            self.fh.flush()

    def close(self) -> None:
        """Rewrite the manifest whole: a line per input, this run's last, in input order."""
        if self.fh is None:
            return
        self.fh.close()
        self.fh = None
        kept = {k: v for k, v in self.earlier.items() if k not in self.lines}
        if not kept and not self.lines:  # nothing ran (a model error): no empty manifest
            with contextlib.suppress(OSError):
                if self.path.stat().st_size == 0:
                    self.path.unlink()
                for folder in self.made:  # nor an empty -o this run made
                    folder.rmdir()
            return
        ours = [line for _, line in sorted(self.lines.values(), key=lambda item: item[0])]
        text = "".join(json.dumps(line) + "\n" for line in [*kept.values(), *ours])
        try:
            atomic_write(self.path, text)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write ({exc.strerror or exc})") from None


def read_manifest(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Return the latest manifest line of each input (key: its resolved path).

    Lines that are not JSON objects (the last one of a driver killed while writing it)
    are passed over.
    """
    lines: dict[str, dict[str, Any]] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for text in fh:
                with contextlib.suppress(ValueError):
                    line = json.loads(text)
                    if isinstance(line, dict) and isinstance(line.get("path"), str):
                        lines[line["path"]] = line
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise OutputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return lines


def _manifest_line(result: ClusterResult, given: Path, root: Path) -> dict[str, Any]:
    def shown(path: Path) -> str:
        return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)

    return {
        "input": str(given),
        "path": str(given.absolute().resolve()),
        "status": result.status,
        "outputs": {name: shown(Path(p)) for name, p in result.outputs.items()},
        "audio_seconds": round(result.seconds, 3),
        "compute_seconds": round(result.elapsed, 3),
        "worker": result.worker,
        "attempts": result.attempts,
        "error": result.reason if result.status == "failed" else "",
        "redone": result.redone,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


class _Progress:
    """A bar over the inputs with files/s and hours of audio per hour."""

    def __init__(self, total: int, enabled: bool | None) -> None:
        from tqdm import tqdm

        self.start = time.perf_counter()
        self.files = 0
        self.audio = 0.0
        self.bar = tqdm(
            total=total,
            unit="file",
            disable=None if enabled is None else not enabled,
            leave=False,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n}/{total} files [{elapsed}<{remaining}{postfix}]",
        )

    def add(self, result: FileResult) -> None:
        self.files += 1
        self.audio += result.seconds if result.status == "done" else 0.0
        self.bar.update(1)
        self.tick()

    def tick(self) -> None:
        wall = time.perf_counter() - self.start
        if wall > 0:
            self.bar.set_postfix_str(
                f"{self.files / wall:.2f} files/s, {self.audio / wall:.1f} h audio/h",
                refresh=True,
            )

    def close(self) -> None:
        self.bar.close()


def separate_on_ray(
    params: str,
    files: Sequence[Path],
    destination: str | os.PathLike[str],
    *,
    separator_options: Mapping[str, Any] | None = None,
    codec: str = "wav",
    bitrate: str = DEFAULT_BITRATE,
    bit_depth: int | str = DEFAULT_BIT_DEPTH,
    offset: float = 0.0,
    duration: float | None = None,
    filename_format: str = DEFAULT_FILENAME_FORMAT,
    resume: bool = False,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    workers: int | None = None,
    retries: int = DEFAULT_RETRIES,
    progress: bool | None = None,
    on_result: Callable[[ClusterResult], None] | None = None,
) -> ClusterReport:
    """Separate ``files`` on the connected Ray cluster (see :func:`connect`).

    ``params`` and ``separator_options`` (the :class:`~splitstems.separator.Separator`
    keywords) build each worker's separator; the other settings are those of
    :func:`~splitstems.batch.separate_files`. The pool has as many actors of
    ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs as the cluster holds (or
    ``workers``), each with one input (or group of clashing inputs) at a time.
    ``destination`` must be a folder every node sees. ``on_result`` is called as each
    input ends; the manifest is written as described in the module's notes.

    Raises:
        ConfigError: no worker fits the cluster.
        ModelError: a worker cannot load the model (the message names its node).
        OutputError: the manifest cannot be written.
    """
    ray = _ray()
    from ray.exceptions import RayActorError, RayError

    if not ray.is_initialized():
        connect(None)
    root = Path(destination).absolute()
    start = time.perf_counter()
    config = load_config(params)
    given = list(files)
    absolute = [path.absolute() for path in given]
    unseen = {i: why for i, path in enumerate(absolute) if (why := _unseen(path)) is not None}
    n_left = len(given) - len(unseen)  # the inputs that need a worker
    n_actors = 0
    if n_left:
        n_actors = min(workers, n_left) if workers else 0
        n_actors = n_actors or pool_size(
            ray.cluster_resources(),
            cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
            n_tasks=n_left,
        )
    options = dict(separator_options or {})
    if options.get("threads") is None and cpus_per_worker >= 1:
        options["threads"] = int(cpus_per_worker)
    settings = {
        "codec": codec,
        "bitrate": bitrate,
        "bit_depth": bit_depth,
        "offset": offset,
        "duration": duration,
        "filename_format": filename_format,
    }
    actor_class = ray.remote(_Worker).options(
        num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0
    )
    env = _forwarded_env()
    report = ClusterReport(workers=n_actors)
    ended: dict[int, ClusterResult] = {}  # input's index → its result
    manifest = _Manifest(root)
    groups: list[list[int]] = []  # inputs whose stems may clash go together
    attempts: list[int] = []  # per group
    pending: deque[int] = deque()  # groups to hand out
    starting: dict[Any, Any] = {}  # ready() ref → actor
    idle: list[Any] = []
    running: dict[Any, tuple[Any, int]] = {}  # run() ref → (actor, group)
    lost_at_start = 0  # actors that died before their model was loaded
    names: dict[Any, str] = {}  # actor → its ip:pid

    def start_actor() -> None:
        actor = actor_class.remote(params, options, env)
        starting[actor.ready.remote()] = actor

    def finish(index: int, result: ClusterResult, group: int) -> None:
        result.path = given[index]  # and its messages name the inputs as given
        for i in groups[group]:
            result.reason = result.reason.replace(str(absolute[i]), str(given[i]))
        ended[index] = result
        manifest.add(index, _manifest_line(result, given[index], root))
        bar.add(result)
        if on_result is not None:
            on_result(result)

    def fail_group(group: int, reason: str) -> None:
        for index in groups[group]:
            why = f"{given[index]}: {reason}"
            result = ClusterResult(given[index], "failed", why, attempts=attempts[group])
            finish(index, result, group)

    bar = _Progress(len(given), progress)
    _Relay.raised = None
    try:
        for _ in range(n_actors):  # they load the model while the inputs are planned
            start_actor()
        groups[:] = _groups(
            absolute, root, config.instruments, codec=codec, filename_format=filename_format
        )
        attempts[:] = [0] * len(groups)
        for group, members in enumerate(groups):
            if all(i in unseen for i in members):  # missing here: no worker needed
                for i in members:
                    finish(i, ClusterResult(given[i], "failed", f"{given[i]}: {unseen[i]}"), group)
            else:
                pending.append(group)
        while pending or running:
            while idle and pending:
                actor, group = idle.pop(), pending.popleft()
                attempts[group] += 1
                paths = [str(absolute[i]) for i in groups[group]]
                ref = actor.run.remote(paths, str(root), settings, resume)
                running[ref] = (actor, group)
            ready, _ = ray.wait([*running, *starting], num_returns=1, timeout=_TICK)
            bar.tick()
            for ref in ready:
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        names[actor], problem = ray.get(ref)
                    except RayError as exc:  # died while loading: try another, a few times
                        lost_at_start += 1
                        if lost_at_start > n_actors * (retries + 1):
                            raise ModelError(
                                f"Ray workers keep dying while loading the model "
                                f"({lost_at_start} times; last: {_first_line(exc)})"
                            ) from None
                        start_actor()
                        continue
                    if problem is not None:
                        raise ModelError(problem)
                    idle.append(actor)
                    continue
                actor, group = running.pop(ref)
                try:
                    rows = ray.get(ref)
                except RayActorError as exc:  # the worker died: retry elsewhere
                    with contextlib.suppress(Exception):
                        ray.kill(actor)
                    start_actor()
                    if attempts[group] > retries:
                        fail_group(
                            group,
                            f"its Ray worker died {attempts[group]} times "
                            f"while separating it ({_first_line(exc)})",
                        )
                    else:
                        inputs = ", ".join(str(given[i]) for i in groups[group])
                        log.warning(
                            "%s: its Ray worker %s died (%s); retrying (attempt %d of %d)",
                            inputs,
                            names.get(actor, "?"),
                            _first_line(exc),
                            attempts[group] + 1,
                            retries + 1,
                        )
                        pending.appendleft(group)
                    continue
                except RayError as exc:  # an unexpected error of the file: not retried
                    idle.append(actor)
                    cause = getattr(exc, "cause", None) or exc  # the worker's own exception
                    fail_group(group, f"{type(cause).__name__}: {_first_line(cause)}")
                    continue
                idle.append(actor)
                for index, row in zip(groups[group], rows, strict=True):
                    finish(index, _result(row, attempts[group]), group)
    except KeyboardInterrupt as exc:  # as the signal's own handler raised it
        raised = _Relay.raised
        if raised is not None and raised is not exc and isinstance(raised, KeyboardInterrupt):
            raise raised from None
        raise
    finally:
        report.wall = time.perf_counter() - start
        bar.close()
        for actor in [*idle, *starting.values(), *(a for a, _ in running.values())]:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        # Stopped mid-file: once their workers are gone, their temp files go too.
        _wait_gone([names.get(actor, "") for actor, _ in running.values()])
        for _, group in running.values():
            _remove_temps([absolute[i] for i in groups[group]], root, config.instruments, settings)
        manifest.close()
    report.results = [ended[index] for index in sorted(ended)]
    return report


def _unseen(path: Path) -> str | None:
    """Why ``path`` fails, when the driver sees it at once (missing, a folder); else None.

    One ``stat`` per input, as listing a folder costs; a worker looks at the rest.
    """
    if any(c in str(path) for c in "*?["):
        return None  # a pattern that matched nothing: the batch says so
    try:
        if stat.S_ISDIR(os.stat(path).st_mode):
            return "folder holds no audio files"  # as expand_inputs kept it
    except FileNotFoundError:
        return "file not found"
    except OSError:
        return None
    return None


def _wait_gone(workers: Sequence[str]) -> None:
    """Wait (at most ``_KILL_WAIT`` s) until the killed workers of this host have exited."""
    import ray

    here = ray.util.get_node_ip_address()
    pids = [int(w.rpartition(":")[2]) for w in workers if w.rpartition(":")[0] == here]
    deadline = time.monotonic() + _KILL_WAIT
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _running(pid)]
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_temps(
    paths: Sequence[Path], root: Path, instruments: tuple[str, ...], settings: Mapping[str, Any]
) -> None:
    """Remove the temp files of these inputs' stems whose writers are gone."""
    for path in paths:
        with contextlib.suppress(SplitstemsError):
            targets = output_paths(
                path,
                root,
                instruments,
                codec=settings["codec"],
                filename_format=settings["filename_format"],
            )
            for target in targets.values():
                remove_stale_temps(target)


def _result(row: dict[str, Any], attempts: int) -> ClusterResult:
    return ClusterResult(
        Path(row["path"]),
        row["status"],
        row["reason"],
        seconds=row["seconds"] or 0.0,
        elapsed=row["elapsed"],
        outputs={name: Path(p) for name, p in row["outputs"].items()},
        redone=row["redone"],
        redone_kind=row["redone_kind"],
        worker=row["worker"],
        attempts=attempts,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class SeparateStems:
    """A Ray Data block: rows of paths or decoded audio in, stems or stem paths out.

    Use it with ``Dataset.map_batches(SeparateStems, fn_constructor_kwargs={...},
    compute=ray.data.ActorPoolStrategy(size=n), batch_format="numpy")``: each actor
    loads the model once. Rows are either

    - ``path``: a file every node can read. With ``output_dir`` the stems are written
      there (atomically, with their record; ``resume`` skips complete ones, as
      ``separate --resume``) and the block returns ``path``, ``status``, ``error`` and
      one ``<instrument>_path`` column per stem; without it, it returns ``path``,
      ``sample_rate``, ``error`` and one ``<instrument>`` column of
      ``(n_samples, 2)`` float32 stems at the model's rate;
    - ``audio``: a ``(n_samples, n_channels)`` float waveform, with an optional
      ``sample_rate`` column (default: the model's): one ``<instrument>`` column per
      stem at the input's rate and length, ``sample_rate`` and ``error``.

    A row that fails (unreadable audio) gets its one-line reason in ``error`` and empty
    stems; the other rows go on. The other columns of the input are passed through.

    Args:
        model: a model name or JSON config, as ``Separator``'s first argument.
        output_dir: where path rows' stems are written; None: stems are returned.
        codec, bitrate, bit_depth, filename_format, resume: as ``separate``'s options.
        **separator_options: further :class:`~splitstems.separator.Separator` keywords.
    """

    def __init__(
        self,
        model: str = "spleeter:2stems",
        *,
        output_dir: str | os.PathLike[str] | None = None,
        codec: str = "wav",
        bitrate: str = DEFAULT_BITRATE,
        bit_depth: int | str = DEFAULT_BIT_DEPTH,
        filename_format: str = DEFAULT_FILENAME_FORMAT,
        resume: bool = False,
        **separator_options: Any,
    ) -> None:
        self.separator = Separator(model, progress=False, **separator_options)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.settings = {
            "codec": codec,
            "bitrate": bitrate,
            "bit_depth": bit_depth,
            "filename_format": filename_format,
        }
        self.resume = resume

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Separate one batch of rows (numpy batch format)."""
        if "path" in batch and self.output_dir is not None:
            return self._to_files(batch)
        if "path" in batch:
            stems, rates, errors = self._stems(self._decoded(str(p)) for p in batch["path"])
        elif "audio" in batch:
            rates_in = batch.get("sample_rate")
            rows = (
                (np.asarray(wave), None if rates_in is None else int(rates_in[i]))
                for i, wave in enumerate(batch["audio"])
            )
            stems, rates, errors = self._stems(self._given(w, r) for w, r in rows)
        else:
            raise ConfigError("SeparateStems needs a 'path' or an 'audio' column")
        out = {k: v for k, v in batch.items() if k != "audio"}
        out.update(stems)
        out["sample_rate"] = np.asarray(rates, dtype=np.int64)
        out["error"] = np.asarray(errors, dtype=object)
        return out

    def _decoded(self, path: str) -> tuple[np.ndarray | None, int, str]:
        rate = self.separator.sample_rate
        try:
            wave = audio.load(path, sample_rate=rate, n_channels=self.separator.config.n_channels)
        except SplitstemsError as exc:
            return None, rate, str(exc)
        return wave, rate, ""

    def _given(self, wave: np.ndarray, rate: int | None) -> tuple[np.ndarray | None, int, str]:
        return wave, rate or self.separator.sample_rate, ""

    def _stems(
        self, rows: Iterator[tuple[np.ndarray | None, int, str]]
    ) -> tuple[dict[str, np.ndarray], list[int], list[str]]:
        names = self.separator.instruments
        columns: dict[str, list[np.ndarray]] = {name: [] for name in names}
        rates, errors = [], []
        for wave, rate, error in rows:
            result: dict[str, np.ndarray] = {}
            if wave is not None:
                try:
                    result = self.separator.separate(wave, sample_rate=rate)
                except (SplitstemsError, ValueError) as exc:
                    error = str(exc)
            for name in names:
                columns[name].append(result.get(name, np.zeros((0, 2), np.float32)))
            rates.append(rate)
            errors.append(error)
        return {name: _ragged(values) for name, values in columns.items()}, rates, errors

    def _to_files(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.output_dir is not None
        paths = [Path(str(p)) for p in batch["path"]]
        results: list[FileResult] = []
        for path in paths:  # one by one: stems clashing across rows are the caller's
            results.extend(
                separate_files(
                    self.separator,
                    [path],
                    self.output_dir,
                    resume=self.resume,
                    progress=False,
                    **self.settings,
                ).results
            )
        out = dict(batch)
        out["status"] = np.asarray([r.status for r in results], dtype=object)
        out["error"] = np.asarray(
            [r.reason if r.status == "failed" else "" for r in results], dtype=object
        )
        for name in self.separator.instruments:
            out[f"{name}_path"] = np.asarray(
                [str(r.outputs[name]) if name in r.outputs else "" for r in results],
                dtype=object,
            )
        return out


def _ragged(values: list[np.ndarray]) -> np.ndarray:
    """Return an object array of per-row arrays (Ray Data: variable-shaped tensors)."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out

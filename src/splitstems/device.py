"""Where the engine computes, and with how many CPU threads.

The one place for device and thread choice (torch is imported inside the functions).

**Threads.** torch's intra-op threads meet at a barrier after every operation; the
thread that arrives first spins there for a while. That is the fastest way to use an
idle machine, and the slowest on a machine that is doing other things: when another
process takes a core, the thread that shares it falls behind, every operation waits
for it, and the spinning threads take the CPU it needs. Measured on 2 CPUs with one kept
busy by another process, a 3-minute song took 7.5-9.0 s with 2 threads (3.6-3.7 s
idle), 5.5 s with one, 5.5 s with 2 threads and OpenMP's passive wait policy (which
costs 5-10 % on an idle machine, so it is not used), 5.0 s with the plan below.

So the default plan (:func:`plan_threads`) looks at what the machine is doing:

- the CPUs this process may use (:func:`usable_cpus`: its affinity, capped by a cgroup
  CPU quota, which torch does not look at);
- the CPU time other processes took on those CPUs since the last look
  (:class:`LoadMeter`: ``/proc/stat`` against this process's own CPU time; the
  command line starts it first thing, so the first look covers its start-up, about
  a second).

On an idle machine: one thread per usable CPU, as torch does. When others keep CPUs
busy: as many intra-op threads as CPUs are left (at least one), and the model's U-Nets
(one per instrument) run side by side in their own threads instead of one after the
other. Threads that never wait for each other lose only their fair share when the OS
gives a core to someone else. ``threads=N`` fixes N intra-op threads and no adaptation.

The stems do not depend on the plan beyond float32 rounding: on the machine this was
measured on, 1, 2 and 4 threads give the same bits, 3 threads differ by ~1e-9 (193 dB).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: How U-Nets are run: ``map_unets(fn, unets)`` returns ``[fn(u) for u in unets]``.
MapUNets = Callable[[Callable[[Any], Any], list[Any]], list[Any]]

__all__ = [
    "pick_device",
    "usable_cpus",
    "cgroup_cpu_limit",
    "LoadMeter",
    "ThreadPlan",
    "plan_threads",
    "baseline_threads",
    "set_threads",
    "check_threads",
    "UNetWorkers",
    "MapUNets",
    "load_meter",
    "BUSY_CORES",
    "keep_freed_memory",
]

#: Other processes using at least this many cores (on our CPUs) make the machine "busy".
BUSY_CORES = 0.5
#: Shortest window (seconds) over which the load of other processes is believed.
MIN_WINDOW = 0.2


def pick_device(name: str | None = None) -> torch.device:
    """Return the torch device for ``name`` ("cpu", "cuda", "cuda:1", "mps" or None=auto).

    Auto picks CUDA when available, then Apple MPS, else the CPU.
    """
    import torch

    if name and name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"unknown device {name!r} (use cpu, cuda, cuda:N or mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r} requested but Apple MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# --------------------------------------------------------------------------- CPUs


def cgroup_cpu_limit(
    *, root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")
) -> float | None:
    """Return the CPU quota of this process's cgroup in CPUs (1.5 = 150 %), or None.

    cgroup v2: ``cpu.max`` ("max 100000" or "<quota> <period>") of the process's cgroup
    and of each of its ancestors; v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of the
    ``cpu`` controller's cgroup and its ancestors. The smallest quota found wins; None
    when there is none (or no cgroup file system).
    """
    limits: list[float] = []
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2
            for folder in _ancestors(root, path):
                limits += _read_v2(folder / "cpu.max")
        elif "cpu" in controllers.split(","):  # v1
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                for folder in _ancestors(mount, path):
                    limits += _read_v1(folder)
    if not lines:  # no /proc: look at the root of the mount alone
        limits += _read_v2(root / "cpu.max") + _read_v1(root / "cpu")
    return min(limits) if limits else None


def _ancestors(mount: Path, path: str) -> list[Path]:
    """Return ``mount/path`` and each folder above it, up to ``mount`` itself.

    Inside a container the process's path is often not visible under the mount; then
    the mount's own files are the container's.
    """
    parts = [p for p in path.strip("/").split("/") if p]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _read_v2(path: Path) -> list[float]:
    try:
        quota, period = path.read_text().split()[:2]
        if quota != "max" and int(period) > 0 and int(quota) > 0:
            return [int(quota) / int(period)]
    except (OSError, ValueError):
        pass
    return []


def _read_v1(folder: Path) -> list[float]:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return [quota / period]
    except (OSError, ValueError):
        pass
    return []


def _affinity() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return None


def _cpu_count(affinity: set[int] | None) -> int:
    """CPUs in ``affinity``, else the machine's."""
    return len(affinity) if affinity else os.cpu_count() or 1


def usable_cpus() -> int:
    """Return how many CPUs this process may really use: affinity, capped by a cgroup quota.

    A quota of 1.5 CPUs gives 2 (rounded up: the half CPU is still worth a thread).
    """
    cpus = _cpu_count(_affinity())
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


# --------------------------------------------------------------------------- load


def _busy_seconds(cpus: set[int] | None, stat: Path = Path("/proc/stat")) -> float | None:
    """CPU seconds spent busy so far on ``cpus`` (all CPUs: None), steal time included."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    ticks = 0
    found = False
    for line in lines:
        name, _, values = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        fields = [int(v) for v in values.split()]
        # user nice system idle iowait irq softirq steal (guest is inside user)
        ticks += sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)
        found = True
    return ticks / os.sysconf("SC_CLK_TCK") if found else None


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


class LoadMeter:
    """Measures how many cores other processes keep busy on this process's CPUs.

    Each :meth:`others` call covers the time since the previous call (or since the meter
    was made): the busy time of this process's CPUs in ``/proc/stat`` (steal time
    included), less this process's own CPU time, over the wall time. None where that
    cannot be known (no ``/proc``, a window under :data:`MIN_WINDOW` seconds, or a CPU
    quota smaller than the CPUs the process may run on: then the quota, not the other
    processes, decides).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cpus = _affinity()
        limit = cgroup_cpu_limit()  # a quota below the CPUs decides, not the others' load
        self._quota_decides = limit is not None and limit < _cpu_count(self._cpus)
        self._sample = self._take()

    def _take(self) -> tuple[float, float | None, float]:
        return time.monotonic(), _busy_seconds(self._cpus), _own_seconds()

    def others(self) -> float | None:
        """Cores used by other processes since the last call (see the class), or None."""
        with self._lock:
            now = self._take()
            (start, busy0, own0), (end, busy1, own1) = self._sample, now
            if end - start < MIN_WINDOW:
                return None  # keep the window open
            self._sample = now
        if busy0 is None or busy1 is None or self._quota_decides:
            return None
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (end - start))


_meter: LoadMeter | None = None
_meter_lock = threading.Lock()


def load_meter() -> LoadMeter:
    """Return the process's :class:`LoadMeter`, started by the first call.

    The command line calls it first thing, so that its start-up is the first window in
    which the load of other processes is seen.
    """
    global _meter
    with _meter_lock:
        if _meter is None:
            _meter = LoadMeter()
        return _meter


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class ThreadPlan:
    """How one separation uses the CPUs.

    Attributes:
        threads: torch intra-op threads of the calling thread (STFT, masks, iSTFT and,
            with one worker, the U-Nets).
        unet_workers: U-Nets run side by side in this many threads (1: one after another
            in the calling thread).
        worker_threads: intra-op threads of each U-Net worker.
        others: cores other processes were seen to use (None: not known).
    """

    threads: int
    unet_workers: int = 1
    worker_threads: int = 1
    others: float | None = None


def plan_threads(
    *,
    usable: int,
    others: float | None,
    n_unets: int,
    threads: int | None = None,
    unet_workers: int | None = None,
) -> ThreadPlan:
    """Choose the threads of one separation (see the module docstring).

    ``threads``/``unet_workers`` given: used as they are (workers default to 1). Else,
    idle (``others`` below :data:`BUSY_CORES` or unknown): ``usable`` threads, one
    worker. Busy: ``usable`` less the cores others use (at least 1) threads, and the
    U-Nets side by side, up to ``usable`` workers of ``threads // workers`` threads.
    """
    if threads is not None:
        workers = max(1, min(unet_workers or 1, n_unets))
        return ThreadPlan(threads, workers, max(1, threads // workers), others)
    busy = others is not None and others >= BUSY_CORES
    count = max(1, usable - round(others)) if busy and others is not None else usable
    if unet_workers is None:
        unet_workers = min(n_unets, usable) if busy else 1
    workers = max(1, min(unet_workers, n_unets))
    return ThreadPlan(count, workers, max(1, count // workers), others)


_torch_default: int | None = None


def baseline_threads() -> int:
    """Threads for an idle machine: torch's own count, capped by :func:`usable_cpus`.

    torch's count is read once per process, before anything here changes it; it is
    ``OMP_NUM_THREADS`` when set, else what torch chose (physical cores, or the CPUs
    in the affinity mask at start).
    """
    import torch

    global _torch_default
    with _meter_lock:
        if _torch_default is None:
            _torch_default = torch.get_num_threads()
    return max(1, min(_torch_default, usable_cpus()))


def set_threads(threads: int) -> None:
    """Set the calling thread's intra-op threads, and torch's default for new threads."""
    import torch

    torch.set_num_threads(threads)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed torch work on one intra-op thread, then restore the count.

    For building and loading models: hundreds of small copies, each of which threads
    would split and then wait for each other on; on a machine where another process
    keeps a core busy that waiting made the set-up of a 2stems model take 0.5-1.4 s
    instead of ~0.2 s (2026-11-30, 2 CPUs).
    """
    import torch

    before = torch.get_num_threads()
    if before != 1:
        set_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            set_threads(before)


#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
#: Freed memory at the top of the heap is given back to the system only past this size.
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep and reuse freed memory; return whether it applies.

    By default glibc serves every block of 32 MB or more (a segment's spectrogram, a
    stem's iFFT frames: 20-60 MB each) with its own ``mmap`` and gives it back to the
    system when freed, so the next block of that size is mapped again and its pages
    are faulted in, zeroed, one by one: a process separating a 3-minute song made
    ~610,000 page faults, and the separation took 0.1-0.2 s longer on 2 CPUs
    (2026-11-30). Served from the heap and kept there instead (no ``mmap`` for single
    blocks; the heap's top given back only past :data:`TRIM_THRESHOLD`), the same
    blocks are reused: ~160,000 faults, the same peak memory. Process-wide, so only
    the command line calls it (first thing), not the library. Elsewhere than glibc
    (macOS, musl) it does nothing and returns False, and so does
    ``SPLITSTEMS_KEEP_FREED_MEMORY=0`` (glibc's defaults: for comparisons).
    """
    import ctypes
    import ctypes.util

    if os.environ.get("SPLITSTEMS_KEEP_FREED_MEMORY", "1").strip() == "0":
        return False  # the benchmarks' baseline
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):
        return False  # not glibc: its mallopt (if any) means other things
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def check_threads(threads: object) -> int | None:
    """Return ``threads`` if it is None or a whole number >= 1.

    Raises:
        ValueError: anything else, naming the value.
    """
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
    return threads


class UNetWorkers:
    """Threads that run a model's U-Nets side by side (see :class:`ThreadPlan`).

    Each worker has its own intra-op thread count (torch keeps it per thread) and runs
    in inference mode. Use as a context manager; :meth:`map` is what
    :meth:`splitstems.models.fast.FastSpleeterModel.forward` takes as ``map_unets``.
    """

    def __init__(self, plan: ThreadPlan) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.plan = plan
        self._pool = ThreadPoolExecutor(
            max_workers=plan.unet_workers,
            thread_name_prefix="splitstems-unet",
            initializer=_init_worker,
            initargs=(plan.worker_threads,),
        )
        # Start every worker now: each sets its own threads, which also sets torch's
        # default for new threads; the calling thread's count is then set back.
        ready = threading.Barrier(plan.unet_workers)
        for future in [self._pool.submit(ready.wait, 30) for _ in range(plan.unet_workers)]:
            future.result()
        set_threads(plan.threads)

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        """Return ``[fn(item) for item in items]``, computed in the workers."""
        return [future.result() for future in [self._pool.submit(_inference, fn, i) for i in items]]

    def close(self) -> None:
        """Stop the workers (waiting for what they are computing)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> UNetWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _init_worker(threads: int) -> None:
    import torch

    torch.get_num_threads()  # torch sets a thread's count at its first use: do it first
    torch.set_num_threads(threads)


def _inference(fn: Callable[[Any], Any], item: Any) -> Any:  # noqa: ANN401
    import torch

    with torch.inference_mode():
        return fn(item)

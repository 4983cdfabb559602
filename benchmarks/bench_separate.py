"""Benchmark ``splitstems separate`` (and, on request, the original Spleeter 2.4.2).

What it measures, each timed thing alone, one after another:

* the command line ``splitstems separate -p spleeter:<model> -o OUT FILE`` per input
  length, model and mode (default, ``--fast``): wall time, real-time factor (seconds of
  audio written / wall seconds), peak RSS of the process tree (``os.wait4`` on a fresh
  child: the largest RSS of the child or of any descendant it waited for) and CPU time;
* ten 3-minute files in one command;
* in-process model compute on the 3-minute waveform (``graph_splitstems.py``), best of 3
  after a warm-up;
* with ``--against-spleeter``: the same with Spleeter 2.4.2 (TensorFlow 2.12.1) in its own
  virtualenv (installed on first use), on the same files in the same run, and the ratios.

Inputs are Spleeter's example song looped to exactly N seconds (16-bit WAV, 44.1 kHz
stereo), built once into the cache folder. The 2stems model is the real checkpoint from
the shared folder; other models get random weights of the real shapes (same compute).
The machine is shared and noisy: compare numbers of one run only (the ratios). Before
each run the script waits (``--wait-idle``) for other processes to go quiet, measures the
CPU they used during the run (column "others") and redoes noisy runs (``--retry-noisy``).
A run whose processes pass ``--mem-limit-gb`` of RSS is killed and reported as failed
(memory); runs past ``--timeout`` likewise.

The headline (``--headline``): the three ratios of Spleeter 2.4.2's wall time to ours on
the 3-minute WAV, 2stems, in one run, best of 2 (``--repeat``), the tools alternating:

* idle, ``splitstems separate`` (target >= 4x);
* idle, ``splitstems separate --fast`` (>= 6x, against Spleeter's idle run);
* ``splitstems separate`` while another process keeps one core busy (>= 3x, against
  Spleeter beside the same busy loop): the benchmark starts ``python -c 'while True:
  pass'`` (not pinned) half a second before each such run and stops it after; its CPU
  time is not counted as noise.

Run it on a quiet machine (nothing else running; it waits up to ``--wait-idle`` s before
each run and redoes runs that other processes slowed, ``--retry-noisy``)::

    .venv/bin/python benchmarks/bench_separate.py --headline
                                    # ~3 min on a quiet machine (Spleeter installed)

It prints a table of the runs and the three ratios (met / NOT met), and writes them
(``"headline"``) with every run to ``benchmarks/results/<timestamp>.json``. Spleeter is
installed into ``benchmarks/.spleeter-venv`` on first use (needs python3.11 and ffmpeg).

Examples::

    .venv/bin/python benchmarks/bench_separate.py --durations 30,180 --models 2stems \\
        --against-spleeter          # quick: ~6 min on a quiet machine
    .venv/bin/python benchmarks/bench_separate.py --against-spleeter --spleeter-full
                                    # everything: ~20-25 min on a quiet machine

Results: a markdown table on stdout, ``benchmarks/results/<timestamp>.json`` (+ ``.md``)
and, for a completed run, ``benchmarks/results/latest.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
SHARED = Path(os.environ.get("SPLITSTEMS_SHARED", ROOT.parent / "shared")).resolve()
EXAMPLE = SHARED / "audio" / "examples" / "audio_example.mp3"
CHECKPOINT_2STEMS = SHARED / "models" / "spleeter" / "2stems"
CHECKPOINT_FILES = ("checkpoint", "model.data-00000-of-00001", "model.index", "model.meta")
SAMPLE_RATE = 44100
GIB = 1024**3
SPLEETER_REQUIREMENTS = ("spleeter==2.4.2", "tensorflow==2.12.1", "numpy<2")
SPLEETER_DEFAULT_DURATION = 600.0  # the original's CLI stops there unless -d is given
BATCH_FILES = 10
BATCH_SECONDS = 180
GRAPH_SECONDS = 180
#: The headline ratios (``--headline``): 3-min WAV, 2stems, against Spleeter 2.4.2.
HEADLINE_SECONDS = 180
BUSY = "default, 1 core busy"
#: splitstems mode → (Spleeter mode it is compared with, target ratio of wall times)
HEADLINE_TARGETS = {"default": ("default", 4.0), "fast": ("default", 6.0), BUSY: (BUSY, 3.0)}
MEMORY_PATTERNS = (
    "memoryerror",
    "bad_alloc",
    "resourceexhausted",
    "out of memory",
    "cannot allocate memory",
    "can't allocate memory",
    "oom when allocating",
    "failed to allocate",
)


# --------------------------------------------------------------------------- data


@dataclass
class Run:
    """One timed process (or one timed call inside a helper process)."""

    wall_s: float | None
    status: str  # "ok", "failed (...)", "unavailable (...)"
    peak_rss_bytes: int | None = None
    cpu_s: float | None = None
    returncode: int | None = None
    audio_out_s: float | None = None
    note: str = ""
    other_cores: float | None = None  # CPU used by other processes during the run, in cores
    peak_group_rss_bytes: int | None = None  # summed RSS of the process group, polled


@dataclass
class Case:
    """One row of a table: a tool on an input, repeated."""

    kind: str  # "cli", "batch", "graph", "warmup"
    tool: str  # "splitstems" or "spleeter"
    model: str
    mode: str  # "default", "fast", "default -d N"
    input: str
    audio_in_s: float
    command: list[str] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok_walls(self) -> list[float]:
        return [r.wall_s for r in self.runs if r.status == "ok" and r.wall_s is not None]

    @property
    def status(self) -> str:
        bad = [r.status for r in self.runs if r.status != "ok"]
        if not self.runs:
            return "not run"
        if bad:
            return bad[0] if not self.ok_walls else f"{bad[0]} in {len(bad)}/{len(self.runs)}"
        return "ok"

    @property
    def best_s(self) -> float | None:
        return min(self.ok_walls) if self.ok_walls else None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.ok_walls) if self.ok_walls else None

    @property
    def audio_out_s(self) -> float | None:
        outs = [r.audio_out_s for r in self.runs if r.audio_out_s is not None]
        return min(outs) if outs else None

    @property
    def audio_s(self) -> float:
        """Seconds of audio actually separated (what was written, else the input)."""
        out = self.audio_out_s
        return out if out is not None and out > 0 else self.audio_in_s

    def rtf(self, wall: float | None) -> float | None:
        return self.audio_s / wall if wall else None

    @property
    def peak_rss_bytes(self) -> int | None:
        values = [r.peak_rss_bytes for r in self.runs if r.peak_rss_bytes]
        return max(values) if values else None

    @property
    def cpu_percent(self) -> float | None:
        pairs = [(r.cpu_s, r.wall_s) for r in self.runs if r.status == "ok" and r.cpu_s]
        if not pairs:
            return None
        return 100.0 * sum(c for c, _ in pairs) / sum(w for _, w in pairs if w)

    @property
    def other_cores(self) -> float | None:
        values = [r.other_cores for r in self.runs if r.other_cores is not None]
        return max(values) if values else None

    def summary(self) -> dict[str, Any]:
        return {
            "other_cores_max": self.other_cores,
            "status": self.status,
            "best_s": self.best_s,
            "median_s": self.median_s,
            "rtf_best": self.rtf(self.best_s),
            "rtf_median": self.rtf(self.median_s),
            "peak_rss_bytes": self.peak_rss_bytes,
            "cpu_percent": self.cpu_percent,
            "audio_out_s": self.audio_out_s,
        }

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["summary"] = self.summary()
        return data


# --------------------------------------------------------------------------- helpers


def log(message: str) -> None:
    """Progress goes to stderr, tables to stdout."""
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def parse_seconds(text: str) -> int:
    """``30`` → 30, ``3m`` → 180, ``1h`` → 3600."""
    text = text.strip().lower()
    factor = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], None)
    value = float(text[:-1] if factor else text) * (factor or 1)
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text}: expected a whole number of seconds")
    return int(value)


def parse_durations(text: str) -> list[int]:
    return [parse_seconds(part) for part in text.split(",") if part.strip()]


def parse_models(text: str) -> dict[str, list[int] | None]:
    """``2stems,4stems@180,5stems@30+180`` → name → durations it runs at (None: all)."""
    models: dict[str, list[int] | None] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, only = part.partition("@")
        name = name.removeprefix("spleeter:")
        models[name] = [parse_seconds(d) for d in only.split("+")] if only else None
    return models


def fmt_s(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f} s" if value < 100 else f"{value:.0f} s"


def fmt_x(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}x"


def fmt_gib(value: int | None) -> str:
    return "—" if not value else f"{value / GIB:.2f} GiB"


def fmt_dur(seconds: float) -> str:
    if seconds >= 60 and abs(seconds / 60 - round(seconds / 60)) < 1e-6:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.1f} s" if seconds != int(seconds) else f"{seconds:.0f} s"


def wav_seconds(path: Path) -> float | None:
    """Duration of a WAV file (header, else size), or None."""
    try:
        with wave.open(str(path), "rb") as handle:
            return handle.getnframes() / handle.getframerate()
    except (OSError, wave.Error, EOFError):
        pass
    try:  # the header of a huge or unusual WAV: fall back to the decoder
        from splitstems import audio

        info = audio.probe(path)
        return info.duration
    except Exception:  # best effort only
        return None


def output_seconds(out_dir: Path) -> tuple[float | None, int]:
    """Seconds of audio written under ``out_dir``, and the number of WAV files.

    Each input gets its own folder of stems; an input counts with its shortest stem, and
    the inputs are added up (ten 3-minute files: 1800 s).
    """
    files = sorted(out_dir.rglob("*.wav")) if out_dir.exists() else []
    per_folder: dict[Path, float] = {}
    for path in files:
        seconds = wav_seconds(path)
        if seconds is not None:
            per_folder[path.parent] = min(seconds, per_folder.get(path.parent, seconds))
    return (sum(per_folder.values()) if per_folder else None), len(files)


def busy_cpu_s() -> float | None:
    """CPU seconds all processes of the machine have used so far (from /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [int(f) for f in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # guest time is already inside user
    return busy / os.sysconf("SC_CLK_TCK")


def wait_for_idle(max_wait_s: float, threshold_cores: float = 0.3) -> float | None:
    """Wait (up to ``max_wait_s``) until other processes use < ``threshold_cores``.

    Returns the last measured load in cores (1-second samples).
    """
    if max_wait_s <= 0:
        return None
    deadline = time.monotonic() + max_wait_s
    while True:
        before = busy_cpu_s()
        time.sleep(1.0)
        after = busy_cpu_s()
        if before is None or after is None:
            return None
        load = after - before
        if load < threshold_cores or time.monotonic() >= deadline:
            return load
        log(f"  machine busy ({load:.1f} cores used by others), waiting")
        time.sleep(4.0)


def tail(path: Path, n_chars: int = 1500) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-n_chars:]


def address_space_limiter(limit_bytes: int | None) -> Callable[[], None] | None:
    if not limit_bytes:
        return None

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return apply


def group_rss_bytes(pgid: int) -> int:
    """Summed RSS of the processes of process group ``pgid`` (from /proc/*/stat)."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as handle:
                    stat = handle.read()
                fields = stat[stat.rindex(b")") + 2 :].split()  # fields[0] is field 3
                if int(fields[2]) == pgid:  # field 5: pgrp
                    total += int(fields[21]) * page  # field 24: rss in pages
            except (OSError, ValueError, IndexError):
                continue
    return total


class MemoryWatch(threading.Thread):
    """Polls a process group's summed RSS; kills the group when it passes ``limit``."""

    def __init__(self, pgid: int, limit_bytes: int | None, interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pgid, self.limit, self.interval = pgid, limit_bytes, interval_s
        self.peak = 0
        self.killed = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            rss = group_rss_bytes(self.pgid)
            self.peak = max(self.peak, rss)
            if self.limit and rss > self.limit:
                self.killed.set()
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pgid, signal.SIGKILL)
                return


def run_process(
    command: list[str],
    *,
    env: dict[str, str],
    timeout_s: float,
    log_dir: Path,
    name: str,
    rss_limit_bytes: int | None = None,
    as_limit_bytes: int | None = None,
    cwd: Path | None = None,
) -> tuple[Run, str]:
    """Run ``command`` in a fresh process group; return its Run and the stdout tail.

    Peak RSS and CPU come from ``os.wait4`` on that very child: Linux reports the largest
    RSS of the child and of every descendant it reaped, so each run is measured alone.
    The group is killed when its summed RSS passes ``rss_limit_bytes`` (polled 4 times
    a second) or after ``timeout_s``; ``as_limit_bytes`` sets RLIMIT_AS in the child.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    timed_out = threading.Event()
    busy_before = busy_cpu_s()
    start = time.perf_counter()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        try:
            proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=address_space_limiter(as_limit_bytes),
            )
        except OSError as exc:
            return Run(None, f"failed (cannot start: {exc.strerror})"), ""

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

        watch = MemoryWatch(proc.pid, rss_limit_bytes)
        watch.start()
        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            kill()
            os.wait4(proc.pid, 0)
            raise
        finally:
            timer.cancel()
            watch.done.set()
        wall = time.perf_counter() - start
        busy_after = busy_cpu_s()
        proc.returncode = os.waitstatus_to_exitcode(status)
    # Leftover members of the group (a pool worker) must not outlive the run.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    watch.join(timeout=5)
    rc = proc.returncode
    err_text = tail(err_path, 200_000)
    run = Run(
        wall_s=wall,
        status="ok",
        peak_rss_bytes=usage.ru_maxrss * 1024,
        cpu_s=usage.ru_utime + usage.ru_stime,
        returncode=rc,
        peak_group_rss_bytes=watch.peak or None,
    )
    if busy_before is not None and busy_after is not None and wall > 0:
        other = busy_after - busy_before - (usage.ru_utime + usage.ru_stime)
        run.other_cores = max(0.0, other / wall)
    if watch.killed.is_set():
        limit = fmt_gib(rss_limit_bytes)
        run.status = f"failed (memory: RSS passed {limit}, killed)"
    elif timed_out.is_set():
        run.status = f"failed (timeout {timeout_s:.0f} s)"
    elif rc != 0:
        lines = err_text.strip().splitlines()
        memory = [ln for ln in lines if any(p in ln.lower() for p in MEMORY_PATTERNS)]
        if memory:
            run.status = "failed (memory)"
        elif rc == -signal.SIGKILL:
            run.status = "failed (killed: memory?)"
        elif rc < 0 and as_limit_bytes:
            name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
            run.status = f"failed ({name} under the {fmt_gib(as_limit_bytes)} address-space limit)"
        else:
            run.status = f"failed (exit {rc})"
        run.note = (memory or lines or [""])[-1].strip()[-300:]
    return run, tail(out_path, 4000)


def _with_bytecode(env: dict[str, str]) -> dict[str, str]:
    """``env`` without ``PYTHONDONTWRITEBYTECODE``: both tools run as installed packages do.

    pip compiles an installed package's modules once; with the variable set (as on the
    development machines), a source checkout installed in editable mode recompiled
    splitstems' ~20 modules on every run (~50 ms of a 2 s command, 2026-11-30), while
    Spleeter, installed by pip, had its bytecode already. The warm-up runs write it.
    """
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


class BusyLoop:
    """Another process keeping one core busy (a Python busy loop, not pinned), for a run.

    ``cpu_s`` is the CPU time it used between start and stop (to tell it apart from
    other noise on the machine).
    """

    SETTLE_S = 0.5  # running this long before the timed run starts

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.cpu_s = 0.0

    def _cpu(self) -> float:
        assert self.proc is not None
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_bytes()
            fields = stat[stat.rindex(b")") + 2 :].split()  # fields[0] is field 3
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return 0.0

    def __enter__(self) -> BusyLoop:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "while True: pass"],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(self.SETTLE_S)
        self._start = self._cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.cpu_s = max(0.0, self._cpu() - self._start)
        self.proc.kill()
        self.proc.wait()


# --------------------------------------------------------------------------- setup


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "splitstems-bench"


def build_inputs(cache: Path, durations: list[int]) -> dict[int, Path]:
    """Loop the example song to exactly N seconds; 16-bit WAV; reuse what is built."""
    folder = cache / "inputs"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {d: folder / f"loop_{d}s.wav" for d in durations}
    missing = [d for d, p in paths.items() if wav_seconds(p) != float(d)]
    if not missing:
        return paths
    from splitstems import audio

    source = audio.load(EXAMPLE, sample_rate=SAMPLE_RATE, n_channels=2)
    pcm = (np.clip(source, -1.0, 32767 / 32768) * 32768.0).round().astype("<i2")
    for seconds in missing:
        log(f"building {paths[seconds].name} ({seconds} s of {EXAMPLE.name} looped)")
        tmp = paths[seconds].with_suffix(".tmp")
        remaining = seconds * SAMPLE_RATE
        with wave.open(str(tmp), "wb") as handle:
            handle.setnchannels(2)
            handle.setsampwidth(2)
            handle.setframerate(SAMPLE_RATE)
            while remaining:
                piece = pcm[: min(remaining, pcm.shape[0])]
                handle.writeframes(piece.tobytes())
                remaining -= piece.shape[0]
        tmp.replace(paths[seconds])
    return paths


def build_batch(cache: Path, source: Path) -> list[Path]:
    """Ten differently named links to the 3-minute input (outputs are named by file)."""
    folder = cache / "inputs" / f"batch{BATCH_FILES}"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(1, BATCH_FILES + 1):
        link = folder / f"track_{i:02d}.wav"
        if not link.is_symlink() or link.resolve() != source.resolve():
            link.unlink(missing_ok=True)
            link.symlink_to(source)
        files.append(link)
    return files


def build_random_model(cache: Path, name: str) -> Path:
    """``<cache>/models/<name>/{model.safetensors,config.json}``, random weights, real shapes."""
    from safetensors.torch import save_file

    from splitstems.config import load_config
    from splitstems.models.unet import SpleeterModel

    config = load_config(f"spleeter:{name}")
    folder = cache / "models" / config.model_dir
    weights = folder / "model.safetensors"
    if weights.exists() and (folder / "config.json").exists():
        return cache / "models"
    import torch

    log(f"writing random-weight {name} model to {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = {
        k: v.contiguous()
        for k, v in SpleeterModel(config).state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    save_file(state, str(folder / "model.safetensors.tmp"))
    (folder / "model.safetensors.tmp").replace(weights)
    (folder / "config.json").write_text(json.dumps(config.to_json_dict(), indent=2))
    return cache / "models"


def build_pretrained_models(cache: Path) -> Path:
    """``<cache>/pretrained_models/2stems``: links to the shared checkpoint + ``.probe``."""
    folder = cache / "pretrained_models" / "2stems"
    folder.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        link = folder / name
        if not link.exists():
            link.unlink(missing_ok=True)
            link.symlink_to(CHECKPOINT_2STEMS / name)
    (folder / ".probe").touch()
    return folder.parent


def ensure_spleeter(venv: Path, timeout_s: float) -> str | None:
    """Install Spleeter 2.4.2 into ``venv`` if needed; return an error text or None."""
    python = venv / "bin" / "python"
    if not (venv / "bin" / "spleeter").exists():
        base = shutil.which("python3.11")
        if base is None:
            return "python3.11 not found (Spleeter 2.4.2 needs Python 3.11)"
        log(f"installing {' '.join(SPLEETER_REQUIREMENTS)} into {venv} (a few minutes)")
        steps = [
            [base, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"],
            [str(python), "-m", "pip", "install", "-q", *SPLEETER_REQUIREMENTS],
        ]
        for step in steps:
            try:
                subprocess.run(step, check=True, timeout=timeout_s)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
                return f"installing Spleeter failed: {exc}"
    check = subprocess.run(
        [str(python), "-c", "import spleeter, tensorflow; print(tensorflow.__version__)"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check.returncode != 0:
        return f"Spleeter venv {venv} is broken: {check.stderr.strip()[-300:]}"
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            return f"{tool} not found: Spleeter needs it (apt-get install ffmpeg)"
    return None


def source_fingerprint() -> str:
    """sha256 (12 hex) of the package sources: tells whether the code changed mid-run."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "src").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode())
        with contextlib.suppress(OSError):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def machine_info(splitstems_python: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "loadavg_start": os.getloadavg(),
    }
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
        for line in cpuinfo.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
        info["cpu_flags"] = sorted(
            f for f in flags.split() if f.startswith(("avx512", "amx")) or f in {"avx2", "fma"}
        )
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram_bytes"] = int(line.split()[1]) * 1024
    probe = subprocess.run(
        [
            splitstems_python,
            "-c",
            "import json, torch, splitstems; print(json.dumps({'torch': torch.__version__, "
            "'torch_threads': torch.get_num_threads(), "
            "'torch_interop_threads': torch.get_num_interop_threads(), "
            "'splitstems': splitstems.__version__, "
            "'mkldnn': torch.backends.mkldnn.is_available()}))",
        ],
        capture_output=True,
        text=True,
    )
    with contextlib.suppress(json.JSONDecodeError, IndexError):
        info.update(json.loads(probe.stdout.strip().splitlines()[-1]))
    git = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
    )
    info["git"] = git.stdout.strip()
    return info


# --------------------------------------------------------------------------- benchmark


class Bench:
    """Runs the cases one after another and keeps the results (saved after each case)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cache: Path = args.cache_dir
        self.out_dir = self.cache / "out"
        self.log_dir = self.cache / "logs"
        self.cases: list[Case] = []
        self.notes: list[str] = []
        self.stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.started = time.time()
        self.python = sys.executable
        script = Path(sys.executable).parent / "splitstems"
        self.splitstems = [str(script)] if script.exists() else ["splitstems"]
        self.spleeter_venv: Path = args.spleeter_venv
        self.spleeter_error: str | None = None
        self.fast_available = False
        self.meta: dict[str, Any] = {}
        self.model_dirs: dict[str, Path] = {}
        self.pretrained: Path | None = None
        self.counter = 0

    # -- environments

    def ours_env(self) -> dict[str, str]:
        env = _with_bytecode(dict(os.environ))
        env["SPLITSTEMS_MODEL_DIR"] = str(SHARED / "models" / "spleeter")
        return env

    def spleeter_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
        env = _with_bytecode(env)
        env["MODEL_PATH"] = str(self.pretrained)
        env["PATH"] = f"{self.spleeter_venv / 'bin'}:{env.get('PATH', '')}"
        return env

    def ours_command(self, model: str, mode: str, files: list[Path]) -> list[str]:
        cmd = [*self.splitstems, "separate", "-p", f"spleeter:{model}", "-o", str(self.out_dir)]
        if model in self.model_dirs:
            cmd += ["--model-dir", str(self.model_dirs[model])]
        if mode == "fast":
            cmd.append("--fast")
        return cmd + [str(f) for f in files]

    def spleeter_command(self, files: list[Path], duration: float | None = None) -> list[str]:
        cmd = [str(self.spleeter_venv / "bin" / "spleeter"), "separate"]
        cmd += ["-p", "spleeter:2stems", "-o", str(self.out_dir)]
        if duration is not None:
            cmd += ["-d", f"{duration:g}"]
        return cmd + [str(f) for f in files]

    # -- running

    def launch(self, case: Case, env: dict[str, str], name: str) -> tuple[Run, str]:
        """Run ``case.command`` alone, under this run's timeout and memory limits."""
        rss, space = self.args.mem_limit_gb, self.args.as_limit_gb
        return run_process(
            case.command,
            env=env,
            timeout_s=self.args.timeout,
            log_dir=self.log_dir,
            name=name,
            cwd=self.cache,
            rss_limit_bytes=int(rss * GIB) if rss else None,
            as_limit_bytes=int(space * GIB) if space else None,
        )

    def noisy(self, run: Run) -> bool:
        return (
            run.status == "ok"
            and run.other_cores is not None
            and run.other_cores > self.args.noisy_cores
        )

    def timed(self, case: Case, env: dict[str, str], *, repeat: int, quiet: bool = True) -> Case:
        """Run ``case.command`` ``repeat`` times; stop at the first failure.

        A run during which other processes used more than ``--noisy-cores`` is redone (up
        to ``--retry-noisy`` times); the quietest attempt is kept, the others are listed
        in ``case.extra["discarded"]``. ``quiet=False`` (warm-ups): no waiting, no retries.
        """
        for i in range(repeat):
            attempts: list[Run] = []
            for attempt in range(self.args.retry_noisy + 1 if quiet else 1):
                log(
                    f"{case.tool} {case.kind} {case.model} {case.mode} {case.input} "
                    f"(run {i + 1}/{repeat}" + (f", retry {attempt})" if attempt else ")")
                )
                run = self.attempt(case, env, wait=quiet)
                attempts.append(run)
                if not self.noisy(run):
                    break
            run = min(attempts, key=lambda r: r.other_cores if self.noisy(r) else -1.0)
            discarded = [asdict(r) for r in attempts if r is not run]
            if discarded:
                case.extra.setdefault("discarded", []).extend(discarded)
                if self.noisy(run):
                    run.note = (run.note + " " if run.note else "") + "(noisy)"
            case.runs.append(run)
            if run.status != "ok":
                break
        self.cases.append(case)
        self.save()
        return case

    def attempt(self, case: Case, env: dict[str, str], *, wait: bool = True) -> Run:
        """One run of ``case.command`` in a clean output folder.

        A case whose mode is :data:`BUSY` runs beside a :class:`BusyLoop` (started after
        the wait for an idle machine); its CPU time is not counted as noise.
        """
        shutil.rmtree(self.out_dir, ignore_errors=True)
        self.out_dir.mkdir(parents=True)
        self.counter += 1
        name = f"{self.stamp}-{self.counter:03d}-{case.tool}-{case.kind}"
        if wait:
            wait_for_idle(self.args.wait_idle)
        if case.mode == BUSY:
            with BusyLoop() as busy:
                run, _ = self.launch(case, env, name)
            if run.other_cores is not None and run.wall_s:
                # the busy loop ran SETTLE_S before the run: count only its share
                busy_cores = busy.cpu_s / (run.wall_s + BusyLoop.SETTLE_S)
                run.other_cores = max(0.0, run.other_cores - busy_cores)
            run.note = (run.note + " " if run.note else "") + (
                f"(busy loop: {busy.cpu_s:.1f} CPU s)"
            )
        else:
            run, _ = self.launch(case, env, name)
        seconds, n_files = output_seconds(self.out_dir)
        run.audio_out_s = seconds
        expected = len(case.extra.get("inputs", [1])) * case.extra.get("n_stems", 2)
        if run.status == "ok" and n_files < expected:
            run.status = f"failed (only {n_files} of {expected} stems written)"
        if run.status == "ok" and seconds is not None and seconds + 0.05 < case.audio_in_s:
            run.note = (run.note + " " if run.note else "") + (
                f"output only {seconds:.1f} s of {case.audio_in_s:.0f} s"
            )
        shutil.rmtree(self.out_dir, ignore_errors=True)
        self.log_run(run)
        return run

    @staticmethod
    def log_run(run: Run) -> None:
        rss = fmt_gib(run.peak_rss_bytes)
        others = "?" if run.other_cores is None else f"{run.other_cores:.2f}"
        log(
            f"  -> {run.status}, {fmt_s(run.wall_s)}, peak RSS {rss}, "
            f"other processes {others} cores {run.note}".rstrip()
        )

    def unavailable(self, case: Case, why: str) -> None:
        case.runs.append(Run(None, f"unavailable ({why})"))
        self.cases.append(case)
        log(f"{case.tool} {case.kind} {case.model} {case.mode} {case.input}: {why}")

    def n_stems(self, model: str) -> int:
        from splitstems.config import load_config

        return len(load_config(f"spleeter:{model}").instruments)

    # -- phases

    def setup(self) -> dict[int, Path]:
        args = self.args
        self.cache.mkdir(parents=True, exist_ok=True)
        log(f"cache folder {self.cache}")
        help_text = subprocess.run(
            [*self.splitstems, "separate", "--help"], capture_output=True, text=True
        ).stdout
        self.fast_available = "--fast" in help_text
        if "fast" in args.modes and not self.fast_available:
            self.notes.append("`--fast` is not in `splitstems separate --help`: fast mode skipped")
        self.meta = machine_info(self.python)
        self.meta["source_fingerprint_start"] = source_fingerprint()
        durations = sorted(set(args.durations))
        needed = set(durations)
        if not args.skip_batch:
            needed.add(BATCH_SECONDS)
        if not args.skip_graph:
            needed.add(GRAPH_SECONDS)
        inputs = build_inputs(self.cache, sorted(needed))
        for model in args.models:
            if model != "2stems":
                self.model_dirs[model] = build_random_model(self.cache, model)
        if args.against_spleeter:
            self.spleeter_error = ensure_spleeter(self.spleeter_venv, args.install_timeout)
            if self.spleeter_error:
                self.notes.append(f"Spleeter not run: {self.spleeter_error}")
                log(self.spleeter_error)
            else:
                self.pretrained = build_pretrained_models(self.cache)
                version = subprocess.run(
                    [
                        str(self.spleeter_venv / "bin" / "python"),
                        "-c",
                        "import tensorflow as tf, numpy, importlib.metadata as m; "
                        "print(m.version('spleeter'), tf.__version__, numpy.__version__)",
                    ],
                    capture_output=True,
                    text=True,
                ).stdout.split()
                if len(version) == 3:
                    self.meta.update(
                        spleeter=version[0], tensorflow=version[1], spleeter_numpy=version[2]
                    )
        return inputs

    def modes(self) -> list[str]:
        return list(self.args.modes)

    def warmup(self) -> None:
        """Untimed first runs: page cache, 2stems conversion into splitstems' cache."""
        for model in self.args.models:
            for mode in self.modes():
                if mode == "fast" and not self.fast_available:
                    continue
                case = Case("warmup", "splitstems", model, mode, EXAMPLE.name, 10.88)
                case.command = self.ours_command(model, mode, [EXAMPLE])
                case.extra["n_stems"] = self.n_stems(model)
                self.timed(case, self.ours_env(), repeat=1, quiet=False)
        if self.spleeter_ok:
            case = Case("warmup", "spleeter", "2stems", "default", EXAMPLE.name, 10.88)
            case.command = self.spleeter_command([EXAMPLE])
            self.timed(case, self.spleeter_env(), repeat=1, quiet=False)

    @property
    def spleeter_ok(self) -> bool:
        return bool(self.args.against_spleeter and not self.spleeter_error)

    def cli(self, inputs: dict[int, Path]) -> None:
        args = self.args
        for seconds in sorted(set(args.durations)):
            path = inputs[seconds]
            for model, only in args.models.items():
                if only is not None and seconds not in only:
                    continue
                for mode in self.modes():
                    case = Case("cli", "splitstems", model, mode, fmt_dur(seconds), seconds)
                    case.extra["n_stems"] = self.n_stems(model)
                    case.extra["weights"] = "real" if model == "2stems" else "random"
                    if mode == "fast" and not self.fast_available:
                        self.unavailable(case, "no --fast flag")
                        continue
                    case.command = self.ours_command(model, mode, [path])
                    self.timed(case, self.ours_env(), repeat=args.repeat)
            if self.spleeter_ok and "2stems" in args.models:
                case = Case("cli", "spleeter", "2stems", "default", fmt_dur(seconds), seconds)
                case.command = self.spleeter_command([path])
                self.timed(case, self.spleeter_env(), repeat=args.repeat)
                if seconds > SPLEETER_DEFAULT_DURATION and args.spleeter_full:
                    mode = f"-d {seconds}"
                    case = Case("cli", "spleeter", "2stems", mode, fmt_dur(seconds), seconds)
                    case.command = self.spleeter_command([path], duration=seconds)
                    self.timed(case, self.spleeter_env(), repeat=1)

    def batch(self, inputs: dict[int, Path]) -> None:
        files = build_batch(self.cache, inputs[BATCH_SECONDS])
        label = f"{BATCH_FILES} x {fmt_dur(BATCH_SECONDS)}"
        total = float(BATCH_FILES * BATCH_SECONDS)
        for mode in self.modes():
            case = Case("batch", "splitstems", "2stems", mode, label, total)
            case.extra.update(inputs=[str(f) for f in files], n_stems=2)
            if mode == "fast" and not self.fast_available:
                self.unavailable(case, "no --fast flag")
                continue
            case.command = self.ours_command("2stems", mode, files)
            self.timed(case, self.ours_env(), repeat=1)
        if self.spleeter_ok:
            case = Case("batch", "spleeter", "2stems", "default", label, total)
            case.extra.update(inputs=[str(f) for f in files], n_stems=2)
            case.command = self.spleeter_command(files)
            self.timed(case, self.spleeter_env(), repeat=1)

    def graph(self, inputs: dict[int, Path]) -> None:
        path = inputs[GRAPH_SECONDS]
        label = fmt_dur(GRAPH_SECONDS)
        for mode in self.modes():
            case = Case("graph", "splitstems", "2stems", mode, label, GRAPH_SECONDS)
            if mode == "fast" and not self.fast_available:
                self.unavailable(case, "no --fast flag")
                continue
            case.command = [self.python, str(BENCH / "graph_splitstems.py"), str(path)]
            case.command += ["--repeat", str(self.args.graph_repeat)]
            if mode == "fast":
                case.command.append("--fast")
            self.helper(case, self.ours_env())
        if self.spleeter_ok:
            case = Case("graph", "spleeter", "2stems", "default", label, GRAPH_SECONDS)
            case.command = [str(self.spleeter_venv / "bin" / "python")]
            case.command += [str(BENCH / "graph_spleeter.py"), str(path)]
            case.command += ["--repeat", str(self.args.graph_repeat)]
            self.helper(case, self.spleeter_env())

    def helper(self, case: Case, env: dict[str, str]) -> None:
        """Run a graph helper; its timed calls become the case's runs."""
        tries: list[tuple[Run, str]] = []
        for attempt in range(self.args.retry_noisy + 1):
            self.counter += 1
            name = f"{self.stamp}-{self.counter:03d}-{case.tool}-graph"
            retry = f" (retry {attempt})" if attempt else ""
            log(f"{case.tool} in-process compute {case.mode} {case.input}{retry}")
            wait_for_idle(self.args.wait_idle)
            tries.append(self.launch(case, env, name))
            self.log_run(tries[-1][0])
            if not self.noisy(tries[-1][0]):
                break
        run, out = min(tries, key=lambda t: t[0].other_cores if self.noisy(t[0]) else -1.0)
        if len(tries) > 1:
            case.extra["discarded"] = [asdict(t[0]) for t in tries if t[0] is not run]
        result: dict[str, Any] = {}
        for line in reversed(out.strip().splitlines()):
            with contextlib.suppress(json.JSONDecodeError):
                result = json.loads(line)
                break
        case.extra.update(
            process_wall_s=run.wall_s,
            process_peak_rss_bytes=run.peak_rss_bytes,
            **{k: v for k, v in result.items() if k != "times_s"},
        )
        if run.status != "ok" or result.get("status") != "ok":
            status = result.get("status") if result.get("status", "ok") != "ok" else run.status
            case.runs.append(Run(None, status or run.status, run.peak_rss_bytes, note=run.note))
        else:
            for t in result["times_s"]:
                case.runs.append(
                    Run(
                        t,
                        "ok",
                        run.peak_rss_bytes,
                        audio_out_s=result["output_samples"] / SAMPLE_RATE,
                        other_cores=run.other_cores,
                    )
                )
        log(f"  -> {case.status}, best {fmt_s(case.best_s)}")
        self.cases.append(case)
        self.save()

    def headline(self, inputs: dict[int, Path]) -> None:
        """The three headline ratios: idle default, idle ``--fast``, default with one core busy.

        Runs alternate between the tools (ours default, ours fast, Spleeter, then the
        same with a busy loop), ``--repeat`` rounds; each case keeps its best.
        """
        path, label = inputs[HEADLINE_SECONDS], fmt_dur(HEADLINE_SECONDS)
        plan: list[tuple[Case, dict[str, str]]] = []
        for mode in ("default", "fast", BUSY):
            if mode == "fast" and not self.fast_available:
                continue
            case = Case("headline", "splitstems", "2stems", mode, label, HEADLINE_SECONDS)
            case.command = self.ours_command("2stems", "fast" if mode == "fast" else "", [path])
            case.extra["n_stems"] = 2
            plan.append((case, self.ours_env()))
            if mode != "fast" and self.spleeter_ok:
                ref = Case("headline", "spleeter", "2stems", mode, label, HEADLINE_SECONDS)
                ref.command = self.spleeter_command([path])
                ref.extra["n_stems"] = 2
                plan.append((ref, self.spleeter_env()))
        for case, _ in plan:
            self.cases.append(case)
        for round_ in range(self.args.repeat):
            for case, env in plan:
                if case.runs and case.runs[-1].status != "ok":
                    continue
                log(f"{case.tool} {case.mode} {case.input} (round {round_ + 1}/{self.args.repeat})")
                attempts = []
                for _ in range(self.args.retry_noisy + 1):
                    attempts.append(self.attempt(case, env))
                    if not self.noisy(attempts[-1]):
                        break
                run = min(attempts, key=lambda r: r.other_cores if self.noisy(r) else -1.0)
                if self.noisy(run):
                    run.note = (run.note + " " if run.note else "") + "(noisy)"
                discarded = [asdict(r) for r in attempts if r is not run]
                if discarded:
                    case.extra.setdefault("discarded", []).extend(discarded)
                case.runs.append(run)
                self.save()

    def headline_ratios(self) -> list[dict[str, Any]]:
        """Spleeter's best wall time / ours, per headline mode, with the target."""
        rows = []
        for mode, (ref_mode, target) in HEADLINE_TARGETS.items():
            ours = self.find("headline", "splitstems", "2stems", mode, fmt_dur(HEADLINE_SECONDS))
            ref = self.find("headline", "spleeter", "2stems", ref_mode, fmt_dur(HEADLINE_SECONDS))
            if ours is None:
                continue
            row: dict[str, Any] = {
                "mode": mode,
                "splitstems_best_s": ours.best_s,
                "spleeter_best_s": ref.best_s if ref else None,
                "target": target,
                "runs": len(ours.runs),
            }
            if ref is not None and ref.best_s and ours.best_s:
                row["ratio"] = ref.best_s / ours.best_s
                row["met"] = row["ratio"] >= target
            noisy = [
                c.tool
                for c in (ours, ref)
                if c is not None
                and c.other_cores is not None
                and c.other_cores > self.args.noisy_cores
            ]
            row["note"] = f"noisy: {' and '.join(noisy)}" if noisy else ""
            rows.append(row)
        return rows

    def run(self) -> None:
        inputs = self.setup()
        self.warmup()
        if self.args.headline:
            self.headline(inputs)
            self.finish()
            return
        self.cli(inputs)
        if not self.args.skip_batch:
            self.batch(inputs)
        if not self.args.skip_graph:
            self.graph(inputs)
        self.finish()

    def finish(self) -> None:
        self.meta["loadavg_end"] = os.getloadavg()
        self.meta["source_fingerprint_end"] = source_fingerprint()
        if self.meta["source_fingerprint_end"] != self.meta["source_fingerprint_start"]:
            self.notes.append(
                "src/ changed while the benchmark ran (editable install): rows may mix versions"
            )
        self.meta["total_wall_s"] = time.time() - self.started
        self.save(final=True)
        report = self.markdown()
        print(report)
        (RESULTS / f"{self.stamp}.md").write_text(report + "\n")
        log(f"results: {RESULTS / (self.stamp + '.json')} and {RESULTS / 'latest.json'}")

    # -- output

    def save(self, *, final: bool = False) -> None:
        """Write the timestamped JSON (after every case); ``latest.json`` when complete."""
        RESULTS.mkdir(parents=True, exist_ok=True)
        data = {
            "timestamp": self.stamp,
            "command": [sys.executable, *sys.argv],
            "machine": self.meta,
            "settings": {
                "durations": self.args.durations,
                "models": self.args.models,
                "modes": self.args.modes,
                "repeat": self.args.repeat,
                "against_spleeter": self.args.against_spleeter,
                "spleeter_venv": str(self.spleeter_venv),
                "mem_limit_gb": self.args.mem_limit_gb,
                "as_limit_gb": self.args.as_limit_gb,
                "wait_idle_s": self.args.wait_idle,
                "noisy_cores": self.args.noisy_cores,
                "retry_noisy": self.args.retry_noisy,
                "timeout_s": self.args.timeout,
                "cache": str(self.cache),
                "input_source": str(EXAMPLE),
            },
            "notes": self.notes,
            "cases": [c.to_json() for c in self.cases],
            "ratios": self.ratios(),
            "headline": self.headline_ratios(),
        }
        text = json.dumps(data, indent=2, default=str)
        tmp = RESULTS / f".{self.stamp}.json.tmp"
        tmp.write_text(text)
        tmp.replace(RESULTS / f"{self.stamp}.json")
        if final:
            (RESULTS / "latest.json").write_text(text)

    def find(self, kind: str, tool: str, model: str, mode: str, label: str) -> Case | None:
        for case in self.cases:
            if (case.kind, case.tool, case.model, case.mode, case.input) == (
                kind,
                tool,
                model,
                mode,
                label,
            ):
                return case
        return None

    def ratios(self) -> list[dict[str, Any]]:
        """Spleeter (default CLI) vs ours, per input and mode, from this run only."""
        rows = []
        for ref in self.cases:
            if (
                ref.tool != "spleeter"
                or ref.kind in ("warmup", "headline")
                or ref.mode != "default"
            ):
                continue
            for mode in self.modes():
                ours = self.find(ref.kind, "splitstems", "2stems", mode, ref.input)
                if ours is None or ours.best_s is None:
                    continue
                row: dict[str, Any] = {"kind": ref.kind, "input": ref.input, "mode": mode}
                if ref.best_s is not None:
                    row["wall_best"] = ref.best_s / ours.best_s
                    if ref.median_s and ours.median_s:
                        row["wall_median"] = ref.median_s / ours.median_s
                    ref_rtf, our_rtf = ref.rtf(ref.best_s), ours.rtf(ours.best_s)
                    row["rtf_best"] = our_rtf / ref_rtf if ref_rtf and our_rtf else None
                if (
                    ref.best_s is not None
                    and ref.peak_rss_bytes
                    and ours.peak_rss_bytes
                    and ref.kind != "graph"
                ):
                    row["memory"] = ref.peak_rss_bytes / ours.peak_rss_bytes
                notes = [n for n in (ref.status if ref.status != "ok" else "",) if n]
                noisy = [
                    c.tool
                    for c in (ref, ours)
                    if c.other_cores is not None and c.other_cores > self.args.noisy_cores
                ]
                if noisy:
                    notes.append(f"noisy ({' and '.join(noisy)} slowed by other processes)")
                if ref.audio_out_s and ref.audio_out_s + 0.05 < ref.audio_in_s:
                    notes.append(
                        f"Spleeter wrote only {fmt_dur(round(ref.audio_out_s))} of "
                        f"{ref.input}: compare real-time factors"
                    )
                row["note"] = "; ".join(notes)
                rows.append(row)
        return rows

    def markdown(self) -> str:
        m = self.meta
        lines = [
            f"## splitstems benchmark {self.stamp}",
            "",
            f"Machine: {m.get('cpu_model', '?')}, {m.get('cpus_usable')} cores usable, "
            f"{(m.get('ram_bytes') or 0) / GIB:.1f} GiB RAM; torch {m.get('torch')} "
            f"({m.get('torch_threads')} threads), splitstems {m.get('splitstems')} "
            f"({m.get('git')})"
            + (
                f"; Spleeter {m['spleeter']}, TensorFlow {m['tensorflow']}"
                if "spleeter" in m
                else ""
            )
            + f". Load average at start {m.get('loadavg_start', ('?',))[0]:.2f}. "
            f"Repeats: {self.args.repeat} (best / median). Total {m.get('total_wall_s', 0):.0f} s.",
            "",
        ]
        header = (
            "| tool | model | mode | input | audio out | wall best | wall median | RTF best "
            "| RTF median | peak RSS | CPU | others | status |"
        )
        sections = [
            (
                "headline",
                f"Headline: one {fmt_dur(HEADLINE_SECONDS)} WAV, 2stems, best of "
                f"{self.args.repeat}",
            ),
            ("cli", "Command line, one file (`separate -o out FILE`)"),
            ("batch", f"{BATCH_FILES} files of {fmt_dur(BATCH_SECONDS)} in one command"),
            ("graph", "In-process model compute (STFT + U-Nets + masks + iSTFT), warm"),
        ]
        for kind, title in sections:
            cases = [c for c in self.cases if c.kind == kind]
            if not cases:
                continue
            lines += [f"### {title}", "", header, "|" + "---|" * 13]
            for c in cases:
                s = c.summary()
                cpu = f"{s['cpu_percent']:.0f} %" if s["cpu_percent"] else "—"
                others = "—" if c.other_cores is None else f"{c.other_cores:.2f}"
                out = fmt_dur(round(s["audio_out_s"], 1)) if s["audio_out_s"] else "—"
                status = c.status + (f" — {c.runs[-1].note}" if c.runs and c.runs[-1].note else "")
                if c.extra.get("weights") == "random":
                    status += " (random weights)"
                lines.append(
                    f"| {c.tool} | {c.model} | {c.mode} | {c.input} | {out} "
                    f"| {fmt_s(s['best_s'])} | {fmt_s(s['median_s'])} | {fmt_x(s['rtf_best'])} "
                    f"| {fmt_x(s['rtf_median'])} | {fmt_gib(s['peak_rss_bytes'])} | {cpu} "
                    f"| {others} | {status} |"
                )
            if kind == "graph":
                lines.append("")
                lines.append(
                    "Graph rows: peak RSS is the helper process's (load + warm-up + runs); "
                    "build = model load / graph build + restore: "
                    + ", ".join(
                        f"{c.tool} {c.mode} {fmt_s(c.extra.get('build_s'))}"
                        for c in cases
                        if c.extra.get("build_s") is not None
                    )
                )
            lines.append("")
        lines += [
            "CPU: the run's CPU time / wall time (200 % = both cores). others: the most CPU "
            "other processes of the machine used during a run, in cores (noise: > 0.3 means "
            "the run was slowed by something else).",
            "",
        ]
        headline = self.headline_ratios()
        if headline:
            lines += [
                "### Headline ratios: Spleeter 2.4.2 wall time / splitstems (same run, best "
                f"of {self.args.repeat}; {BUSY}: both beside a busy loop)",
                "",
                "| splitstems | splitstems best | Spleeter best | ratio | target | note |",
                "|---|---|---|---|---|---|",
            ]
            for r in headline:
                met = "" if "met" not in r else (" (met)" if r["met"] else " (NOT met)")
                lines.append(
                    f"| {r['mode']} | {fmt_s(r['splitstems_best_s'])} | "
                    f"{fmt_s(r['spleeter_best_s'])} | {fmt_x(r.get('ratio'), 2)} | "
                    f">= {r['target']:g}x{met} | {r['note']} |"
                )
            lines.append("")
        ratios = self.ratios()
        if ratios:
            lines += [
                "### Spleeter 2.4.2 / splitstems (same run; > 1 means splitstems is better)",
                "",
                "| what | input | splitstems mode | wall time (best) | wall time (median) "
                "| real-time factor (best) | peak RSS | note |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in ratios:
                lines.append(
                    f"| {r['kind']} | {r['input']} | {r['mode']} | "
                    f"{fmt_x(r.get('wall_best'), 2)} | {fmt_x(r.get('wall_median'), 2)} | "
                    f"{fmt_x(r.get('rtf_best'), 2)} | {fmt_x(r.get('memory'), 2)} | "
                    f"{r.get('note', '')} |"
                )
            lines.append("")
        for note in self.notes:
            lines.append(f"Note: {note}")
        return "\n".join(lines).rstrip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--durations",
        type=parse_durations,
        default=parse_durations("30,180,600,3600"),
        help="input lengths in seconds (30, 3m, 1h), comma-separated (default: 30,180,600,3600)",
    )
    parser.add_argument(
        "--models",
        type=parse_models,
        default=parse_models("2stems,4stems@180,5stems@180"),
        help="models, comma-separated; NAME@D1+D2 runs NAME only at those durations "
        "(default: 2stems,4stems@180,5stems@180; only 2stems has real weights offline)",
    )
    parser.add_argument(
        "--modes",
        type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
        default=["default", "fast"],
        help="splitstems modes: default, fast (--fast) (default: both)",
    )
    parser.add_argument(
        "--headline",
        action="store_true",
        help=f"only the three headline ratios against Spleeter 2.4.2 on a "
        f"{HEADLINE_SECONDS} s WAV, 2stems: idle default (target >= 4x), idle --fast "
        "(>= 6x), default with one core kept busy by a busy loop (>= 3x); best of "
        "--repeat (default 2 here); installs Spleeter if missing",
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="runs per CLI case (best, median; default 1)"
    )
    parser.add_argument("--graph-repeat", type=int, default=3, help="timed in-process calls")
    parser.add_argument(
        "--against-spleeter",
        action="store_true",
        help="also run the original Spleeter 2.4.2 (installed into --spleeter-venv if missing)",
    )
    parser.add_argument(
        "--spleeter-full",
        action="store_true",
        help="for inputs over 600 s also run Spleeter with -d <length> (its CLI stops at "
        "600 s by default); needs memory linear in the length",
    )
    parser.add_argument("--spleeter-venv", type=Path, default=BENCH / ".spleeter-venv")
    parser.add_argument("--skip-batch", action="store_true", help="skip the ten-file command")
    parser.add_argument("--skip-graph", action="store_true", help="skip in-process compute")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache(),
        help="inputs, random models, Spleeter's pretrained_models, scratch output "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds per run (default: 1800)"
    )
    parser.add_argument(
        "--mem-limit-gb",
        type=float,
        default=19.0,
        help="kill a run when its processes' summed RSS passes this many GiB (polled "
        "4 times a second), reported as failed (memory); 0 for none (default: 19)",
    )
    parser.add_argument(
        "--as-limit-gb",
        type=float,
        default=0.0,
        help="also cap each child's address space (RLIMIT_AS) at this many GiB; "
        "TensorFlow reserves far more address space than it uses, so this fails Spleeter "
        "well before its RSS reaches it (default: 0, no cap)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=60.0,
        help="before each timed run, wait up to this many seconds for other processes to "
        "use < 0.3 cores (default: 60; 0 to not wait)",
    )
    parser.add_argument(
        "--noisy-cores",
        type=float,
        default=0.3,
        help="a run during which other processes used more CPU than this (in cores) is "
        "noisy (default: 0.3)",
    )
    parser.add_argument(
        "--retry-noisy",
        type=int,
        default=2,
        help="redo a noisy run up to this many times, keeping the quietest (default: 2)",
    )
    parser.add_argument("--install-timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)
    bad = [m for m in args.modes if m not in {"default", "fast"}]
    if bad:
        parser.error(f"unknown modes {bad}: use default, fast")
    if args.repeat is None:
        args.repeat = 2 if args.headline else 1
    if args.headline:
        args.against_spleeter = True
        args.durations = [HEADLINE_SECONDS]
        args.models = {"2stems": None}
        args.modes = ["default", "fast"]
        args.skip_batch = args.skip_graph = True
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.cache_dir = args.cache_dir.resolve()
    args.spleeter_venv = args.spleeter_venv.absolute()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not EXAMPLE.exists():
        print(f"error: {EXAMPLE} not found (set SPLITSTEMS_SHARED)", file=sys.stderr)
        return 2
    bench = Bench(args)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # kill the running child group, save, exit
    try:
        bench.run()
    except KeyboardInterrupt:
        bench.save()
        log("interrupted; partial results saved")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

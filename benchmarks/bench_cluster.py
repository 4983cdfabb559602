"""Benchmark ``separate --ray`` against plain ``separate`` on the same files, same run.

A Ray head with ``--cpus`` CPUs is started on 127.0.0.1 (``ray start --head --block``,
no dashboard; stopped by its process id). The same ``--files`` songs (MUSDB18's 7-second
previews from the shared folder, each looped to ``--seconds``, 30 by default, as 16-bit
WAV) are separated with 2stems by:

* ``plain``: ``splitstems separate FILES -o OUT`` (one process, its default threads);
* ``ray``: ``splitstems separate --ray 127.0.0.1:PORT FILES -o OUT`` (one 1-CPU worker
  per CPU of the cluster);
* ``ray-2cpu`` (with ``--also-2cpu``): ``--ray-cpus-per-worker 2``, one worker.

Each command is timed whole (wall clock: start-up, model loading, connecting, every
file), ``--repeat`` times, the kinds alternating; the best of each is compared. The
overhead of Ray is ``(ray - plain) / ray`` of the wall time (target: at most 10 %).
Per-file costs come from the run's ``manifest.jsonl`` (compute seconds per file and per
second of audio, on one worker): docs/cluster.md sizes a catalogue from them.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python benchmarks/bench_cluster.py

prints a table and writes ``benchmarks/results/cluster-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED = Path(os.environ.get("SPLITSTEMS_SHARED", REPO.parent / "shared")).resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(cpus: int, temp: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = temp / "head.log"
    head = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
            "--port", str(port), "--num-cpus", str(cpus), "--include-dashboard", "false",
            "--disable-usage-stats", "--object-store-memory", "300000000",
            "--temp-dir", str(temp / "ray"),
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text():
        if head.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the Ray head did not start:\n{log.read_text()}")
        time.sleep(0.3)
    return head, f"127.0.0.1:{port}"


def make_inputs(folder: Path, n: int, seconds: float) -> list[Path]:
    import numpy as np

    from splitstems import audio

    sources = sorted((SHARED / "audio" / "musdb7").glob("*/*.mp4"))[:n]
    if len(sources) < n:
        raise SystemExit(f"only {len(sources)} previews in {SHARED / 'audio' / 'musdb7'}")
    out = []
    for index, source in enumerate(sources):
        path = folder / f"song{index:02d}.wav"
        wave = audio.load(source)
        n_samples = int(seconds * 44100)
        wave = np.tile(wave, (-(-n_samples // len(wave)), 1))[:n_samples]  # looped
        audio.save(path, wave, sample_rate=44100)
        out.append(path)
    return out


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each file")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray head")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--also-2cpu", action="store_true", help="also one 2-CPU worker")
    args = parser.parse_args()

    temp = Path(tempfile.mkdtemp(prefix="rayb", dir="/tmp"))
    cache = temp / "cache"
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "SPLITSTEMS_MODEL_DIR": str(SHARED / "models" / "spleeter"),
        "SPLITSTEMS_CACHE": str(cache),
        "SPLITSTEMS_DOWNLOAD_URL": "http://127.0.0.1:9/unreachable",
    }
    os.environ.update({k: env[k] for k in ("SPLITSTEMS_MODEL_DIR", "SPLITSTEMS_CACHE")})
    head_env = {k: v for k, v in env.items() if not k.startswith("SPLITSTEMS_")}
    inputs = temp / "in"
    inputs.mkdir()
    files = make_inputs(inputs, args.files, args.seconds)
    audio_s = 0.0
    from splitstems import audio

    for path in files:
        audio_s += audio.probe(path).duration or 0.0
    head, address = start_head(args.cpus, temp, head_env)
    base = [sys.executable, "-m", "splitstems", "separate", *map(str, files)]
    kinds = {
        "plain": [],
        "ray": ["--ray", address],
    }
    if args.also_2cpu:
        kinds["ray-2cpu"] = ["--ray", address, "--ray-cpus-per-worker", "2"]
    walls: dict[str, list[float]] = {k: [] for k in kinds}
    per_file: dict[str, list[float]] = {k: [] for k in kinds if k != "plain"}
    try:
        timed([*base[: -len(files)], str(files[0]), "-o", str(temp / "warm")], env)  # cache
        for rep in range(args.repeat):
            order = list(kinds) if rep % 2 == 0 else list(reversed(kinds))
            for kind in order:
                out = temp / f"{kind}-{rep}"
                wall = timed([*base, "-o", str(out), *kinds[kind]], env)
                walls[kind].append(wall)
                print(f"{kind:9s} run {rep + 1}: {wall:6.2f} s", flush=True)
                if kind != "plain":
                    lines = [
                        json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()
                    ]
                    per_file[kind] += [line["compute_seconds"] for line in lines]
                shutil.rmtree(out, ignore_errors=True)
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(120)
    best = {k: min(v) for k, v in walls.items()}
    rows = []
    for kind, wall in best.items():
        overhead = (wall - best["plain"]) / wall
        row = {
            "kind": kind,
            "best_wall_s": round(wall, 2),
            "walls_s": [round(w, 2) for w in walls[kind]],
            "files_per_s": round(len(files) / wall, 3),
            "audio_h_per_h": round(audio_s / wall, 2),
            "overhead_of_wall": round(overhead, 3) if kind != "plain" else None,
        }
        if kind in per_file:
            median = statistics.median(per_file[kind])
            row["median_compute_s_per_file"] = round(median, 3)
            row["compute_s_per_audio_s"] = round(median / (audio_s / len(files)), 4)
        rows.append(row)
    print()
    print(f"{len(files)} files, {audio_s:.1f} s of audio, 2stems, Ray head with {args.cpus} CPUs")
    print("| kind | best wall s | runs | files/s | h audio/h | Ray overhead | s/file (worker) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        over = "" if row["overhead_of_wall"] is None else f"{100 * row['overhead_of_wall']:.1f} %"
        cost = row.get("median_compute_s_per_file", "")
        print(
            f"| {row['kind']} | {row['best_wall_s']} | {row['walls_s']} | {row['files_per_s']} "
            f"| {row['audio_h_per_h']} | {over} | {cost} |"
        )
    ray_row = next(r for r in rows if r["kind"] == "ray")
    met = ray_row["overhead_of_wall"] <= 0.10
    print(
        f"\nRay overhead {100 * ray_row['overhead_of_wall']:.1f} % of wall time: "
        f"{'met' if met else 'NOT met'} (target <= 10 %)"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    data = {
        "benchmark": "bench_cluster",
        "when": stamp,
        "files": len(files),
        "audio_seconds": round(audio_s, 2),
        "cpus": args.cpus,
        "repeat": args.repeat,
        "rows": rows,
        "target_met": met,
    }
    (RESULTS / f"cluster-{stamp}.json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"results: {RESULTS / f'cluster-{stamp}.json'}")
    shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()

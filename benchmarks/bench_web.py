"""Benchmark ``splitstems serve``: a song through the web server against the library.

In one run, on the same WAV (Spleeter's example song looped to ``--seconds``):

* ``Separator.separate_to_file`` in this process (model loaded first, best of
  ``--repeat``): the baseline;
* one upload to ``splitstems serve`` on 127.0.0.1 (model loaded at start), from the
  first byte sent to the job's ``done``, best of ``--repeat``; the ratio web / library
  is the cost of the web path (upload, decode check, peaks for the waveforms);
* ``--concurrent`` uploads at once: wall time until all are done, and the server's peak
  RSS (VmHWM) after one song and after the burst (memory stays bounded: the jobs queue).

Prints a table and writes ``benchmarks/results/web-<timestamp>.json``. The machine is
shared and noisy: compare the ratios of one run only::

    .venv/bin/python benchmarks/bench_web.py --seconds 180 --concurrent 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from splitstems import audio
from splitstems.separator import Separator

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPLITSTEMS_SHARED", ROOT.parent / "shared")).resolve()


def _song(seconds: float, folder: Path) -> Path:
    path = folder / f"example-{seconds:g}s.wav"
    if not path.exists():
        x = audio.load(SHARED / "audio" / "examples" / "audio_example.mp3")
        n = int(seconds * 44100)
        audio.save(path, np.resize(x, (n, 2)), sample_rate=44100)
    return path


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=600) as response:
        return json.loads(response.read())


def _through_web(base: str, path: Path) -> float:
    start = time.perf_counter()
    request = urllib.request.Request(
        f"{base}/api/jobs?name={path.name}", data=path.read_bytes(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        job = json.loads(response.read())
    while job["state"] not in ("done", "failed", "cancelled"):
        time.sleep(0.05)
        job = _get(f"{base}/api/jobs/{job['id']}")
    if job["state"] != "done":
        raise SystemExit(f"job failed: {job}")
    return time.perf_counter() - start


def _peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--concurrent", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("SPLITSTEMS_MODEL_DIR", str(SHARED / "models" / "spleeter"))
    work = Path(tempfile.mkdtemp(prefix="bench-web-"))
    song = _song(args.seconds, work)

    separator = Separator("spleeter:2stems", progress=False)
    library = min(
        _timed(lambda: separator.separate_to_file(song, work / "lib")) for _ in range(args.repeat)
    )

    port = _port()
    server = subprocess.Popen(
        [sys.executable, "-m", "splitstems", "serve", "--port", str(port)],
        env={**os.environ, "TMPDIR": str(work)},
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                _get(f"{base}/api/config")
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(3)  # the default model is loaded at start
        idle_mb = _peak_mb(server.pid)
        web = min(_through_web(base, song) for _ in range(args.repeat))
        one_mb = _peak_mb(server.pid)
        start = time.perf_counter()
        threads = [
            threading.Thread(target=_through_web, args=(base, song)) for _ in range(args.concurrent)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        burst = time.perf_counter() - start
        burst_mb = _peak_mb(server.pid)
    finally:
        os.kill(server.pid, signal.SIGTERM)
        server.wait(timeout=60)

    rows = {
        "song_seconds": args.seconds,
        "library_s": round(library, 2),
        "web_s": round(web, 2),
        "web_over_library": round(web / library, 3),
        f"{args.concurrent}_at_once_s": round(burst, 2),
        "server_peak_mb_idle": round(idle_mb),
        "server_peak_mb_one_song": round(one_mb),
        f"server_peak_mb_after_{args.concurrent}_at_once": round(burst_mb),
    }
    print("| measure | value |\n|---|---|")
    for key, value in rows.items():
        print(f"| {key} | {value} |")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / f"web-{stamp}.json").write_text(json.dumps(rows, indent=2))


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()

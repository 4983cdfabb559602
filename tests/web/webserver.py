"""Start ``splitstems serve`` on 127.0.0.1 in a subprocess, and stop it by its pid."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SONGS = ("BKS - Too Much", "Buitraker - Revo X", "Cristina Vane - So Easy")


def song(shared_dir: Path, k: int = 0) -> Path:
    """A 7-second MUSDB18 preview (the mixture is its first audio stream)."""
    return shared_dir / "audio" / "musdb7" / "test" / f"{SONGS[k]}.stem.mp4"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A running ``splitstems serve``: its address, process and temp folder."""

    url: str
    port: int
    process: subprocess.Popen
    tmpdir: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> int:
        """SIGTERM by pid, wait for the exit; return the exit code."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        return self.process.returncode

    def json(self, path: str, *, method: str = "GET", data: bytes | None = None) -> dict:
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")

    def wait_done(self, job_id: str, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.json(f"/api/jobs/{job_id}")
            if job["state"] in ("done", "failed", "cancelled"):
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not finished after {timeout} s: {job}")

    def peak_rss_mb(self) -> float:
        """The server process's peak resident memory (VmHWM), in MB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM")

    def leftovers(self) -> list[Path]:
        return sorted(self.tmpdir.rglob("*"))

    def wait_files_gone(self, job_id: str, timeout: float) -> None:
        """Wait until no file or folder of ``job_id`` is left; fail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while any(p.name == job_id for p in self.leftovers()):
            assert time.monotonic() < deadline, self.leftovers()
            time.sleep(0.1)


def start_server(env: dict[str, str], tmp: Path, *args: str) -> Server:
    """Run ``splitstems serve --port <free> ARGS`` with TMPDIR=tmp/tmp; wait until it answers."""
    port = free_port()
    tmpdir = tmp / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    log = tmp / "server.log"
    full_env = {**os.environ, **env, "TMPDIR": str(tmpdir)}
    process = subprocess.Popen(
        [sys.executable, "-m", "splitstems", "serve", "--port", str(port), *args],
        env=full_env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    server = Server(f"http://127.0.0.1:{port}", port, process, tmpdir, log)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited {process.returncode}: {log.read_text()}")
        try:
            urllib.request.urlopen(server.url + "/api/config", timeout=5).close()
            return server
        except urllib.error.HTTPError:  # a token server answers 401: it is up
            return server
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    server.stop()
    raise AssertionError(f"server did not start: {log.read_text()}")

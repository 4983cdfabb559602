"""Whole-or-nothing file writes, and the clean-up of temp files a killed run left."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from splitstems import files
from splitstems.files import atomic_write, remove_stale_temps, temp_path

posix_only = pytest.mark.skipif(os.name != "posix", reason="process ids and modes are POSIX")


def test_writes_bytes_text_and_through_a_function(tmp_path):
    atomic_write(tmp_path / "a.bin", b"\x00\x01")
    atomic_write(tmp_path / "b.txt", "grüße")
    atomic_write(tmp_path / "c.txt", lambda path: path.write_text("from a writer"))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "grüße"
    assert (tmp_path / "c.txt").read_text() == "from a writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.txt"]


@posix_only
def test_a_new_file_gets_the_mode_of_a_plain_open(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "x", b"x")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o640
    assert (tmp_path / "x").stat().st_mode == (tmp_path / "plain").stat().st_mode


@posix_only
def test_a_writer_that_makes_its_own_file_does_not_set_the_mode(tmp_path):
    # safetensors' save_file replaces the file it is given by one of mode 0600: the
    # result must still have the mode of a plain open() (the umask applies, unchanged).
    def private_writer(path: Path) -> None:
        path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"weights")
        os.close(fd)

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "model.safetensors", private_writer)
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o644
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"


@posix_only
def test_the_umask_is_never_changed(tmp_path, monkeypatch):
    # os.umask is process-wide: flipping it to read it races with other threads' files
    def no_umask(mask: int) -> int:
        raise AssertionError(f"os.umask({mask:#o}) called")

    monkeypatch.setattr(os, "umask", no_umask)
    atomic_write(tmp_path / "x", b"x")
    atomic_write(tmp_path / "x", b"y")
    assert (tmp_path / "x").read_bytes() == b"y"


@posix_only
def test_an_existing_file_keeps_its_mode(tmp_path):
    target = tmp_path / "secret.json"
    target.write_text("{}")
    target.chmod(0o600)
    atomic_write(target, '{"token": 1}')
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    target.chmod(0o664)
    atomic_write(target, lambda path: path.write_text("{}"))
    assert stat.S_IMODE(target.stat().st_mode) == 0o664


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "scores.json"
    target.write_text("old")

    def broken(path: Path) -> None:
        path.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]


def test_temp_names_carry_the_process_id_and_the_suffix(tmp_path):
    name = temp_path(tmp_path / "vocals.wav").name
    assert name.startswith(f".vocals.{os.getpid()}-") and name.endswith(".part.wav")
    assert temp_path(tmp_path / "vocals.wav") != temp_path(tmp_path / "vocals.wav")


_CHILD = """
import sys, time
from splitstems.files import temp_path
path = temp_path(sys.argv[1])
path.write_bytes(b"half-written")
print(path, flush=True)
time.sleep(600)
"""


def _writer_process(target: Path) -> tuple[subprocess.Popen[str], Path]:
    """Start a process that creates a temp file for ``target`` and then waits."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(target)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    return child, Path(child.stdout.readline().strip())


@posix_only
def test_temp_files_of_killed_processes_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "scores.json"
    killed, stale = _writer_process(target)
    killed.send_signal(signal.SIGKILL)  # no clean-up runs: the temp file stays behind
    killed.wait()
    alive, busy = _writer_process(target)
    try:
        unrelated = [
            tmp_path / ".scores.notours.part.json",
            tmp_path / "scores.part.json",
            tmp_path / f".other.{killed.pid}-0123abcd.part.json",  # another target's
            tmp_path / f".scores.{killed.pid}-0123abcd.part.wav",  # another suffix
        ]
        for path in unrelated:
            path.write_text("not ours")
        assert stale.exists() and busy.exists()
        atomic_write(target, "{}")
        assert not stale.exists()
        assert busy.exists()  # its process is still writing
        assert all(path.exists() for path in unrelated)
        assert remove_stale_temps(target) == []
    finally:
        alive.kill()
        alive.wait()
    assert remove_stale_temps(target) == [busy]


@posix_only
def test_a_temp_file_of_a_running_process_of_any_user_is_kept(tmp_path):
    # pid 1 always runs; an unprivileged user may not signal it (PermissionError: alive)
    assert files._alive(1)
    path = tmp_path / ".x.1-0123abcd.part"
    path.write_text("")
    remove_stale_temps(tmp_path / "x")
    assert path.exists()

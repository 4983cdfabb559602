"""Writing files whole or not at all: a temp file in the same folder, then a rename.

A reader (or a crash, or Ctrl-C) never sees a half-written file: the content goes to a
hidden temp file beside the target, is flushed to disk, and replaces the target in one
``os.replace``. A new file gets the permissions a plain ``open(path, "w")`` would give
it; an existing file keeps its own.

Temp files are named by :func:`temp_path`: ``.{stem}.{pid}-{token}.part{suffix}``
beside the target (``.vocals.4711-0a1b2c3d.part.wav`` for ``vocals.wav``). The process
id in the name lets a later run recognise the leftovers of a process that was killed
before it could clean up (SIGKILL, power loss): :func:`remove_stale_temps` deletes the
temp files of a target whose process is gone. Liveness is checked with ``kill(pid, 0)``
on this machine: two hosts writing into one shared folder (NFS) at the same time may
see each other's live temp files as stale. A dead writer's id reused by a new process
only keeps its leftover a while longer: a live writer's file is never removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "remove_stale_temps", "temp_path"]

_TOKEN_HEX = 8


def _split(target: Path) -> tuple[str, str]:
    """``(stem, suffix)`` of the target's name, as the temp name uses them."""
    return target.stem, target.suffix


def temp_path(target: str | os.PathLike[str]) -> Path:
    """Return a fresh temp path beside ``target``: ``.{stem}.{pid}-{token}.part{suffix}``.

    The name keeps the target's suffix (tools that look at suffixes still see a
    ``.wav``), starts with a dot (hidden), and carries this process's id so that
    :func:`remove_stale_temps` can tell a killed writer's leftovers from a live one's.
    """
    target = Path(target)
    stem, suffix = _split(target)
    token = secrets.token_hex(_TOKEN_HEX // 2)
    return target.with_name(f".{stem}.{os.getpid()}-{token}.part{suffix}")


def _temp_pattern(target: Path) -> re.Pattern[str]:
    stem, suffix = _split(target)
    return re.compile(
        rf"\.{re.escape(stem)}\.([1-9][0-9]{{0,9}})-[0-9a-f]{{{_TOKEN_HEX}}}\.part{re.escape(suffix)}"
    )


def _alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (unknown counts as alive)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except (OverflowError, ValueError):  # no process can have this id
        return False
    except OSError:
        return True
    return True


def remove_stale_temps(target: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp files of ``target`` left by processes that no longer run.

    Only files named as :func:`temp_path` names them for this very target are looked
    at, and only those whose process id is not alive on this machine are removed
    (a temp file of a live process, this one included, is kept; so is anything else
    in the folder). Errors (a missing folder, a file removed meanwhile by someone
    else) are ignored. Returns the paths removed.
    """
    target = Path(target)
    pattern = _temp_pattern(target)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _create(target: Path, mode: int) -> tuple[int, Path]:
    """Create a new temp file for ``target`` with ``mode`` (the umask applies)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = temp_path(target)
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{target}: cannot find a free temp file name")


def atomic_write(path: str | os.PathLike[str], data: bytes | str | Callable[[Path], None]) -> None:
    """Write ``path`` through a temp file in the same folder, then ``os.replace`` it.

    ``data`` is the content (``str`` is written as UTF-8), or a function that writes the
    file at the path it is given. On any error the temp file is removed and the target
    is left as it was. An existing target keeps its permission bits; a new one gets
    those of a plain ``open(path, "w")`` (``0o666`` less the umask, which is never
    changed, so threads are safe), whatever mode a writer function gave the file.
    Stale temp files of ``path`` are removed first (see :func:`remove_stale_temps`).
    """
    path = Path(path)
    try:
        keep_mode: int | None = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        keep_mode = None
    remove_stale_temps(path)
    # A new file is created as open() would create it; one replacing an existing file
    # starts private and gets that file's bits at the end (no wider window meanwhile).
    fd, tmp = _create(path, 0o666 if keep_mode is None else 0o600)
    try:
        # What open() gave the new file (0o666 less the umask, read without changing it):
        # a writer function may replace the temp file with one of its own mode
        # (safetensors' save_file creates it 0o600).
        mode = stat.S_IMODE(os.fstat(fd).st_mode) if keep_mode is None else keep_mode
        with os.fdopen(fd, "wb") as fh:
            if isinstance(data, str):
                fh.write(data.encode("utf-8"))
            elif not callable(data):
                fh.write(data)
        if callable(data):
            data(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if keep_mode is not None or callable(data):
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

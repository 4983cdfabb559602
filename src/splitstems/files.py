"""Writing files whole or not at all: a temp file in the same folder, then a rename.

A reader (or a crash, or Ctrl-C) never sees a half-written file: the content goes to a
hidden temp file beside the target, is flushed to disk, gets the permissions a plain
``open(path, "w")`` would give it, and replaces the target in one ``os.replace``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], data: bytes | str | Callable[[Path], None]) -> None:
    """Write ``path`` through a temp file in the same folder, then ``os.replace`` it.

    ``data`` is the content (``str`` is written as UTF-8), or a function that writes the
    file at the path it is given. On any error the temp file is removed and the target
    is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(data, str):
                fh.write(data.encode("utf-8"))
            elif not callable(data):
                fh.write(data)
        if callable(data):
            data(Path(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""``model.safetensors`` files: check their structure, read them, verify them by checksum.

Weights come from folders people manage by hand and from our cache, so a file may be
truncated, overwritten with something else, or be a folder. :func:`inspect` reads the
header alone (a few KB) and says in one line what is wrong; :func:`load` reads the
tensors with the same one-line errors. Weights holding NaN or infinite values (a
damaged file, a diverged training run) are refused by both :func:`load` and
:func:`verify`: such a model gives silent or NaN stems.

A cache entry keeps a small record beside its weights (``checksum.json``): the file's
sha256 and a *stamp*, its (size, mtime_ns, inode) when the sha256 was last checked.
A record is only written for a file found whole and finite. :func:`verify` reads the
file in full (hash and finite values, about 70 ms for 75 MB) only when the stamp no
longer matches, so a change made through the file system (a truncation, a rewrite, a
replacement) is always caught and an untouched entry costs one ``stat``. An entry
without a record of the current version is checked in full; then, where its source is
known (``require_record``), it counts as unverifiable (:data:`NO_RECORD`: the caller
rebuilds it), else (a downloaded or hand-placed entry) it is recorded as found.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from splitstems.errors import ModelError
from splitstems.files import atomic_write

if TYPE_CHECKING:
    import torch

__all__ = [
    "NO_RECORD",
    "RECORD",
    "tensor_digest",
    "TensorHeader",
    "inspect",
    "nonfinite",
    "load",
    "sha256",
    "write_record",
    "verify",
]

log = logging.getLogger(__name__)

#: The checksum record kept beside cached weights.
RECORD = "checksum.json"
#: 2: the file was checked for structure and finite values before it was recorded (a
#: version 1 record may hold the sha256 of a damaged file: it is checked again).
_RECORD_VERSION = 2
#: What :func:`verify` says of whole, finite weights that have no current record.
NO_RECORD = "no checksum record (removed, or written by an older version)"
#: safetensors refuses headers larger than this; so do we.
_MAX_HEADER = 100_000_000
_DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
#: torch's names of the dtypes (the tensor digest spells a tensor's dtype as torch does).
_TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
    "I64": "int64", "U64": "uint64", "F64": "float64",
}  # fmt: skip
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
#: How the values of each floating dtype are viewed for the finite check (bfloat16 as
#: its bits: numpy has no bfloat16; all exponent bits set means inf or NaN).
_NUMPY_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": "<u2"}
_BF16_EXPONENT = 0x7F80
_HASH_CHUNK = 1 << 22


@dataclass(frozen=True)
class TensorHeader:
    """One tensor of a safetensors header: dtype name (``F32``), shape and byte range."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _size(n: int) -> str:
    return f"{n:,} bytes"


def inspect(path: str | os.PathLike[str]) -> dict[str, TensorHeader]:
    """Check the structure of a safetensors file from its header; return its tensors.

    Only the header is read. The tensors' byte ranges must tile the data that follows
    the header exactly, so a truncated or extended file is caught here.

    Raises:
        ModelError: ``"<path>: <cause>"`` (a folder, unreadable, empty, truncated, not a
            safetensors file, a corrupt header).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                if file_size == 0:
                    raise ModelError(f"{path}: empty file, not a safetensors weights file")
                raise ModelError(
                    f"{path}: {_size(file_size)} is too short for a safetensors weights file "
                    "(truncated?)"
                )
            (n_header,) = struct.unpack("<Q", prefix)
            if n_header > _MAX_HEADER:
                raise ModelError(
                    f"{path}: not a safetensors weights file (no valid header length in its "
                    "first 8 bytes)"
                )
            raw = fh.read(n_header)
    except IsADirectoryError:
        raise ModelError(f"{path}: is a folder, not a safetensors weights file") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) < n_header:
        looks_like = raw[:1] == b"{"
        raise ModelError(
            f"{path}: "
            + ("truncated" if looks_like else "not a safetensors weights file")
            + f" (the header needs {_size(8 + n_header)}, the file holds {_size(file_size)})"
        )
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        what = "corrupt header" if raw[:1] == b"{" else "not a safetensors weights file"
        raise ModelError(f"{path}: {what} ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: not a safetensors weights file (its header is not an object)")
    tensors = _parse_header(header, path=path)
    data_size = file_size - 8 - n_header
    needed = max((t.end for t in tensors.values()), default=0)
    if data_size < needed:
        raise ModelError(
            f"{path}: truncated (the header describes {_size(needed)} of tensor data, the "
            f"file holds {_size(data_size)})"
        )
    if data_size > needed:
        raise ModelError(
            f"{path}: {_size(data_size - needed)} after the last tensor (the header describes "
            f"{_size(needed)} of tensor data); damaged or not a safetensors weights file"
        )
    return tensors


def _parse_header(header: dict[str, object], *, path: Path) -> dict[str, TensorHeader]:
    tensors: dict[str, TensorHeader] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise ModelError(f"{where}: corrupt header entry")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if dtype not in _DTYPE_SIZES:
            raise ModelError(f"{where}: unknown dtype {dtype!r}")
        if not (
            isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
        ) or not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and o >= 0 for o in offsets)
        ):
            raise ModelError(f"{where}: corrupt header entry (shape or data_offsets)")
        begin, end = offsets
        if end - begin != math.prod(shape) * _DTYPE_SIZES[dtype]:
            raise ModelError(
                f"{where}: corrupt header ({end - begin} bytes for shape {tuple(shape)} of {dtype})"
            )
        tensors[name] = TensorHeader(dtype, tuple(shape), begin, end)
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: item[1].begin):
        if info.begin != position:
            raise ModelError(
                f"{path}: tensor {name!r}: corrupt header (overlapping or gapped data)"
            )
        position = info.end
    return tensors


def load(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read the tensors of a safetensors weights file; every tensor must be floating point.

    Raises:
        ModelError: ``"<path>: <cause>"`` (see :func:`inspect`).
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    tensors = inspect(path)
    wrong = sorted(name for name, info in tensors.items() if info.dtype not in _FLOAT_DTYPES)
    if wrong:
        first = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ModelError(
            f"{path}: tensor {first!r} is {tensors[first].dtype}{more}; model weights are "
            "floating point (F32, F16, BF16, F64)"
        )
    try:
        loaded = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        cause = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelError(f"{path}: cannot read the weights ({cause})") from None
    for name in _in_file_order(tensors):
        tensor = loaded.get(name)
        if tensor is None:
            continue
        values = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        problem = _nonfinite(name, values.numpy(), tensors[name].dtype)
        if problem:
            raise ModelError(
                f"{path}: {problem}; damaged, or saved from a training run that diverged"
            )
    return loaded


def _in_file_order(tensors: dict[str, TensorHeader]) -> list[str]:
    return sorted(tensors, key=lambda name: tensors[name].begin)


def _nonfinite(name: str, values: np.ndarray, dtype: str) -> str | None:
    """Say what is wrong if tensor ``name``'s values hold NaN or inf, else None."""
    problem = nonfinite(values, dtype)
    return None if problem is None else f"tensor {name!r} {problem}"


def nonfinite(values: np.ndarray, dtype: str = "F32") -> str | None:
    """Return ``"holds N NaN or infinite values (of M)"`` for ``values``, or None if finite.

    ``dtype`` is the safetensors name; bfloat16 values come as their bits (numpy has no
    bfloat16). numpy, not torch: ``np.isfinite`` takes 4-15 ms for the 2stems model's
    75 MB, ``torch.isfinite`` about 0.6 s on a busy CPU; a sum first (NaN and inf carry
    through it) reads the values once without a mask: ~3 ms.
    """
    if dtype == "BF16":
        bad = (values & _BF16_EXPONENT) == _BF16_EXPONENT
        if not bad.any():
            return None
    else:
        with np.errstate(all="ignore"):  # one sum: NaN and inf carry through it
            if not values.size or math.isfinite(float(np.add.reduce(values, axis=None))):
                return None
        if np.isfinite(values).all():
            return None  # finite values whose sum overflowed
        bad = ~np.isfinite(values)
    count = int(np.count_nonzero(bad))
    values_word = "values" if count > 1 else "value"
    return f"holds {count:,} NaN or infinite {values_word} (of {values.size:,})"


def _check(path: Path) -> tuple[str, str]:
    """Check ``path`` in full (structure, finite values); return its sha256 and tensor digest.

    Raises:
        ModelError: ``"<path>: <cause>"``.
    """
    tensors = inspect(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from None
    start = 8 + int.from_bytes(data[:8], "little")
    for name in _in_file_order(tensors):
        info = tensors[name]
        if info.dtype not in _NUMPY_DTYPES:
            continue  # not weights: load() says so
        dtype = np.dtype(_NUMPY_DTYPES[info.dtype])
        count = (info.end - info.begin) // dtype.itemsize
        try:
            values = np.frombuffer(data, dtype=dtype, count=count, offset=start + info.begin)
        except ValueError:  # shorter than its header said: replaced while we read it
            raise ModelError(f"{path}: changed while it was being read") from None
        problem = _nonfinite(name, values, info.dtype)
        if problem:
            raise ModelError(f"{path}: {problem}")
    return hashlib.sha256(data).hexdigest(), _digest_tensors(data, tensors)


def _digest_tensors(data: bytes, tensors: dict[str, TensorHeader]) -> str:
    """sha256 of the tensors of a whole file's ``data``: names, dtypes, shapes, bytes.

    In name order, each ``"<name>:torch.<dtype>:<shape>"`` then its raw bytes, so files
    with the same tensors give the same digest whatever their header's order or metadata.
    """
    start = 8 + int.from_bytes(data[:8], "little")
    view = memoryview(data)
    digest = hashlib.sha256()
    for name in sorted(tensors):
        info = tensors[name]
        digest.update(f"{name}:torch.{_TORCH_NAMES[info.dtype]}:{info.shape}".encode())
        digest.update(view[start + info.begin : start + info.end])
    return digest.hexdigest()


# --------------------------------------------------------------------------- checksums


def sha256(path: str | os.PathLike[str]) -> str:
    """Return the sha256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def write_record(weights: str | os.PathLike[str]) -> None:
    """Check ``weights`` in full and record their sha256 and stamp in :data:`RECORD`.

    Raises:
        ModelError: the weights are damaged (see :func:`inspect`) or not finite.
        OSError: the record cannot be written.
    """
    weights = Path(weights)
    stamp = _stamp(weights)
    _write_record(weights, *_check(weights), stamp)


def _write_record(weights: Path, digest: str, tensors: str, stamp: list[int]) -> None:
    record = {
        "version": _RECORD_VERSION,
        "file": weights.name,
        "sha256": digest,
        "stamp": stamp,
        "tensors": tensors,
    }
    atomic_write(weights.parent / RECORD, json.dumps(record, indent=2) + "\n")


def tensor_digest(weights: str | os.PathLike[str]) -> str:
    """Return a sha256 of the tensors in ``weights`` (not of the file: its metadata varies).

    Two files with the same tensors have the same digest, whatever their header's key
    order or metadata. Read from the file's checksum record when the record describes
    this very file (same stamp: size, mtime, inode), so a cached model costs nothing
    here; else computed (~0.05 s for 2stems) and, where a current record exists, kept in it.
    """
    weights = Path(weights)
    record = _read_record(weights.parent)
    stamp = _stamp(weights)
    mine = (
        record is not None
        and record.get("version") == _RECORD_VERSION
        and record.get("file") == weights.name
        and record.get("stamp") == stamp
    )
    if mine and record is not None and isinstance(record.get("tensors"), str):
        return str(record["tensors"])
    try:
        value = _digest_tensors(weights.read_bytes(), inspect(weights))
    except OSError as exc:
        raise ModelError(f"{weights}: cannot read ({exc.strerror or exc})") from None
    if mine and record is not None and _stamp(weights) == stamp:
        try:
            atomic_write(
                weights.parent / RECORD, json.dumps({**record, "tensors": value}, indent=2) + "\n"
            )
        except OSError as exc:
            log.debug("%s: cannot record its tensor digest (%s)", weights, exc)
    return value


def _read_record(folder: Path) -> dict[str, object] | None:
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        return None
    return record


def verify(weights: str | os.PathLike[str], *, require_record: bool = False) -> str | None:
    """Check cached weights against their record; return what is wrong, or None.

    With a current record whose stamp matches the file, nothing is read. Otherwise the
    file is checked in full (:func:`inspect`, which names a truncation; finite values;
    the sha256): with a record the hashes must match, and a match refreshes the stamp
    and the record's version. Without a current record (removed, or an older version's,
    which may have recorded a damaged file), whole and finite weights give
    :data:`NO_RECORD` when ``require_record`` (their source is known: rebuild them), else
    (downloaded or placed by hand, no source here) a record is written. A record that
    cannot be written (a read-only cache) is not an error.
    """
    weights = Path(weights)
    try:
        stamp = _stamp(weights)
    except OSError as exc:
        return exc.strerror or str(exc)
    record = _read_record(weights.parent)
    current = record is not None and record.get("version") == _RECORD_VERSION
    if current and record is not None and record.get("stamp") == stamp:
        return None
    try:
        digest, tensors = _check(weights)
    except ModelError as exc:
        return str(exc).removeprefix(f"{weights}: ")
    if record is not None and digest != record["sha256"]:
        return (
            f"its sha256 ({digest[:12]}...) is not the one recorded at conversion "
            f"({str(record['sha256'])[:12]}...); the file was changed or damaged"
        )
    if not current and require_record:
        return NO_RECORD
    try:
        if _stamp(weights) == stamp:  # not replaced while we read it (a rebuild elsewhere)
            _write_record(weights, digest, tensors, stamp)
    except OSError as exc:
        log.debug("%s: cannot record its checksum (%s)", weights, exc)
    return None

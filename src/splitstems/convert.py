"""Read TensorFlow checkpoints without TensorFlow and convert Spleeter's to safetensors.

A TF2/TF1 checkpoint ``<prefix>`` is a *tensor bundle*: ``<prefix>.index`` is an SSTable
(LevelDB table format) mapping each variable name to a ``BundleEntryProto`` (dtype,
shape, shard, offset, size, masked crc32c), and ``<prefix>.data-00000-of-00001`` holds the
raw little-endian tensor bytes. This module reads both with a small SSTable reader and a
protobuf wire-format decoder (no TensorFlow, no protobuf package), verifies every block
and tensor checksum, maps Spleeter's Keras variable names to
:class:`splitstems.models.unet.SpleeterModel`'s ``state_dict`` names, and writes
``model.safetensors`` + ``config.json``.

It can also write a bundle (:func:`write_checkpoint`), which the tests use to build
synthetic checkpoints and which can export weights back into Spleeter's layout.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import crc32c as _crc32c
import numpy as np

from splitstems.errors import CheckpointError, OutputError
from splitstems.files import atomic_write
from splitstems.weights import nonfinite

if TYPE_CHECKING:
    import torch

    from splitstems.config import ModelConfig

__all__ = [
    "IGNORED_VARIABLES",
    "TensorInfo",
    "read_index",
    "read_checkpoint",
    "write_checkpoint",
    "mapping_for",
    "expected_shapes",
    "tf_to_state_dict",
    "convert_checkpoint",
]

#: Variables of Spleeter's checkpoints that are not model weights and are skipped on
#: purpose. The released 2/4/5stems checkpoints hold only ``global_step`` besides the
#: U-Net weights; the optimizer names are what a TF1 ``spleeter train`` run with Adam
#: adds (``beta1_power``/``beta2_power`` and an ``/Adam``, ``/Adam_1`` slot per weight).
IGNORED_VARIABLES: frozenset[str] = frozenset({"global_step", "beta1_power", "beta2_power"})
_IGNORED_SUFFIXES: tuple[str, ...] = ("/Adam", "/Adam_1")

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48  # 2 BlockHandles (max 20 bytes each), zero padding, 8-byte magic
_BLOCK_TRAILER_SIZE = 5  # 1 byte compression type + 4 bytes masked crc32c
_CRC_MASK_DELTA = 0xA282EAD8
_DATA_SUFFIX = ".data-{shard:05d}-of-{num_shards:05d}"

# tensorflow/core/framework/types.proto DataType values with a fixed-width numpy twin.
_DTYPES: dict[int, tuple[str, str]] = {
    1: ("float32", "<f4"),
    2: ("float64", "<f8"),
    3: ("int32", "<i4"),
    4: ("uint8", "|u1"),
    5: ("int16", "<i2"),
    6: ("int8", "|i1"),
    8: ("complex64", "<c8"),
    9: ("int64", "<i8"),
    10: ("bool", "|b1"),
    17: ("uint16", "<u2"),
    18: ("complex128", "<c16"),
    19: ("float16", "<f2"),
    22: ("uint32", "<u4"),
    23: ("uint64", "<u8"),
}
_DTYPE_NAMES: dict[int, str] = {7: "string", 14: "bfloat16", 20: "resource", 21: "variant"}
_DTYPE_CODES: dict[str, int] = {name: code for code, (name, _) in _DTYPES.items()}


# --------------------------------------------------------------------------- checksums


def _mask_crc(crc: int) -> int:
    """Return TensorFlow/LevelDB's masked form of a crc32c."""
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def _crc(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    return _crc32c.crc32c(data, crc)


# --------------------------------------------------------------------------- protobuf


def _read_varint(buf: bytes, pos: int, *, what: str) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; return (value, next position)."""
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise CheckpointError(f"{what}: truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise CheckpointError(f"{what}: varint longer than 10 bytes")


def _write_varint(value: int) -> bytes:
    if value < 0:
        value &= 0xFFFFFFFFFFFFFFFF  # protobuf encodes negative int64 as 10-byte varints
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _proto_fields(buf: bytes, *, what: str) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield (field number, wire type, value) for every field of a protobuf message.

    Varints come back as unsigned ints, fixed32/fixed64 as unsigned little-endian ints
    and length-delimited fields as bytes (sub-messages, strings, packed arrays).
    """
    pos = 0
    end = len(buf)
    while pos < end:
        tag, pos = _read_varint(buf, pos, what=what)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise CheckpointError(f"{what}: invalid protobuf field number 0")
        value: int | bytes
        if wire == 0:
            value, pos = _read_varint(buf, pos, what=what)
        elif wire == 1:
            if pos + 8 > end:
                raise CheckpointError(f"{what}: truncated fixed64 field")
            (value,) = struct.unpack_from("<Q", buf, pos)
            pos += 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos, what=what)
            if pos + length > end:
                raise CheckpointError(f"{what}: truncated length-delimited field")
            value = bytes(buf[pos : pos + length])
            pos += length
        elif wire == 5:
            if pos + 4 > end:
                raise CheckpointError(f"{what}: truncated fixed32 field")
            (value,) = struct.unpack_from("<I", buf, pos)
            pos += 4
        else:
            raise CheckpointError(f"{what}: unsupported protobuf wire type {wire}")
        yield number, wire, value


def _to_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _proto_key(number: int, wire: int) -> bytes:
    return _write_varint(number << 3 | wire)


def _proto_varint(number: int, value: int) -> bytes:
    return _proto_key(number, 0) + _write_varint(value) if value else b""


def _proto_bytes(number: int, value: bytes) -> bytes:
    return _proto_key(number, 2) + _write_varint(len(value)) + value


# --------------------------------------------------------------------------- SSTable


def _read_block(data: bytes, offset: int, size: int, *, source: str) -> bytes:
    """Return the contents of the table block at (offset, size), checksum verified."""
    end = offset + size + _BLOCK_TRAILER_SIZE
    if offset < 0 or end > len(data):
        raise CheckpointError(
            f"{source}: block at offset {offset} (size {size}) runs past the end of the "
            f"file ({len(data)} bytes); the index is truncated or corrupt"
        )
    contents = data[offset : offset + size]
    compression = data[offset + size]
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    actual = _mask_crc(_crc(data[offset : offset + size + 1]))
    if stored != actual:
        raise CheckpointError(
            f"{source}: block checksum mismatch at offset {offset} "
            f"(stored {stored:#010x}, computed {actual:#010x}); the index file is corrupt"
        )
    if compression == 1:
        raise CheckpointError(
            f"{source}: snappy-compressed table blocks are not supported "
            "(TensorFlow never writes them for checkpoints)"
        )
    if compression != 0:
        raise CheckpointError(f"{source}: unknown table block compression type {compression}")
    return contents


def _block_entries(block: bytes, *, source: str) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) for every entry of a table block (prefix-compressed keys)."""
    if len(block) < 4:
        raise CheckpointError(f"{source}: table block too short ({len(block)} bytes)")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise CheckpointError(f"{source}: corrupt table block (restart array too large)")
    pos = 0
    key = b""
    while pos < limit:
        shared, pos = _read_varint(block, pos, what=source)
        non_shared, pos = _read_varint(block, pos, what=source)
        value_len, pos = _read_varint(block, pos, what=source)
        if shared > len(key) or pos + non_shared + value_len > limit:
            raise CheckpointError(f"{source}: corrupt table block entry at byte {pos}")
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        yield key, block[pos : pos + value_len]
        pos += value_len


def _read_table(data: bytes, *, source: str) -> Iterator[tuple[bytes, bytes]]:
    """Yield every (key, value) of an SSTable held in ``data``, in key order."""
    if len(data) < _FOOTER_SIZE:
        raise CheckpointError(
            f"{source}: {len(data)} bytes is too short for a checkpoint index (truncated?)"
        )
    footer = data[-_FOOTER_SIZE:]
    (magic,) = struct.unpack_from("<Q", footer, _FOOTER_SIZE - 8)
    if magic != _TABLE_MAGIC:
        raise CheckpointError(
            f"{source}: not a TensorFlow checkpoint index (bad table magic; truncated?)"
        )
    pos = 0
    _meta_offset, pos = _read_varint(footer, pos, what=source)
    _meta_size, pos = _read_varint(footer, pos, what=source)
    index_offset, pos = _read_varint(footer, pos, what=source)
    index_size, pos = _read_varint(footer, pos, what=source)
    index_block = _read_block(data, index_offset, index_size, source=source)
    for _last_key, handle in _block_entries(index_block, source=source):
        block_offset, hpos = _read_varint(handle, 0, what=source)
        block_size, _ = _read_varint(handle, hpos, what=source)
        block = _read_block(data, block_offset, block_size, source=source)
        yield from _block_entries(block, source=source)


class _TableWriter:
    """Build an SSTable (LevelDB table format, no compression) from sorted entries."""

    def __init__(self, *, block_size: int = 4096, restart_interval: int = 16) -> None:
        self._out = bytearray()
        self._block_size = block_size
        self._restart_interval = restart_interval
        self._index: list[tuple[bytes, bytes]] = []
        self._block = bytearray()
        self._restarts: list[int] = [0]
        self._count = 0
        self._last_key = b""
        self._block_last_key = b""
        self._started = False

    def add(self, key: bytes, value: bytes) -> None:
        if self._started and key <= self._last_key:
            raise ValueError(f"keys must be added in increasing order ({key!r})")
        self._started = True
        shared = 0
        if self._count < self._restart_interval:
            # Keys share a prefix with the previous key of the same block only.
            limit = min(len(key), len(self._block_last_key))
            while shared < limit and key[shared] == self._block_last_key[shared]:
                shared += 1
        else:
            self._restarts.append(len(self._block))
            self._count = 0
        self._block += _write_varint(shared) + _write_varint(len(key) - shared)
        self._block += _write_varint(len(value)) + key[shared:] + value
        self._count += 1
        self._last_key = key
        self._block_last_key = key
        if len(self._block) >= self._block_size:
            self._flush()

    def _finish_block(self, block: bytearray, restarts: list[int]) -> bytes:
        for restart in restarts:
            block += struct.pack("<I", restart)
        block += struct.pack("<I", len(restarts))
        offset = len(self._out)
        self._out += block + b"\x00"
        self._out += struct.pack("<I", _mask_crc(_crc(block + b"\x00")))
        return _write_varint(offset) + _write_varint(len(block))

    def _flush(self) -> None:
        if not self._block:
            return
        handle = self._finish_block(self._block, self._restarts)
        self._index.append((self._block_last_key, handle))
        self._block = bytearray()
        self._block_last_key = b""
        self._restarts = [0]
        self._count = 0

    def finish(self) -> bytes:
        self._flush()
        meta_handle = self._finish_block(bytearray(), [0])
        index = bytearray()
        # Index keys are the last key of each block: a valid separator, never prefix-shared.
        for key, handle in self._index:
            index += _write_varint(0) + _write_varint(len(key)) + _write_varint(len(handle))
            index += key + handle
        index_handle = self._finish_block(index, [0])
        footer = meta_handle + index_handle
        footer += b"\x00" * (_FOOTER_SIZE - 8 - len(footer)) + struct.pack("<Q", _TABLE_MAGIC)
        self._out += footer
        return bytes(self._out)


# --------------------------------------------------------------------------- bundle


@dataclass(frozen=True)
class TensorInfo:
    """One variable of a tensor bundle index: where its bytes are and how to check them.

    ``dtype`` is the numpy name (``"float32"``) or TensorFlow's (``"string"``) for types
    without a fixed-width twin; ``crc32c`` is the *masked* crc32c TensorFlow stores.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int


@dataclass(frozen=True)
class _Header:
    num_shards: int
    little_endian: bool


def _parse_shape(buf: bytes, *, what: str) -> tuple[int, ...]:
    dims: list[int] = []
    for number, wire, value in _proto_fields(buf, what=what):
        if number == 2 and wire == 2:
            size = 0
            for dnum, dwire, dval in _proto_fields(value, what=what):  # type: ignore[arg-type]
                if dnum == 1 and dwire == 0:
                    size = _to_int64(dval)  # type: ignore[arg-type]
            dims.append(size)
        elif number == 3 and wire == 0 and value:
            raise CheckpointError(f"{what}: shape of unknown rank")
    if any(d < 0 for d in dims):
        raise CheckpointError(f"{what}: shape {tuple(dims)} has unknown dimensions")
    return tuple(dims)


def _parse_entry(name: str, buf: bytes, *, source: str) -> TensorInfo:
    what = f"{source}: variable {name!r}"
    dtype_code = 0
    shape: tuple[int, ...] = ()
    shard_id = offset = size = crc = 0
    for number, wire, value in _proto_fields(buf, what=what):
        if number == 1 and wire == 0:
            dtype_code = value  # type: ignore[assignment]
        elif number == 2 and wire == 2:
            shape = _parse_shape(value, what=what)  # type: ignore[arg-type]
        elif number == 3 and wire == 0:
            shard_id = value  # type: ignore[assignment]
        elif number == 4 and wire == 0:
            offset = _to_int64(value)  # type: ignore[arg-type]
        elif number == 5 and wire == 0:
            size = _to_int64(value)  # type: ignore[arg-type]
        elif number == 6 and wire == 5:
            crc = value  # type: ignore[assignment]
        elif number == 7:
            raise CheckpointError(f"{what}: partitioned (sliced) variables are not supported")
    if dtype_code in _DTYPES:
        dtype = _DTYPES[dtype_code][0]
    else:
        dtype = _DTYPE_NAMES.get(dtype_code, f"dtype#{dtype_code}")
    if offset < 0 or size < 0:
        raise CheckpointError(f"{what}: negative offset or size in the index")
    return TensorInfo(name, dtype, shape, int(shard_id), offset, size, int(crc))


def _parse_header(buf: bytes, *, source: str) -> _Header:
    num_shards = 1
    endianness = 0
    for number, wire, value in _proto_fields(buf, what=f"{source}: bundle header"):
        if number == 1 and wire == 0:
            num_shards = int(value)  # type: ignore[arg-type]
        elif number == 2 and wire == 0:
            endianness = int(value)  # type: ignore[arg-type]
    return _Header(num_shards=num_shards, little_endian=endianness == 0)


def _load_index(path: Path) -> tuple[_Header, dict[str, TensorInfo]]:
    source = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{source}: checkpoint index not found") from None
    except OSError as exc:
        raise CheckpointError(f"{source}: cannot read checkpoint index ({exc})") from None
    header: _Header | None = None
    entries: dict[str, TensorInfo] = {}
    for key, value in _read_table(data, source=source):
        if key == b"":
            header = _parse_header(value, source=source)
            continue
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{source}: variable name {key!r} is not UTF-8") from None
        entries[name] = _parse_entry(name, value, source=source)
    if header is None:
        raise CheckpointError(f"{source}: no bundle header; not a TensorFlow checkpoint index")
    if not header.little_endian:
        raise CheckpointError(f"{source}: big-endian checkpoints are not supported")
    for info in entries.values():
        if not 0 <= info.shard_id < header.num_shards:
            raise CheckpointError(
                f"{source}: variable {info.name!r} is in shard {info.shard_id} of "
                f"{header.num_shards}"
            )
    return header, entries


def read_index(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Read a tensor bundle ``.index`` file; return variable name → :class:`TensorInfo`.

    ``path`` may be the ``.index`` file, a checkpoint prefix or a checkpoint folder.
    Block checksums are verified.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt or not an index.
    """
    return _load_index(_index_path(path))[1]


_ESCAPES = {
    b"n": b"\n",
    b"t": b"\t",
    b"r": b"\r",
    b"a": b"\a",
    b"b": b"\b",
    b"f": b"\f",
    b"v": b"\v",
}


def _unescape_text_proto(value: str) -> str:
    """Decode a protobuf text-format string literal body (C escapes, octal UTF-8 bytes)."""

    def repl(match: re.Match[bytes]) -> bytes:
        esc = match.group(1)
        if esc[:1].isdigit():
            return bytes([int(esc, 8) & 0xFF])
        if esc[:1] == b"x":
            return bytes([int(esc[1:], 16)])
        return _ESCAPES.get(esc, esc)

    raw = re.sub(rb"\\([0-7]{1,3}|x[0-9a-fA-F]{1,2}|.)", repl, value.encode("utf-8"))
    return raw.decode("utf-8", errors="replace")


def _checkpoint_prefix(path: str | os.PathLike[str]) -> Path:
    """Return the checkpoint prefix (``.../model``) for a folder, prefix or index path."""
    p = Path(path).expanduser()
    if p.is_dir():
        prefix_name = "model"
        state = p / "checkpoint"
        if state.is_file():
            try:
                text = state.read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                raise CheckpointError(f"{state}: cannot read ({exc})") from None
            match = re.search(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', text, re.M)
            if match:
                prefix_name = _unescape_text_proto(match.group(1))
        prefix = Path(prefix_name)
        if not prefix.is_absolute():
            prefix = p / prefix
        if not Path(f"{prefix}.index").is_file():
            # The checkpoint file may name the path it was trained at; look next to it.
            local = p / prefix.name
            if Path(f"{local}.index").is_file():
                return local
            if (p / "model.index").is_file():
                return p / "model"
            raise CheckpointError(f"{p}: no checkpoint index ({prefix.name}.index) in folder")
        return prefix
    if p.suffix == ".index" and p.is_file():
        return p.with_suffix("")
    if not Path(f"{p}.index").is_file():
        raise CheckpointError(f"{p}: checkpoint not found (expected a folder with model.index)")
    return p


def _index_path(path: str | os.PathLike[str]) -> Path:
    return Path(f"{_checkpoint_prefix(path)}.index")


def read_checkpoint(
    prefix_or_dir: str | os.PathLike[str],
    *,
    verify: bool = True,
    names: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """Read the variables of a TensorFlow checkpoint as numpy arrays.

    Args:
        prefix_or_dir: a folder holding ``model.index`` and ``model.data-00000-of-00001``
            (its ``checkpoint`` file names the prefix when present), a prefix such as
            ``.../model``, or the ``.index`` file.
        verify: check every tensor's crc32c against the index.
        names: read only these variables (default: all).

    Returns:
        Variable name → writable little-endian array of the stored dtype and shape.

    Raises:
        CheckpointError: a file is missing, truncated or corrupt, a checksum fails, a
            requested variable is absent, or a variable has an unsupported dtype.
    """
    prefix = _checkpoint_prefix(prefix_or_dir)
    index_path = Path(f"{prefix}.index")
    header, index = _load_index(index_path)
    if names is None:
        wanted = list(index)
    else:
        wanted = list(dict.fromkeys(names))
        absent = [n for n in wanted if n not in index]
        if absent:
            raise CheckpointError(f"{index_path}: no variable(s) {', '.join(absent)}")
    by_shard: dict[int, list[TensorInfo]] = {}
    for name in wanted:
        info = index[name]
        by_shard.setdefault(info.shard_id, []).append(info)
    out: dict[str, np.ndarray] = {}
    for shard, infos in sorted(by_shard.items()):
        data_path = Path(
            f"{prefix}{_DATA_SUFFIX.format(shard=shard, num_shards=header.num_shards)}"
        )
        try:
            fh = open(data_path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise CheckpointError(
                f"{data_path}: checkpoint data file not found (next to {index_path.name})"
            ) from None
        except OSError as exc:
            raise CheckpointError(f"{data_path}: cannot open ({exc})") from None
        with fh:
            file_size = os.fstat(fh.fileno()).st_size
            for info in sorted(infos, key=lambda i: i.offset):
                out[info.name] = _read_tensor(fh, info, file_size, data_path, verify=verify)
    return {name: out[name] for name in wanted}


def _read_tensor(fh: Any, info: TensorInfo, file_size: int, data_path: Path, *, verify: bool):
    where = f"{data_path}: variable {info.name!r}"
    if info.dtype not in _DTYPE_CODES:
        raise CheckpointError(f"{where}: unsupported dtype {info.dtype}")
    np_dtype = np.dtype(_DTYPES[_DTYPE_CODES[info.dtype]][1])
    count = int(np.prod(info.shape, dtype=np.int64))
    if info.size != count * np_dtype.itemsize:
        raise CheckpointError(
            f"{where}: index says {info.size} bytes but shape {info.shape} of "
            f"{info.dtype} needs {count * np_dtype.itemsize}"
        )
    if info.offset + info.size > file_size:
        raise CheckpointError(
            f"{where}: bytes [{info.offset}, {info.offset + info.size}) lie beyond the end "
            f"of the data file ({file_size} bytes); the data file is truncated or does not "
            "belong to this index"
        )
    buf = bytearray(info.size)
    fh.seek(info.offset)
    if fh.readinto(buf) != info.size:
        raise CheckpointError(f"{where}: short read from the data file")
    if verify:
        actual = _mask_crc(_crc(buf))
        if actual != info.crc32c:
            raise CheckpointError(
                f"{where}: crc32c mismatch (index {info.crc32c:#010x}, data "
                f"{actual:#010x}); the data file is corrupt or does not belong to this index"
            )
    return np.frombuffer(buf, dtype=np_dtype).reshape(info.shape)


def write_checkpoint(
    prefix: str | os.PathLike[str], tensors: Mapping[str, np.ndarray]
) -> dict[str, TensorInfo]:
    """Write ``tensors`` as a single-shard TensorFlow tensor bundle at ``prefix``.

    Creates ``<prefix>.index`` and ``<prefix>.data-00000-of-00001`` (TensorFlow's layout:
    sorted names, tensors packed in name order, masked crc32c per tensor) and returns the
    index it wrote. Only fixed-width numeric dtypes are supported.

    Raises:
        CheckpointError: a tensor has a dtype a bundle cannot hold here.
    """
    prefix = Path(prefix)
    data = bytearray()
    infos: dict[str, TensorInfo] = {}
    table = _TableWriter()
    header = _proto_varint(1, 1) + _proto_bytes(3, _proto_varint(1, 1))  # 1 shard, LE, v1
    table.add(b"", header)
    for name in sorted(tensors, key=lambda n: n.encode("utf-8")):
        if not name:
            raise CheckpointError("a variable name must not be empty")
        array = np.asarray(tensors[name])
        if array.dtype.name not in _DTYPE_CODES:
            raise CheckpointError(f"variable {name!r}: cannot write dtype {array.dtype}")
        code = _DTYPE_CODES[array.dtype.name]
        raw = np.ascontiguousarray(array, dtype=np.dtype(_DTYPES[code][1])).tobytes()
        info = TensorInfo(
            name, array.dtype.name, tuple(array.shape), 0, len(data), len(raw),
            _mask_crc(_crc(raw)),
        )  # fmt: skip
        infos[name] = info
        data += raw
        shape = b"".join(_proto_bytes(2, _proto_varint(1, d)) for d in array.shape)
        entry = _proto_varint(1, code) + _proto_bytes(2, shape)
        entry += _proto_varint(4, info.offset) + _proto_varint(5, info.size)
        entry += _proto_key(6, 5) + struct.pack("<I", info.crc32c)
        table.add(name.encode("utf-8"), entry)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(f"{prefix}{_DATA_SUFFIX.format(shard=0, num_shards=1)}"), bytes(data))
    atomic_write(Path(f"{prefix}.index"), table.finish())
    return infos


# --------------------------------------------------------------------------- name mapping

_BN_FIELDS = (
    ("gamma", "weight"),
    ("beta", "bias"),
    ("moving_mean", "running_mean"),
    ("moving_variance", "running_var"),
)
_ENCODER_FILTERS = (16, 32, 64, 128, 256, 512)
_DECODER_FILTERS = (256, 128, 64, 32, 16, 1)
_KERNEL = 5
_OUTPUT_KERNEL = 4


def _numbered(base: str, index: int) -> str:
    return base if index == 0 else f"{base}_{index}"


def _tf_layout(torch_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Return the TF shape of a PyTorch parameter shape (inverse of permute(3, 2, 0, 1))."""
    if len(torch_shape) == 4:
        a, b, h, w = torch_shape
        return (h, w, b, a)
    return torch_shape


def _expected(config: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Return torch name → (TF name, PyTorch shape) for every parameter of the model."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    n_channels = config.n_channels
    k = _KERNEL
    for u, instrument in enumerate(config.instruments):
        pre = f"unets.{instrument}"

        def add_bn(torch_prefix: str, bn_index: int, channels: int, pre: str = pre) -> None:
            tf_prefix = _numbered("batch_normalization", bn_index)
            for tf_field, torch_field in _BN_FIELDS:
                out[f"{pre}.{torch_prefix}.{torch_field}"] = (
                    f"{tf_prefix}/{tf_field}",
                    (channels,),
                )

        in_channels = n_channels
        for i, filters in enumerate(_ENCODER_FILTERS):
            tf_conv = _numbered("conv2d", 7 * u + i)
            out[f"{pre}.encoder.{i}.conv.weight"] = (
                f"{tf_conv}/kernel",
                (filters, in_channels, k, k),
            )
            out[f"{pre}.encoder.{i}.conv.bias"] = (f"{tf_conv}/bias", (filters,))
            add_bn(f"encoder.{i}.bn", 12 * u + i, filters)
            in_channels = filters
        for j, filters in enumerate(_DECODER_FILTERS):
            tf_deconv = _numbered("conv2d_transpose", 6 * u + j)
            # ConvTranspose2d weight: (in_channels, out_channels, kH, kW).
            out[f"{pre}.decoder.{j}.deconv.weight"] = (
                f"{tf_deconv}/kernel",
                (in_channels, filters, k, k),
            )
            out[f"{pre}.decoder.{j}.deconv.bias"] = (f"{tf_deconv}/bias", (filters,))
            add_bn(f"decoder.{j}.bn", 12 * u + 6 + j, filters)
            # The next layer sees [skip, upsampled]: twice the channels, except after the last.
            in_channels = 2 * filters
        tf_out = _numbered("conv2d", 7 * u + 6)
        out[f"{pre}.output.weight"] = (
            f"{tf_out}/kernel",
            (n_channels, 1, _OUTPUT_KERNEL, _OUTPUT_KERNEL),
        )
        out[f"{pre}.output.bias"] = (f"{tf_out}/bias", (n_channels,))
    return out


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Return the PyTorch name → shape of every parameter a checkpoint must provide."""
    return {name: shape for name, (_, shape) in _expected(config).items()}


def _is_ignored(name: str) -> bool:
    return name in IGNORED_VARIABLES or name.endswith(_IGNORED_SUFFIXES)


def _count_unets(names: Iterable[str]) -> int:
    """Count the U-Nets a checkpoint holds (six transposed convolutions each)."""
    pattern = re.compile(r"^conv2d_transpose(?:_\d+)?/kernel$")
    return sum(1 for n in names if pattern.match(n)) // len(_DECODER_FILTERS)


def _build_mapping(
    shapes: Mapping[str, tuple[int, ...]], config: ModelConfig, *, source: str
) -> dict[str, str]:
    expected = _expected(config)
    n_unets = _count_unets(shapes)
    n_wanted = len(config.instruments)
    if n_unets != n_wanted:
        raise CheckpointError(
            f"{source}: the checkpoint holds {n_unets} U-Net(s) but model {config.name} "
            f"needs {n_wanted} ({', '.join(config.instruments)}); wrong checkpoint for this "
            "model?"
        )
    missing: list[str] = []
    wrong: list[str] = []
    mapping: dict[str, str] = {}
    for torch_name, (tf_name, torch_shape) in expected.items():
        if tf_name not in shapes:
            missing.append(f"{tf_name} (for {torch_name})")
            continue
        tf_shape = tuple(shapes[tf_name])
        if tf_shape != _tf_layout(torch_shape):
            wrong.append(
                f"{tf_name}: {tf_shape}, expected {_tf_layout(torch_shape)} for {torch_name}"
            )
        mapping[torch_name] = tf_name
    used = set(mapping.values())
    unmapped = sorted(n for n in shapes if n not in used and not _is_ignored(n))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} variable(s): {', '.join(missing)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {'; '.join(wrong)}")
    if unmapped:
        problems.append(f"{len(unmapped)} unexpected variable(s): {', '.join(unmapped)}")
    if problems:
        raise CheckpointError(
            f"{source}: checkpoint does not fit model {config.name}: " + "; ".join(problems)
        )
    return mapping


def mapping_for(index: Mapping[str, TensorInfo], config: ModelConfig) -> dict[str, str]:
    """Map every PyTorch parameter name of ``config``'s model to its TF variable name.

    Works from the index alone. Shapes are checked; :data:`IGNORED_VARIABLES` (and Adam
    slot variables) are skipped.

    Raises:
        CheckpointError: a parameter is missing or misshapen, a variable is unexpected,
            or the checkpoint has a different number of U-Nets than the config.
    """
    for info in index.values():
        if not _is_ignored(info.name) and info.dtype != "float32":
            raise CheckpointError(
                f"variable {info.name!r} is {info.dtype}; model weights must be float32"
            )
    shapes = {name: info.shape for name, info in index.items()}
    return _build_mapping(shapes, config, source="checkpoint index")


def tf_to_state_dict(
    tf_vars: Mapping[str, np.ndarray], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Convert TF variables (from :func:`read_checkpoint`) into the model's ``state_dict``.

    Kernels (Conv2D HWIO, Conv2DTranspose HWOI) become PyTorch's layout by
    ``permute(3, 2, 0, 1)``; tensors are contiguous float32 copies. ``num_batches_tracked``
    buffers are not included (the checkpoint has none).

    Raises:
        CheckpointError: the variables do not fit the model (see :func:`mapping_for`).
    """
    import torch

    shapes = {name: tuple(np.shape(value)) for name, value in tf_vars.items()}
    mapping = _build_mapping(shapes, config, source="checkpoint")
    state: dict[str, torch.Tensor] = {}
    for torch_name, tf_name in mapping.items():
        array = np.asarray(tf_vars[tf_name])
        if array.dtype != np.float32:
            raise CheckpointError(f"variable {tf_name!r} is {array.dtype}; expected float32")
        tensor = torch.tensor(array, dtype=torch.float32)
        if tensor.ndim == 4:
            tensor = tensor.permute(3, 2, 0, 1)
        state[torch_name] = tensor.contiguous()
    return state


# --------------------------------------------------------------------------- conversion


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    config: ModelConfig,
    *,
    source: str | None = None,
) -> Path:
    """Convert a Spleeter TF checkpoint into ``dst_dir/model.safetensors`` + ``config.json``.

    Args:
        src: checkpoint folder, prefix or ``.index`` file (see :func:`read_checkpoint`).
        dst_dir: output folder (created if needed); both files are written atomically.
        config: the model the checkpoint is for.
        source: what to record as the weights' origin in the safetensors metadata
            (default: the checkpoint's path).

    Returns:
        The path of ``model.safetensors``.

    Raises:
        CheckpointError: the checkpoint is unreadable, corrupt, not for this model, or
            holds NaN or infinite values.
        OutputError: the files cannot be written (nothing half-written is left).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    prefix = _checkpoint_prefix(src)
    index = read_index(Path(f"{prefix}.index"))
    try:
        mapping = mapping_for(index, config)
    except CheckpointError as exc:
        raise CheckpointError(f"{prefix}.index: {exc}") from None
    tf_vars = read_checkpoint(prefix, names=sorted(set(mapping.values())))
    for name, values in tf_vars.items():  # a diverged training run's checkpoint
        problem = nonfinite(values)
        if problem:
            raise CheckpointError(
                f"{prefix}.index: variable {name!r} {problem}; the checkpoint cannot be used"
            )
    state = tf_to_state_dict(tf_vars, config)
    metadata = {
        "format": "pt",
        "source": source if source is not None else str(Path(f"{prefix}.index").resolve()),
        "model": config.name,
    }
    dst = Path(dst_dir)
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError(f"{dst}: not a folder") from None
    except OSError as exc:
        raise CheckpointError(f"{dst}: cannot create ({exc.strerror or exc})") from None
    weights = dst / "model.safetensors"
    config_text = json.dumps(config.to_json_dict(), indent=2) + "\n"
    try:
        atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata=metadata))
        atomic_write(dst / "config.json", config_text.encode("utf-8"))
    except (OSError, SafetensorError) as exc:  # disk full, file-size limit, read-only folder
        error = _os_error(exc)
        cause = error.strerror or str(error) or type(error).__name__
        raise OutputError(f"{dst}: cannot write the converted model ({cause})") from error
    return weights


def _os_error(exc: BaseException) -> OSError:
    """Return ``exc`` as an OSError (safetensors reports I/O errors as ``(os error N)``)."""
    if isinstance(exc, OSError):
        return exc
    match = re.search(r"\(os error (\d+)\)", str(exc))
    if match:
        number = int(match.group(1))
        return OSError(number, os.strerror(number))
    return OSError(" ".join(str(exc).split()))

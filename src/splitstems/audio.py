"""Decode, resample and encode audio files with PyAV and soxr.

The audio layer of splitstems: the rest of the library only sees numpy waveforms.

- A waveform is a float32 array of shape ``(n_samples, n_channels)`` (Spleeter's
  convention). Integer PCM decodes exactly: 16-bit samples become ``int16 / 32768``,
  24-bit ``int24 / 2**23``, 32-bit ``int32 / 2**31`` (rounded to float32).
- Every format FFmpeg reads is accepted, including the N-th audio stream of a video or
  a MUSDB ``.stem.mp4`` (streams 0..4: mixture, drums, bass, other, vocals).
- Channels: mono is duplicated to ``n_channels``; ``n_channels=1`` averages all
  channels; otherwise extra channels are dropped (the first ``n_channels`` are kept,
  as Spleeter's ``to_stereo`` does).
- Other sample rates are resampled with soxr (``"HQ"``); ``offset`` and ``duration``
  cut the source at sample ``round(offset * source_rate)`` before resampling.
- Damaged input: a file that decodes shorter than the exact length its header gives
  is an error ("truncated", both lengths) when it is read to its end: by a single
  sample for PCM WAV/RF64/AIFF and FLAC, by more than :data:`LENGTH_TOLERANCE` for
  MP4/M4A and MP3 with a frame count (codec priming and padding); an Ogg file that
  ends inside a page is truncated too (Ogg headers give no length). NaN and ±inf
  samples become 0, with one warning per file (:class:`NonFinite`).
- Every write goes to a hidden ``.part`` file in the destination directory that is
  renamed over the destination only once it is complete; the ``.part`` files of
  killed runs are removed (:func:`splitstems.files.remove_stale_temps`).
- Lossy bitrates are checked against what each encoder really does
  (:func:`bitrate_range`): LAME never exceeds 320k, so 500k is an error, not a cap.

Errors: failures raise :class:`~splitstems.errors.AudioError` (reading, encoding) or
:class:`~splitstems.errors.OutputError` (the destination cannot be written) with a
one-line message ``"<path>: <cause>"``. Invalid arguments raise ``ValueError``.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import av
import numpy as np
import soxr

from splitstems.errors import AudioError, OutputError
from splitstems.files import remove_stale_temps, temp_path

_log = logging.getLogger(__name__)

__all__ = [
    "CODECS",
    "LENGTH_TOLERANCE",
    "AudioInfo",
    "AudioWriter",
    "NonFinite",
    "load",
    "probe",
    "is_pcm",
    "save",
    "stream",
]

#: Output codecs :func:`save` and :class:`AudioWriter` know (also the file suffixes).
CODECS = ("wav", "flac", "mp3", "ogg", "m4a", "wma")

# Decoded samples are converted, checked and handed on this many at a time.
_BLOCK_SAMPLES = 16384
# Offsets below this are reached by decoding from the start and dropping samples; from
# here on the demuxer seeks first (only where timestamps are sample-exact, see _can_seek).
_SEEK_MIN_OFFSET = 10.0
# Seconds decoded and dropped before the offset after a seek: decoders need a frame or
# two to warm up (MP3 bit reservoir, AAC/Vorbis overlap) before their output is exact.
_SEEK_PREROLL = 1.0
_RESAMPLE_QUALITY = "HQ"
# Samples per frame handed to encoders that accept any frame size (PCM).
_PCM_FRAME = 1 << 16


@dataclass(frozen=True)
class AudioInfo:
    """What :func:`probe` finds out about an audio stream without decoding it.

    Attributes:
        duration: Length in seconds from the container, ``None`` if unknown; an
            estimate for some formats (decoded lengths can differ by a frame).
        sample_rate: Samples per second of the stream.
        n_channels: Number of channels of the stream.
        codec: FFmpeg's codec name, e.g. ``"mp3"``, ``"aac"``, ``"pcm_s16le"``.

    """

    duration: float | None
    sample_rate: int
    n_channels: int
    codec: str


def is_pcm(codec: str) -> bool:
    """Whether an FFmpeg codec name (:attr:`AudioInfo.codec`) is uncompressed PCM.

    Decoding or encoding PCM is a copy: a thread of its own costs a separation more (in
    contention with torch's threads) than doing it in line (see
    :meth:`splitstems.separator.Separator.separate_to_file`).
    """
    return codec.startswith("pcm_")


# --------------------------------------------------------------------------- errors


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _reason(exc: BaseException) -> str:
    """Return the cause of an FFmpeg or OS error without errno numbers and file names."""
    strerror = getattr(exc, "strerror", None)
    return _one_line(strerror or str(exc) or type(exc).__name__)


def _fs_name(path: str | os.PathLike[str]) -> str:
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    return name


# --------------------------------------------------------------------------- reading


def _check_input(path: str | os.PathLike[str]) -> str:
    name = _fs_name(path)
    if not os.path.exists(name):
        raise AudioError(f"{name}: file not found")
    if os.path.isdir(name):
        raise AudioError(f"{name}: is a directory")
    try:
        if os.path.isfile(name) and os.path.getsize(name) == 0:
            raise AudioError(f"{name}: empty file")
    except OSError as exc:
        raise AudioError(f"{name}: cannot read ({_reason(exc)})") from exc
    return name


# Leading bytes of the containers that are common for audio (MPEG sync is checked apart).
_MAGIC = (b"ID3", b"RIFF", b"RF64", b"fLaC", b"OggS", b"FORM", b"\x30\x26\xb2\x75", b"\x1a\x45")


def _file_head(name: str) -> bytes:
    """Return a file's first 12 bytes (its container's magic), or b"" if unreadable."""
    try:
        with open(name, "rb") as f:
            return f.read(12)
    except OSError:
        return b""


def _looks_like_audio(name: str) -> bool:
    """Whether the file starts like a known audio container (to tell truncation apart)."""
    head = _file_head(name)
    mpeg_sync = len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0
    return head.startswith(_MAGIC) or head[4:8] == b"ftyp" or mpeg_sync


#: FFmpeg's options for WAV files (see :func:`_open_options`).
_WAV_OPTIONS = {"probesize": str(1 << 15), "max_size": str(1 << 18)}


def _open_options(name: str) -> dict[str, str] | None:
    """Return FFmpeg's open options for ``name``: for a WAV file, :data:`_WAV_OPTIONS`.

    - ``probesize`` 32 KB: before the first packet FFmpeg read and analysed ~1 MB of a
      16-bit PCM WAV (18 ms per open, twice per separated file: the probe and the
      decoder), though the header says all there is; 32 KB take 1 ms.
    - ``max_size`` 256 KB, the WAV demuxer's largest packet (4 KB by default): 122
      frames for 3 minutes instead of 7,750, decoded in 11-20 ms instead of 18-64 ms.

    Tried on WAVs of 8/16/24/32-bit and float PCM, A-law, mu-law, MS and IMA ADPCM, MP3
    and S/PDIF-wrapped AC-3 (found from the first 64 KB anyway): the same streams and
    samples. Other containers keep FFmpeg's defaults, and only regular files are looked
    at (a pipe's bytes are not read twice).
    """
    if not os.path.isfile(name):
        return None
    head = _file_head(name)
    if head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return dict(_WAV_OPTIONS)
    return None


def _open_input(name: str) -> av.container.InputContainer:
    try:
        return av.open(name, mode="r", metadata_errors="ignore", options=_open_options(name))
    except (av.error.InvalidDataError, av.error.EOFError) as exc:  # EOF: cut in the header
        if _looks_like_audio(name):
            raise AudioError(f"{name}: truncated or corrupt audio file ({_reason(exc)})") from exc
        raise AudioError(f"{name}: not an audio file ({_reason(exc)})") from exc
    except FileNotFoundError as exc:
        raise AudioError(f"{name}: file not found") from exc
    except PermissionError as exc:
        raise AudioError(f"{name}: permission denied") from exc
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise AudioError(f"{name}: cannot open ({_reason(exc)})") from exc


def _open_stream(
    path: str | os.PathLike[str], index: int
) -> tuple[str, av.container.InputContainer, av.audio.stream.AudioStream]:
    """Open ``path`` and pick its ``index``-th audio stream (the container stays open)."""
    name = _check_input(path)
    container = _open_input(name)
    try:
        streams = container.streams.audio
        if not streams:
            raise AudioError(f"{name}: no audio stream")
        if not 0 <= index < len(streams):
            raise AudioError(
                f"{name}: no audio stream {index} (it has {len(streams)}, numbered from 0)"
            )
        audio = streams[index]
        if not audio.codec_context.sample_rate:
            raise AudioError(f"{name}: not an audio file (no sample rate)")
    except BaseException:
        container.close()
        raise
    return name, container, audio


def probe(path: str | os.PathLike[str], *, stream: int = 0) -> AudioInfo:
    """Describe the ``stream``-th audio stream of ``path`` without decoding it.

    Raises:
        AudioError: The file is missing, not audio, or has no such audio stream.

    """
    name, container, audio = _open_stream(path, stream)
    with container:
        ctx = audio.codec_context
        duration = None
        if audio.duration is not None and audio.time_base:
            duration = float(audio.duration * audio.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        codec = ctx.codec.canonical_name if ctx.codec is not None else ctx.name
        return AudioInfo(
            duration=duration,
            sample_rate=int(ctx.sample_rate),
            n_channels=int(ctx.layout.nb_channels),
            codec=str(codec),
        )


def _frame_samples(frame: av.AudioFrame) -> np.ndarray:
    """Return the samples of a decoded frame as ``(n_samples, n_channels)``, not converted.

    A view of the frame's memory where possible: :func:`_convert_into` copies it out.
    """
    data = frame.to_ndarray()
    return data.T if frame.format.is_planar else data.reshape(-1, frame.layout.nb_channels)


def _convert_into(samples: np.ndarray, out: np.ndarray) -> None:
    """Write ``samples`` into float32 ``out`` (same shape); integer PCM exactly.

    16-bit samples become ``int16 / 32768``, 24-bit (in 32) and 32-bit ``int32 / 2**31``
    rounded once to float32, unsigned 8-bit ``(x - 128) / 128``. The scales are powers
    of two: scaling before or after the rounding gives the same floats.
    """
    kind = samples.dtype
    if kind.kind == "f":
        out[...] = samples
    elif kind == np.int16:
        np.multiply(samples, np.float32(2.0**-15), out=out)
    elif kind == np.uint8:
        np.subtract(samples, np.float32(128), out=out)
        out *= np.float32(2.0**-7)
    elif kind.kind == "i":  # in float64, then rounded once
        np.multiply(samples, 2.0 ** (1 - 8 * kind.itemsize), out=out, casting="same_kind")
    else:
        out[...] = samples


class DecodeLog:
    """What went wrong while decoding.

    Attributes:
        error: the last error (for the message when nothing decoded).
        skipped: packets that failed to decode and were skipped.
        read_error: the error that ended the reading (a damaged container, a pipe cut), if any.
    """

    def __init__(self) -> None:
        self.error: str | None = None
        self.skipped = 0
        self.read_error: str | None = None


def decode_frames(
    container: av.container.InputContainer, audio: av.audio.stream.AudioStream, log: DecodeLog
) -> Iterator[av.AudioFrame]:
    """Decode ``audio``: skip packets that fail to decode (as FFmpeg), stop at a read error."""
    packets = container.demux(audio)
    flushed = False
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except (av.error.FFmpegError, OSError) as exc:
            if not isinstance(exc, av.error.EOFError):
                log.error = log.read_error = _reason(exc)
            break
        flushed = packet.size == 0
        try:
            yield from audio.codec_context.decode(packet)
        except (av.error.FFmpegError, ValueError) as exc:
            log.error = _reason(exc)
            log.skipped += 1
    if not flushed:
        try:
            yield from audio.codec_context.decode(None)
        except (av.error.FFmpegError, ValueError):
            pass


def _can_seek(audio: av.audio.stream.AudioStream) -> bool:
    """Whether this stream's timestamps can address single samples."""
    tb = audio.time_base
    rate = audio.codec_context.sample_rate
    return bool(tb) and tb.denominator % (rate * tb.numerator) == 0


#: Most channels an array of samples may have (more: not a sound, or transposed).
MAX_CHANNELS = 64
# At most this many rows and more columns: a (channels, samples) array.
_TRANSPOSED_ROWS = 8


def check_samples_first(name: str, data: np.ndarray) -> None:
    """Refuse a 2-D ``data`` that is channels first or has more channels than a sound.

    Raises:
        AudioError: naming ``name``, the shape and the expected ``(n_samples, n_channels)``.
    """
    n_samples, n_channels = data.shape
    if n_samples <= _TRANSPOSED_ROWS < n_channels:
        raise AudioError(
            f"{name}: expected shape (n_samples, n_channels), got {data.shape}: "
            "channels first? pass it transposed (.T)"
        )
    if n_channels > MAX_CHANNELS:
        raise AudioError(
            f"{name}: expected shape (n_samples, n_channels) with at most {MAX_CHANNELS} "
            f"channels, got {data.shape}"
        )


def to_channels(name: str, data: np.ndarray, n_channels: int) -> np.ndarray:
    """Return ``(n, C)`` audio with ``n_channels`` channels.

    Mono is duplicated; extra channels are dropped (Spleeter's behaviour), or averaged
    when mono is asked for. ``name`` names the audio in errors.
    """
    have = data.shape[1]
    if have == n_channels:
        return data
    if have == 1:
        return np.repeat(data, n_channels, axis=1)
    if n_channels == 1:
        return data.mean(axis=1, keepdims=True, dtype=np.float32)
    if have > n_channels:
        return np.ascontiguousarray(data[:, :n_channels])
    raise AudioError(f"{name}: cannot make {n_channels} channels from {have}")


# --------------------------------------------------------------------------- damage

#: Largest shortfall (seconds) of a lossy stream (MP4/AAC, MP3 with a frame count)
#: against the length its container gives before the file counts as truncated (codec
#: priming and padding are ~50 ms). Lossless formats whose header counts samples (PCM
#: WAV, RF64, AIFF, FLAC) must decode to that count exactly.
LENGTH_TOLERANCE = 0.1


@dataclass(frozen=True)
class _Expected:
    """The length a stream's header gives, and how much less the decoder may give."""

    samples: int  # sample frames, at the stream's rate
    slack: int  # shortfall (sample frames) still counted as complete
    there: int | None = None  # sample frames the file holds, where its size tells (PCM WAV)


def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _skip_id3(f: BinaryIO) -> int:
    """Offset of the first byte after a leading ID3v2 tag (0 without one)."""
    head = _read_at(f, 0, 10)
    if len(head) < 10 or not head.startswith(b"ID3"):
        return 0
    size = 0
    for byte in head[6:10]:  # syncsafe: 7 bits per byte
        size = size << 7 | (byte & 0x7F)
    return 10 + size + (10 if head[5] & 0x10 else 0)


# Data sizes that mean "unknown" in WAVs written to pipes: FFmpeg leaves 0xFFFFFFFF,
# SoX writes 0x7FFFF000 (some others 0 or anything above it).
_WAV_UNKNOWN_SIZE = 0x7FFFF000


def _wav_layout(f: BinaryIO) -> tuple[int, int, int] | None:
    """Return a PCM WAV's announced sample frames, the offset of its samples, the frame size."""
    head = _read_at(f, 0, 12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
        return None
    rf64 = head[:4] == b"RF64"
    block_align = 0
    big_size: int | None = None
    offset = 12
    for _ in range(1000):
        chunk = _read_at(f, offset, 8)
        if len(chunk) < 8:
            return None
        kind, size = chunk[:4], int.from_bytes(chunk[4:], "little")
        if kind == b"ds64":
            body = _read_at(f, offset + 8, 16)
            big_size = int.from_bytes(body[8:16], "little") if len(body) == 16 else None
        elif kind == b"fmt ":
            body = _read_at(f, offset + 8, 16)
            block_align = int.from_bytes(body[12:14], "little") if len(body) == 16 else 0
        elif kind == b"data":
            if rf64 and size == 0xFFFFFFFF:
                size = big_size or 0
            elif size >= _WAV_UNKNOWN_SIZE:  # written to a pipe: the length was not known
                size = 0
            if not (size and block_align):
                return None
            return size // block_align, offset + 8, block_align
        offset += 8 + size + (size & 1)
    return None


def announced_wav_frames(head: bytes) -> int | None:
    """Sample frames a PCM WAV announces, from its first bytes; None: not known there.

    ``None`` too for a WAV written to a pipe (its header cannot say the length) and for
    anything that is not a PCM WAV whose header fits in ``head``.
    """
    layout = _wav_layout(io.BytesIO(head))
    return None if layout is None else layout[0]


def _flac_samples(f: BinaryIO) -> int | None:
    """Total samples of a FLAC's STREAMINFO (``None`` where it says "unknown": 0)."""
    start = _skip_id3(f)
    head = _read_at(f, start, 8 + 34)
    if len(head) < 42 or head[:4] != b"fLaC" or head[4] & 0x7F != 0:
        return None
    total = int.from_bytes(head[8 + 13 : 8 + 18], "big") & (2**36 - 1)
    return total or None


def _mp3_counts_frames(f: BinaryIO) -> bool:
    """Whether the first MPEG audio frame is a Xing/Info (with a frame count) or VBRI one.

    Only then is FFmpeg's duration of an MP3 exact; otherwise it is estimated from the
    bitrate and the file size (and may differ from the decoded length either way).
    """
    start = _skip_id3(f)
    data = _read_at(f, start, 1 << 16)
    for i in range(len(data) - 3):
        if data[i] != 0xFF or data[i + 1] & 0xE0 != 0xE0:
            continue
        version, layer = data[i + 1] >> 3 & 3, data[i + 1] >> 1 & 3
        bitrate, rate = data[i + 2] >> 4, data[i + 2] >> 2 & 3
        if version == 1 or layer != 1 or bitrate in (0, 15) or rate == 3:
            continue  # not a valid MPEG layer III header: keep looking
        mono = data[i + 3] >> 6 == 3
        side = (17 if mono else 32) if version == 3 else (9 if mono else 17)
        tag = data[i + 4 + side : i + 12 + side]
        if tag[:4] in (b"Xing", b"Info"):
            return len(tag) == 8 and bool(tag[7] & 1)  # flag: the frame count is there
        return data[i + 36 : i + 40] == b"VBRI"
    return False


def _expected_length(
    name: str, container: av.container.InputContainer, stream: av.audio.stream.AudioStream
) -> _Expected | None:
    """Return the sample frames the header says ``stream`` has, where that is exact.

    Exact, and decoded to the sample (slack 0): PCM in WAV/RF64 (the ``data`` chunk,
    read here: FFmpeg replaces it by the file size when the file is shorter), PCM in
    AIFF (COMM) and FLAC (STREAMINFO; its frames carry exact sample counts and a frame
    cut short is dropped whole, so even a cut inside the last frame loses samples).
    Exact but with codec priming and padding (slack :data:`LENGTH_TOLERANCE`): MP4/M4A
    (the track's duration), other AIFF-C codecs and MP3 with a Xing/Info/VBRI frame
    count. Anything else gives ``None``: unknown. That is an MP3 without a frame count
    (estimated from the bitrate), ASF/WMA, Matroska/WebM, raw AAC, and Ogg: its length
    is the last page's granule position, which a cut file simply has earlier (see
    :func:`_ogg_cut_page` for what is checked there instead).
    """
    kinds = set(container.format.name.split(","))
    ctx = stream.codec_context
    rate = int(ctx.sample_rate)
    lossy_slack = round(LENGTH_TOLERANCE * rate)
    pcm = ctx.name.startswith("pcm_")
    try:
        with open(name, "rb") as f:
            if "wav" in kinds:
                layout = _wav_layout(f) if pcm else None
                if layout is None:
                    return None
                samples, data_offset, block_align = layout
                size = os.fstat(f.fileno()).st_size
                return _Expected(samples, 0, max(0, size - data_offset) // block_align)
            if "flac" in kinds:
                samples = _flac_samples(f)
                return None if samples is None else _Expected(samples, 0)
            if "mp3" in kinds and not _mp3_counts_frames(f):
                return None
    except OSError:
        return None
    if not kinds & {"aiff", "mp3", "mp4"}:
        return None
    if not stream.duration or not stream.time_base or stream.duration < 0:
        return None
    samples = round(stream.duration * stream.time_base * rate)
    return _Expected(samples, 0 if "aiff" in kinds and pcm else lossy_slack)


# Ogg pages are at most 27 + 255 + 255 * 255 bytes: the last four fit in this much.
_OGG_TAIL = 1 << 18


def _ogg_cut_page(name: str) -> bool:
    """Whether an Ogg file ends inside a page (it was cut there).

    A complete Ogg file is a chain of whole pages, each with its length in its header;
    FFmpeg drops a page the file ends inside, and with it the samples after the
    previous page's granule. The pages of the file's last :data:`_OGG_TAIL` bytes are
    walked from the first one found: a page reaching past the end of the file means a
    cut. Anything that does not parse as pages (trailing junk) is not called a cut, nor
    is a file cut exactly between two pages (nothing there tells it apart).
    """
    try:
        size = os.path.getsize(name)
        with open(name, "rb") as f:
            start = max(0, size - _OGG_TAIL)
            data = _read_at(f, start, size - start)
    except OSError:
        return False
    candidate = data.find(b"OggS\x00")
    while candidate >= 0:
        cut = _ogg_walk(data, candidate)
        if cut is not None:
            return cut
        candidate = data.find(b"OggS\x00", candidate + 1)
    return False


def _ogg_walk(data: bytes, at: int) -> bool | None:
    """Walk pages from ``at``: whether the last is cut short; ``None``: these are not pages."""
    n_pages = 0
    while at < len(data):
        if not data.startswith(b"OggS\x00"[: len(data) - at], at) or (
            at + 5 < len(data) and data[at + 5] > 7  # header type: 3 flag bits
        ):
            return None  # not a page: misaligned, or junk after the last page
        end = at + 27
        if end <= len(data):
            end += data[at + 26]  # the segment table
        if end <= len(data):
            end += sum(data[at + 27 : end])  # the page's data
        if end > len(data):
            # a page that does not fit is a cut only after one that did (a false
            # "OggS" inside the data of the first page walked could claim anything)
            return True if n_pages else None
        at, n_pages = end, n_pages + 1
    return False


class NonFinite:
    """Replace NaN and ±inf by 0 in the successive pieces of one audio, counting them.

    :meth:`clean` costs one sum per piece when everything is finite (the
    piece itself is returned, never copied); otherwise it returns a copy with zeros
    in place of the non-finite samples. :meth:`report` then logs one warning for the
    whole audio, e.g. ``"song.wav: 3 non-finite samples replaced by 0 (first at
    30.000 s)"``.

    Args:
        name: names the audio in the message (a file, or ``"waveform"``).
        sample_rate: samples per second, for the position in the message.
    """

    def __init__(self, name: str, sample_rate: int) -> None:
        self.name = name
        self.sample_rate = sample_rate
        self.count = 0
        self.first: int | None = None

    def clean(self, data: np.ndarray, start: int = 0) -> np.ndarray:
        """Return ``data`` (``(n_samples, ...)`` floats) with NaN and ±inf set to 0.

        ``start`` is the position of ``data[0]`` in the whole audio, in samples.
        """
        flat = data.ravel(order="K")  # a view of any contiguous array
        with np.errstate(all="ignore"):
            if not flat.size or math.isfinite(float(np.add.reduce(flat))):
                return data
        bad = ~np.isfinite(data)
        n_bad = int(np.count_nonzero(bad))
        if not n_bad:  # finite, but so large that their sum overflowed
            return data
        if self.first is None:
            row = int(np.flatnonzero(bad.reshape(len(data), -1).any(axis=1))[0])
            self.first = start + row
        self.count += n_bad
        out = data.copy()
        out[bad] = 0
        return out

    def message(self) -> str | None:
        """Return the warning for what :meth:`clean` replaced so far (``None``: nothing)."""
        if not self.count or self.first is None:
            return None
        plural = "s" if self.count != 1 else ""
        return (
            f"{self.name}: {self.count} non-finite sample{plural} replaced by 0 "
            f"(first at {self.first / self.sample_rate:.3f} s)"
        )

    def report(self) -> None:
        """Log :meth:`message` as a warning, if there is one."""
        message = self.message()
        if message is not None:
            _log.warning("%s", message)


class _Source:
    """Samples ``[start, start + count)`` of one audio stream at its own rate."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        index: int,
        offset: float,
        duration: float | None,
        warn: bool = True,
    ) -> None:
        self.name, self.container, self.audio = _open_stream(path, index)
        self.index = index
        self.warn = warn
        self.rate = int(self.audio.codec_context.sample_rate)
        self.offset = offset
        self.start = round(offset * self.rate)
        self.stop = None if duration is None else self.start + round(duration * self.rate)
        try:
            self.expected = _expected_length(self.name, self.container, self.audio)
            self._check_wav_size()
        except BaseException:
            self.container.close()
            raise

    def _check_wav_size(self) -> None:
        """Fail now, before any decoding, on a PCM WAV whose samples are cut short.

        The file's size tells how many of the announced sample frames are there: a cut
        WAV is refused up front (a long one would otherwise be separated before the
        end-of-stream check finds it), unless the part asked for lies before the cut.
        """
        expected = self.expected
        if expected is None or expected.there is None or expected.there >= expected.samples:
            return
        if self.stop is None or self.stop > expected.there:
            raise self._truncated(expected.there, expected)

    def _truncated(self, decoded: int, expected: _Expected) -> AudioError:
        """Return the error of a stream that ends after ``decoded`` of its sample frames."""
        have, want = _seconds_apart(decoded / self.rate, expected.samples / self.rate)
        return AudioError(
            f"{self.name}: truncated: decodes to {have} s of the {want} s its header gives"
        )

    def _reopen(self) -> None:
        self.container.close()
        _, self.container, self.audio = _open_stream(self.name, self.index)

    def _seek(self, log: DecodeLog) -> tuple[int, Iterator[av.AudioFrame]] | None:
        """Seek to just before ``start``: the first frame's sample position and the frames.

        Positions count from the first frame a decode from the start gives. ``None``
        where seeking is not possible or not trustworthy; the container is then
        reopened if anything was read, and the caller decodes from the start.
        """
        if self.offset < _SEEK_MIN_OFFSET or not _can_seek(self.audio):
            return None
        tb = self.audio.time_base
        first = next(decode_frames(self.container, self.audio, DecodeLog()), None)
        target = max(self.start - round(_SEEK_PREROLL * self.rate), 0)
        if first is not None and first.pts is not None:
            ref = first.pts
            try:
                self.container.seek(
                    ref + int(Fraction(target, self.rate) / tb), stream=self.audio, backward=True
                )
            except (av.error.FFmpegError, OSError):
                pass
            else:
                frames = decode_frames(self.container, self.audio, log)
                frame = next(frames, None)
                if frame is not None and frame.pts is not None:
                    position = round((frame.pts - ref) * tb * self.rate)
                    if 0 <= position <= target:
                        return position, _chain_one(frame, frames)
        self._reopen()
        return None

    def chunks(self, n_channels: int) -> Iterator[np.ndarray]:
        """Yield float32 ``(n, n_channels)`` arrays; raise AudioError when nothing is there."""
        try:
            yield from self._chunks(n_channels)
        except av.error.FFmpegError as exc:
            raise AudioError(f"{self.name}: cannot decode ({_reason(exc)})") from exc
        except OSError as exc:
            raise AudioError(f"{self.name}: cannot read ({_reason(exc)})") from exc
        finally:
            self.container.close()

    def _chunks(self, n_channels: int) -> Iterator[np.ndarray]:
        have = self.audio.codec_context.channels
        if have > n_channels > 1 and self.warn:  # as Spleeter: the first channels
            _log.warning("%s: keeping the first %d of its %d channels", self.name, n_channels, have)
        non_finite = NonFinite(self.name, self.rate)
        log = DecodeLog()
        sought = self._seek(log)
        if sought is None:
            position, frames = 0, decode_frames(self.container, self.audio, log)
        else:
            position, frames = sought
        decoded = 0
        # Frames are small (~1000 samples): samples are converted into blocks of
        # _BLOCK_SAMPLES, then checked for NaN and mapped to n_channels once per block.
        block: np.ndarray | None = None
        filled = block_start = 0
        for frame in frames:
            if frame.sample_rate != self.rate:
                raise AudioError(f"{self.name}: sample rate changes mid-stream")
            samples = _frame_samples(frame)
            begin, position = position, position + len(samples)
            decoded += len(samples)
            lo = max(self.start - begin, 0)
            hi = len(samples) if self.stop is None else min(self.stop - begin, len(samples))
            if block is not None and hi > lo and samples.shape[1] != block.shape[1]:
                yield self._finish(block[:filled], block_start, non_finite, n_channels)
                block, filled = None, 0  # the layout changed mid-stream
            while hi > lo:
                if block is None:
                    block = np.empty((_BLOCK_SAMPLES, samples.shape[1]), np.float32)
                    filled, block_start = 0, begin + lo
                take = min(_BLOCK_SAMPLES - filled, hi - lo)
                _convert_into(samples[lo : lo + take], block[filled : filled + take])
                filled, lo = filled + take, lo + take
                if filled == _BLOCK_SAMPLES:
                    yield self._finish(block, block_start, non_finite, n_channels)
                    block, filled = None, 0
            if self.stop is not None and position >= self.stop:
                break
        if block is not None and filled:
            yield self._finish(block[:filled], block_start, non_finite, n_channels)
        if self.stop is not None and position >= self.stop:  # not read to the end
            self._done(non_finite)
            return
        if decoded == 0:  # only possible without a seek
            if log.error is not None:
                raise AudioError(f"{self.name}: no audio decoded ({log.error})")
            self._check_complete(0)  # a header announcing samples that are not there
            raise AudioError(f"{self.name}: zero-length audio")
        if position <= self.start:
            self._check_complete(position)  # the offset may lie in what was cut off
            raise AudioError(
                f"{self.name}: offset {self.offset:g} s is beyond the end of the audio "
                f"({position / self.rate:.3f} s)"
            )
        self._check_complete(position)
        self._done(non_finite)

    def _check_complete(self, decoded: int) -> None:
        """Raise if the stream ended (after ``decoded`` samples) before its header says."""
        expected = self.expected
        if expected is not None and decoded < expected.samples - expected.slack:
            raise self._truncated(decoded, expected)
        if "ogg" in self.container.format.name.split(",") and _ogg_cut_page(self.name):
            raise AudioError(
                f"{self.name}: truncated: decodes to {decoded / self.rate:.3f} s, then the "
                "file ends inside an Ogg page (Ogg headers give no total length)"
            )

    def _finish(
        self, block: np.ndarray, start: int, non_finite: NonFinite, n_channels: int
    ) -> np.ndarray:
        """``block`` (samples from ``start`` on) without NaN/inf, with ``n_channels``."""
        return to_channels(self.name, non_finite.clean(block, start), n_channels)

    def _done(self, non_finite: NonFinite) -> None:
        if self.warn:
            non_finite.report()


def _seconds_apart(a: float, b: float) -> tuple[str, str]:
    """Format ``a`` and ``b`` (seconds) with 3 decimals, or as many more (to 6) as differ."""
    for digits in range(3, 7):
        texts = f"{a:.{digits}f}", f"{b:.{digits}f}"
        if texts[0] != texts[1]:
            break
    return texts


def _chain_one(first: av.AudioFrame, rest: Iterator[av.AudioFrame]) -> Iterator[av.AudioFrame]:
    yield first
    yield from rest


class StreamResampler:
    """soxr's streaming resampler (float32, the project's quality), block by block.

    Passes blocks through unchanged when the rates agree. The one resampler of decoding,
    encoding and ``splitstems stream``.
    """

    def __init__(self, rate_in: int, rate_out: int, n_channels: int) -> None:
        self.n_channels = n_channels
        self._soxr = None
        if rate_in != rate_out:
            self._soxr = soxr.ResampleStream(
                rate_in, rate_out, n_channels, dtype="float32", quality=_RESAMPLE_QUALITY
            )

    def push(self, block: np.ndarray) -> np.ndarray:
        """Resample the next ``(n, channels)`` block (output may lag by the filter)."""
        if self._soxr is None:
            return block
        out = self._soxr.resample_chunk(np.ascontiguousarray(block), last=False)
        return out.reshape(-1, self.n_channels)

    def flush(self) -> np.ndarray:
        """Return what the filter still holds."""
        empty = np.zeros((0, self.n_channels), np.float32)
        if self._soxr is None:
            return empty
        return self._soxr.resample_chunk(empty, last=True).reshape(-1, self.n_channels)


def _resampled(
    chunks: Iterable[np.ndarray], rate_in: int, rate_out: int, n_channels: int
) -> Iterator[np.ndarray]:
    if rate_in == rate_out:
        yield from chunks
        return
    resampler = StreamResampler(rate_in, rate_out, n_channels)
    for chunk in chunks:
        out = resampler.push(chunk)
        if len(out):
            yield out
    out = resampler.flush()
    if len(out):
        yield out


def _check_read_args(
    offset: float, duration: float | None, sample_rate: int, n_channels: int
) -> None:
    if not (math.isfinite(offset) and offset >= 0):
        raise ValueError(f"offset must be a finite number >= 0, not {offset!r}")
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        raise ValueError(f"duration must be a finite number > 0 or None, not {duration!r}")
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, not {sample_rate!r}")
    if int(n_channels) != n_channels or n_channels < 1:
        raise ValueError(f"n_channels must be a positive integer, not {n_channels!r}")


def _pipeline(
    path: str | os.PathLike[str],
    *,
    offset: float,
    duration: float | None,
    sample_rate: int,
    n_channels: int,
    stream: int,
    warn: bool,
) -> Iterator[np.ndarray]:
    """Open eagerly (errors now), then lazily yield output-rate arrays of any length."""
    _check_read_args(offset, duration, sample_rate, n_channels)
    source = _Source(path, index=stream, offset=offset, duration=duration, warn=warn)
    return _resampled(source.chunks(n_channels), source.rate, int(sample_rate), n_channels)


def load(
    path: str | os.PathLike[str],
    *,
    offset: float = 0.0,
    duration: float | None = None,
    sample_rate: int = 44100,
    n_channels: int = 2,
    stream: int = 0,
    warn: bool = True,
) -> np.ndarray:
    """Decode an audio file to a float32 waveform of shape ``(n_samples, n_channels)``.

    Args:
        path: Any file FFmpeg reads (mp3, wav, flac, ogg, m4a, wma, aiff, video, ...).
        offset: Start in seconds, sample-exact (``round(offset * source_rate)``).
        duration: Seconds to read from ``offset``; ``None`` reads to the end. A
            duration past the end returns what is there.
        sample_rate: Output rate; other rates are resampled with soxr.
        n_channels: Output channels (see the module docstring for the mapping).
        stream: Which audio stream (0-based among the audio streams only).
        warn: Log the warnings about this file (channels dropped, non-finite
            samples replaced); ``False`` for a second pass over the same file.

    NaN and ±inf samples (float files, or a decoder's output) become 0, with one
    warning for the file (see :class:`NonFinite`).

    Raises:
        AudioError: Missing, empty or non-audio file, no such stream, nothing
            decodable, zero-length audio, ``offset`` past the end, or a truncated
            file: reading to its end gives less than the exact length its header
            gives (PCM WAV/RF64/AIFF and FLAC: by a sample; MP4/M4A and MP3 with a
            Xing/Info/VBRI header: by more than :data:`LENGTH_TOLERANCE`), or an Ogg
            file ends inside a page. Other lengths are estimates or absent and are not
            checked (MP3 without a frame count, ASF/WMA, Matroska/WebM, raw AAC; an
            Ogg file cut exactly between two pages).
        ValueError: Invalid arguments.

    """
    chunks = list(
        _pipeline(
            path,
            offset=offset,
            duration=duration,
            sample_rate=sample_rate,
            n_channels=n_channels,
            stream=stream,
            warn=warn,
        )
    )
    if not chunks:
        return np.zeros((0, n_channels), np.float32)
    return np.concatenate(chunks, axis=0)


def stream(
    path: str | os.PathLike[str],
    *,
    chunk_samples: int,
    offset: float = 0.0,
    duration: float | None = None,
    sample_rate: int = 44100,
    n_channels: int = 2,
    stream: int = 0,
    warn: bool = True,
    first_chunk_samples: int | None = None,
) -> Iterator[np.ndarray]:
    """Decode like :func:`load`, yielding ``(chunk_samples, n_channels)`` float32 arrays.

    Every chunk has exactly ``chunk_samples`` frames except a shorter last one (and the
    first, of ``first_chunk_samples`` when given: a consumer that can start on less
    starts sooner); their concatenation equals :func:`load` with the same arguments.
    Memory stays bounded by the chunk size, so hour-long files are fine. The file is
    opened (and errors such as a missing file are raised) by this call; decoding errors
    (and truncation, found at the end of the file) surface while iterating.
    """
    for size in (chunk_samples, first_chunk_samples or 1):
        if int(size) != size or size < 1:
            raise ValueError(f"chunk sizes must be positive integers, not {size!r}")
    arrays = _pipeline(
        path,
        offset=offset,
        duration=duration,
        sample_rate=sample_rate,
        n_channels=n_channels,
        stream=stream,
        warn=warn,
    )
    first = int(first_chunk_samples or chunk_samples)
    return _rechunk(arrays, int(chunk_samples), n_channels, first=first)


def _rechunk(
    arrays: Iterable[np.ndarray], size: int, n_channels: int, *, first: int
) -> Iterator[np.ndarray]:
    """Chunks of ``size`` samples (the first of ``first``), the last one shorter."""
    buffer = np.empty((first, n_channels), np.float32)
    filled = 0
    for array in arrays:
        used = 0
        while used < len(array):
            take = min(len(buffer) - filled, len(array) - used)
            buffer[filled : filled + take] = array[used : used + take]
            filled += take
            used += take
            if filled == len(buffer):
                yield buffer
                buffer = np.empty((size, n_channels), np.float32)
                filled = 0
    if filled:
        yield buffer[:filled]


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _Target:
    """How one output codec is written: muxer, encoder, sample format, rate."""

    muxer: str
    encoder: str
    sample_format: str
    lossy: bool
    encode_rate: int | None = None  # resample to this rate before encoding
    lead_in_frames: int = 0


_SUFFIXES = {
    ".wav": "wav",
    ".wave": "wav",
    ".flac": "flac",
    ".mp3": "mp3",
    ".ogg": "ogg",
    ".oga": "ogg",
    ".m4a": "m4a",
    ".mp4": "m4a",
    ".wma": "wma",
}
_ALIASES = {"wave": "wav", "vorbis": "ogg", "aac": "m4a", "mp4": "m4a"}
# Candidate encoders per lossy codec, best first (the PyAV wheel decides what exists).
# FFmpeg's native "vorbis" encoder is left out on purpose: it is experimental, ignores
# the bitrate, is stereo only and garbles the second channel (correlation ~0.6 on a
# plain two-tone test). Without libvorbis, ogg files get Opus (a valid Ogg Opus file).
_LOSSY = {
    "mp3": ("mp3", ("libmp3lame",)),
    "ogg": ("ogg", ("libvorbis", "libopus")),
    "m4a": ("ipod", ("libfdk_aac", "aac")),
    "wma": ("asf", ("wmav2",)),
}


def _encoder(name: str) -> av.Codec | None:
    try:
        codec = av.Codec(name, "w")
    except (av.codec.codec.UnknownCodecError, ValueError):
        return None
    return codec if codec.name == name else None


def _bit_depth(value: int | str) -> str:
    text = str(value).lower()
    if text not in {"16", "24", "32", "32f"}:
        raise ValueError(f"bit_depth must be 16, 24, 32 or '32f', not {value!r}")
    return "32f" if text == "32" else text


def _target(name: str, codec: str | None, bit_depth: int | str, rate: int) -> _Target:
    if codec is None:
        suffix = Path(name).suffix.lower()
        if suffix not in _SUFFIXES:
            raise AudioError(
                f"{name}: cannot tell the codec from the suffix {suffix or '(none)'!r}; "
                f"pass codec= one of {', '.join(CODECS)}"
            )
        codec = _SUFFIXES[suffix]
    key = _ALIASES.get(codec.lower(), codec.lower())
    depth = _bit_depth(bit_depth)
    if key == "wav":
        encoder, fmt = {
            "16": ("pcm_s16le", "s16"),
            "24": ("pcm_s24le", "s32"),
            "32f": ("pcm_f32le", "flt"),
        }[depth]
        return _Target("wav", encoder, fmt, lossy=False)
    if key == "flac":
        if depth not in {"16", "24"}:
            raise AudioError(f"{name}: flac supports bit_depth 16 or 24, not {bit_depth!r}")
        return _Target("flac", "flac", "s16" if depth == "16" else "s32", lossy=False)
    if key not in _LOSSY:
        raise AudioError(f"{name}: unknown codec {codec!r} (known: {', '.join(CODECS)})")
    muxer, candidates = _LOSSY[key]
    for candidate in candidates:
        found = _encoder(candidate)
        if found is None:
            continue
        formats = [f.name for f in found.audio_formats or ()]
        fmt = next((f for f in ("fltp", "flt", "s16p", "s16") if f in formats), None)
        if fmt is None:
            continue
        encode_rate = None
        if found.audio_rates and rate not in found.audio_rates:
            if candidate != "libopus":
                supported = ", ".join(str(r) for r in sorted(found.audio_rates))
                raise AudioError(
                    f"{name}: {candidate} cannot encode {rate} Hz (supported: {supported})"
                )
            encode_rate = 48000  # Opus runs at 48 kHz; decoders give 48 kHz back
        return _Target(
            muxer,
            candidate,
            fmt,
            lossy=True,
            encode_rate=encode_rate,
            # FFmpeg's wmav2 decoder drops the first frame: lead in with one of silence.
            lead_in_frames=1 if candidate == "wmav2" else 0,
        )
    raise AudioError(f"{name}: no {key} encoder in this PyAV build (tried {', '.join(candidates)})")


#: Bitrates (bits per second) any lossy codec is asked for; each encoder narrows it
#: (see :func:`bitrate_range`).
BITRATE_RANGE = (8_000, 512_000)


#: What a lossy codec's bitrate and a lossless codec's bit depth are when not chosen.
DEFAULT_BITRATE, DEFAULT_BIT_DEPTH = "128k", "16"


def bitrate_range(
    encoder: str, *, sample_rate: int = 44100, n_channels: int = 2
) -> tuple[int, int]:
    """Return the ``(lowest, highest)`` bitrate ``encoder`` really gives, in bits per second.

    Measured with FFmpeg's encoders (file size against the bitrate asked for, on music
    and on noise). Outside these ranges an encoder either refuses (libopus above
    256k per channel, wmav2 below 24k) or, worse, silently gives something else:
    LAME (MPEG-1 layer III at 32-48 kHz) never goes above 320k or below 32k, and
    FFmpeg's AAC encoder stops following the request above about 192k per channel
    (448k and 512k give the same ~420k stereo file) and spends more than asked below
    16k mono / 24k stereo. Other encoders get :data:`BITRATE_RANGE`.
    """
    low, high = BITRATE_RANGE
    if encoder == "libmp3lame":
        if sample_rate >= 32000:  # MPEG-1
            low, high = 32_000, 320_000
        elif sample_rate >= 16000:  # MPEG-2
            high = 160_000
        else:  # MPEG-2.5
            high = 64_000
    elif encoder == "aac":
        low, high = 8_000 * (n_channels + 1), 192_000 * n_channels
    elif encoder == "libopus":
        high = 256_000 * n_channels
    elif encoder == "wmav2":
        low = 24_000
    return max(low, BITRATE_RANGE[0]), min(high, BITRATE_RANGE[1])


def _check_bitrate(
    target: _Target, value: int, rate: int, n_channels: int, *, bitrate: int | str
) -> int:
    """Return ``value``, ``bitrate`` parsed to bits per second, if the encoder can do it.

    Raises:
        ValueError: outside the encoder's range (the message quotes ``bitrate`` as given).
    """
    low, high = bitrate_range(target.encoder, sample_rate=rate, n_channels=n_channels)
    if not low <= value <= high:
        raise ValueError(
            f"bitrate {bitrate} is outside what {target.encoder} can do "
            f"({_kbps(low)}-{_kbps(high)} at {rate} Hz, {_channels(n_channels)})"
        )
    return value


def _kbps(value: int) -> str:
    return f"{value / 1000:g}k"


def _channels(n: int) -> str:
    return f"{n} channel{'s' if n != 1 else ''}"


def check_encoding(
    codec: str,
    *,
    bitrate: int | str | None = None,
    bit_depth: int | str | None = None,
    sample_rate: int = 44100,
    n_channels: int = 2,
) -> list[str]:
    """Check that stems can be written with these settings, once, before any work.

    ``bitrate`` and ``bit_depth`` are ``None`` when the user did not choose them (the
    defaults, :data:`DEFAULT_BITRATE` and :data:`DEFAULT_BIT_DEPTH`, are used). Returns
    warnings for settings that do nothing with this codec: a bitrate with a lossless
    codec (wav, flac), a bit depth with a lossy one. Each is one line, ``"codec <codec>: ..."``.

    Raises:
        OutputError: an unknown codec, a bit depth the codec has no format for, a
            bitrate outside what the encoder can do (see :func:`bitrate_range`), or an
            encoder that cannot be opened with these settings; the message names the
            codec, the value and what is allowed.
    """
    warnings: list[str] = []
    chosen = DEFAULT_BITRATE if bitrate is None else bitrate
    depth = DEFAULT_BIT_DEPTH if bit_depth is None else bit_depth
    try:
        target = _target(f"output.{codec}", codec, depth, sample_rate)
        if target.lossy:
            rate = target.encode_rate or sample_rate
            value = _check_bitrate(target, _parse_bitrate(chosen), rate, n_channels, bitrate=chosen)
            _try_encoder(target, rate, n_channels, value, chosen)
            if bit_depth is not None:
                warnings.append(f"codec {codec}: lossy, the bit depth {bit_depth} is ignored")
        elif bitrate is not None:
            _parse_bitrate(bitrate)  # a malformed bitrate is an error with any codec
            warnings.append(f"codec {codec}: lossless, the bitrate {bitrate} is ignored")
    except (AudioError, ValueError) as exc:
        message = str(exc).removeprefix(f"output.{codec}: ")
        raise OutputError(f"codec {codec}: {message}") from None
    return warnings


def _try_encoder(
    target: _Target, rate: int, n_channels: int, bit_rate: int, bitrate: int | str
) -> None:
    """Open (and drop) the encoder with these settings: its own refusals, before any work.

    ``bit_rate`` is ``bitrate`` (as given, for the message) in bits per second.
    """
    ctx = av.CodecContext.create(target.encoder, "w")
    try:
        ctx.sample_rate = rate
        ctx.layout = _layout(n_channels)
        ctx.format = target.sample_format
        ctx.bit_rate = bit_rate
        ctx.open()
    except (av.error.FFmpegError, ValueError) as exc:
        raise ValueError(
            f"{target.encoder} refuses bitrate {bitrate} at {rate} Hz, "
            f"{_channels(n_channels)} ({_reason(exc)})"
        ) from exc


def _parse_bitrate(bitrate: int | str) -> int:
    text = str(bitrate).strip().lower()
    factor = 1
    if text.endswith("k"):
        factor, text = 1000, text[:-1]
    elif text.endswith("m"):
        factor, text = 1000000, text[:-1]
    try:
        value = round(float(text) * factor)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"bitrate must look like '128k' or 128000, not {bitrate!r}")
    return value


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples → 16-bit integers, as FFmpeg's flt→s16 makes them.

    ``lrintf(x * 2**15)``, clipped to the int16 range; NaN becomes 0 and ±inf full scale.
    Every 16-bit output (files, and the raw or WAV streams of ``splitstems stream``) uses it.
    """
    scaled = np.multiply(samples, np.float32(32768), dtype=np.float32)  # the one copy
    np.copyto(scaled, 0, where=np.isnan(scaled))  # ±inf: clipped below
    np.rint(scaled, out=scaled)
    return np.clip(scaled, -32768, 32767, out=scaled).astype(np.int16)


def _to_encoder_array(data: np.ndarray, sample_format: str) -> np.ndarray:
    """Float32 ``(n, channels)`` → the layout ``AudioFrame.from_ndarray`` wants."""
    planar = sample_format.endswith("p")
    base = sample_format.rstrip("p")
    if base == "flt":
        out = data
    elif base == "s16":
        out = to_pcm16(data)
    else:  # s32 carrying 24-bit samples (pcm_s24le, 24-bit flac)
        clean = np.nan_to_num(data, nan=0.0, posinf=1.0, neginf=-1.0)
        ints = np.clip(np.rint(clean * np.float32(2**23)), -(2**23), 2**23 - 1)
        out = ints.astype(np.int32) << 8
    if planar:
        return np.ascontiguousarray(out.T)
    return np.ascontiguousarray(out).reshape(1, -1)


def _layout(n_channels: int) -> str:
    return {1: "mono", 2: "stereo"}.get(n_channels, f"{n_channels}c")


class AudioWriter:
    """Encode a waveform chunk by chunk into a file, atomically.

    Samples go to a hidden ``.<name>.<pid>-<random>.part<suffix>`` file in the
    destination's directory (:func:`splitstems.files.temp_path`); :meth:`close`
    finishes it and renames it over ``path``. Leaving a ``with`` block with an
    exception (or calling :meth:`abort`) deletes it instead, so a failed write never
    leaves a partial file behind; the temp files that killed processes left for the
    same destination are removed when a writer opens.

    Codecs (from ``codec`` or the suffix of ``path``): ``wav`` (``bit_depth`` 16 →
    pcm_s16le, 24 → pcm_s24le, 32 or ``"32f"`` → pcm_f32le), ``flac`` (16 or 24 bit),
    ``mp3`` (LAME), ``ogg`` (Vorbis with libvorbis; PyAV wheels without it get Opus in
    Ogg, resampled to 48 kHz), ``m4a`` (AAC in MP4) and ``wma`` (WMA v2); the lossy ones
    use ``bitrate``. Integer formats clip to [-1, 1] and round to nearest as FFmpeg does.

    Example:
        >>> with AudioWriter("out/vocals.mp3", sample_rate=44100) as writer:
        ...     for chunk in chunks:
        ...         writer.write(chunk)

    Raises:
        AudioError: Unknown codec, encoder missing, or the encoder fails.
        OutputError: The destination (or its directory) cannot be written.

    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sample_rate: int,
        n_channels: int = 2,
        codec: str | None = None,
        bitrate: int | str = "128k",
        bit_depth: int | str = 16,
    ) -> None:
        if int(sample_rate) != sample_rate or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive integer, not {sample_rate!r}")
        if int(n_channels) != n_channels or n_channels < 1:
            raise ValueError(f"n_channels must be a positive integer, not {n_channels!r}")
        self.path = Path(_fs_name(path))
        self.sample_rate = int(sample_rate)
        self.n_channels = int(n_channels)
        name = str(self.path)
        self._target = _target(name, codec, bit_depth, self.sample_rate)
        self._rate = self._target.encode_rate or self.sample_rate  # the encoder's rate
        bit_rate = None
        if self._target.lossy:
            value = _parse_bitrate(bitrate)  # ValueError: not a bitrate at all
            try:
                bit_rate = _check_bitrate(
                    self._target, value, self._rate, self.n_channels, bitrate=bitrate
                )
            except ValueError as exc:  # a bitrate, but not one this encoder can do
                raise AudioError(f"{name}: {exc}") from None
        self._resampler = None
        if self._rate != self.sample_rate:
            self._resampler = StreamResampler(self.sample_rate, self._rate, self.n_channels)
        self._pending: list[np.ndarray] = []
        self._n_pending = 0
        self._n_written = 0
        self._container: av.container.OutputContainer | None = None
        self._closed = False
        self._temp = self._make_temp(name)
        try:
            self._open(name, bit_rate)
        except BaseException:
            self.abort()
            raise

    def _make_temp(self, name: str) -> Path:
        parent = self.path.parent
        if self.path.is_dir():
            raise OutputError(f"{name}: is a directory")
        existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise OutputError(f"{name}: {existing} is not a directory")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{name}: cannot create directory {parent} ({_reason(exc)})") from exc
        remove_stale_temps(self.path)  # leftovers of a killed run writing here
        return temp_path(self.path)

    def _open(self, name: str, bit_rate: int | None) -> None:
        target = self._target
        try:
            self._container = av.open(str(self._temp), mode="w", format=target.muxer)
        except (av.error.FFmpegError, OSError) as exc:
            raise OutputError(f"{name}: cannot write ({_reason(exc)})") from exc
        try:
            audio = self._container.add_stream(target.encoder, rate=self._rate)
            ctx = audio.codec_context
            ctx.layout = _layout(self.n_channels)
            ctx.format = target.sample_format
            if bit_rate is not None:
                ctx.bit_rate = bit_rate
            ctx.open()
        except (av.error.FFmpegError, ValueError, OSError) as exc:
            raise AudioError(
                f"{name}: cannot encode {target.encoder} at {self._rate} Hz, "
                f"{self.n_channels} channel(s) ({_reason(exc)})"
            ) from exc
        self._stream = audio
        # Encoders with a fixed frame size get exactly that (the last frame excepted);
        # those without (PCM) take each write as it comes, in frames of at most _PCM_FRAME.
        self._any_frame_size = not ctx.frame_size
        self._frame_size = ctx.frame_size or _PCM_FRAME
        if target.lead_in_frames:
            silence = np.zeros((target.lead_in_frames * self._frame_size, self.n_channels))
            self._queue(silence.astype(np.float32))

    def __enter__(self) -> AudioWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def pcm(self) -> bool:
        """Whether the file's encoder is uncompressed PCM (see :func:`is_pcm`)."""
        return is_pcm(self._target.encoder)

    def write(self, chunk: np.ndarray) -> None:
        """Append ``chunk`` (``(n_samples, n_channels)``, or 1-D when mono); not modified."""
        if self._closed:
            raise ValueError(f"{self.path}: write to a closed AudioWriter")
        data = np.asarray(chunk)
        if data.ndim == 1 and self.n_channels == 1:
            data = data[:, None]
        if data.ndim != 2 or data.shape[1] != self.n_channels:
            raise ValueError(
                f"expected a waveform of shape (n_samples, {self.n_channels}), got {data.shape}"
            )
        if data.dtype.kind != "f":
            raise ValueError(f"expected a float waveform, got dtype {data.dtype}")
        data = data.astype(np.float32, copy=False)
        if self._resampler is not None:
            data = self._resampler.push(data)
        self._queue(data)
        self._encode_full_frames(final=False)

    def _queue(self, data: np.ndarray) -> None:
        if len(data):
            self._pending.append(data)
            self._n_pending += len(data)

    def _encode_full_frames(self, *, final: bool) -> None:
        size = self._frame_size
        if self._any_frame_size:
            final = True  # no remainder to carry: no copy of each write into the next
        if self._n_pending < size and not (final and self._n_pending):
            return
        data = np.concatenate(self._pending, axis=0) if len(self._pending) > 1 else self._pending[0]
        n_full = len(data) // size * size
        cut = len(data) if final else n_full
        for begin in range(0, cut, size):
            self._encode(data[begin : begin + size])
        rest = data[cut:]  # less than a frame; copied: it may be the caller's array
        self._pending = [rest.copy()] if len(rest) else []
        self._n_pending = len(rest)

    def _encode(self, data: np.ndarray | None) -> None:
        try:
            if data is None:
                packets = self._stream.encode(None)
            else:
                frame = av.AudioFrame.from_ndarray(
                    _to_encoder_array(data, self._target.sample_format),
                    format=self._target.sample_format,
                    layout=_layout(self.n_channels),
                )
                frame.sample_rate = self._rate
                frame.pts = self._n_written
                frame.time_base = Fraction(1, self._rate)
                self._n_written += len(data)
                packets = self._stream.encode(frame)
            self._container.mux(packets)
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise self._write_error(exc) from exc

    def _write_error(self, exc: BaseException) -> Exception:
        if isinstance(exc, OSError):
            return OutputError(f"{self.path}: cannot write ({_reason(exc)})")
        return AudioError(f"{self.path}: encoding failed ({_reason(exc)})")

    def close(self) -> None:
        """Flush the encoder, finish the file and move it to ``path`` (idempotent)."""
        if self._closed:
            return
        try:
            if self._resampler is not None:
                self._queue(self._resampler.flush())
            self._encode_full_frames(final=True)
            self._encode(None)
            try:
                self._container.close()
            except (av.error.FFmpegError, OSError) as exc:
                raise self._write_error(exc) from exc
            self._container = None
            try:
                os.replace(self._temp, self.path)
            except OSError as exc:
                raise OutputError(f"{self.path}: cannot write ({_reason(exc)})") from exc
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Discard everything written so far; ``path`` is left untouched (idempotent)."""
        self._closed = True
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - best effort: the file is deleted anyway
                pass
            self._container = None
        try:
            os.unlink(self._temp)
        except (OSError, AttributeError):
            pass


def save(
    path: str | os.PathLike[str],
    waveform: np.ndarray,
    *,
    sample_rate: int,
    codec: str | None = None,
    bitrate: int | str = "128k",
    bit_depth: int | str = 16,
) -> None:
    """Write a ``(n_samples, n_channels)`` float waveform to ``path`` atomically.

    Creates missing parent directories. See :class:`AudioWriter` for codecs, bit
    depths, rounding and the errors raised; ``save`` is one ``AudioWriter.write``.
    """
    data = np.asarray(waveform)
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2:
        raise ValueError(f"expected a waveform of shape (n_samples, n_channels), got {data.shape}")
    with AudioWriter(
        path,
        sample_rate=sample_rate,
        n_channels=data.shape[1],
        codec=codec,
        bitrate=bitrate,
        bit_depth=bit_depth,
    ) as writer:
        writer.write(data)

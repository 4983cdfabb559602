"""Audio in and out of a live stream: pipes, growing files and sound devices.

What ``splitstems stream`` reads and writes, block by block as the audio arrives:

- :func:`raw_blocks`: raw PCM (``f32le``/``s16le``) from a file descriptor, whatever
  the pipe hands over at each read (no waiting for a full buffer);
- :func:`decoded_blocks`: any stream PyAV can demux from a pipe or URL (WAV, Ogg, MP3,
  FLAC...), probed from a few kilobytes only;
- :class:`PcmWriter`, :class:`WavStreamWriter` (a WAV header of unknown length, for
  pipes) and :class:`GrowingWav` (a file whose header is patched at every write, so it
  is a valid WAV at any moment, and after Ctrl-C);
- :class:`DeviceInput` and :class:`DevicePlayer`: sounddevice (PortAudio) callbacks on
  bounded buffers, overruns and underruns counted (the ``live`` extra).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import struct
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import av
import numpy as np

from splitstems.audio import (
    DecodeLog,
    StreamResampler,
    announced_wav_frames,
    decode_frames,
    to_pcm16,
)
from splitstems.errors import AudioError, OutputError

log = logging.getLogger(__name__)

__all__ = [
    "RAW_FORMATS",
    "raw_blocks",
    "decoded_blocks",
    "PcmWriter",
    "WavStreamWriter",
    "GrowingWav",
    "DeviceInput",
    "DevicePlayer",
]

#: Raw PCM formats: name → little-endian sample dtype.
RAW_FORMATS = {"f32le": np.dtype("<f4"), "s16le": np.dtype("<i2")}
#: Bytes asked of the input per read (a pipe returns what it has, up to this).
READ_BYTES = 1 << 15
#: PyAV probes a piped stream from this many bytes (its default, 5 MB, is ~30 s of WAV).
PROBE_BYTES = 8192


def _to_float(data: np.ndarray) -> np.ndarray:
    if data.dtype.kind == "f":
        return data.astype(np.float32)
    return data.astype(np.float32) * np.float32(1.0 / 32768)


def raw_blocks(fd: int, name: str, *, fmt: str, n_channels: int) -> Iterator[np.ndarray]:
    """Yield ``(n, n_channels)`` float32 blocks of raw PCM read from ``fd`` as it arrives.

    Raises:
        AudioError: the input ends inside a sample frame (what came before was yielded).
    """
    dtype = RAW_FORMATS[fmt]
    frame_bytes = dtype.itemsize * n_channels
    carry = b""
    while True:
        try:
            data = os.read(fd, READ_BYTES)
        except OSError as exc:
            raise AudioError(f"{name}: cannot read ({exc.strerror or exc})") from exc
        if not data:
            break
        data = carry + data
        whole = len(data) - len(data) % frame_bytes
        carry = data[whole:]
        if whole:
            samples = np.frombuffer(data[:whole], dtype=dtype).reshape(-1, n_channels)
            yield _to_float(samples)
    if carry:
        raise AudioError(
            f"{name}: input ends mid-sample ({len(carry)} bytes after the last whole "
            f"{fmt} frame of {n_channels} channel(s))"
        )


#: Bytes of a stream's start kept to read a WAV header's announced length from.
HEAD_BYTES = 1 << 16


class _FdFile:
    """A file object whose ``read(n)`` returns what ``fd`` has now (for PyAV).

    The first :data:`HEAD_BYTES` read are kept in :attr:`head`.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.head = b""

    def read(self, n: int) -> bytes:
        data = os.read(self.fd, n)
        if len(self.head) < HEAD_BYTES:
            self.head += data[: HEAD_BYTES - len(self.head)]
        return data


def _head(target: _FdFile | str) -> bytes:
    """Return a stream's first bytes (read so far from a pipe; from a local file, read now)."""
    if isinstance(target, _FdFile):
        return target.head
    try:
        with open(target, "rb") as f:
            return f.read(HEAD_BYTES)
    except OSError:  # a URL
        return b""


def decoded_blocks(
    source: str | int, name: str, *, sample_rate: int, n_channels: int
) -> Iterator[np.ndarray]:
    """Decode a stream (a URL/path, or a file descriptor) to float32 ``(n, n_channels)``.

    Blocks are yielded as frames decode, resampled to ``sample_rate`` (soxr, streaming).

    Raises:
        AudioError: not an audio stream, or a decoding error (after what decoded before).
    """
    options = {"probesize": str(PROBE_BYTES), "analyzeduration": "0"}
    target = _FdFile(source) if isinstance(source, int) else source
    try:
        container = av.open(target, mode="r", options=options, metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise AudioError(f"{name}: cannot open as audio ({_reason(exc)})") from exc
    with container:
        if not container.streams.audio:
            raise AudioError(f"{name}: no audio stream")
        stream = container.streams.audio[0]
        layout = "mono" if n_channels == 1 else "stereo"
        converter = av.AudioResampler(format="flt", layout=layout)
        resampler: StreamResampler | None = None
        decoded = DecodeLog()  # a packet that fails to decode is skipped, as FFmpeg does
        n_source = 0  # sample frames decoded, at the stream's own rate
        try:
            for frame in decode_frames(container, stream, decoded):
                n_source += frame.samples
                for out in converter.resample(frame):
                    block = out.to_ndarray().reshape(-1, n_channels)
                    if resampler is None:
                        resampler = StreamResampler(out.sample_rate, sample_rate, n_channels)
                    block = resampler.push(block)
                    if len(block):
                        yield block
        except (av.error.FFmpegError, ValueError) as exc:
            raise AudioError(f"{name}: cannot decode ({_reason(exc)})") from exc
        if decoded.skipped:
            log.warning(
                "%s: %d damaged packet(s) skipped (%s); the stems have a gap there",
                name,
                decoded.skipped,
                decoded.error,
            )
        if resampler is not None:
            rest = resampler.flush()
            if len(rest):
                yield rest
        if decoded.read_error is not None:
            raise AudioError(f"{name}: cannot read further ({decoded.read_error})")
        if resampler is None and decoded.error is not None:
            raise AudioError(f"{name}: cannot decode ({decoded.error})")
        announced = announced_wav_frames(_head(target)) if "wav" in container.format.name else None
        if announced is not None and n_source < announced:
            rate = stream.codec_context.sample_rate
            raise AudioError(
                f"{name}: truncated: ends after {n_source / rate:.3f} s of the "
                f"{announced / rate:.3f} s its WAV header gives"
            )


def _reason(exc: BaseException) -> str:
    return " ".join(str(getattr(exc, "strerror", None) or exc or type(exc).__name__).split())


def _pcm16(samples: np.ndarray) -> bytes:
    return to_pcm16(samples).astype("<i2").tobytes()


class PcmWriter:
    """Raw PCM of ``fmt`` to a binary stream, flushed after every write."""

    def __init__(self, out: BinaryIO, *, fmt: str) -> None:
        self.out, self.fmt = out, fmt

    def write(self, samples: np.ndarray) -> None:
        """Write ``(n, channels)`` float samples."""
        if self.fmt == "f32le":
            data = np.ascontiguousarray(samples, dtype="<f4").tobytes()
        else:
            data = _pcm16(samples)
        self.out.write(data)
        self.out.flush()

    def close(self) -> None:
        """Flush (the stream itself belongs to the caller)."""
        self.out.flush()


class WavStreamWriter(PcmWriter):
    """A 16-bit WAV stream of unknown length (sizes 0xFFFFFFFF, as FFmpeg and SoX read)."""

    def __init__(self, out: BinaryIO, *, sample_rate: int, n_channels: int) -> None:
        super().__init__(out, fmt="s16le")
        block_align = 2 * n_channels
        header = b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
        header += b"fmt " + struct.pack(
            "<IHHIIHH", 16, 1, n_channels, sample_rate, sample_rate * block_align, block_align, 16
        )
        header += b"data" + struct.pack("<I", 0xFFFFFFFF)
        out.write(header)
        out.flush()


class GrowingWav:
    """A 16-bit WAV file that grows as samples come and is valid at every moment.

    The standard library's ``wave`` writer patches the header's sizes after each write,
    so the file can be played while the stream runs and stays valid after Ctrl-C.
    """

    def __init__(self, path: Path, *, sample_rate: int, n_channels: int) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._wav = wave.open(str(path), "wb")
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
        self._wav.setnchannels(n_channels)
        self._wav.setsampwidth(2)
        self._wav.setframerate(sample_rate)
        self._wav.writeframes(b"")  # the header, at once

    def write(self, samples: np.ndarray) -> None:
        """Append ``(n, channels)`` float samples."""
        try:
            self._wav.writeframes(_pcm16(samples))
            self._wav._file.flush()  # noqa: SLF001 - readers see the samples now
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write ({exc.strerror or exc})") from exc

    def close(self) -> None:
        """Fix the header and close."""
        self._wav.close()


def _sounddevice() -> Any:  # noqa: ANN401 - the module
    """Import sounddevice, or say what is missing."""
    try:
        import sounddevice  # noqa: PLC0415 - optional, and it loads PortAudio
    except ImportError as exc:
        raise AudioError("sound devices need sounddevice: pip install 'splitstems[live]'") from exc
    except OSError as exc:  # the module is there, the PortAudio library is not
        raise AudioError(
            f"sound devices need the PortAudio library ({exc}); on Debian/Ubuntu: "
            "apt install libportaudio2"
        ) from exc
    return sounddevice


def _start_stream(kind: str, adapter: DeviceInput | DevicePlayer, **options: Any) -> Any:  # noqa: ANN401
    """Open and start sounddevice's ``InputStream`` or ``OutputStream`` for ``adapter``."""
    sd = _sounddevice()
    opener = sd.InputStream if kind == "input" else sd.OutputStream
    try:
        stream = opener(
            device=adapter.device,
            channels=adapter.n_channels,
            samplerate=adapter.sample_rate,
            dtype="float32",
            callback=adapter.callback,
            **options,
        )
        stream.start()
    except (sd.PortAudioError, ValueError) as exc:
        raise AudioError(f"{kind} device {adapter.device}: {exc}") from exc
    return stream


def _stop_stream(stream: Any) -> None:  # noqa: ANN401
    if stream is not None:
        stream.stop()
        stream.close()


class DeviceInput:
    """A microphone or line-in: sounddevice's input callback fills a bounded queue.

    :meth:`callback` never blocks (PortAudio calls it on its own thread): when the
    separation falls behind and the queue holds ``max_seconds`` of audio, new blocks are
    dropped and counted in :attr:`dropped` (samples); PortAudio's own input overflows
    are counted in :attr:`overflows`. :meth:`blocks` yields what arrives until
    :meth:`close`.
    """

    def __init__(
        self,
        device: int | str | None,
        *,
        sample_rate: int,
        n_channels: int,
        max_seconds: float = 2.0,
        block_samples: int = 1024,
    ) -> None:
        self.device, self.sample_rate, self.n_channels = device, sample_rate, n_channels
        self.block_samples = block_samples
        self._closed = threading.Event()
        self._queue: queue.Queue[np.ndarray] = queue.Queue(
            maxsize=max(1, int(max_seconds * sample_rate / block_samples))
        )
        self.dropped = 0
        self.overflows = 0
        self._stream: Any = None

    def callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:  # noqa: ANN401
        """PortAudio's input callback: queue a copy of ``indata`` or count it as dropped."""
        if status and getattr(status, "input_overflow", False):
            self.overflows += 1
        try:
            self._queue.put_nowait(np.array(indata[:frames], dtype=np.float32))
        except queue.Full:
            self.dropped += frames

    def start(self) -> None:
        """Open and start the input stream."""
        self._stream = _start_stream("input", self, blocksize=self.block_samples)

    def blocks(self) -> Iterator[np.ndarray]:
        """Yield the recorded blocks until :meth:`close` (and what was queued before it)."""
        while True:
            try:
                yield self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._closed.is_set() and self._queue.empty():
                    return

    def close(self) -> None:
        """Stop the device; :meth:`blocks` ends after what is queued."""
        _stop_stream(self._stream)
        self._stream = None
        self._closed.set()


class DevicePlayer:
    """Speakers: :meth:`write` queues samples, sounddevice's output callback plays them.

    Holds at most ``max_seconds`` (the oldest samples are dropped and counted in
    :attr:`dropped`); when nothing is queued the callback plays silence and counts the
    samples in :attr:`underruns` (once the first samples have come).
    """

    def __init__(
        self,
        device: int | str | None,
        *,
        sample_rate: int,
        n_channels: int,
        max_seconds: float = 2.0,
    ) -> None:
        self.device, self.sample_rate, self.n_channels = device, sample_rate, n_channels
        self.max_samples = int(max_seconds * sample_rate)
        self._blocks: collections.deque[np.ndarray] = collections.deque()
        self._queued = 0
        self._lock = threading.Lock()
        self.dropped = 0
        self.underruns = 0
        self._written = False
        self._stream: Any = None

    def write(self, samples: np.ndarray) -> None:
        """Queue ``(n, channels)`` samples for playing."""
        with self._lock:
            self._written = True
            self._blocks.append(np.asarray(samples, dtype=np.float32))
            self._queued += len(samples)
            while self._queued > self.max_samples:  # the oldest samples go first
                excess = self._queued - self.max_samples
                head = self._blocks[0]
                if len(head) <= excess:
                    self._blocks.popleft()
                else:
                    self._blocks[0] = head[excess:]
                cut = min(excess, len(head))
                self._queued -= cut
                self.dropped += cut

    def callback(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:  # noqa: ANN401
        """PortAudio's output callback: fill ``outdata`` from the queue, silence after."""
        filled = 0
        with self._lock:
            while filled < frames and self._blocks:
                head = self._blocks[0]
                take = min(frames - filled, len(head))
                outdata[filled : filled + take] = head[:take]
                filled += take
                self._queued -= take
                if take == len(head):
                    self._blocks.popleft()
                else:
                    self._blocks[0] = head[take:]
        if filled < frames:
            outdata[filled:frames] = 0
            if self._written:  # silence before the first stems is the delay, not a gap
                self.underruns += frames - filled

    def start(self) -> None:
        """Open and start the output stream."""
        self._stream = _start_stream("output", self)

    def close(self, *, drain: bool = True) -> None:
        """Stop the device, after what is queued has played unless ``drain`` is False."""
        if self._stream is not None and drain:
            time.sleep(self._queued / self.sample_rate)
        _stop_stream(self._stream)
        self._stream = None

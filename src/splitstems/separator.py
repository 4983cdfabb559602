"""The ``Separator`` facade: Spleeter's Python API over the engine.

``Separator('spleeter:2stems').separate(waveform)`` and ``separate_to_file(...)`` work
as in the original; files are decoded, separated and encoded chunk by chunk, so memory
does not grow with the length of the song.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import soxr
import torch

from splitstems import audio, hub
from splitstems.config import ModelConfig, load_config
from splitstems.device import one_thread
from splitstems.engine import Engine, OrderedWorker
from splitstems.errors import AudioError, ConfigError, OutputError
from splitstems.live import DEFAULT_LATENCY, LiveEngine, LiveSeparator
from splitstems.models.unet import SpleeterModel, uninitialised
from splitstems.readahead import prefetch
from splitstems.weights import load as read_weights
from splitstems.weights import sha256, tensor_digest

__all__ = [
    "DEFAULT_FILENAME_FORMAT",
    "MAX_CHANNELS",
    "Separator",
    "StemFiles",
    "load_model",
    "output_paths",
]

DEFAULT_FILENAME_FORMAT = "{filename}/{instrument}.{codec}"
#: Seconds of audio per chunk read for the live path and batches of segments.
CHUNK_SECONDS = 30.0


def load_model(
    descriptor: str | os.PathLike[str] | ModelConfig,
    *,
    model_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    progress: bool = True,
) -> tuple[SpleeterModel, ModelConfig]:
    """Return the model (weights loaded, eval mode) and config for a name or JSON config."""
    model, config, _ = _load_model(
        descriptor, model_dir=model_dir, download=download, progress=progress
    )
    return model, config


def _load_model(
    descriptor: str | os.PathLike[str] | ModelConfig,
    *,
    model_dir: str | os.PathLike[str] | None,
    download: bool,
    progress: bool,
) -> tuple[SpleeterModel, ModelConfig, Path]:
    """:func:`load_model`, and the weights file it read.

    Raises:
        ModelError: no weights, or weights that cannot be read (a damaged or foreign
            ``model.safetensors``) or do not fit the model; the message names the file.
    """
    if not isinstance(descriptor, ModelConfig) and str(descriptor).lower().endswith(".onnx"):
        raise ConfigError(f"{descriptor}: that is the ONNX graph; pass its folder or config.json")
    config = descriptor if isinstance(descriptor, ModelConfig) else load_config(descriptor)
    source = Path(config.name)  # the JSON file's path when the config came from one
    beside = source.is_file() and (source.parent / "model.onnx").is_file()
    if "onnx" in config.train or beside:  # written by ``splitstems export``: onnxruntime runs it
        from splitstems.export import load_exported

        onnx_model = load_exported(config)
        return onnx_model, config, onnx_model.path  # type: ignore[return-value]
    weights = hub.resolve_weights(config, model_dir=model_dir, download=download, progress=progress)
    with one_thread():  # many small copies (see one_thread)
        with uninitialised():  # every parameter is loaded next
            model = SpleeterModel(config)
        model.load_weights(read_weights(weights), source=str(weights))
    return model.eval(), config, Path(weights)


def output_paths(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    instruments: tuple[str, ...],
    *,
    codec: str = "wav",
    filename_format: str = DEFAULT_FILENAME_FORMAT,
) -> dict[str, Path]:
    """Return instrument → output path, checked to stay inside ``destination``.

    Keys of ``filename_format``: ``filename`` (the input's name without extension),
    ``foldername`` (its folder's name), ``instrument`` and ``codec``.

    Raises:
        OutputError: a bad format, a path outside ``destination``, or two stems on one path.
    """
    if not filename_format.strip():
        raise OutputError("empty filename format")
    src = Path(source)
    root = Path(destination).resolve()
    paths: dict[str, Path] = {}
    for instrument in instruments:
        try:
            name = filename_format.format(
                filename=src.stem,
                foldername=src.resolve().parent.name,
                instrument=instrument,
                codec=codec,
            )
        except (KeyError, IndexError, ValueError) as exc:
            raise OutputError(
                f"{filename_format}: bad filename format ({exc!r}); keys are "
                "{filename}, {foldername}, {instrument}, {codec}"
            ) from None
        path = (root / name).resolve()
        if not name or path == root or not path.is_relative_to(root):
            raise OutputError(f"{name}: output path would be outside the output directory {root}")
        suffix = path.suffix.lower().lstrip(".")
        if suffix in audio.CODECS and suffix != codec.lower():
            raise OutputError(
                f"{filename_format}: the file name ends in .{suffix} but the codec is {codec} "
                f"(pass -c {suffix}, or end the format in .{{codec}})"
            )
        if path in paths.values():
            raise OutputError(
                f"{filename_format}: two stems would be written to {path} "
                "(use {instrument} in the filename format)"
            )
        paths[instrument] = path
    return paths


class StemFiles(dict[str, Path]):
    """What :meth:`Separator.separate_to_file` wrote: instrument → path, as a dict.

    Attributes:
        n_samples: the length of every stem, in samples at ``sample_rate``.
        sample_rate: the model's sample rate (the stems are written at it).
    """

    def __init__(self, paths: dict[str, Path], *, n_samples: int, sample_rate: int) -> None:
        super().__init__(paths)
        self.n_samples = n_samples
        self.sample_rate = sample_rate


class Separator:
    """Separate audio into stems with a Spleeter model (the original's API).

    Args:
        params_descriptor: a model name (``spleeter:2stems``, ``spleeter:4stems-16kHz``...)
            or the path of a Spleeter JSON config; the ``config.json`` of a folder written
            by ``splitstems export`` runs its ONNX model with onnxruntime (extra ``export``).
        MWF: use the multichannel Wiener filter (norbert's, as the original) instead of
            ratio masks; files are then read ``mwf_iterations + 1`` times.
        multiprocess: accepted for compatibility with Spleeter; unused.
        model_dir: folder holding the weights (see :func:`splitstems.hub.resolve_weights`).
        device: "cpu", "cuda", "mps" or None (automatic).
        batch_segments: model segments computed at once (more is faster, uses more memory).
        mask_extension: "zeros" or "average"; default: the config's.
        precision: "float32" (faithful to the original, the default) or "fast"
            (bfloat16 on the CPU, float16 on GPUs: about 45 dB from the faithful output).
        overlap: overlap of consecutive model segments (0 = the original's output; 0.5
            removes the seams at segment boundaries).
        mwf_iterations: EM iterations of the Wiener filter (the original: 1).
        mwf_exponent: power applied to the model's magnitudes before the Wiener filter
            (the original: 1; 0.7 scores better on MUSDB18, see the README).
        shifts: average over this many time-shifted separations (1 = the original).
        threads: CPU threads (process-wide), fixed; None: one per CPU this process may use
            (affinity, cgroup quota), fewer while other processes keep CPUs busy (see
            :mod:`splitstems.device`). The stems depend on it at most by float32 rounding.
        download: whether missing released weights may be downloaded.
        progress: show a progress bar while downloading.
        latency: separate files and waveforms through the live path (see :meth:`live`)
            with at most this delay in seconds: the quality of a live stream, offline.
    """

    def __init__(
        self,
        params_descriptor: str | os.PathLike[str] = "spleeter:2stems",
        MWF: bool = False,  # noqa: N803 - the original's keyword
        multiprocess: bool = True,
        *,
        model_dir: str | os.PathLike[str] | None = None,
        device: str | torch.device | None = None,
        batch_segments: int = 1,
        mask_extension: str | None = None,
        precision: str = "float32",
        overlap: float = 0.0,
        mwf_iterations: int = 1,
        mwf_exponent: float = 1.0,
        shifts: int = 1,
        threads: int | None = None,
        download: bool = True,
        progress: bool = True,
        latency: float | None = None,
    ) -> None:
        model, config, self.weights_path = _load_model(
            params_descriptor, model_dir=model_dir, download=download, progress=progress
        )
        self.config = config
        if self.weights_path.suffix == ".onnx" and precision != "float32":
            raise ConfigError(
                f"{self.weights_path}: precision {precision!r} does not apply to an ONNX "
                "model (its precision is chosen at export: splitstems export --precision)"
            )
        self.engine = Engine(
            model,
            config,
            device=device,
            batch_segments=batch_segments,
            mask_extension=mask_extension,
            precision=precision,
            overlap=overlap,
            mwf=MWF,
            mwf_iterations=mwf_iterations,
            mwf_exponent=mwf_exponent,
            shifts=shifts,
            threads=threads,
        )
        if latency is not None:  # files and waveforms go through the live path
            self.engine = LiveEngine(self.engine, latency=latency)

    def live(self, latency: float | None = None) -> LiveSeparator:
        """Return a :class:`~splitstems.live.LiveSeparator` for a stream, ``latency`` s behind.

        ``latency`` defaults to the separator's own (``latency=``), else 0.5 s; the
        settings with the longest delay that fits are used (``live.latency`` tells it).
        """
        engine = self.engine
        if isinstance(engine, LiveEngine):
            latency = engine.latency if latency is None else latency
            engine = engine.base
        return LiveSeparator(engine, latency=DEFAULT_LATENCY if latency is None else latency)

    def fingerprint(self) -> str:
        """Return a short sha256 of the model's configuration and weights.

        Two separators with the same fingerprint compute the same model, whatever the
        model was called or where its files were (``evaluate --resume`` compares it).
        """
        digest = hashlib.sha256(
            json.dumps(self.config.to_json_dict(), sort_keys=True).encode("utf-8")
        )
        # the tensors, not the file: its metadata (source path, key order) varies. An ONNX
        # graph is the file: the sha256 its config records (checked against the file when
        # it was loaded) is already in the config hashed above; hash the file only if none.
        path = self.weights_path
        if path.suffix == ".onnx":
            if not (self.config.to_json_dict().get("onnx") or {}).get("sha256"):
                digest.update(sha256(path).encode())
        else:
            digest.update(tensor_digest(path).encode())
        return digest.hexdigest()[:16]

    @property
    def instruments(self) -> tuple[str, ...]:
        """The stems this separator produces, in order."""
        return self.config.instruments

    @property
    def sample_rate(self) -> int:
        """The model's sample rate (files are resampled to it)."""
        return self.config.sample_rate

    def separate(
        self,
        waveform: np.ndarray,
        audio_descriptor: str | None = None,
        *,
        sample_rate: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Separate a waveform ``(n_samples, n_channels)`` (or mono ``(n_samples,)``).

        ``waveform`` is anything ``numpy.asarray`` turns into numbers (an array, a list);
        it is never modified. ``sample_rate`` defaults to the model's (44.1 kHz); other
        rates are resampled for the model and the stems resampled back, so they have the
        input's rate and length. Samples are floats in [-1, 1]: integer PCM (``int16``
        from a WAV reader, say) is refused rather than separated 32768 times too loud;
        divide it first (``x / 32768`` for int16). NaN and ±inf samples are replaced by
        0, with one warning. Returns instrument → ``(n_samples, 2)`` float32.
        ``audio_descriptor`` is ignored (the original's signature).

        Raises:
            AudioError: empty audio; samples that are not floats (integer, bool or
                complex dtypes: the message names the dtype and the division to
                apply); or a shape that is not ``(n_samples, n_channels)``: more than
                :data:`MAX_CHANNELS` channels, or what looks transposed
                (``(channels, samples)``: at most 8 rows and more columns).
            ValueError: ``sample_rate`` is not a positive integer.
        """
        data = _as_waveform(waveform)
        n_samples = data.shape[0]
        rate = self.sample_rate if sample_rate is None else sample_rate
        if isinstance(rate, bool) or int(rate) != rate or rate <= 0:
            raise ValueError(f"sample_rate must be a positive integer, not {sample_rate!r}")
        rate = int(rate)
        non_finite = audio.NonFinite("waveform", rate)
        data = non_finite.clean(data)
        non_finite.report()
        data = audio.to_channels("waveform", data, self.config.n_channels)
        if rate != self.sample_rate:
            data = soxr.resample(data, rate, self.sample_rate, quality="HQ").astype(np.float32)
        stems = self.engine.separate(data)
        if rate != self.sample_rate:
            stems = {
                k: _fit_length(soxr.resample(v, self.sample_rate, rate, quality="HQ"), n_samples)
                for k, v in stems.items()
            }
        return stems

    def separate_to_file(
        self,
        audio_descriptor: str | os.PathLike[str],
        destination: str | os.PathLike[str],
        audio_adapter: object = None,
        offset: float = 0.0,
        duration: float | None = None,
        codec: str = "wav",
        bitrate: str = "128k",
        filename_format: str = DEFAULT_FILENAME_FORMAT,
        synchronous: bool = True,
        *,
        bit_depth: int | str = 16,
        on_progress: Callable[[float], None] | None = None,
    ) -> StemFiles:
        """Separate an audio file and write one file per stem; return instrument → path.

        The file is decoded, separated and encoded in chunks (memory stays bounded), every
        stem is written to a temporary file and renamed only when complete. ``duration``
        None means the whole file (the original stopped at 600 s). ``on_progress(seconds)``
        is called with the seconds of audio done. The positional order is Spleeter's;
        ``audio_adapter`` and ``synchronous`` are accepted for compatibility and ignored
        (the call always returns when the files are written; :meth:`join` is a no-op).
        The returned dict also tells the stems' length (:class:`StemFiles`).

        Raises:
            OutputError: before anything is decoded or written: encoding settings the
                codec cannot do (an unknown codec, a bitrate outside what its encoder
                does, such as mp3 at 500k, a bit depth it has no format for, such as
                flac at 32f; see :func:`splitstems.audio.check_encoding`), a bad
                ``filename_format`` or an output path outside ``destination``; while
                writing, an output that cannot be written.
            AudioError: the input cannot be read or is damaged (truncated, ...); no
                stem is left behind.
        """
        # Settings a codec ignores (a bitrate with wav) are not worth a warning here: the
        # defaults always pass both. The command line warns about those it was given.
        audio.check_encoding(
            codec,
            bitrate=bitrate,
            bit_depth=bit_depth,
            sample_rate=self.sample_rate,
            n_channels=self.config.n_channels,
        )
        source = Path(audio_descriptor)
        paths = output_paths(
            source,
            destination,
            self.instruments,
            codec=codec,
            filename_format=filename_format,
        )
        info = audio.probe(source)  # fail on a bad input before any output file is opened

        passes = itertools.count()
        segment = self.engine.segment_samples
        # One model segment's samples (~11.9 s) at a time: each segment runs as soon as
        # its samples are in, and the buffers stay small (30 s chunks: 45 MB more peak
        # memory and 20-30 ms more for 3 minutes, 2026-11-30); the same bits. The live
        # path and batches of segments group their work by chunk: 30 s chunks there, as
        # before (their bits and speed unchanged).
        grouped = isinstance(self.engine, LiveEngine) or self.engine.batch_segments > 1
        chunk = int(CHUNK_SECONDS * self.sample_rate) if grouped else segment

        def chunks() -> Iterator[np.ndarray]:  # opened once per pass (MWF: several)
            return audio.stream(
                source,
                chunk_samples=chunk,
                first_chunk_samples=segment,
                offset=offset,
                duration=duration,
                sample_rate=self.sample_rate,
                n_channels=self.config.n_channels,
                warn=next(passes) == 0,  # the file's warnings once, not once per pass
            )

        created = _missing_parents(paths.values())
        try:
            n_samples = self._write_stems(
                source,
                chunks,
                paths,
                codec,
                bitrate,
                bit_depth,
                on_progress,
                read_ahead=not audio.is_pcm(info.codec),
            )
        except BaseException:
            for folder in created:  # leave no empty folders behind a failure
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        return StemFiles(paths, n_samples=n_samples, sample_rate=self.sample_rate)

    def join(self, timeout: float = 200) -> None:
        """Do nothing: Spleeter's call to wait for asynchronous exports (ours are not)."""

    def _write_stems(
        self,
        source: Path,
        chunks: Callable[[], Iterator[np.ndarray]],
        paths: dict[str, Path],
        codec: str,
        bitrate: str,
        bit_depth: int | str,
        on_progress: Callable[[float], None] | None,
        *,
        read_ahead: bool,
    ) -> int:
        """Write the stems of ``chunks()`` to ``paths``; return their length in samples.

        Decoding (``read_ahead``) runs ahead of the model in a thread, and encoding
        behind it in one thread per stem, only where they are real work: compressed
        input, compressed output. PCM is a copy, done in line: on 2 CPUs the threads'
        contention with torch's made a 3-minute WAV take ~50 ms more (2026-11-30), while
        MP3 stems encoded side by side took a 3-minute MP3-to-MP3 separation from 11.6 s
        (both stems in one thread: 9.7 s of LAME) to 9.4 s.
        """
        seconds_per_segment = (
            self.engine.segment_samples / self.sample_rate / self.engine.work_factor
        )

        def progress(n_segments: int) -> None:
            if on_progress is not None:
                on_progress(n_segments * seconds_per_segment)

        with ExitStack() as stack:
            writers = {
                name: stack.enter_context(
                    audio.AudioWriter(
                        path,
                        sample_rate=self.sample_rate,
                        n_channels=self.config.n_channels,
                        codec=codec,
                        bitrate=bitrate,
                        bit_depth=bit_depth,
                    )
                )
                for name, path in paths.items()
            }

            def inputs() -> Iterator[np.ndarray]:
                checked = _checked(chunks(), source)
                return prefetch(checked, depth=2) if read_ahead else checked

            encoders = {
                name: OrderedWorker(depth=2) for name, writer in writers.items() if not writer.pcm
            }
            n_written = 0
            stream = self.engine.stream(inputs, on_segments=progress)
            try:
                for stems in stream:
                    for name, samples in stems.items():
                        if name in encoders:
                            encoders[name].submit(writers[name].write, samples)
                        else:
                            writers[name].write(samples)
                    n_written += next(iter(stems.values())).shape[0]
            except BaseException:
                stream.close()  # stops the decoder's read-ahead thread now
                for encoder in encoders.values():
                    encoder.join(raise_errors=False)
                raise
            for encoder in encoders.values():
                encoder.join()
            if n_written == 0:
                raise AudioError(f"{source}: zero-length audio")
        return n_written


#: Most channels :meth:`Separator.separate` accepts in a waveform (more is taken for a
#: ``(channels, samples)`` array or a mistake: sound files rarely have more than 16).
MAX_CHANNELS = audio.MAX_CHANNELS


def _as_waveform(waveform: object) -> np.ndarray:
    """Return ``waveform`` as float32 ``(n_samples, n_channels)`` (maybe the same memory)."""
    try:
        raw = np.asarray(waveform)
        if raw.dtype.kind in _NOT_FLOAT:
            raise AudioError(_not_float(raw.dtype))
        data = raw.astype(np.float32, copy=False)
    except (TypeError, ValueError) as exc:
        raise AudioError(
            f"waveform: expected numbers of shape (n_samples, n_channels) ({exc})"
        ) from None
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2 or data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioError(f"waveform: expected shape (n_samples, n_channels), got {data.shape}")
    audio.check_samples_first("waveform", data)
    return data


# dtype kinds refused by Separator.separate: bool, signed and unsigned integers, complex.
_NOT_FLOAT = "biuc"
# What turns integer PCM of these dtypes into floats in [-1, 1].
_INT_SCALES = {
    "int8": "x / 128",
    "uint8": "(x - 128) / 128",
    "int16": "x / 32768",
    "int32": "x / 2**31",
}


def _not_float(dtype: np.dtype) -> str:
    """Return the message refusing samples of ``dtype``: what they are, what to pass."""
    fix = "pass float samples in [-1, 1]"
    if dtype.kind == "b":
        return f"waveform: got dtype {dtype}: {fix}"
    if dtype.kind == "c":
        return f"waveform: got complex samples (dtype {dtype}): {fix} (x.real)"
    scale = _INT_SCALES.get(dtype.name, "x / 32768 for 16-bit values")
    return f"waveform: got integer samples (dtype {dtype}): {fix}, e.g. {scale}"


def _missing_parents(paths: Iterable[Path]) -> list[Path]:
    """Folders that writing ``paths`` will create, deepest first (for clean-up)."""
    missing: set[Path] = set()
    for path in paths:
        for folder in path.parents:
            if folder.exists():
                break
            missing.add(folder)
    return sorted(missing, key=lambda p: len(p.parts), reverse=True)


def _checked(chunks: Iterator[np.ndarray], source: Path) -> Iterator[np.ndarray]:
    """Pass chunks through, failing clearly if the decoder yields nothing at all."""
    n = 0
    for chunk in chunks:
        n += chunk.shape[0]
        yield chunk
    if n == 0:
        raise AudioError(f"{source}: zero-length audio")


def _fit_length(data: np.ndarray, n: int) -> np.ndarray:
    """Crop or zero-pad ``(samples, channels)`` to ``n`` samples, as float32."""
    data = data[:n].astype(np.float32, copy=False)
    if data.shape[0] < n:
        data = np.pad(data, ((0, n - data.shape[0]), (0, 0)))
    return data

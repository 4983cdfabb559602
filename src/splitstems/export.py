"""ONNX export of a Spleeter model, and an onnxruntime backend for the engine.

:func:`export_model` writes a folder that runtimes without PyTorch can use:

- ``model.onnx``: every instrument's U-Net in one graph, magnitudes
  ``(batch, n_channels, T, F)`` → estimates ``(batch, n_instruments, n_channels, T, F)``
  (the masked magnitudes, as :class:`~splitstems.models.unet.SpleeterModel` returns
  them); ``batch`` and ``T`` are dynamic, ``T`` a multiple of 64 (six stride-2 levels).
  The STFT and the inverse STFT stay outside: ONNX has no inverse STFT operator.
- ``config.json``: the Spleeter config plus an ``"onnx"`` entry with what a runtime
  needs (file, sha256, input and output names and layouts, precision, STFT parameters,
  instruments, ``T`` and ``F``).

The export is checked before the folder is written: the engine separates the same
audio with the torch model and with onnxruntime, and every stem must agree to
:data:`MIN_SDR_DB` (float32) or :data:`MIN_SDR_DB_FLOAT16` (float16).

:class:`OnnxModel` runs such a folder in place of the torch U-Nets, through the same
engine (STFT, masks, Wiener filter, shifts, streaming): ``Separator("DIR/config.json")``
and ``splitstems separate -p DIR/config.json`` load it. onnx, onnxscript and onnxruntime
come with the ``export`` extra and are imported only when used.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from splitstems import dsp
from splitstems.config import ModelConfig
from splitstems.engine import Engine
from splitstems.errors import ConfigError, ModelError, OutputError
from splitstems.files import atomic_write
from splitstems.models.unet import SpleeterModel
from splitstems.weights import sha256

__all__ = [
    "FORMATS",
    "PRECISIONS",
    "ONNX_FILE",
    "CONFIG_FILE",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "MIN_SDR_DB",
    "MIN_SDR_DB_FLOAT16",
    "TONE_CHECK",
    "ExportResult",
    "OnnxModel",
    "export_model",
    "check_export",
    "load_exported",
    "runtime_config",
    "test_signal",
]

log = logging.getLogger(__name__)

FORMATS = ("onnx",)
#: Precisions of the exported weights (inputs and outputs stay float32).
PRECISIONS = ("float32", "float16")
ONNX_FILE = "model.onnx"
CONFIG_FILE = "config.json"
INPUT_NAME = "magnitudes"
OUTPUT_NAME = "estimates"
#: The dynamo exporter's smallest opset.
OPSET = 18
#: ``T`` must be a multiple of this (the U-Net halves it six times).
SEGMENT_MULTIPLE = 64
#: Agreement of the float32 export with torch, per stem, on the check's audio.
MIN_SDR_DB = 50.0
#: Agreement of the float16 export with torch float32 (float16 weights and activations:
#: ~11 bits of mantissa; measured 55-65 dB, see docs/export.md).
MIN_SDR_DB_FLOAT16 = 40.0
#: The key of :func:`check_export`'s score on a pure tone (the worst stem's SDR).
TONE_CHECK = "(440 Hz tone)"
#: Seconds of audio the export check separates (two segments of 512 frames at 44.1 kHz).
CHECK_SECONDS = 20.0
_INSTALL_HINT = "pip install 'splitstems[export]'"


def _import(name: str) -> Any:  # noqa: ANN401 - a module
    """Import an optional dependency of the ``export`` extra, or say how to install it."""
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        raise ModelError(f"ONNX needs {name.split('.')[0]}: {_INSTALL_HINT}") from None


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote and how close it is to torch.

    Attributes:
        onnx_path: the ``model.onnx`` written.
        config_path: the ``config.json`` written beside it.
        size: the ONNX file's size in bytes.
        sdr_db: instrument → SDR (dB) of onnxruntime's stem against torch's.
    """

    onnx_path: Path
    config_path: Path
    size: int
    sdr_db: dict[str, float]


# --------------------------------------------------------------------------- backend


class OnnxModel(nn.Module):
    """An exported model run by onnxruntime, in place of a :class:`SpleeterModel`.

    Same call as the torch model: magnitudes ``(batch, C, T, F)`` → estimates
    ``(batch, I, C, T, F)``, float32 tensors on the caller's device. The engine chooses
    the threads of each separation and tells the model through :meth:`configure`
    (sessions are made once per thread count and device and kept). onnxruntime's
    threads do not spin while waiting (``session.intra_op.allow_spinning`` "0"): torch
    runs the STFT and the masks in the same process, and spinning threads slow it down
    (onnxruntime issue 13808).

    Args:
        path: the ``model.onnx``.
        config: the model's configuration (instruments, channels, ``F``).
        precision: the weights' precision, as exported (for display).
    """

    def __init__(self, path: str | os.PathLike[str], config: ModelConfig, *, precision: str):
        super().__init__()
        self.path = Path(path)
        self.instruments = tuple(config.instruments)
        self.precision = precision
        self._sessions: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._key: tuple[int, tuple[str, ...]] = (0, ("CPUExecutionProvider",))
        self._ort = _import("onnxruntime")
        self._warned = False

    def __deepcopy__(self, memo: dict) -> OnnxModel:
        """Return the model itself: sessions are immutable and safe to share between threads."""
        return self

    def configure(self, *, threads: int, device: torch.device | None = None) -> None:
        """Run with ``threads`` intra-op threads on ``device`` (CUDA when onnxruntime has it)."""
        providers: tuple[str, ...] = ("CPUExecutionProvider",)
        if device is not None and device.type == "cuda":
            if "CUDAExecutionProvider" in self._ort.get_available_providers():
                providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
            elif not self._warned:
                self._warned = True
                log.warning("onnxruntime has no CUDA provider here: the ONNX model runs on the CPU")
        self._key = (max(1, int(threads)), providers)

    def session(self) -> Any:  # noqa: ANN401 - onnxruntime.InferenceSession
        """Return the onnxruntime session of the current threads and device (made once)."""
        session = self._sessions.get(self._key)
        if session is None:
            threads, providers = self._key
            options = self._ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                session = self._ort.InferenceSession(
                    str(self.path), options, providers=list(providers)
                )
            except Exception as exc:  # onnxruntime raises its own exception types
                cause = " ".join(str(exc).split())
                raise ModelError(
                    f"{self.path}: onnxruntime cannot load the model ({cause})"
                ) from None
            self._sessions[self._key] = session
        return session

    def forward(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Magnitudes (B, C, T, F) → estimates (B, n_instruments, C, T, F), float32."""
        # (batch, channels, frames, bins), float32 on the CPU for onnxruntime
        array = magnitude.detach().to("cpu", torch.float32).contiguous().numpy()
        (estimates,) = self.session().run([OUTPUT_NAME], {INPUT_NAME: array})
        return torch.from_numpy(estimates).to(magnitude.device)


def _onnx_entry(config: ModelConfig) -> dict[str, Any]:
    entry = config.train.get("onnx")
    if entry is None and (Path(config.name).parent / ONNX_FILE).is_file():
        raise ConfigError(
            f"{config.name}: no 'onnx' entry, but {ONNX_FILE} is beside it: export the model again"
        )
    if not isinstance(entry, dict):
        raise ConfigError(f"{config.name}: not an exported model (no 'onnx' entry)")
    return entry


def _dims(value: Any) -> list[int | str]:  # noqa: ANN401 - an onnx ValueInfoProto
    """Return the dimensions of a graph input or output: sizes, or names of dynamic ones."""
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _check_graph(path: Path, config: ModelConfig, entry: dict[str, Any]) -> None:
    """Check that ``path`` is an ONNX graph whose input and output fit ``config``.

    Raises:
        ModelError: the file is not a readable ONNX model.
        ConfigError: the config's instruments, channels, ``F`` or ``T`` do not fit it.
    """
    onnx = _import("onnx")
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # protobuf's and onnx's own error types
        cause = " ".join(str(exc).split())[:300]
        raise ModelError(
            f"{path}: not a readable ONNX model ({cause}); export the model again"
        ) from None
    inputs = {v.name: _dims(v) for v in graph.input}
    outputs = {v.name: _dims(v) for v in graph.output}
    source, target = inputs.get(INPUT_NAME), outputs.get(OUTPUT_NAME)
    if source is None or target is None or len(source) != 4 or len(target) != 5:
        raise ModelError(
            f"{path}: not a graph written by splitstems export (no {INPUT_NAME!r} input of "
            f"4 dimensions and {OUTPUT_NAME!r} output of 5); export the model again"
        )
    problems = []
    if entry.get("instruments", list(config.instruments)) != list(config.instruments):
        problems.append("'onnx.instruments' differs from 'instrument_list'")
    for what, ours, verb, theirs in (
        ("instruments", len(config.instruments), "outputs", target[1]),
        ("channels", config.n_channels, "takes", source[1]),
        ("frequency bins (F)", config.F, "takes", source[3]),
    ):
        if isinstance(theirs, int) and theirs != ours:
            problems.append(f"lists {ours} {what} but {path.name} {verb} {theirs}")
    if config.T % SEGMENT_MULTIPLE:
        problems.append(f"T {config.T} is not a multiple of {SEGMENT_MULTIPLE}")
    if problems:
        raise ConfigError(f"{config.name}: {'; '.join(problems)}; export the model again")


def load_exported(config: ModelConfig, *, verify: bool = True) -> OnnxModel:
    """Return the :class:`OnnxModel` of a config read from an exported folder's JSON.

    Args:
        config: a config loaded from ``DIR/config.json`` (``load_config``), whose
            ``"onnx"`` entry names the model file beside it.
        verify: check the file's sha256 against the one the config records.

    Raises:
        ConfigError: the config has no usable ``"onnx"`` entry (or none, with a
            ``model.onnx`` beside it), or its instruments, channels, ``F`` or ``T`` do not
            fit the graph.
        ModelError: the model file is missing, differs from the one exported (sha256),
            is not a readable ONNX graph, or onnxruntime is not installed.
    """
    entry = _onnx_entry(config)
    name = entry.get("file")
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise ConfigError(f"{config.name}: 'onnx.file' must be a file name beside the config")
    precision = entry.get("precision", "float32")
    if precision not in PRECISIONS:
        raise ConfigError(f"{config.name}: unknown 'onnx.precision' {precision!r}")
    path = Path(config.name).parent / name
    if not path.is_file():
        raise ModelError(f"{path}: the exported model file is missing")
    expected = entry.get("sha256")
    if verify and expected and sha256(path) != expected:
        raise ModelError(
            f"{path}: its sha256 differs from the one in {CONFIG_FILE} (damaged or "
            "replaced); export the model again"
        )
    _check_graph(path, config, entry)
    return OnnxModel(path, config, precision=precision)


# --------------------------------------------------------------------------- export


def runtime_config(config: ModelConfig, *, precision: str, digest: str) -> dict[str, Any]:
    """Return the exported ``config.json``: Spleeter's config plus the ``"onnx"`` entry."""
    data = config.to_json_dict()
    data.pop("onnx", None)
    data["onnx"] = {
        "file": ONNX_FILE,
        "sha256": digest,
        "precision": precision,
        "opset": OPSET,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", config.n_channels, "T", config.F],
            "dtype": "float32",
            "meaning": "STFT magnitudes |X|, bins 0..F-1 (time frames on axis 2)",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", len(config.instruments), config.n_channels, "T", config.F],
            "dtype": "float32",
            "meaning": "each instrument's magnitude estimate (mask times the input)",
        },
        "T_multiple_of": SEGMENT_MULTIPLE,
        "instruments": list(config.instruments),
        "sample_rate": config.sample_rate,
        "n_channels": config.n_channels,
        "T": config.T,
        "F": config.F,
        "stft": {
            "frame_length": config.frame_length,
            "frame_step": config.frame_step,
            "n_bins": config.n_bins,
            "window": "periodic hann",
            "prepend_zeros": config.frame_length,
            "pad_end": True,
            "inverse_scale": 2.0 / 3.0,
        },
        "masks": {
            "separation_exponent": config.separation_exponent,
            "epsilon": 1e-10,
            "mask_extension": config.mask_extension,
        },
    }
    return data


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints and warnings about packages we do not use."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(open(os.devnull, "w")) as sink,  # noqa: SIM115
        ):
            warnings.simplefilter("ignore")
            try:
                yield
            finally:
                sink.close()
    finally:
        logger.setLevel(level)


class _ExportedGraph(nn.Module):
    """What ``model.onnx`` computes: :class:`SpleeterModel`'s forward, sigmoid made exact.

    onnxruntime's Sigmoid kernel is accurate to ~1e-7 in absolute terms only: below
    ``x = -10`` its relative error passes 50 %, and below about -18 it returns exactly 0
    (docs/export.md). Spleeter's ratio masks divide one instrument's sigmoid by the
    others', so where every U-Net is sure (pure tones: logits of -16 to -28 at loud bins)
    that error made masks of 0.95/0.05 where torch has 0.66/0.34. The graph computes
    ``magnitude / (1 + exp(-x))`` instead, as torch computes the sigmoid: onnxruntime's
    Exp is exact to float rounding, and a large ``exp(-x)`` only makes the quotient small.
    """

    def __init__(self, model: SpleeterModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Magnitudes (B, C, T, F) → estimates (B, n_instruments, C, T, F)."""
        model = self.model
        logits = torch.stack([unet(magnitude) for unet in model.unets.values()], dim=1)
        if model.softmax:
            return torch.softmax(logits, dim=1) * magnitude.unsqueeze(1)
        return magnitude.unsqueeze(1) / (1.0 + torch.exp(-logits))


def _write_graph(model: SpleeterModel, config: ModelConfig, path: Path, precision: str) -> None:
    """Export ``model`` to ``path`` (one file, weights inside) at ``precision``.

    torch's dynamo exporter (``torch.onnx.export(dynamo=True)``, onnxscript): batch and
    ``T`` are dynamic dimensions, ``T`` declared as 64 times a free size.
    """
    _import("onnxscript")
    onnx = _import("onnx")
    network = _ExportedGraph(copy.deepcopy(model).eval().float().cpu())
    example = torch.rand(1, config.n_channels, config.T, config.F)
    batch = torch.export.Dim("batch", min=1, max=4096)
    blocks = torch.export.Dim("blocks", min=1, max=65536)
    with _quiet_exporter():
        torch.onnx.export(
            network,
            (example,),
            str(path),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"magnitude": {0: batch, 2: SEGMENT_MULTIPLE * blocks}},
            external_data=False,
            verbose=False,
        )
    if precision == "float16":
        float16 = _import("onnxruntime.transformers.float16")
        ir = _import("onnx_ir")  # onnxscript's graph library
        half = ir.from_proto(
            float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
        )
        half.graph.sort()  # the converter appends the input casts after their users
        onnx.save(ir.to_proto(half), str(path))
    onnx.checker.check_model(str(path))


def test_signal(config: ModelConfig, *, seconds: float = CHECK_SECONDS, seed: int = 0):
    """Return a seeded music-like mixture ``(n_samples, n_channels)`` float32 for checks.

    Bass notes, chords, a vibrato "voice" and noise-burst drums, panned: a spectrum with
    the structure of music, so the masks are neither all 0 nor all 1. Used when the
    export check is given no recording.
    """
    rng = np.random.default_rng(seed)
    rate = config.sample_rate
    t = np.arange(int(seconds * rate)) / rate
    out = np.zeros((t.size, config.n_channels))
    beat = 0.5
    for k, start in enumerate(np.arange(0, seconds, beat)):
        span = (t >= start) & (t < start + beat)
        local = t[span] - start
        bass = 55.0 * 2 ** (rng.integers(0, 12) / 12)
        chord = 220.0 * 2 ** (rng.choice([0, 3, 4, 7, 9], 3) / 12)
        tone = sum(np.sin(2 * np.pi * bass * h * local) / h for h in range(1, 6))
        tone += sum(0.3 * np.sin(2 * np.pi * f * local) * np.exp(-3 * local) for f in chord)
        vibrato = 1 + 0.01 * np.sin(2 * np.pi * 5 * local)
        voice_f = 330.0 * 2 ** (rng.integers(-5, 6) / 12) * vibrato
        voice = sum(0.2 / h * np.sin(2 * np.pi * np.cumsum(voice_f) / rate * h) for h in (1, 2, 3))
        drum = rng.standard_normal(local.size) * np.exp(-30 * local) * (0.8 if k % 2 else 0.4)
        drum += np.sin(2 * np.pi * 60 * local) * np.exp(-20 * local)
        pan = np.linspace(0.3, 0.7, config.n_channels) if config.n_channels > 1 else [0.5]
        for c, p in enumerate(pan):
            out[span, c] = 0.3 * tone + voice * p + drum * (1 - p)
    return (0.5 * out / np.abs(out).max()).astype(np.float32)


def _sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Plain SDR (dB) of ``estimate`` against ``reference``, no scaling."""
    reference = reference.astype(np.float64)
    error = float(np.sum((reference - estimate) ** 2))
    return float(10 * np.log10(float(np.sum(reference**2)) / max(error, 1e-300)))


def _tone(config: ModelConfig, *, seconds: float = 2.0, hz: float = 440.0) -> np.ndarray:
    """``seconds`` of a sine at ``hz`` (amplitude 0.5, every channel): tonal input."""
    t = np.arange(int(seconds * config.sample_rate)) / config.sample_rate
    wave = 0.5 * np.sin(2 * np.pi * hz * t)
    return np.repeat(wave[:, None], config.n_channels, axis=1).astype(np.float32)


def _short_segments(waveform: np.ndarray, config: ModelConfig, *, n_segments: int) -> torch.Tensor:
    """Magnitudes of the waveform's first frames as ``n_segments`` segments of 64 frames."""
    n_frames = n_segments * SEGMENT_MULTIPLE
    n_samples = (n_frames - 1) * config.frame_step + config.frame_length
    samples = torch.zeros(config.n_channels, n_samples)
    head = torch.from_numpy(np.ascontiguousarray(waveform[:n_samples].T))
    samples[:, : head.shape[1]] = head
    spec = dsp.stft_frames(
        samples, dsp.hann_window(config.frame_length), frame_step=config.frame_step
    )
    magnitudes = spec[..., : config.F].abs()  # (C, frames, F)
    return magnitudes.unflatten(1, (n_segments, SEGMENT_MULTIPLE)).transpose(0, 1).contiguous()


def check_export(
    model: SpleeterModel,
    onnx_model: OnnxModel,
    config: ModelConfig,
    waveform: np.ndarray,
    *,
    threads: int | None = None,
) -> dict[str, float]:
    """Separate ``waveform`` with torch and with onnxruntime; return instrument → SDR (dB).

    Both run through the :class:`~splitstems.engine.Engine` on the CPU (the ONNX one two
    segments per call, so the dynamic batch is exercised); 2 s of a 440 Hz sine check
    tonal input (``"(440 Hz tone)"``, the worst stem), and one more direct call with
    ``T = 64`` frames checks the dynamic time axis.

    Raises:
        ModelError: the ONNX output has the wrong shape.
    """
    torch_engine = Engine(model, config, device="cpu", threads=threads)
    engine = Engine(onnx_model, config, device="cpu", batch_segments=2, threads=threads)
    onnx_model.configure(threads=engine.threads)
    reference, ours = torch_engine.separate(waveform), engine.separate(waveform)
    scores = {name: _sdr(reference[name], ours[name]) for name in config.instruments}
    # A pure tone: every U-Net sure at its loud bins, the masks a ratio of tiny sigmoids.
    tone = _tone(config)
    reference, ours = torch_engine.separate(tone), engine.separate(tone)
    scores[TONE_CHECK] = min(_sdr(reference[k], ours[k]) for k in config.instruments)
    short = _short_segments(waveform, config, n_segments=3)
    with torch.inference_mode():
        expected = model.eval()(short)
    got = onnx_model(short)
    if got.shape != expected.shape:
        raise ModelError(
            f"{onnx_model.path}: ONNX output shape {tuple(got.shape)} for input "
            f"{tuple(short.shape)}, torch gives {tuple(expected.shape)}"
        )
    scores["(T=64, batch 3)"] = _sdr(expected.numpy(), got.numpy())
    return scores


def export_model(
    model: SpleeterModel,
    config: ModelConfig,
    output: str | os.PathLike[str],
    *,
    precision: str = "float32",
    waveform: np.ndarray | None = None,
    threads: int | None = None,
    on_step: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export ``model`` to ``output/model.onnx`` + ``output/config.json``, checked.

    Args:
        model: the loaded torch model (:func:`splitstems.separator.load_model`).
        config: its configuration.
        output: the folder to write (created if missing; files of an earlier export
            there are replaced).
        precision: "float32" (exact to float rounding) or "float16" (half the size).
        waveform: audio ``(n_samples, n_channels)`` at the model's rate that the check
            separates; default :func:`test_signal`.
        threads: CPU threads of the check (default: the engine's plan).
        on_step: called with a line of progress before each step.

    Raises:
        ValueError: an unknown precision.
        ModelError: onnx, onnxscript or onnxruntime missing, the export failed, or its
            output differs from torch's by more than the precision allows (nothing is
            written then).
        OutputError: the folder cannot be written.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not isinstance(model, SpleeterModel):
        raise ModelError(f"{config.name}: only a torch model can be exported (this one is ONNX)")
    step = on_step or (lambda line: log.info("%s", line))
    folder = Path(output)
    created = not folder.exists()
    if not created and not folder.is_dir():
        raise OutputError(f"{folder}: output path exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the output folder ({exc.strerror})") from None
    onnx_path, config_path = folder / ONNX_FILE, folder / CONFIG_FILE
    floor = MIN_SDR_DB if precision == "float32" else MIN_SDR_DB_FLOAT16
    audio = test_signal(config) if waveform is None else np.asarray(waveform, np.float32)
    scores: dict[str, float] = {}
    digest = ""

    def write(path: Path) -> None:
        nonlocal scores, digest
        step(f"exporting {config.name} ({precision}) to ONNX")
        try:
            _write_graph(model, config, path, precision)
        except ModelError:
            raise
        except Exception as exc:  # the exporter's and onnx's own error types
            cause = " ".join(str(exc).split())[:500]
            raise ModelError(f"{onnx_path}: the ONNX export failed ({cause})") from None
        seconds = audio.shape[0] / config.sample_rate
        step(f"checking with onnxruntime against torch ({seconds:.1f} s of audio)")
        scores = check_export(
            model, OnnxModel(path, config, precision=precision), config, audio, threads=threads
        )
        worst = min(scores, key=lambda k: scores[k])
        if not scores[worst] >= floor:
            raise ModelError(
                f"{onnx_path}: onnxruntime's output differs from torch's ({worst}: "
                f"{scores[worst]:.1f} dB SDR, at least {floor:g} dB expected); nothing written"
            )
        digest = sha256(path)

    text = ""
    try:
        atomic_write(onnx_path, write)
        text = json.dumps(runtime_config(config, precision=precision, digest=digest), indent=2)
        atomic_write(config_path, text + "\n")
    except OSError as exc:
        target = config_path if text else onnx_path
        raise OutputError(f"{target}: cannot write the export ({exc.strerror or exc})") from None
    finally:
        if created and not any(folder.iterdir()):
            folder.rmdir()  # a failed export leaves no empty folder behind
    return ExportResult(onnx_path, config_path, onnx_path.stat().st_size, scores)

"""Live separation: a stream separated as it plays, a fixed fraction of a second behind.

The offline engine runs the U-Nets on 512-frame segments (11.9 s at 44.1 kHz), so a
sample's stems are known only once its whole segment has arrived. Here the U-Nets run on
a short sliding *window* of STFT frames that ends a few *look-ahead* frames after the
frames it decides: every *hop* frames, the newest window gives the masks of the ``hop``
frames that end ``lookahead`` frames before its end, and those frames are masked,
inverted and overlap-added at once. The same pieces as the offline engine compute it:
:mod:`splitstems.dsp`'s STFT and iSTFT, :meth:`Engine.estimate` (the fused U-Nets, all
instruments) and :meth:`Engine.mask_stems`.

A sample at input position ``i`` is final once frame ``(i + N) // H + hop + lookahead - 1``
is in (N the frame length, H the frame step), so the worst-case algorithmic delay is
``(hop + lookahead - 1) * H + N`` samples (:meth:`LiveSettings.delay_samples`), one frame
step less with ``partial`` (the step after each run's frames goes out at once, without the
frame that only starts there): 0.488 s for the 0.5 s setting, whose masks also blend the
newest window's with the previous one's (``blend``). Memory is bounded whatever the
stream's length: a window of magnitudes, the frames not yet masked, the last windows'
masks, one iSTFT tail.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from splitstems import audio, dsp
from splitstems.config import ModelConfig
from splitstems.device import set_threads
from splitstems.engine import ChunkSource, Engine
from splitstems.errors import AudioError

__all__ = [
    "DEFAULT_LATENCY",
    "LIVE_SETTINGS",
    "LiveEngine",
    "LiveSeparator",
    "LiveSettings",
    "settings_for",
]

log = logging.getLogger(__name__)

#: The latency (seconds) ``Separator.live()`` and ``splitstems stream`` ask for by default.
DEFAULT_LATENCY = 0.5
#: Seconds by which a setting's delay may exceed the latency asked (delays are printed
#: rounded to the millisecond, and such a figure, given back, chooses that setting).
LATENCY_TOLERANCE = 0.0005
#: The U-Nets' six stride-2 layers want windows that are multiples of this many frames.
WINDOW_MULTIPLE = 64


@dataclass(frozen=True)
class LiveSettings:
    """How the U-Nets slide over a stream.

    Attributes:
        window: STFT frames the U-Nets see at once (a multiple of 64).
        hop: frames decided by each model run (model runs per frame: ``1 / hop``).
        lookahead: frames after the decided ones that the window still sees.
        partial: 0, or 1 to hand out the frame step of samples after the decided frames
            at once, without the one frame that only starts there (its analysis window is
            near zero over them; the others are renormalised): one frame step less
            delay, so one frame more look-ahead at the same delay.
        blend: weights of the ratio masks a frame gets from the newest window and the
            ones before it (which saw ``hop``, ``2 * hop`` ... frames less of what
            follows it); ``(1.0,)``: the newest window's alone.
    """

    window: int
    hop: int
    lookahead: int
    partial: int = 0
    blend: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if self.window <= 0 or self.window % WINDOW_MULTIPLE:
            raise ValueError(f"window must be a multiple of {WINDOW_MULTIPLE} frames: {self}")
        if self.hop < 1 or self.lookahead < 0 or self.hop + self.lookahead > self.window:
            raise ValueError(f"need hop >= 1, lookahead >= 0, hop + lookahead <= window: {self}")
        if self.partial not in (0, 1):
            raise ValueError(f"partial must be 0 or 1: {self}")
        weights = self.blend
        if not weights or not all(isinstance(w, int | float) and 0 < w < math.inf for w in weights):
            raise ValueError(f"blend needs one or more positive weights: {self}")
        if (len(weights) - 1) * self.hop > self.lookahead:
            raise ValueError(f"blend: each earlier window must still hold the frames: {self}")

    def delay_samples(self, config: ModelConfig) -> int:
        """Worst-case algorithmic delay in samples: input in to its stems out."""
        frames = self.hop + self.lookahead - 1 - self.partial
        return frames * config.frame_step + config.frame_length

    def delay(self, config: ModelConfig) -> float:
        """Worst-case algorithmic delay in seconds."""
        return self.delay_samples(config) / config.sample_rate

    @property
    def work(self) -> float:
        """Model work per frame relative to the offline engine (``window / hop``)."""
        return self.window / self.hop


#: The settings a requested latency chooses from, shortest delay first; each is the best
#: measured at its delay on the MUSDB18 previews (docs/live.md: median vocals SDR 5.93 dB
#: at 0.116 s, 6.83 at 0.441 s, 7.03 at 0.488 s, 7.08 at 0.813 s; offline 7.08). For a
#: latency, the entry with the longest delay that fits is taken (window 128, hop 32,
#: look-ahead 32, at 1.556 s, scored 6.90: a longer delay is not better by itself).
LIVE_SETTINGS: tuple[LiveSettings, ...] = (
    LiveSettings(window=64, hop=2, lookahead=0),
    LiveSettings(window=64, hop=4, lookahead=2),
    LiveSettings(window=64, hop=4, lookahead=4),
    LiveSettings(window=64, hop=8, lookahead=4),
    LiveSettings(window=64, hop=8, lookahead=8),
    LiveSettings(window=128, hop=4, lookahead=15, partial=1, blend=(0.75, 0.25)),
    LiveSettings(window=128, hop=8, lookahead=24),
)


def settings_for(latency: float, config: ModelConfig) -> LiveSettings:
    """Return the settings with the longest delay that is at most ``latency`` seconds.

    Raises:
        ValueError: ``latency`` is not a positive number or is below the shortest delay.
    """
    if not (isinstance(latency, int | float) and math.isfinite(latency) and latency > 0):
        raise ValueError(f"latency must be a positive number of seconds, got {latency!r}")
    # delays are printed in milliseconds (0.441 s): such a number, given back, fits
    fitting = [s for s in LIVE_SETTINGS if s.delay(config) <= latency + LATENCY_TOLERANCE]
    if not fitting:
        shortest = min(s.delay(config) for s in LIVE_SETTINGS)
        raise ValueError(
            f"latency {latency:g} s is below the shortest this model can do ({shortest:.3f} s)"
        )
    return max(fitting, key=lambda s: (s.delay(config), -s.work))


class LiveSeparator:
    """Separates a stream pushed block by block; output trails the input by a fixed delay.

    ``push(block)`` takes any ``(n, n_channels)`` float block (mono is duplicated) and
    returns instrument → the ``(m, n_channels)`` float32 samples that became final;
    ``flush()`` returns the rest, after which the separator is ready for a new stream.
    All outputs of one stream, concatenated, are exactly as long as its input and
    sample-aligned with it. The stems of input sample ``i`` are returned at the latest by
    the push that brings the input to ``i + delay_samples`` samples.

    Args:
        engine: the engine whose model, masks, STFT and device are used.
        latency: the worst-case delay allowed, in seconds (see :func:`settings_for`).
        settings: explicit window/hop/look-ahead (then ``latency`` is ignored).
        batch: model runs batched together when a block brings several (more is faster
            for files, no help for small live blocks).
        on_windows: called with the number of model runs after each batch (progress).
        threads: CPU threads for the model (process-wide). None: the engine's, if they
            were given, else 1. A short window gives two threads little to share, and on
            a busy machine their waiting for each other made a step 10-20x slower
            (docs/live.md); one thread keeps a stream steady.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        latency: float = DEFAULT_LATENCY,
        settings: LiveSettings | None = None,
        batch: int = 1,
        on_windows: Callable[[int], None] | None = None,
        threads: int | None = None,
    ) -> None:
        if engine.mwf or engine.shifts != 1:
            raise ValueError(
                "live separation works with ratio masks and no shifts (the Wiener filter "
                "and shifts need the whole track)"
            )
        cfg = engine.config
        self.engine = engine
        self.config = cfg
        self.settings = settings if settings is not None else settings_for(latency, cfg)
        self.batch = max(1, int(batch))
        self.on_windows = on_windows
        self._hop, self._n_fft = cfg.frame_step, cfg.frame_length
        self._device = engine.device
        self.threads = threads or engine.threads_given or 1
        if self.settings.partial and self._n_fft % self._hop:
            raise ValueError("partial needs a frame length that is a multiple of the frame step")
        # the partial samples' gain: all frames' squared windows over those of the frames in
        squared = (engine.window**2).reshape(-1, self._hop)
        self._partial_gain = squared.sum(0) / (squared.sum(0) - squared[0])
        self.reset()

    @property
    def latency(self) -> float:
        """Worst-case algorithmic delay, seconds (input sample in → its stems out)."""
        return self.settings.delay(self.config)

    @property
    def delay_samples(self) -> int:
        """Worst-case algorithmic delay in samples."""
        return self.settings.delay_samples(self.config)

    @property
    def instruments(self) -> tuple[str, ...]:
        """Output stems, in order."""
        return self.config.instruments

    @property
    def sample_rate(self) -> int:
        """Samples per second of input and output."""
        return self.config.sample_rate

    @property
    def n_channels(self) -> int:
        """Channels of input and output."""
        return self.config.n_channels

    def reset(self) -> None:
        """Forget the current stream (the next push starts a new one)."""
        cfg, s, dev = self.config, self.settings, self._device
        n_ch, n_inst = cfg.n_channels, len(cfg.instruments)
        self.n_input = 0  # samples pushed in this stream
        self._stream_channels: int | None = None  # channels of this stream's first block
        self._samples = torch.zeros(n_ch, self._n_fft)  # padded samples from frame K's start
        self._n_frames = 0  # K: STFT frames computed (frames count from the padded start)
        self._decided = 0  # M: frames masked and inverted
        # magnitudes of frames [K - W, K) (before the start: zero frames)
        self._mag = torch.zeros(n_ch, s.window, cfg.F, device=dev)
        self._spec = torch.zeros(n_ch, 0, cfg.n_bins, dtype=torch.complex64, device=dev)
        self._tail = torch.zeros(n_inst, n_ch, self._n_fft - self._hop, device=dev)
        self._emitted = 0  # padded position of the next output sample
        self._earlier: list[torch.Tensor] = []  # earlier windows' masks, for the blend
        self._stems = torch.zeros(
            n_inst, n_ch, s.hop * self.batch, cfg.n_bins, dtype=torch.complex64, device=dev
        )
        self._nonfinite = audio.NonFinite("live input", cfg.sample_rate)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run the model once on silence, so that the first real window is not slow.

        The first run of a model builds its kernels (oneDNN primitives, CUDA contexts),
        which takes longer than the whole delay; a live stream should not pay it.
        """
        self._set_threads()
        s = self.settings
        windows = torch.zeros(self.batch, self.n_channels, s.window, self.config.F)
        self.engine.estimate(windows.to(self._device))

    @torch.inference_mode()
    def push(self, block: Any) -> dict[str, np.ndarray]:  # noqa: ANN401 - array-like
        """Add ``(n, n_channels)`` samples; return instrument → the samples now final."""
        data = self._checked(block)
        self._set_threads()
        out: list[torch.Tensor] = []
        piece = self.settings.hop * self.batch * self._hop
        for begin in range(0, data.shape[0], piece):  # bounded work and memory per step
            part = data[begin : begin + piece]
            self.n_input += part.shape[0]
            self._add_samples(torch.from_numpy(part.T.copy()))
            out.extend(self._run_ready(limit=None))
        return self._as_stems(out)

    @torch.inference_mode()
    def flush(self) -> dict[str, np.ndarray]:
        """End the stream: return the remaining samples of every stem, then reset."""
        out: list[torch.Tensor] = []
        self._set_threads()
        if self.n_input:
            end = self._n_fft + self.n_input  # padded position just after the input
            total = dsp.n_frames_for(self.n_input, frame_length=self._n_fft, frame_step=self._hop)
            zeros = torch.zeros(self.n_channels, self.settings.hop * self._hop)
            while self._decided < total:  # frames past the input are zero, as offline
                self._add_samples(zeros)
                out.extend(self._run_ready(limit=end))
        stems = self._as_stems(out)
        self._nonfinite.report()
        self.reset()
        return stems

    def _set_threads(self) -> None:
        if self._device.type == "cpu" and torch.get_num_threads() != self.threads:
            set_threads(self.threads)

    def _checked(self, block: Any) -> np.ndarray:  # noqa: ANN401
        data = np.asarray(block)
        if data.dtype.kind not in "f":
            raise ValueError(f"live input: expected float samples in [-1, 1], got {data.dtype}")
        data = data.astype(np.float32, copy=False)
        if data.ndim == 1:
            data = data[:, None]
        if data.ndim != 2 or (data.shape[0] and data.shape[1] == 0):
            raise ValueError(f"live input: expected shape (n, n_channels), got {data.shape}")
        if not data.shape[0]:
            return np.zeros((0, self.n_channels), np.float32)
        try:
            audio.check_samples_first("live input", data)
        except AudioError as exc:
            raise ValueError(str(exc)) from None
        if self._stream_channels is None:
            self._stream_channels = data.shape[1]
        elif data.shape[1] != self._stream_channels:
            raise ValueError(
                f"live input: a block of {data.shape[1]} channel(s) in a stream that started "
                f"with {self._stream_channels} (flush() ends a stream)"
            )
        data = audio.to_channels("live input", data, self.n_channels)
        return self._nonfinite.clean(data, self.n_input)

    def _add_samples(self, samples: torch.Tensor) -> None:
        """Append samples (C, n) and compute the STFT frames they complete."""
        self._samples = torch.cat([self._samples, samples], dim=1)
        n_new = (self._samples.shape[1] - self._n_fft) // self._hop + 1
        if n_new <= 0:
            return
        used = (n_new - 1) * self._hop + self._n_fft
        block = self._samples[:, :used].to(self._device)
        spec = dsp.stft_frames(block, self.engine.window, frame_step=self._hop)
        self._samples = self._samples[:, n_new * self._hop :]
        self._n_frames += n_new
        self._spec = torch.cat([self._spec, spec], dim=1)
        # each frame's magnitude is computed once and kept while a window can see it
        self._mag = torch.cat([self._mag, spec[..., : self.config.F].abs()], dim=1)

    def _run_ready(self, *, limit: int | None) -> Iterator[torch.Tensor]:
        """Run the model on every window that is complete; yield (I, C, n) final samples."""
        s = self.settings
        while self._n_frames - self._decided >= s.hop + s.lookahead:
            n_ready = (self._n_frames - self._decided - s.lookahead) // s.hop
            n_runs = min(n_ready, self.batch)
            yield from self._decide(n_runs, limit=limit)
        self._mag = self._mag[:, -s.window :]  # later windows start after this

    def _window_size(self, end: int) -> int:
        """Frames of the window that ends at frame ``end`` (shorter near the stream's start).

        The settings' window, or near the start the smallest multiple of 64 frames that
        holds ``end``.

        Near the start a full window would be mostly the mirror image below; on the
        MUSDB18 previews a 128-frame window filled so lost 0.81 dB of vocals SDR in the
        stream's first second against offline, and 0.48 dB when shrunk (docs/live.md).
        """
        multiple = WINDOW_MULTIPLE
        return min(self.settings.window, -(-max(end, 1) // multiple) * multiple)

    def _window(self, end: int, first_mag: int, size: int) -> torch.Tensor:
        """Magnitudes of frames [end - size, end); before the stream's start, its mirror image.

        The U-Net was trained on segments full of music: a window that is mostly the
        silence before the start gave poor masks for the first second (up to 5 dB less
        SDR there on MUSDB18 previews). Mirroring the frames that are in (0, 1, 2 ... read
        backwards before frame 0, repeated if too few) keeps the window full.
        """
        window = self._mag[:, end - size - first_mag : end - first_mag]
        missing = size - end  # frames before the stream's start
        if missing <= 0 or end <= 0:
            return window
        known = window[:, missing:]  # frames [0, end)
        reps = -(-missing // end)
        mirrored = torch.cat([known, known.flip(1)] * reps, dim=1)[:, :missing].flip(1)
        return torch.cat([mirrored, known], dim=1)

    def _estimates(self, ends: list[int], first_mag: int) -> torch.Tensor:
        """Estimates of the windows ending at ``ends``: (n, I, C, len(blend) * hop, F).

        Of each window, its decided frames and the ``hop`` frames after them for every
        later window the blend gives them to. Windows of one size run as one batch (all but
        the stream's first ones).
        """
        s = self.settings
        span = len(s.blend) * s.hop
        groups: list[torch.Tensor] = []
        for size, same in itertools.groupby(ends, key=self._window_size):  # in order
            windows = torch.stack([self._window(end, first_mag, size) for end in same])
            lo = size - s.lookahead - s.hop
            groups.append(self.engine.estimate(windows)[:, :, :, lo : lo + span])
        return groups[0] if len(groups) == 1 else torch.cat(groups)

    def _masks(self, ends: list[int], first_mag: int) -> torch.Tensor:
        """Ratio masks of the frames the windows ending at ``ends`` decide: (I, C, n, F)."""
        s = self.settings
        estimates = self._estimates(ends, first_mag).transpose(0, 1)  # (I, runs, C, span, F)
        masks = dsp.ratio_masks(estimates, exponent=self.config.separation_exponent)
        if len(s.blend) > 1:
            blended = []
            for run in range(masks.shape[1]):  # in stream order: each blends the ones before
                newest = masks[:, run]
                mask, total = s.blend[0] * newest[:, :, : s.hop], s.blend[0]
                for weight, earlier in zip(s.blend[1:], self._earlier, strict=False):
                    mask, total = mask + weight * earlier[:, :, : s.hop], total + weight
                blended.append(mask / total)
                # what this and the earlier windows say of the frames the next run decides
                self._earlier = [m[:, :, s.hop :] for m in (newest, *self._earlier)]
                self._earlier = self._earlier[: len(s.blend) - 1]
            masks = torch.stack(blended, dim=1)
        # (I, runs, C, hop, F) -> (I, C, runs * hop, F), frames in stream order
        return masks.transpose(1, 2).flatten(2, 3)

    def _decide(self, n_runs: int, *, limit: int | None) -> Iterator[torch.Tensor]:
        s, step = self.settings, self._hop
        first_mag = self._n_frames - self._mag.shape[1]  # frame index of self._mag[:, 0]
        ends = [self._decided + (k + 1) * s.hop + s.lookahead for k in range(n_runs)]
        masks = self._masks(ends, first_mag)  # (I, C, n, F)
        n = n_runs * s.hop
        stems = self.engine.mask_stems(masks, self._spec[:, :n], out=self._stems[:, :, :n])
        signal = dsp.istft(stems, self.engine.window, frame_step=step)
        signal[..., : self._tail.shape[-1]] += self._tail
        self._tail = signal[..., n * step :].clone()
        base = self._decided * step  # padded position of signal[..., 0]
        if s.partial:  # each run hands out the step after its frames without the next frame
            if n_runs > 1:  # here the later runs' first frames are in: take them out again
                firsts = stems[:, :, s.hop : n : s.hop]  # (I, C, n_runs - 1, bins)
                added = dsp.istft_frames(firsts, self.engine.window)[..., :step]
                blocks = signal[..., s.hop * step : n * step].unflatten(-1, (n_runs - 1, -1))
                blocks[..., :step] -= added
                blocks[..., :step] *= self._partial_gain
            signal[..., n * step : (n + 1) * step] *= self._partial_gain
        self._spec = self._spec[:, n:]
        self._decided += n
        if self.on_windows is not None:
            self.on_windows(n_runs)
        end = (self._decided + s.partial) * step
        end = end if limit is None else min(end, limit)
        begin = max(self._emitted, self._n_fft)  # the prepended frame of zeros is dropped
        self._emitted = max(self._emitted, end)
        if end > begin:
            yield signal[..., begin - base : end - base]

    def _as_stems(self, parts: list[torch.Tensor]) -> dict[str, np.ndarray]:
        if parts:
            host = torch.cat(parts, dim=-1).cpu().numpy()  # (I, C, n)
        else:
            host = np.zeros((len(self.instruments), self.n_channels, 0), np.float32)
        return {name: np.ascontiguousarray(host[i].T) for i, name in enumerate(self.instruments)}


class LiveEngine:
    """An :class:`Engine` that separates through :class:`LiveSeparator` (``--latency``).

    It stands in for the engine behind a ``Separator`` built with ``latency``: files and
    waveforms are pushed through the same live path as a stream, so its quality is
    measured with the offline tools. Everything else (device, model, settings) is the
    wrapped engine's.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        latency: float = DEFAULT_LATENCY,
        settings: LiveSettings | None = None,
        batch: int | None = None,
    ) -> None:
        if engine.overlap_frames:
            raise ValueError("a latency and an overlap of segments do not go together")
        self.base = engine
        self.live_settings = LiveSeparator(engine, latency=latency, settings=settings).settings
        # None: an offline segment's worth of frames per model call (512 / window windows),
        # so memory stays near the offline engine's (8 windows of 128 frames: 0.94 GB
        # against 0.60 GB for one, and no faster)
        self.batch = batch or max(1, engine.config.T // self.live_settings.window)

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - the wrapped engine's attributes
        return getattr(self.base, name)

    @property
    def latency(self) -> float:
        """Worst-case algorithmic delay of the live path, seconds."""
        return self.live_settings.delay(self.base.config)

    @property
    def segment_samples(self) -> int:
        """Input samples that one model run advances by (the hop)."""
        return self.live_settings.hop * self.base.config.frame_step

    @property
    def work_factor(self) -> int:
        """Model runs per hop of input (one)."""
        return 1

    #: A whole waveform through the live path: the engine's own joining of :meth:`stream`.
    separate = Engine.separate

    def stream(
        self, chunks: ChunkSource, *, on_segments: Callable[[int], None] | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Separate ``(n, n_channels)`` chunks through the live path (see :meth:`Engine.stream`)."""
        if callable(chunks):
            chunks = chunks()
        live = LiveSeparator(
            self.base,
            settings=self.live_settings,
            batch=self.batch,
            on_windows=on_segments,
            threads=self.base.thread_plan().threads,  # batches of windows: as offline
        )
        iterator = iter(chunks)
        try:
            for chunk in iterator:
                stems = live.push(chunk)
                if next(iter(stems.values())).shape[0]:
                    yield stems
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        stems = live.flush()
        if next(iter(stems.values())).shape[0]:
            yield stems

"""The separation engine: streaming, batching and device choice.

The only module that knows about memory and speed. Audio arrives in chunks of any size;
the engine keeps the original's grid of ``T``-frame segments from the start of the
stream (after Spleeter's prepended frame of zeros), runs the model on whole segments as
soon as their samples are in, and carries the STFT overlap (``frame_length - frame_step``
samples) across chunk boundaries. Output is therefore the same, sample for sample, as
running the original on the whole track at once, while memory is bounded by the chunk.

Two options change what is computed, not how much memory it takes:

- ``mwf``: norbert's multichannel Wiener filter instead of ratio masks. Its spatial
  covariances are sums over the whole track, so the input is read ``iterations + 1``
  times: the first passes run the model and only collect statistics
  (:class:`splitstems.wiener.StreamingWiener`), the last one filters and emits. The input
  must then be replayable (a list of chunks, or a callable that opens the stream anew).
- ``shifts``: test-time augmentation. The input is also separated delayed by multiples
  of ``SHIFT_SPACING / shifts`` samples (the U-Net's strided grid and the segment grid
  move), and the aligned outputs are averaged.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing

import numpy as np
import torch

from splitstems import dsp
from splitstems.config import ModelConfig
from splitstems.device import (
    MapUNets,
    ThreadPlan,
    UNetWorkers,
    baseline_threads,
    check_threads,
    load_meter,
    one_thread,
    pick_device,
    plan_threads,
    set_threads,
    usable_cpus,
)
from splitstems.models.fast import FastSpleeterModel, fuse_for_inference
from splitstems.models.unet import SpleeterModel
from splitstems.wiener import StreamingWiener

__all__ = [
    "pick_device",
    "Engine",
    "PRECISIONS",
    "MIN_STEP",
    "overlap_frames",
    "OrderedWorker",
]

log = logging.getLogger(__name__)

#: Model precisions: "float32" is faithful to the original; "fast" is bfloat16 on the CPU
#: and float16 on GPUs.
PRECISIONS = ("float32", "fast")
#: Longest cross-fade, in STFT frames (~0.74 s at 44.1 kHz), between overlapping segments.
CROSSFADE_FRAMES = 32
#: Smallest step between the starts of consecutive segments, as a fraction of a segment
#: (``overlap`` at most 1 - MIN_STEP = 0.875: at most 8 model runs per frame).
MIN_STEP = 1 / 8
#: Test-time shifts delay the input by multiples of ``SHIFT_SPACING / shifts`` samples
#: (4 STFT hops: the U-Net's strided grid and the segment grid move; measured in the README).
SHIFT_SPACING = 4096

#: What :meth:`Engine.stream` reads: chunks, or (for several passes) a callable opening them.
ChunkSource = Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]]


def overlap_frames(overlap: float, n_frames: int) -> int:
    """Frames by which consecutive ``n_frames``-frame segments overlap (checked).

    Segments start ``n_frames - overlap_frames`` frames apart. That step must be at least
    ``n_frames * MIN_STEP`` frames (and one frame): at most ``1 / MIN_STEP`` model runs
    per frame of input. Without the bound an overlap near 1 rounds to a step of zero (an
    endless loop) or of one frame (hundreds of times the work), while every frame is
    already taken from the segment where it lies most centrally at far smaller overlaps
    (see :meth:`Engine.segment_weights`).

    Raises:
        ValueError: ``overlap`` outside the usable range, which the message gives.
    """
    min_step = max(1, math.ceil(n_frames * MIN_STEP))
    largest = (n_frames - min_step) / n_frames
    frames = round(overlap * n_frames) if math.isfinite(overlap) else -1
    if not 0.0 <= overlap < 1.0 or not 0 <= frames <= n_frames - min_step:
        raise ValueError(
            f"overlap {overlap:g}: the usable range is 0 to {largest:g} (segments of "
            f"{n_frames} frames must start at least {min_step} frames apart)"
        )
    return frames


class Engine:
    """Streams a waveform through a Spleeter model, segment by segment.

    Args:
        model: the model, already loaded with weights (or its fused inference form, or an
            exported model run by onnxruntime: :class:`splitstems.export.OnnxModel`). The
            engine computes with its own copy: the caller's model is not changed.
        config: its configuration (STFT parameters, ``T``, ``F``, mask extension).
        device: where to compute (see :func:`pick_device`).
        batch_segments: how many ``T``-frame segments go through the model at once.
        mask_extension: override the config's mask extension ("zeros" or "average").
        precision: "float32" (faithful, the default) or "fast" (bfloat16 on the CPU,
            float16 on GPUs; masks, STFT and iSTFT stay float32).
        overlap: fraction of a segment by which consecutive segments overlap (0 = the
            original's grid; at most ``1 - MIN_STEP`` = 0.875, see :func:`overlap_frames`);
            see :meth:`segment_weights` for how they are joined.
        fuse: run the fused inference form of the model (:mod:`splitstems.models.fast`);
            False runs the plain modules (the reference, slower).
        mwf: multichannel Wiener filter (norbert's, as the original's ``--mwf``) instead
            of ratio masks; the input is read ``mwf_iterations + 1`` times.
        mwf_iterations: EM iterations of the Wiener filter (the original: 1).
        mwf_exponent: the Wiener filter sees the model's magnitudes raised to this power
            (the original: 1). Below 1 the filter's initial masks are softer; 0.7 gained
            about 0.08 dB vocals SDR over 1 on MUSDB18 previews (README, results).
        shifts: average the separations of the input delayed by ``k * SHIFT_SPACING /
            shifts`` samples, ``k = 0 .. shifts-1`` (1 = no averaging, the original).
        threads: CPU threads (torch's intra-op threads; process-wide). None: chosen for
            each separation from the CPUs this process may use and how busy other
            processes keep them (see :mod:`splitstems.device`); ``OMP_NUM_THREADS``,
            when set, counts as given. A number: exactly that many, never adapted.
        unet_workers: run the U-Nets (one per instrument) side by side in this many
            threads; None: only when other processes keep CPUs busy.
    """

    def __init__(
        self,
        model: SpleeterModel | FastSpleeterModel,
        config: ModelConfig,
        *,
        device: torch.device | str | None = None,
        batch_segments: int = 1,
        mask_extension: str | None = None,
        precision: str = "float32",
        overlap: float = 0.0,
        fuse: bool = True,
        mwf: bool = False,
        mwf_iterations: int = 1,
        mwf_exponent: float = 1.0,
        shifts: int = 1,
        threads: int | None = None,
        unet_workers: int | None = None,
    ) -> None:
        self._threads = check_threads(threads)
        self._unet_workers = check_threads(unet_workers)
        self._baseline = baseline_threads()
        usable = usable_cpus()
        if self._threads is not None and self._threads > usable:
            log.warning(
                "%d threads for %d usable CPUs: more threads than CPUs only wait for each "
                "other (see --threads)",
                self._threads,
                usable,
            )
        if self._threads is None and os.environ.get("OMP_NUM_THREADS", "").strip():
            self._threads = self._baseline  # the user's choice: keep it
        load_meter()  # from now on, the load of other processes is watched
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.config = config
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.dtype = torch.float32
        if precision == "fast":
            self.dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        self.overlap_frames = overlap_frames(overlap, config.T)
        # The engine's own copy: the caller's model keeps its mode, dtype and device.
        with one_thread():  # many small copies (see one_thread)
            if isinstance(model, SpleeterModel) and fuse:
                network = fuse_for_inference(model)  # new tensors; the model is not changed
            else:
                network = copy.deepcopy(model)
            self.model = network.eval().to(device=self.device, dtype=self.dtype)
        set_threads(self.threads)
        self.batch_segments = max(1, int(batch_segments))
        self.mask_extension = mask_extension or config.mask_extension
        self.window = dsp.hann_window(config.frame_length, device=self.device)
        if mwf_iterations < 0:
            raise ValueError(f"mwf_iterations must be >= 0, got {mwf_iterations}")
        if shifts < 1:
            raise ValueError(f"shifts must be >= 1, got {shifts}")
        if not 0 < mwf_exponent < float("inf"):
            raise ValueError(f"mwf_exponent must be > 0, got {mwf_exponent}")
        self.mwf = bool(mwf)
        self.mwf_iterations = int(mwf_iterations)
        self.mwf_exponent = float(mwf_exponent)
        self.shifts = int(shifts)

    @property
    def threads(self) -> int:
        """The threads given, else the threads of an idle machine (see :meth:`thread_plan`)."""
        return self._threads or self._baseline

    @property
    def threads_given(self) -> int | None:
        """The threads fixed by the caller (``threads=``, ``OMP_NUM_THREADS``), else None."""
        return self._threads

    def thread_plan(self) -> ThreadPlan:
        """Choose the threads of the next separation (load since the previous choice)."""
        return plan_threads(
            usable=self._baseline,
            others=None if self._threads else load_meter().others(),
            n_unets=len(self.instruments),
            threads=self._threads,
            unet_workers=self._unet_workers,
        )

    @property
    def n_passes(self) -> int:
        """How many times :meth:`stream` reads its input (more than once with the MWF)."""
        return self.mwf_iterations + 1 if self.mwf else 1

    @property
    def shift_offsets(self) -> list[int]:
        """Delays (samples) of the input for the test-time shifts, the first 0."""
        return [k * SHIFT_SPACING // self.shifts for k in range(self.shifts)]

    @property
    def work_factor(self) -> int:
        """Model runs per segment of input (passes times shifts), for progress reports."""
        return self.n_passes * self.shifts

    @property
    def instruments(self) -> tuple[str, ...]:
        """Output instruments, in order."""
        return self.config.instruments

    @property
    def segment_samples(self) -> int:
        """Input samples one model segment advances by (``T * frame_step``)."""
        return self.config.T * self.config.frame_step

    def separate(self, waveform: np.ndarray) -> dict[str, np.ndarray]:
        """Separate a whole waveform ``(n_samples, n_channels)`` → instrument → same shape."""
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.instruments}
        for chunk in self.stream([waveform]):
            for name, samples in chunk.items():
                parts[name].append(samples)
        return {
            name: np.concatenate(chunks, axis=0)
            if chunks
            else np.zeros((0, self.config.n_channels), np.float32)
            for name, chunks in parts.items()
        }

    @torch.inference_mode()
    def stream(
        self,
        chunks: ChunkSource,
        *,
        on_segments: Callable[[int], None] | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Separate a stream of ``(n_samples, n_channels)`` float32 chunks.

        Yields dicts instrument → ``(n, n_channels)`` float32 arrays; their concatenation
        is the separation of the concatenated input, same length. ``on_segments(k)`` is
        called after each model batch of ``k`` segments (for progress bars; with the MWF
        or shifts, :attr:`work_factor` times per segment of input).

        With the MWF, ``chunks`` is read :attr:`n_passes` times: pass a list or a callable
        that returns a fresh iterable of the same chunks (a one-shot iterator is refused).
        The threads are chosen when the stream starts (:meth:`thread_plan`).
        """
        plan = self.last_plan = self.thread_plan()
        set_threads(plan.threads)
        configure = getattr(self.model, "configure", None)  # an ONNX model (splitstems.export)
        if configure is not None:
            configure(threads=plan.threads, device=self.device)
        workers = None
        if plan.unet_workers > 1 and isinstance(self.model, FastSpleeterModel):
            workers = UNetWorkers(plan)
        log.info(
            "CPU threads: %d%s%s",
            plan.threads,
            "" if plan.others is None else f" (other processes used {plan.others:.1f} cores)",
            f"; U-Nets side by side in {plan.unet_workers} threads" if workers else "",
        )
        try:
            yield from self._stream(chunks, on_segments, workers.map if workers else None)
        finally:
            if workers is not None:
                workers.close()
                set_threads(plan.threads)

    def _stream(
        self,
        chunks: ChunkSource,
        on_segments: Callable[[int], None] | None,
        map_unets: MapUNets | None,
    ) -> Iterator[dict[str, np.ndarray]]:
        opened = _opener(chunks, self.n_passes)
        filters = [self._new_wiener() if self.mwf else None for _ in self.shift_offsets]
        for _ in range(self.n_passes - 1):  # MWF statistics passes: nothing to emit
            states = self._states(on_segments, filters, map_unets)
            with closing(self._drive(states, opened())) as steps:
                for _ in steps:
                    pass
            for wiener in filters:
                wiener.end_pass()  # type: ignore[union-attr]
        states = self._states(on_segments, filters, map_unets)
        # closing: a consumer that stops early closes this generator, which closes the
        # input's iterator at once (a read-ahead thread stops, a decoder closes its file)
        with closing(self._drive(states, opened())) as steps:
            if len(states) == 1:
                for outputs in steps:
                    yield from outputs[0]
                return
            merger = _ShiftMerger(len(states), self.instruments)
            for outputs in steps:
                for index, stems in enumerate(outputs):
                    for chunk in stems:
                        merger.push(index, chunk)
                merged = merger.pop()
                if merged is not None:
                    yield merged

    def _new_wiener(self) -> StreamingWiener:
        cfg = self.config
        n_bins = cfg.F if self.mask_extension == "zeros" else cfg.n_bins
        return StreamingWiener(
            len(cfg.instruments),
            cfg.n_channels,
            min(n_bins, cfg.n_bins),
            iterations=self.mwf_iterations,
            device=self.device,
        )

    def _states(
        self,
        on_segments: Callable[[int], None] | None,
        filters: list[StreamingWiener | None],
        map_unets: MapUNets | None,
    ) -> list[_StreamState]:
        return [
            _StreamState(self, on_segments, shift=shift, wiener=wiener, map_unets=map_unets)
            for shift, wiener in zip(self.shift_offsets, filters, strict=True)
        ]

    def _drive(
        self, states: list[_StreamState], chunks: Iterable[np.ndarray]
    ) -> Iterator[list[list[dict[str, np.ndarray]]]]:
        """Feed every state the same pieces; yield each state's outputs per step."""
        piece = self.batch_segments * self.segment_samples
        iterator = iter(chunks)
        try:
            for chunk in iterator:
                array = np.asarray(chunk, dtype=np.float32)
                if array.ndim != 2 or array.shape[1] != self.config.n_channels:
                    raise ValueError(
                        f"expected a (n_samples, {self.config.n_channels}) waveform, "
                        f"got {array.shape}"
                    )
                for begin in range(0, array.shape[0], piece):  # bounded work per step
                    part = array[begin : begin + piece]
                    yield [list(state.feed(part)) for state in states]
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # stops a read-ahead thread, closes a decoder, at once
        yield [list(state.finish()) for state in states]

    def segment_weights(self) -> torch.Tensor:
        """Cross-fade weights of one segment's frames, shape (T,).

        A U-Net sees less context near a segment's edges and is less reliable there, so
        where two segments overlap, each frame is taken from the segment in which it lies
        more centrally: the overlap is split at its middle, with a linear cross-fade of
        ``min(overlap, CROSSFADE_FRAMES)`` frames. Weights never reach zero, so the first
        and last frames of a stream (covered by one segment only) stay defined.
        """
        cfg = self.config
        fade = min(self.overlap_frames, CROSSFADE_FRAMES)
        t = torch.arange(cfg.T, dtype=torch.float32, device=self.device)
        distance = torch.minimum(t, cfg.T - 1 - t)  # frames to the nearest edge
        start = (self.overlap_frames - fade) / 2
        return ((distance - start + 0.5) / fade).clamp(1e-3, 1.0)

    def estimate(
        self,
        magnitude: torch.Tensor,
        *,
        map_unets: MapUNets | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Model estimates for segments (S, C, T, F) → (S, I, C, T, F), float32.

        ``map_unets``: how the fused model runs its U-Nets (:class:`UNetWorkers.map`).
        ``out``: where to write them (returned); by default a new tensor.
        """
        if isinstance(self.model, FastSpleeterModel):  # converts the magnitudes itself
            return self.model(magnitude, map_unets=map_unets, out=out)
        estimates = self.model(magnitude.to(self.dtype)).float()
        return estimates if out is None else out.copy_(estimates)

    def wiener_inputs(
        self, estimates: torch.Tensor, spec: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Magnitudes and mixture STFT the Wiener filter sees, over the bins it filters.

        "zeros": the model's F bins (the original: the estimates are zero above F, so
        the filtered stems are too). "average": above F, each source's magnitude is the
        mixture's times the source's ratio mask averaged over frequency (what the
        "average" mask extension does to the ratio masks). With ``mwf_exponent`` ≠ 1: divided by
        the largest source's magnitude in each bin, then raised to that power.
        """
        n_model_bins = estimates.shape[-1]
        if self.mask_extension == "zeros" or spec.shape[-1] <= n_model_bins:
            magnitudes, mixture = estimates, spec[..., :n_model_bins]
        else:
            masks = dsp.ratio_masks(estimates, exponent=self.config.separation_exponent)
            extra = masks.mean(dim=-1, keepdim=True) * spec[..., n_model_bins:].abs()
            magnitudes, mixture = torch.cat([estimates, extra], dim=-1), spec
        if self.mwf_exponent != 1.0:
            # The filter only uses ratios between the sources in each bin, so dividing by
            # the bin's largest magnitude first keeps any exponent from overflowing.
            peak = magnitudes.amax(dim=0, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            magnitudes = (magnitudes / peak) ** self.mwf_exponent
        return magnitudes, mixture

    def apply_masks(
        self, estimates: torch.Tensor, spec: torch.Tensor, *, out: torch.Tensor
    ) -> torch.Tensor:
        """Estimates (I, C, n, F) and mixture STFT (C, n, bins) → stem STFTs in ``out``.

        ``out`` (I, C, n, bins), complex64, receives the masked bins and is returned. With
        the "zeros" extension only the first F bins are written: the caller keeps the
        others zero (so the inverse FFT needs no zero padding of its own).
        """
        masks = dsp.ratio_masks(estimates, exponent=self.config.separation_exponent)
        return self.mask_stems(masks, spec, out=out)

    def mask_stems(
        self, masks: torch.Tensor, spec: torch.Tensor, *, out: torch.Tensor
    ) -> torch.Tensor:
        """Ratio masks (I, C, n, F) times the mixture STFT (C, n, bins) → stem STFTs in ``out``.

        As :meth:`apply_masks`, for masks computed already (the live path blends them).
        """
        if self.mask_extension == "zeros":
            spec = spec[..., : masks.shape[-1]]
        else:
            masks = dsp.extend_mask(masks, n_bins=spec.shape[-1], mode=self.mask_extension)
        # real-valued mask times complex STFT, without promoting the mask to complex
        torch.mul(
            torch.view_as_real(spec).unsqueeze(0),
            masks.unsqueeze(-1),
            out=torch.view_as_real(out)[..., : masks.shape[-1], :],
        )
        return out


class _StreamState:
    """The state of one stream through an :class:`Engine`.

    Frames are counted from the start of the padded signal (Spleeter prepends
    ``frame_length`` zeros).

    Samples → STFT frames → model segments (every ``T - overlap`` frames, their estimates
    cross-faded when they overlap) → masks on frames no later segment can touch →
    iSTFT, overlap-added with the tail carried from the previous step → output samples.
    """

    def __init__(
        self,
        engine: Engine,
        on_segments: Callable[[int], None] | None,
        *,
        shift: int = 0,
        wiener: StreamingWiener | None = None,
        map_unets: MapUNets | None = None,
    ) -> None:
        cfg = engine.config
        self.engine, self.on_segments = engine, on_segments
        self.map_unets = map_unets
        self.wiener = wiener
        # a statistics pass of the Wiener filter: frames are observed, nothing is emitted
        self.collecting = wiener is not None and wiener.collecting
        self.shift = shift  # zeros before the input (test-time shift), dropped on output
        self.hop, self.n_fft, self.T = cfg.frame_step, cfg.frame_length, cfg.T
        self.step = cfg.T - engine.overlap_frames  # frames between segment starts
        self.weights = engine.segment_weights() if engine.overlap_frames else None
        device, n_ch, n_inst = engine.device, cfg.n_channels, len(cfg.instruments)
        # padded coords from frame self.frame0
        self.samples = torch.zeros(n_ch, self.n_fft + shift)
        self.n_input = shift
        self.frame0 = 0  # first frame of spec / acc / weight_sum, not yet output
        self.spec = torch.zeros(n_ch, 0, cfg.n_bins, dtype=torch.complex64, device=device)
        self.acc = torch.zeros(n_inst, n_ch, 0, cfg.F, device=device)
        self.weight_sum = torch.zeros(0, device=device)
        self.next_segment = 0  # start frame of the next model segment
        self.tail = torch.zeros(n_inst, n_ch, self.n_fft - self.hop, device=device)
        self.emitted = 0  # output samples (padded coords) emitted or skipped
        self._stems: dict[int, torch.Tensor] = {}  # see _stems_buffer

    @property
    def n_frames_in(self) -> int:
        """Frames computed so far (absolute count)."""
        return self.frame0 + self.spec.shape[1]

    def feed(self, array: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        if not array.shape[0]:
            return
        self.n_input += array.shape[0]
        n_old = self.samples.shape[1]
        samples = self.samples.new_empty(self.samples.shape[0], n_old + array.shape[0])
        samples[:, :n_old] = self.samples
        samples.numpy()[:, n_old:] = array.T  # NumPy's transposing copy: 10x torch's here
        self.samples = samples
        self._compute_frames()
        self._run_segments(total_frames=None)
        yield from self._output(self.next_segment)

    def finish(self) -> Iterator[dict[str, np.ndarray]]:
        if self.n_input == self.shift:
            return
        total = dsp.n_frames_for(self.n_input, frame_length=self.n_fft, frame_step=self.hop)
        need = (total - self.n_frames_in - 1) * self.hop + self.n_fft  # pad_end zeros
        self.samples = torch.nn.functional.pad(self.samples, (0, need - self.samples.shape[1]))
        self._compute_frames()
        self._run_segments(total_frames=total)
        yield from self._output(total)
        end = self.n_fft + self.n_input
        yield from self._emit(self.tail[..., : end - self.emitted], end)

    def _compute_frames(self) -> None:
        n_new = (self.samples.shape[1] - self.n_fft) // self.hop + 1
        if n_new <= 0:
            return
        used = (n_new - 1) * self.hop + self.n_fft
        block = self.samples[:, :used].to(self.engine.device)
        # the frames not yet output, then the new ones' STFT written after them
        n_old = self.spec.shape[1]
        spec = self.spec.new_empty(self.spec.shape[0], n_old + n_new, self.spec.shape[2])
        spec[:, :n_old] = self.spec
        dsp.stft_frames(block, self.engine.window, frame_step=self.hop, out=spec[:, n_old:])
        self.samples = self.samples[:, n_new * self.hop :]
        self.spec = spec
        acc_pad = (0, 0, 0, n_new)
        self.acc = torch.nn.functional.pad(self.acc, acc_pad)
        self.weight_sum = torch.nn.functional.pad(self.weight_sum, (0, n_new))

    def _run_segments(self, *, total_frames: int | None) -> None:
        """Run every segment whose frames are all known (at the end: all that remain)."""
        starts = []
        while True:
            start = self.next_segment
            ready = (
                start < total_frames
                if total_frames is not None
                else start + self.T <= self.n_frames_in
            )
            if not ready:
                break
            starts.append(start)
            self.next_segment += self.step
            if len(starts) == self.engine.batch_segments:
                self._run(starts)
                starts = []
        if starts:
            self._run(starts)

    def _run(self, starts: list[int]) -> None:
        cfg = self.engine.config
        needed = starts[-1] + self.T - self.frame0
        magnitude = self.spec[:, :needed, : cfg.F].abs()  # (C, n, F) from frame0
        if needed > magnitude.shape[1]:  # the end: zero frames, as the original pads
            magnitude = torch.nn.functional.pad(magnitude, (0, 0, 0, needed - magnitude.shape[1]))
        windows = [magnitude[:, s - self.frame0 : s - self.frame0 + self.T] for s in starts]
        batch = windows[0].unsqueeze(0) if len(windows) == 1 else torch.stack(windows)
        n_known = self.acc.shape[2]
        lo = starts[0] - self.frame0
        hi = lo + len(starts) * self.T
        if self.weights is None and hi <= n_known and self.step == self.T:
            # whole segments side by side: the model writes into the accumulator itself
            target = self.acc[:, :, lo:hi].unflatten(2, (len(starts), self.T))
            self.engine.estimate(batch, map_unets=self.map_unets, out=target.movedim(2, 0))
            self.weight_sum[lo:hi] = 1.0
            if self.on_segments is not None:
                self.on_segments(len(starts))
            return
        estimates = self.engine.estimate(batch, map_unets=self.map_unets)  # (S, I, C, T, F)
        for k, start in enumerate(starts):
            lo = start - self.frame0
            hi = min(lo + self.T, n_known)
            if self.weights is None:
                self.acc[:, :, lo:hi] = estimates[k, :, :, : hi - lo]
                self.weight_sum[lo:hi] = 1.0
            else:
                w = self.weights[: hi - lo]
                self.acc[:, :, lo:hi] += estimates[k, :, :, : hi - lo] * w[:, None]
                self.weight_sum[lo:hi] += w
        if self.on_segments is not None:
            self.on_segments(len(starts))

    def _output(self, upto: int) -> Iterator[dict[str, np.ndarray]]:
        """Mask, invert and emit frames [frame0, upto): no later segment touches them."""
        n = min(upto, self.n_frames_in) - self.frame0
        if n <= 0:
            return
        estimates = self.acc[:, :, :n]
        if self.weights is not None:
            estimates = estimates / self.weight_sum[:n, None]
        spec = self.spec[:, :n]
        window = self.engine.window
        if self.wiener is None:

            def masked(a: int, b: int) -> torch.Tensor:  # stem STFTs of frames [a, b)
                out = self._stems_buffer(b - a)
                return self.engine.apply_masks(estimates[:, :, a:b], spec[:, a:b], out=out)

            # on the CPU masked and inverted a few frames at a time, in its caches (a GPU
            # takes them all at once: fewer kernel launches)
            block = dsp.ISTFT_BLOCK if spec.device.type == "cpu" else n
            signal = dsp.istft_blocks(n, masked, window, frame_step=self.hop, block=block)
        else:
            magnitudes, mixture = self.engine.wiener_inputs(estimates, spec)
            if self.collecting:
                self.wiener.observe(magnitudes, mixture, full_x=spec)
                self._drop(n)
                return
            stems = self.wiener.apply(magnitudes, mixture)
            signal = dsp.istft(stems, window, frame_step=self.hop)
        # signal: from frame0 * hop
        overlap = self.tail.shape[-1]
        signal[..., :overlap] += self.tail
        self.tail = signal[..., n * self.hop :].clone()
        self._drop(n)
        end = min(self.frame0 * self.hop, self.n_fft + self.n_input)
        yield from self._emit(signal[..., : end - self.emitted], end)

    def _stems_buffer(self, n: int) -> torch.Tensor:
        """Return a zeroed (I, C, n, bins) complex buffer for the masked stems, kept.

        Only the masked bins are rewritten each time; the others stay zero. A few sizes
        are kept (the blocks of :func:`~splitstems.dsp.istft_blocks`, and the last one).
        """
        buffer = self._stems.get(n)
        if buffer is None:
            if len(self._stems) >= 4:
                self._stems.clear()
            shape = (*self.acc.shape[:2], n, self.spec.shape[-1])
            buffer = torch.zeros(shape, dtype=torch.complex64, device=self.engine.device)
            self._stems[n] = buffer
        return buffer

    def _drop(self, n: int) -> None:
        """Forget the first ``n`` frames (they are done)."""
        self.spec = self.spec[:, n:]
        self.acc = self.acc[:, :, n:]
        self.weight_sum = self.weight_sum[n:]
        self.frame0 += n

    def _emit(self, samples: torch.Tensor, end: int) -> Iterator[dict[str, np.ndarray]]:
        """Yield ``samples`` (I, C, n) covering padded positions [emitted, end)."""
        if self.collecting:
            self.emitted = end
            return
        # drop the prepended frame of zeros and the shift's zeros
        start = max(self.emitted, self.n_fft + self.shift)
        keep = samples[..., start - self.emitted :]
        self.emitted = end
        if keep.shape[-1] > 0:
            host = keep.cpu().numpy()
            # (C, n) → (n, C): np.stack of the channels copies ~3x faster than
            # ascontiguousarray of the transposed view (same values)
            yield {
                name: np.stack(host[i], axis=1) for i, name in enumerate(self.engine.instruments)
            }


def _opener(chunks: ChunkSource, n_passes: int) -> Callable[[], Iterable[np.ndarray]]:
    """Return a callable that gives the chunks once per pass (refusing one-shot iterators)."""
    if callable(chunks):
        return chunks  # type: ignore[return-value]
    if n_passes > 1 and iter(chunks) is chunks:  # type: ignore[arg-type]
        raise ValueError(
            "the Wiener filter reads the input more than once: pass a list of chunks "
            "or a callable that opens the stream again, not a one-shot iterator"
        )
    return lambda: chunks  # type: ignore[return-value]


class _ShiftMerger:
    """Averages the outputs of several streams of the same length, as they arrive."""

    def __init__(self, n_streams: int, instruments: tuple[str, ...]) -> None:
        self.instruments = instruments
        self.pending: list[list[dict[str, np.ndarray]]] = [[] for _ in range(n_streams)]
        self.available = [0] * n_streams

    def push(self, index: int, stems: dict[str, np.ndarray]) -> None:
        self.pending[index].append(stems)
        self.available[index] += next(iter(stems.values())).shape[0]

    def pop(self) -> dict[str, np.ndarray] | None:
        """Return the average of the samples that every stream has delivered (None: none yet)."""
        n = min(self.available)
        if n == 0:
            return None
        total: dict[str, np.ndarray] = {}
        for index, queue_ in enumerate(self.pending):
            taken = self._take(queue_, n)
            for name in self.instruments:
                total[name] = taken[name] if name not in total else total[name] + taken[name]
            self.available[index] -= n
        scale = np.float32(1.0 / len(self.pending))
        return {name: samples * scale for name, samples in total.items()}

    def _take(self, queue_: list[dict[str, np.ndarray]], n: int) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.instruments}
        need = n
        while need:
            head = queue_[0]
            size = next(iter(head.values())).shape[0]
            if size <= need:
                queue_.pop(0)
                for name in self.instruments:
                    parts[name].append(head[name])
                need -= size
            else:
                for name in self.instruments:
                    parts[name].append(head[name][:need])
                queue_[0] = {name: head[name][need:] for name in self.instruments}
                need = 0
        return {name: np.concatenate(arrays, axis=0) for name, arrays in parts.items()}


class OrderedWorker:
    """Runs calls one at a time, in order, in a background thread (e.g. encoding).

    At most ``depth`` calls wait; :meth:`submit` blocks beyond that, which bounds memory.
    The first error is raised by the next :meth:`submit` or by :meth:`join`.
    """

    def __init__(self, *, depth: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitstems-writer")
        self._pending: list[Future[None]] = []
        self._depth = max(1, depth)

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        """Queue ``fn(*args)``; raise the error of an earlier call if one failed."""
        waiting = []
        for future in self._pending:
            if future.done():
                future.result()
            else:
                waiting.append(future)
        self._pending = waiting
        while len(self._pending) >= self._depth:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(fn, *args))

    def join(self, *, raise_errors: bool = True) -> None:
        """Wait for every queued call; raise the first error unless ``raise_errors`` is False.

        ``raise_errors=False`` is the way out after a failure or an interrupt: the calls
        that have not started are dropped, only the running one is waited for.
        """
        if not raise_errors:
            for future in self._pending:
                future.cancel()  # False for the running call: it is waited for below
        try:
            for future in self._pending:
                if future.cancelled():
                    continue
                error = future.exception()
                if error is not None and raise_errors:
                    raise error
        finally:
            self._pending = []
            self._pool.shutdown(wait=True)

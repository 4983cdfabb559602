"""The separation engine: streaming, batching and device choice.

The only module that knows about memory and speed. Audio arrives in chunks of any size;
the engine keeps the original's grid of ``T``-frame segments from the start of the
stream (after Spleeter's prepended frame of zeros), runs the model on whole segments as
soon as their samples are in, and carries the STFT overlap (``frame_length - frame_step``
samples) across chunk boundaries. Output is therefore the same, sample for sample, as
running the original on the whole track at once, while memory is bounded by the chunk.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

from splitstems import dsp
from splitstems.config import ModelConfig
from splitstems.models.fast import FastSpleeterModel, fuse_for_inference
from splitstems.models.unet import SpleeterModel

__all__ = ["pick_device", "Engine", "PRECISIONS", "prefetch", "OrderedWorker"]

#: Model precisions: "float32" is faithful to the original; "fast" is bfloat16 on the CPU
#: and float16 on GPUs.
PRECISIONS = ("float32", "fast")
#: Longest cross-fade, in STFT frames (~0.74 s at 44.1 kHz), between overlapping segments.
CROSSFADE_FRAMES = 32


def pick_device(name: str | None = None) -> torch.device:
    """Return the torch device for ``name`` ("cpu", "cuda", "cuda:1", "mps" or None=auto).

    Auto picks CUDA when available, then Apple MPS, else the CPU.
    """
    if name and name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"unknown device {name!r} (use cpu, cuda, cuda:N or mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r} requested but Apple MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class Engine:
    """Streams a waveform through a Spleeter model, segment by segment.

    Args:
        model: the model, already loaded with weights (or its fused inference form).
        config: its configuration (STFT parameters, ``T``, ``F``, mask extension).
        device: where to compute (see :func:`pick_device`).
        batch_segments: how many ``T``-frame segments go through the model at once.
        mask_extension: override the config's mask extension ("zeros" or "average").
        precision: "float32" (faithful, the default) or "fast" (bfloat16 on the CPU,
            float16 on GPUs; masks, STFT and iSTFT stay float32).
        overlap: fraction of a segment by which consecutive segments overlap (0 = the
            original's grid); see :meth:`segment_weights` for how they are joined.
        fuse: run the fused inference form of the model (:mod:`splitstems.models.fast`);
            False runs the plain modules (the reference, slower).
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
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.config = config
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.dtype = torch.float32
        if precision == "fast":
            self.dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.overlap_frames = round(overlap * config.T)
        if isinstance(model, FastSpleeterModel) or not fuse:
            network = model.eval()
        else:
            network = fuse_for_inference(model)
        self.model = network.to(device=self.device, dtype=self.dtype)
        self.batch_segments = max(1, int(batch_segments))
        self.mask_extension = mask_extension or config.mask_extension
        self.window = dsp.hann_window(config.frame_length, device=self.device)

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
        chunks: Iterable[np.ndarray],
        *,
        on_segments: Callable[[int], None] | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Separate a stream of ``(n_samples, n_channels)`` float32 chunks.

        Yields dicts instrument → ``(n, n_channels)`` float32 arrays; their concatenation
        is the separation of the concatenated input, same length. ``on_segments(k)`` is
        called after each model batch of ``k`` segments (for progress bars).
        """
        state = _StreamState(self, on_segments)
        piece = self.batch_segments * self.segment_samples
        for chunk in chunks:
            array = np.asarray(chunk, dtype=np.float32)
            if array.ndim != 2 or array.shape[1] != self.config.n_channels:
                raise ValueError(
                    f"expected a (n_samples, {self.config.n_channels}) waveform, got {array.shape}"
                )
            for begin in range(0, array.shape[0], piece):  # bounded work per step
                yield from state.feed(array[begin : begin + piece])
        yield from state.finish()

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

    def estimate(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Model estimates for segments (S, C, T, F) → (S, I, C, T, F), float32."""
        return self.model(magnitude.to(self.dtype)).float()

    def apply_masks(self, estimates: torch.Tensor, spec: torch.Tensor) -> torch.Tensor:
        """Estimates (I, C, n, F) and mixture STFT (C, n, bins) → stem STFTs (I, C, n, ≤bins).

        With the "zeros" extension only the first F bins are returned (the rest are zero).
        """
        masks = dsp.ratio_masks(estimates, exponent=self.config.separation_exponent)
        if self.mask_extension == "zeros":
            spec = spec[..., : masks.shape[-1]]  # the bins above F are zero: iSTFT pads them
        else:
            masks = dsp.extend_mask(masks, n_bins=spec.shape[-1], mode=self.mask_extension)
        # real-valued mask times complex STFT, without promoting the mask to complex
        stems = torch.view_as_real(spec).unsqueeze(0) * masks.unsqueeze(-1)
        return torch.view_as_complex(stems)


class _StreamState:
    """The state of one stream through an :class:`Engine`.

    Frames are counted from the start of the padded signal (Spleeter prepends
    ``frame_length`` zeros).

    Samples → STFT frames → model segments (every ``T - overlap`` frames, their estimates
    cross-faded when they overlap) → masks on frames no later segment can touch →
    iSTFT, overlap-added with the tail carried from the previous step → output samples.
    """

    def __init__(self, engine: Engine, on_segments: Callable[[int], None] | None) -> None:
        cfg = engine.config
        self.engine, self.on_segments = engine, on_segments
        self.hop, self.n_fft, self.T = cfg.frame_step, cfg.frame_length, cfg.T
        self.step = cfg.T - engine.overlap_frames  # frames between segment starts
        self.weights = engine.segment_weights() if engine.overlap_frames else None
        device, n_ch, n_inst = engine.device, cfg.n_channels, len(cfg.instruments)
        self.samples = torch.zeros(n_ch, self.n_fft)  # padded coords from frame self.frame0
        self.n_input = 0
        self.frame0 = 0  # first frame of spec / acc / weight_sum, not yet output
        self.spec = torch.zeros(n_ch, 0, cfg.n_bins, dtype=torch.complex64, device=device)
        self.acc = torch.zeros(n_inst, n_ch, 0, cfg.F, device=device)
        self.weight_sum = torch.zeros(0, device=device)
        self.next_segment = 0  # start frame of the next model segment
        self.tail = torch.zeros(n_inst, n_ch, self.n_fft - self.hop, device=device)
        self.emitted = 0  # output samples (padded coords) emitted or skipped

    @property
    def n_frames_in(self) -> int:
        """Frames computed so far (absolute count)."""
        return self.frame0 + self.spec.shape[1]

    def feed(self, array: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        if not array.shape[0]:
            return
        self.n_input += array.shape[0]
        self.samples = torch.cat([self.samples, torch.from_numpy(array.T.copy())], dim=1)
        self._compute_frames()
        self._run_segments(total_frames=None)
        yield from self._output(self.next_segment)

    def finish(self) -> Iterator[dict[str, np.ndarray]]:
        if self.n_input == 0:
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
        spec = dsp.stft_frames(block, self.engine.window, frame_step=self.hop)
        self.samples = self.samples[:, n_new * self.hop :]
        self.spec = torch.cat([self.spec, spec], dim=1)
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
        batch = torch.stack(
            [magnitude[:, s - self.frame0 : s - self.frame0 + self.T] for s in starts]
        )
        estimates = self.engine.estimate(batch)  # (S, I, C, T, F)
        n_known = self.acc.shape[2]
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
        stems = self.engine.apply_masks(estimates, self.spec[:, :n])
        signal = dsp.istft(stems, self.engine.window, frame_step=self.hop)  # from frame0 * hop
        overlap = self.tail.shape[-1]
        signal[..., :overlap] += self.tail
        self.tail = signal[..., n * self.hop :].clone()
        self.spec = self.spec[:, n:]
        self.acc = self.acc[:, :, n:]
        self.weight_sum = self.weight_sum[n:]
        self.frame0 += n
        end = min(self.frame0 * self.hop, self.n_fft + self.n_input)
        yield from self._emit(signal[..., : end - self.emitted], end)

    def _emit(self, samples: torch.Tensor, end: int) -> Iterator[dict[str, np.ndarray]]:
        """Yield ``samples`` (I, C, n) covering padded positions [emitted, end)."""
        start = max(self.emitted, self.n_fft)  # drop the prepended frame of zeros
        keep = samples[..., start - self.emitted :]
        self.emitted = end
        if keep.shape[-1] > 0:
            host = keep.cpu().numpy()
            yield {
                name: np.ascontiguousarray(host[i].T)
                for i, name in enumerate(self.engine.instruments)
            }


T_co = TypeVar("T_co")
_DONE = object()


def prefetch(items: Iterable[T_co], *, depth: int = 2) -> Iterator[T_co]:
    """Iterate ``items`` in a background thread, up to ``depth`` items ahead.

    Decoding the next chunk then overlaps the model's compute on this one (the codecs
    release the GIL). Exceptions are re-raised in the consumer; closing the generator
    stops the producer.
    """
    buffer: queue.Queue[object] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            buffer.put(exc)

    thread = threading.Thread(target=produce, name="splitstems-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(timeout=5)


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
        """Wait for every queued call; raise the first error unless ``raise_errors`` is False."""
        try:
            for future in self._pending:
                error = future.exception()
                if error is not None and raise_errors:
                    raise error
        finally:
            self._pending = []
            self._pool.shutdown(wait=True)


def default_threads() -> int:
    """Threads torch should use on the CPU: all cores the process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)

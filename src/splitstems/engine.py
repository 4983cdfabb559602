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
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from splitstems import dsp
from splitstems.config import ModelConfig
from splitstems.models.fast import fuse_for_inference
from splitstems.models.unet import SpleeterModel

__all__ = ["pick_device", "Engine", "PRECISIONS"]

#: Model precisions: "float32" is faithful to the original; "fast" is bfloat16 on the CPU
#: and float16 on GPUs.
PRECISIONS = ("float32", "fast")


def pick_device(name: str | None = None) -> torch.device:
    """Return the torch device for ``name`` ("cpu", "cuda", "cuda:1", "mps" or None=auto).

    Auto picks CUDA when available, then Apple MPS, else the CPU.
    """
    if name and name != "auto":
        device = torch.device(name)
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
        model: the model, already loaded with weights.
        config: its configuration (STFT parameters, ``T``, ``F``, mask extension).
        device: where to compute (see :func:`pick_device`).
        batch_segments: how many ``T``-frame segments go through the model at once.
        mask_extension: override the config's mask extension ("zeros" or "average").
        precision: "float32" (faithful, the default) or "fast" (bfloat16 on the CPU,
            float16 on GPUs; masks, STFT and iSTFT stay float32).
        fuse: run the fused inference form of the model (:mod:`splitstems.models.fast`);
            False runs the plain modules (the reference, slower).
    """

    def __init__(
        self,
        model: SpleeterModel,
        config: ModelConfig,
        *,
        device: torch.device | str | None = None,
        batch_segments: int = 1,
        mask_extension: str | None = None,
        precision: str = "float32",
        fuse: bool = True,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.config = config
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.dtype = torch.float32
        if precision == "fast":
            self.dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        network = fuse_for_inference(model) if fuse else model.eval()
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
        cfg = self.config
        hop, n_fft, seg_frames = cfg.frame_step, cfg.frame_length, cfg.T
        overlap = n_fft - hop
        # Input buffer in "padded" coordinates: Spleeter prepends a frame of zeros.
        pending = [torch.zeros(cfg.n_channels, n_fft)]
        pending_len = n_fft
        frame0 = 0  # first frame not yet computed; the buffer starts at sample frame0 * hop
        n_input = 0
        tail: torch.Tensor | None = None  # overlap-add tail of the last block (C, overlap)
        emitted = 0  # output samples (padded coordinates) emitted or skipped so far
        block_frames = seg_frames * self.batch_segments
        block_samples = (block_frames - 1) * hop + n_fft

        def emit(samples: torch.Tensor, end: int) -> Iterator[dict[str, np.ndarray]]:
            # samples: (I, C, n) covering padded positions [emitted, end); drop the zeros frame.
            nonlocal emitted
            start = max(emitted, n_fft)
            keep = samples[..., start - emitted :]
            emitted = end
            if keep.shape[-1]:
                host = keep.float().cpu().numpy()
                yield {
                    name: np.ascontiguousarray(host[i].T) for i, name in enumerate(self.instruments)
                }

        def run(block: torch.Tensor, n_frames: int) -> torch.Tensor:
            # block: (C, samples) holding exactly the samples of frames [frame0, frame0+n_frames)
            nonlocal tail
            n_segments = -(-n_frames // seg_frames)
            spec = dsp.stft_frames(block.to(self.device), self.window, frame_step=hop)
            out = self._separate_spectrum(spec, n_segments)  # (I, C, n_frames, n_bins)
            frames = dsp.istft_frames(out, self.window)
            signal = dsp.overlap_add(frames, frame_step=hop)  # (I, C, (n-1)*hop + n_fft)
            if tail is not None:
                signal[..., :overlap] += tail
            tail = signal[..., -overlap:].clone()
            if on_segments is not None:
                on_segments(n_segments)
            return signal[..., :-overlap]

        for chunk in chunks:
            array = np.asarray(chunk, dtype=np.float32)
            if array.ndim != 2 or array.shape[1] != cfg.n_channels:
                raise ValueError(
                    f"expected a (n_samples, {cfg.n_channels}) waveform, got {array.shape}"
                )
            if not array.shape[0]:
                continue
            pending.append(torch.from_numpy(array.T.copy()))
            pending_len += array.shape[0]
            n_input += array.shape[0]
            while pending_len >= block_samples:
                buffer = torch.cat(pending, dim=1)
                signal = run(buffer[:, :block_samples], block_frames)
                frame0 += block_frames
                rest = buffer[:, block_frames * hop :]
                pending, pending_len = [rest], rest.shape[1]
                yield from emit(signal, frame0 * hop)
        if n_input == 0:
            return
        total_frames = dsp.n_frames_for(n_input, frame_length=n_fft, frame_step=hop)
        n_frames = total_frames - frame0
        buffer = torch.cat(pending, dim=1)
        padded_len = (n_frames - 1) * hop + n_fft
        buffer = torch.nn.functional.pad(buffer, (0, padded_len - buffer.shape[1]))
        signal = run(buffer, n_frames)
        signal = torch.cat([signal, tail], dim=-1)  # the final block's tail is complete
        end = n_fft + n_input
        yield from emit(signal[..., : end - emitted], end)

    def _separate_spectrum(self, spec: torch.Tensor, n_segments: int) -> torch.Tensor:
        """Mixture STFT (C, n_frames, n_bins) → separated STFTs (I, C, n_frames, n_bins)."""
        cfg = self.config
        n_channels, n_frames, n_bins = spec.shape
        magnitude = spec.abs()[..., : cfg.F]
        pad = n_segments * cfg.T - n_frames
        magnitude = torch.nn.functional.pad(magnitude, (0, 0, 0, pad))
        # (C, S*T, F) → (S, C, T, F)
        batch = magnitude.reshape(n_channels, n_segments, cfg.T, cfg.F).transpose(0, 1)
        estimates = self.model(batch.to(self.dtype)).float()  # (S, I, C, T, F)
        estimates = estimates.permute(1, 2, 0, 3, 4).reshape(
            len(self.instruments), n_channels, n_segments * cfg.T, cfg.F
        )[:, :, :n_frames]
        masks = dsp.ratio_masks(estimates, exponent=cfg.separation_exponent)
        masks = dsp.extend_mask(masks, n_bins=n_bins, mode=self.mask_extension)
        return masks * spec.unsqueeze(0)


def default_threads() -> int:
    """Threads torch should use on the CPU: all cores the process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)

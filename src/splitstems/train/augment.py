"""Optional data augmentation: random time stretch (x0.9-1.1) and pitch shift (±1 semitone).

Two ways, chosen with the ``augmentation`` config key (or ``--augment``):

- ``"spectrogram"``: the original's ``random_time_stretch`` / ``random_pitch_shift``
  (``spleeter/audio/spectrogram.py``): the magnitude crop is resized bilinearly along
  time, then centre-cropped or zero-padded back to ``T`` frames; and resized along
  frequency by ``2**(semitones/12)``, keeping the low ``F`` bins (zero-padded on top).
  Free: a few milliseconds per crop, no extra package.
- ``"audio"``: the waveform crop of every source is time-stretched and pitch-shifted by
  Rubber Band through Spotify's ``pedalboard`` (``pip install 'splitstems[train]'``),
  which keeps transients and formants; better sounding, but about 1 s of CPU per source
  per 12 s crop on a laptop core.

The same random factors are applied to the mix and to every instrument of a sample.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from splitstems.config import ModelConfig
from splitstems.errors import ConfigError

__all__ = ["Augmenter", "time_stretch", "pitch_shift", "STRETCH_RANGE", "SEMITONE_RANGE"]

#: Length factors of the random time stretch (the original's factor_min/factor_max).
STRETCH_RANGE = (0.9, 1.1)
#: Semitones of the random pitch shift (the original's shift_min/shift_max).
SEMITONE_RANGE = (-1.0, 1.0)


def time_stretch(mags: torch.Tensor, factor: float) -> torch.Tensor:
    """Stretch magnitudes ``(..., T, F)`` in time by a length ``factor``, as the original."""
    *lead, n_frames, n_bins = mags.shape
    stretched_frames = int(n_frames * factor)
    flat = mags.reshape(-1, 1, n_frames, n_bins)
    out = F.interpolate(flat, size=(stretched_frames, n_bins), mode="bilinear", align_corners=True)
    # tf.image.resize_image_with_crop_or_pad: central crop, or central zero padding.
    if stretched_frames >= n_frames:
        first = (stretched_frames - n_frames) // 2
        out = out[..., first : first + n_frames, :]
    else:
        before = (n_frames - stretched_frames) // 2
        out = F.pad(out, (0, 0, before, n_frames - stretched_frames - before))
    return out.reshape(*lead, n_frames, n_bins)


def pitch_shift(mags: torch.Tensor, semitones: float) -> torch.Tensor:
    """Shift magnitudes ``(..., T, F)`` in pitch as the original (keeps the low F bins)."""
    *lead, n_frames, n_bins = mags.shape
    shifted_bins = int(n_bins * 2.0 ** (semitones / 12.0))
    flat = mags.reshape(-1, 1, n_frames, n_bins)
    out = F.interpolate(flat, size=(n_frames, shifted_bins), mode="bilinear", align_corners=True)
    out = out[..., :n_bins]
    out = F.pad(out, (0, n_bins - out.shape[-1]))
    return out.reshape(*lead, n_frames, n_bins)


class Augmenter:
    """Takes the crops of a sample and augments them (or not), with a given generator."""

    def __init__(self, mode: str, config: ModelConfig) -> None:
        self.mode = mode
        self.config = config
        self._pedalboard = None
        if mode == "audio":
            try:
                import pedalboard
            except ImportError:
                raise ConfigError(
                    "augmentation 'audio' needs the pedalboard package: "
                    "pip install 'splitstems[train]' (or use 'spectrogram')"
                ) from None
            self._pedalboard = pedalboard

    def crop_waveforms(
        self, array: np.ndarray, length: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Return a random frame-aligned crop ``(S, C, length)`` of a chunk ``(S, C, n)``.

        With audio augmentation the crop is taken long enough to be stretched to
        ``length`` samples, and every source is stretched and pitch-shifted.
        """
        cfg = self.config
        n = array.shape[2]
        if self._pedalboard is None:
            n_frames = 1 + (n - cfg.frame_length) // cfg.frame_step
            first = int(rng.integers(0, n_frames - cfg.T + 1))
            begin = first * cfg.frame_step
            return np.array(array[:, :, begin : begin + length], dtype=np.float32)
        factor = float(rng.uniform(*STRETCH_RANGE))
        semitones = float(rng.uniform(*SEMITONE_RANGE))
        need = min(n, math.ceil(length / factor) + cfg.frame_step)
        first = int(rng.integers(0, (n - need) // cfg.frame_step + 1))
        begin = first * cfg.frame_step
        segment = np.array(array[:, :, begin : begin + need], dtype=np.float32)
        out = np.zeros((array.shape[0], array.shape[1], length), np.float32)
        for s in range(segment.shape[0]):
            # pedalboard's stretch_factor is a speed: > 1 shortens; ours is a length factor.
            stretched = self._pedalboard.time_stretch(
                segment[s],
                float(cfg.sample_rate),
                stretch_factor=1.0 / factor,
                pitch_shift_in_semitones=semitones,
            )
            m = min(length, stretched.shape[-1])
            out[s, :, :m] = stretched[:, :m]
        return out

    def spectrogram(self, mags: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Apply the original's spectrogram augmentation to ``(S, C, T, F)`` (if chosen)."""
        if self.mode != "spectrogram":
            return mags
        factor = float(rng.uniform(*STRETCH_RANGE))
        semitones = float(rng.uniform(*SEMITONE_RANGE))
        return pitch_shift(time_stretch(mags, factor), semitones)

"""A simple signal-to-distortion ratio for validation (museval's SDR lives elsewhere)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["sdr"]

_EPS = 1e-8


def sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Global SDR in dB: ``10 log10(sum s^2 / sum (s - s_hat)^2)`` over all samples.

    ``reference`` and ``estimate`` have the same shape (any; both channels count). This
    is the "SDR" of the MUSDB18 challenge's newer global metric (no allowed distortion
    filter), not museval's BSSEval v4 frame median.
    """
    ref = np.asarray(reference, dtype=np.float64)
    est = np.asarray(estimate, dtype=np.float64)
    n = min(ref.shape[0], est.shape[0])
    ref, est = ref[:n], est[:n]
    signal = float(np.sum(ref**2))
    error = float(np.sum((ref - est) ** 2))
    return 10.0 * math.log10((signal + _EPS) / (error + _EPS))

"""Helpers of the fidelity tests (importable: ``from fidelity import ...``)."""

from __future__ import annotations

import numpy as np

#: Agreement with the original Spleeter's outputs: float rounding only.
MIN_SDR_DB = 50.0


def sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Plain SDR in dB of an estimate against a reference (real or complex; no scaling)."""
    reference = reference.astype(np.complex128 if np.iscomplexobj(reference) else np.float64)
    error = np.sum(np.abs(reference - estimate) ** 2)
    return float(10 * np.log10(np.sum(np.abs(reference) ** 2) / max(error, 1e-300)))

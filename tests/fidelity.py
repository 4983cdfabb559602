"""Helpers of the fidelity tests (importable: ``from fidelity import ...``)."""

from __future__ import annotations

import numpy as np
import torch

#: Agreement with the original Spleeter's outputs: float rounding only.
MIN_SDR_DB = 50.0


def sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Plain SDR in dB of an estimate against a reference (real or complex; no scaling)."""
    reference = reference.astype(np.complex128 if np.iscomplexobj(reference) else np.float64)
    error = np.sum(np.abs(reference - estimate) ** 2)
    return float(10 * np.log10(np.sum(np.abs(reference) ** 2) / max(error, 1e-300)))


def randomise_batchnorm(model: torch.nn.Module) -> None:
    """Give every BatchNorm real statistics and affine terms (fresh ones are identities)."""
    gen = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)

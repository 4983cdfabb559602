"""Multichannel Wiener filter: norbert's ``wiener`` in torch, batched and streamable.

The original's ``--mwf`` runs ``norbert.wiener(v, x)`` on the whole track: ``v`` are the
model's magnitude estimates (zero above ``F``), ``x`` the mixture STFT. With its defaults
(``iterations=1``, ``use_softmask=True``, ``eps`` = float32's epsilon) that is:

1. ``y_j = v_j / (eps + sum_k v_k) * x`` (a magnitude ratio mask);
2. scale ``x`` and ``y`` by ``1 / m``, ``m = max(1, max|x| / 10)`` over the whole STFT;
3. per EM iteration, for each source ``j``: the power ``p_j(t, f) = mean_c |y_j(c, t, f)|²``
   and the spatial covariance ``R_j(f) = sum_t y_j y_jᴴ / (eps + sum_t p_j(t, f))``
   (sums over **all frames of the track**); then per frame the mixture covariance
   ``Cxx = sum_j p_j R_j + sqrt(eps) I`` and ``y_j = p_j R_j Cxx⁻¹ x``;
4. multiply by ``m``.

Only ``m`` and the ``R_j`` are global, and both are sums or maxima over frames. So the
filter streams in ``iterations + 1`` passes over the track (:class:`StreamingWiener`):
pass 0 accumulates ``max|x|`` and the statistics of ``y⁽⁰⁾``; pass ``k`` recomputes the
chain ``y⁽⁰⁾ … y⁽ᵏ⁾`` frame by frame with the ``R`` found so far and accumulates the
statistics of ``y⁽ᵏ⁾``; the last pass applies the filter and emits audio. Memory stays
that of one block of frames plus ``R`` (``n_sources × n_bins × C × C``); the price is
running the model once per pass. Statistics are summed in float64, so the result equals
norbert's on the whole track up to float32 rounding (> 100 dB, see tests/test_wiener.py).

Layouts: the engine's ``(n_sources, n_channels, n_frames, n_bins)`` for estimates and
stems, ``(n_channels, n_frames, n_bins)`` for the mixture; :func:`wiener` takes norbert's
``(n_frames, n_bins, n_channels, n_sources)`` for drop-in comparisons.
"""

from __future__ import annotations

import torch

__all__ = [
    "EPS",
    "softmask",
    "scale_factor",
    "WienerStatistics",
    "em_step",
    "wiener",
    "StreamingWiener",
]

#: norbert's default epsilon: that of the mixture STFT's real dtype (float32 in Spleeter).
EPS = float(torch.finfo(torch.float32).eps)


def _compute_dtype(device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """Real and complex dtypes to compute in: float64 except where a device lacks it."""
    if device.type == "mps":
        return torch.float32, torch.complex64
    return torch.float64, torch.complex128


def softmask(
    v: torch.Tensor, x: torch.Tensor, *, eps: float = EPS, use_softmask: bool = True
) -> torch.Tensor:
    """Return initial estimates from magnitudes ``v`` (I, C, n, B) and mixture ``x`` (C, n, B).

    ``use_softmask``: ``v_j / (eps + sum_k v_k) * x`` (norbert's default); otherwise
    ``v_j`` with the mixture's phase.
    """
    if use_softmask:
        return v / (eps + v.sum(dim=0, keepdim=True)) * x
    return v * torch.exp(1j * torch.angle(x))


def scale_factor(max_abs_x: float) -> float:
    """Return norbert's scale ``max(1, max|x| / 10)`` (in float32, as norbert computes it)."""
    value = float(torch.tensor(max_abs_x, dtype=torch.float32) / 10)
    return max(1.0, value)


class WienerStatistics:
    """Sums over frames that give each source's spatial covariance matrix.

    ``update`` takes source estimates ``y`` (I, C, n, B) for a block of frames; ``R`` is
    ``sum_t y yᴴ / (eps + sum_t mean_c |y|²)``, shape (I, B, C, C).
    """

    def __init__(
        self,
        n_sources: int,
        n_channels: int,
        n_bins: int,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.complex128,
    ) -> None:
        real = torch.float64 if dtype == torch.complex128 else torch.float32
        self.covariance = torch.zeros(
            n_sources, n_bins, n_channels, n_channels, dtype=dtype, device=device
        )
        self.power = torch.zeros(n_sources, n_bins, dtype=real, device=device)

    def update(self, y: torch.Tensor) -> None:
        """Add the frames of ``y`` (I, C, n, B)."""
        y = y.to(self.covariance.dtype)
        # sum_t y[c1] conj(y[c2]) → (I, B, C, C)
        self.covariance += torch.einsum("icnb,idnb->ibcd", y, y.conj())
        self.power += (y.real**2 + y.imag**2).mean(dim=1).sum(dim=1)

    def spatial_covariance(self, *, scale: float = 1.0, eps: float = EPS) -> torch.Tensor:
        """``R`` (I, B, C, C) of estimates that are to be divided by ``scale``."""
        s2 = scale * scale
        weight = eps + self.power / s2
        return (self.covariance / s2) / weight[..., None, None]


def _invert(matrix: torch.Tensor, eps: float) -> torch.Tensor:
    """Invert (..., C, C) matrices as norbert does (closed form for 1 and 2 channels)."""
    n = matrix.shape[-1]
    if n == 1:
        return 1.0 / (matrix + eps)
    if n == 2:
        a, b = matrix[..., 0, 0], matrix[..., 0, 1]
        c, d = matrix[..., 1, 0], matrix[..., 1, 1]
        inv_det = 1.0 / (a * d - b * c)
        row0 = torch.stack([inv_det * d, -inv_det * b], dim=-1)
        row1 = torch.stack([-inv_det * c, inv_det * a], dim=-1)
        return torch.stack([row0, row1], dim=-2)
    return torch.linalg.pinv(matrix, rtol=eps)


def em_step(
    y: torch.Tensor, x: torch.Tensor, covariances: torch.Tensor, *, eps: float = EPS
) -> torch.Tensor:
    """One EM update of the estimates ``y`` (I, C, n, B) of the frames of ``x`` (C, n, B).

    ``covariances`` (I, B, C, C) are the sources' spatial covariance matrices (from the
    statistics of ``y`` over the whole track). Returns ``p_j R_j Cxx⁻¹ x`` per source.
    """
    n_channels = x.shape[0]
    power = (y.real**2 + y.imag**2).mean(dim=1)  # (I, n, B)
    eye = torch.eye(n_channels, dtype=covariances.dtype, device=covariances.device)
    # Cxx (n, B, C, C) = sum_j p_j R_j + sqrt(eps) I
    mix = torch.einsum("inb,ibcd->nbcd", power.to(covariances.dtype), covariances)
    inv_mix = _invert(mix + eps**0.5 * eye, eps)
    gain = torch.einsum("ibce,nbed->inbcd", covariances, inv_mix)  # R_j Cxx⁻¹
    filtered = torch.einsum("inbcd,dnb->icnb", gain, x.to(gain.dtype))
    return filtered * power[:, None].to(filtered.dtype)


def wiener(
    v: torch.Tensor,
    x: torch.Tensor,
    *,
    iterations: int = 1,
    use_softmask: bool = True,
    eps: float | None = None,
) -> torch.Tensor:
    """Compute norbert's ``wiener(v, x)`` on a whole track, in torch (norbert's layout).

    Args:
        v: magnitudes (n_frames, n_bins, n_channels, n_sources), real.
        x: mixture STFT (n_frames, n_bins, n_channels), complex.
        iterations: EM iterations (0 = the soft mask only).
        use_softmask: initial estimates by soft mask (else magnitudes with mixture phase).
        eps: regularisation; None = the epsilon of ``x``'s real dtype (as norbert).

    Returns:
        The source STFTs (n_frames, n_bins, n_channels, n_sources), ``x``'s dtype.
    """
    if eps is None:
        eps = float(torch.finfo(x.real.dtype).eps)
    real, cplx = _compute_dtype(x.device)
    vs = v.permute(3, 2, 0, 1).to(real)  # (I, C, n, B)
    xs = x.permute(2, 0, 1).to(cplx)  # (C, n, B)
    y = softmask(vs, xs, eps=eps, use_softmask=use_softmask)
    if iterations:
        scale = scale_factor(float(x.abs().max()))
        xs, y = xs / scale, y / scale
        for _ in range(iterations):
            stats = WienerStatistics(*y.shape[:2], y.shape[-1], device=y.device, dtype=cplx)
            stats.update(y)
            y = em_step(y, xs, stats.spatial_covariance(eps=eps), eps=eps)
        y = y * scale
    return y.permute(2, 3, 1, 0).to(x.dtype)


class StreamingWiener:
    """The Wiener filter over a track that arrives in blocks of frames, in several passes.

    Run ``n_passes`` passes over the same frames, in order. In each pass but the last,
    call :meth:`observe` on every block, then :meth:`end_pass`; in the last, :meth:`apply`
    returns the filtered source STFTs of a block. The result equals :func:`wiener` on the
    whole track.

    Args:
        n_sources, n_channels, n_bins: shapes of the estimates the filter is given (the
            bins may stop below the STFT's: bins where every estimate is zero stay zero).
        iterations: EM iterations (norbert's default: 1; 0 = the soft mask, one pass).
        use_softmask: see :func:`softmask`.
        eps: regularisation (default: float32's epsilon, as the original).
        device: where to compute.
    """

    def __init__(
        self,
        n_sources: int,
        n_channels: int,
        n_bins: int,
        *,
        iterations: int = 1,
        use_softmask: bool = True,
        eps: float = EPS,
        device: torch.device | str = "cpu",
    ) -> None:
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}")
        self.shape = (n_sources, n_channels, n_bins)
        self.iterations = iterations
        self.use_softmask = use_softmask
        self.eps = eps
        self.device = torch.device(device)
        self.real, self.complex = _compute_dtype(self.device)
        self.covariances: list[torch.Tensor] = []  # R after each finished pass
        self.pass_index = 0
        self.max_abs = 0.0
        self.scale = 1.0
        self._stats = self._new_stats()

    @property
    def n_passes(self) -> int:
        """Passes over the track: one per EM iteration, plus the one that applies."""
        return self.iterations + 1

    @property
    def collecting(self) -> bool:
        """Whether the current pass only collects statistics."""
        return self.pass_index < self.iterations

    def _new_stats(self) -> WienerStatistics:
        n_sources, n_channels, n_bins = self.shape
        return WienerStatistics(
            n_sources, n_channels, n_bins, device=self.device, dtype=self.complex
        )

    def _chain(self, v: torch.Tensor, x: torch.Tensor, upto: int) -> torch.Tensor:
        """Return the estimates after ``upto`` EM steps (divided by the scale after pass 0)."""
        y = softmask(v.to(self.real), x, eps=self.eps, use_softmask=self.use_softmask)
        if self.pass_index == 0:
            return y
        x = x / self.scale
        y = y / self.scale
        for k in range(upto):
            y = em_step(y, x, self.covariances[k], eps=self.eps)
        return y

    def observe(self, v: torch.Tensor, x: torch.Tensor, *, full_x: torch.Tensor) -> None:
        """Add a block: magnitudes ``v`` (I, C, n, B) and mixture ``x`` (C, n, B).

        ``full_x`` is the block's mixture STFT with all its bins (for norbert's scale,
        the maximum of ``|x|`` over the whole STFT).
        """
        if not self.collecting:
            raise RuntimeError("observe() is for the statistics passes")
        if self.pass_index == 0 and full_x.numel():
            self.max_abs = max(self.max_abs, float(full_x.abs().max()))
        y = self._chain(v, x.to(self.complex), self.pass_index)
        self._stats.update(y)

    def end_pass(self) -> None:
        """Close a statistics pass: its covariances become known."""
        if not self.collecting:
            raise RuntimeError("no statistics pass to end")
        if self.pass_index == 0:
            self.scale = scale_factor(self.max_abs)
            # pass 0 summed unscaled estimates: R of y / scale
            covariance = self._stats.spatial_covariance(scale=self.scale, eps=self.eps)
        else:
            covariance = self._stats.spatial_covariance(eps=self.eps)
        self.covariances.append(covariance)
        self._stats = self._new_stats()
        self.pass_index += 1

    def apply(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Filter a block in the last pass → source STFTs (I, C, n, B), complex64."""
        if self.collecting:
            raise RuntimeError("apply() needs the statistics passes to be done")
        y = self._chain(v, x.to(self.complex), self.iterations)
        if self.iterations:
            y = y * self.scale
        return y.to(torch.complex64)

"""BSSEval v4 as museval computes it: SDR, ISR, SIR and SAR per 1 s window.

- :func:`bss_eval` computes what ``museval.evaluate(references, estimates)`` computes
  (BSSEval v4, "images" variant, time-invariant 512-tap distortion filters fitted on the
  whole signal, metrics per window): the filters with museval's own numpy/scipy
  arithmetic (their linear system is singular on band-limited audio, so only the same
  operations give the same SIR/ISR/SAR), the per-window projections and ratios batched in
  torch, float64 (agreement with museval: tests/test_metrics.py).
- :func:`score_targets` scores a track's estimates like ``museval.eval_mus_track``:
  vocals and accompaniment as their own 2-source problem, the other targets jointly, and
  returns museval's per-track JSON dict. ``backend="museval"`` calls museval itself.
- A ``stop`` event (``threading.Event``) ends the fast backend's work within one step
  (one FFT or solve of the filters, one batch of windows) with
  :class:`concurrent.futures.CancelledError`; museval's own computation cannot be
  stopped from another thread (run it in a process to end it early).

Which signal is the truth of a target (MUSDB's stems, its accompaniment) is the dataset's
business: :mod:`splitstems.evaluate`. Needs scipy (``pip install 'splitstems[eval]'``,
which also brings ``museval`` for ``backend="museval"``). torch is imported by the fast
backend only, so that processes running museval stay light.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from splitstems.errors import SplitstemsError

if TYPE_CHECKING:
    import torch

__all__ = [
    "METRICS",
    "TARGET_ORDER",
    "BACKENDS",
    "MUSEVAL_VERSION",
    "StopFlag",
    "bss_eval",
    "score_targets",
    "check_backend",
]

#: Metrics, in the order of the summary table.
METRICS = ("SDR", "SIR", "ISR", "SAR")
#: musdb's order of targets (museval scores them in this order).
TARGET_ORDER = ("vocals", "drums", "bass", "other", "accompaniment")
#: ``"fast"``: :func:`bss_eval`; ``"museval"``: ``museval.evaluate`` itself.
BACKENDS = ("fast", "museval")
#: The museval release whose BSSEval v4 :func:`bss_eval` reproduces (written to the JSON).
MUSEVAL_VERSION = "0.4.1"


class StopFlag(Protocol):
    """What ``stop`` arguments need: a ``threading.Event``, or anything with ``is_set()``."""

    def is_set(self) -> bool:
        """Whether the work should stop."""
        ...


def _checker(stop: StopFlag | None) -> Callable[[], None]:
    """Return a function raising :class:`CancelledError` once ``stop`` is set."""

    def check() -> None:
        if stop is not None and stop.is_set():
            raise CancelledError("the metrics were stopped")

    return check


def _frames(n_samples: int, window: int, hop: int) -> list[slice]:
    """Museval's ``Framing``: full windows every ``hop``; one window if it is too long."""
    if window >= n_samples:
        return [slice(0, n_samples)]
    n_windows = (n_samples - window + hop) // hop
    return [slice(t * hop, min(t * hop + window, n_samples)) for t in range(n_windows)]


def _museval_filters(
    ref: np.ndarray,
    est: np.ndarray,
    filters_len: int,
    check: Callable[[], None] = lambda: None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the distortion filters, computed with museval's own operations.

    ``ref``, ``est``: (J, N, C) float64. Returns the filters of each estimate on all
    references (E, J, C_in, L, C_out) and on its own reference (J, C_in, L, C_out).
    ``check`` is called between the steps (it raises to stop).

    The Gram matrix of the delayed references is singular for band-limited audio (e.g.
    AAC-coded MUSDB18: cond > 1e20). Its solution then depends on rounding, and so do
    SIR, ISR and SAR; to give museval's numbers, this step repeats museval's arithmetic
    operation for operation (scipy.fftpack FFTs, ``numpy.linalg.solve`` per estimate with
    ``eps I``, ``lstsq`` where LAPACK finds the matrix exactly singular).
    """
    try:
        from scipy import fftpack
        from scipy.linalg import toeplitz
    except ImportError:
        raise SplitstemsError("the metrics need scipy: pip install 'splitstems[eval]'") from None

    n_src, n_samples, n_ch = ref.shape
    length = filters_len
    n_fft = int(2 ** np.ceil(np.log2(n_samples + length - 1.0)))
    padded = np.zeros((n_src, n_ch, n_samples + length - 1))
    padded[..., :n_samples] = np.moveaxis(ref, 1, 2)
    sf = fftpack.fft(padded, n=n_fft, axis=2)
    gram = np.zeros((n_src, n_src, n_ch, n_ch, length, length))
    pairs = itertools.product(range(n_src), range(n_ch))
    for (i, c1), (j, c2) in itertools.combinations_with_replacement(pairs, 2):
        check()
        ssf = np.real(fftpack.ifft(sf[j, c2] * np.conj(sf[i, c1])))
        ss = toeplitz(np.hstack((ssf[0], ssf[-1:-length:-1])), r=ssf[:length])
        gram[j, i, c2, c1] = ss
        gram[i, j, c1, c2] = ss.T

    def solve(g: np.ndarray, sf_: np.ndarray, estimate: np.ndarray) -> np.ndarray:
        check()
        n = g.shape[0]
        padded_est = np.zeros((n_ch, n_samples + length - 1))
        padded_est[:, :n_samples] = estimate.T
        sef = fftpack.fft(padded_est, n=n_fft)
        cross = np.zeros((n, n_ch, length, n_ch))
        for j, cj, c in itertools.product(range(n), range(n_ch), range(n_ch)):
            ssef = np.real(fftpack.ifft(sf_[j, cj] * np.conj(sef[c])))
            cross[j, cj, :, c] = np.hstack((ssef[0], ssef[-1:-length:-1]))
        flat = np.moveaxis(g, (1, 3), (3, 4)).reshape(n * n_ch * length, -1)
        rhs = cross.reshape(n * n_ch * length, n_ch)
        eps = np.finfo(float).eps
        check()
        try:
            out = np.linalg.solve(flat + eps * np.eye(flat.shape[0]), rhs)
        except np.linalg.LinAlgError:
            out = np.linalg.lstsq(flat, rhs)[0]
        return out.reshape(n, n_ch, length, n_ch)

    filters = np.stack([solve(gram, sf, est[e]) for e in range(n_src)])
    own = np.stack([solve(gram[j, j][None, None], sf[j][None], est[j])[0] for j in range(n_src)])
    return filters, own


def _silent(x: np.ndarray) -> bool:
    """Museval's test of a whole ``(n, C)`` signal: its channel sum is zero everywhere."""
    return not np.any(x.sum(axis=-1))


def _any_silent(x: torch.Tensor) -> bool:
    """Museval's test: some source (J, C, n) whose channel sum is zero at every sample."""
    return bool((x.sum(dim=1) == 0).all(dim=-1).any())


def _db(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``10 log10(num / den)``, +inf where ``den`` is 0 (museval's ``_safe_db``)."""
    import torch

    ratio = num / den
    return torch.where(den == 0, torch.full_like(ratio, math.inf), 10 * torch.log10(ratio))


def bss_eval(
    references: np.ndarray | torch.Tensor,
    estimates: np.ndarray | torch.Tensor,
    *,
    window: int = 44100,
    hop: int = 44100,
    filters_len: int = 512,
    device: torch.device | str | None = None,
    window_batch: int = 8,
    stop: StopFlag | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """BSSEval v4 as ``museval.evaluate(references, estimates, win, hop)`` computes it.

    Args:
        references: ``(n_sources, n_samples, n_channels)``, the true sources.
        estimates: the same shape; zero-padded or cut to the references' length
            (museval's ``padding=True``).
        window: metric window in samples (museval: 1 s at 44.1 kHz).
        hop: hop between windows in samples (museval: 1 s at 44.1 kHz).
        filters_len: taps of the distortion filters (museval: 512).
        device: where to compute (float64; default CPU).
        window_batch: windows projected at once (memory vs speed).
        stop: once set (from another thread), the computation ends at its next step.

    Returns:
        ``(SDR, ISR, SIR, SAR)``, each ``(n_sources, n_windows)`` float64 in dB; NaN in
        windows where a reference or estimate is silent, +inf where an error term is 0.

    Raises:
        CancelledError: ``stop`` was set (:class:`concurrent.futures.CancelledError`).

    How: the projection filters solve, once per track, the least-squares fit of each
    estimate by the delayed references (the Gram matrix of delays ``0..filters_len-1`` of
    every reference channel, museval's ``G + eps I``), with museval's own arithmetic
    (:func:`_museval_filters`); then, batched in torch, each window's references are
    filtered (their own source's filters give the image, all sources' the image plus
    interference) and the four energy ratios follow. SDR is the plain signal-to-error
    ratio of the window.
    """
    import torch

    with torch.inference_mode():
        return _bss_eval(
            references,
            estimates,
            window=window,
            hop=hop,
            filters_len=filters_len,
            device=device,
            window_batch=window_batch,
            check=_checker(stop),
        )


def _bss_eval(
    references: np.ndarray | torch.Tensor,
    estimates: np.ndarray | torch.Tensor,
    *,
    window: int,
    hop: int,
    filters_len: int,
    device: torch.device | str | None,
    window_batch: int,
    check: Callable[[], None],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import torch

    check()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    ref = torch.as_tensor(np.asarray(references), dtype=torch.float64, device=dev)
    est = torch.as_tensor(np.asarray(estimates), dtype=torch.float64, device=dev)
    if ref.ndim != 3 or est.ndim != 3 or ref.shape[0] != est.shape[0]:
        raise ValueError(
            f"expected (sources, samples, channels) arrays, got {ref.shape}, {est.shape}"
        )
    n_src, n_samples, n_ch = ref.shape
    if est.shape[1] >= n_samples:
        est = est[:, :n_samples]
    else:
        est = torch.nn.functional.pad(est, (0, 0, 0, n_samples - est.shape[1]))
    filters_np, own_np = _museval_filters(ref.cpu().numpy(), est.cpu().numpy(), filters_len, check)
    length = filters_len
    filters = torch.from_numpy(filters_np).to(dev)  # (E, J, C_in, L, C_out)
    own = torch.from_numpy(own_np).to(dev)  # (J, C_in, L, C_out)
    ref = ref.permute(0, 2, 1).contiguous()  # (J, C, N)
    est = est.permute(0, 2, 1).contiguous()

    frames = _frames(n_samples, window, hop)
    results = torch.full((4, n_src, len(frames)), math.nan, dtype=torch.float64)
    width = frames[0].stop - frames[0].start
    n_fft = 1 << math.ceil(math.log2(width + length - 1))
    filters_f = torch.fft.rfft(filters, n=n_fft, dim=3)  # (E, J, Cin, f, Cout)
    own_f = torch.fft.rfft(own, n=n_fft, dim=2)  # (J, Cin, f, Cout)
    for first in range(0, len(frames), window_batch):
        check()
        group = frames[first : first + window_batch]  # all of one width
        refs = torch.stack([ref[..., w] for w in group])  # (W, J, C, n)
        ests = torch.stack([est[..., w] for w in group])
        ref_f = torch.fft.rfft(refs, n=n_fft)  # (W, J, C, f)
        full = torch.einsum("wjcf,ejcfd->wedf", ref_f, filters_f)
        image = torch.einsum("wecf,ecfd->wedf", ref_f, own_f)
        out = width + length - 1
        full = torch.fft.irfft(full, n=n_fft)[..., :out]  # (W, E, C, n + L - 1)
        image = torch.fft.irfft(image, n=n_fft)[..., :out]
        pad = (0, length - 1)
        s_true = torch.nn.functional.pad(refs, pad)
        s_est = torch.nn.functional.pad(ests, pad)

        def energy(x: torch.Tensor) -> torch.Tensor:
            return (x * x).sum(dim=(-2, -1))  # (W, E)

        true_energy = energy(s_true)
        sdr = _db(true_energy, energy(s_est - s_true))
        isr = _db(true_energy, energy(image - s_true))
        sir = _db(energy(image), energy(full - image))
        sar = _db(energy(full), energy(s_est - full))
        for k in range(len(group)):
            if _any_silent(refs[k]) or _any_silent(ests[k]):
                continue
            column = first + k
            for m, values in enumerate((sdr, isr, sir, sar)):
                results[m, :, column] = values[k].cpu()
    out_np = results.numpy()
    return out_np[0], out_np[1], out_np[2], out_np[3]


def _museval_eval(
    references: np.ndarray, estimates: np.ndarray, *, window: int, hop: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        import museval
    except ImportError:
        raise SplitstemsError(
            "the museval backend needs museval: pip install 'splitstems[eval]'"
        ) from None
    sdr, isr, sir, sar = museval.evaluate(references, estimates, win=window, hop=hop)
    return sdr, isr, sir, sar


def check_backend(backend: str) -> None:
    """Fail early when ``backend`` is unknown or its packages are not installed.

    Raises:
        ValueError: ``backend`` is not one of :data:`BACKENDS`.
        SplitstemsError: scipy, or museval for ``"museval"``, is not installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    try:
        import scipy  # noqa: F401 - the fast backend's filters
    except ImportError:
        raise SplitstemsError("the metrics need scipy: pip install 'splitstems[eval]'") from None
    if backend == "museval":
        try:
            import museval  # noqa: F401
        except ImportError:
            raise SplitstemsError(
                "the museval backend needs museval: pip install 'splitstems[eval]'"
            ) from None


def _quantize(value: float) -> float:
    """Museval's JSON values: 5 decimals, +-inf written as NaN."""
    if not math.isfinite(value):
        return math.nan
    return round(float(value), 5)


def score_targets(
    estimates: dict[str, np.ndarray],
    references: dict[str, np.ndarray],
    *,
    sample_rate: int = 44100,
    window: float = 1.0,
    hop: float = 1.0,
    backend: str = "fast",
    device: torch.device | str | None = None,
    stop: StopFlag | None = None,
) -> dict[str, Any]:
    """Score one track's estimates like ``museval.eval_mus_track``; return its JSON dict.

    Args:
        estimates: target → ``(n_samples, n_channels)`` estimate; targets outside
            :data:`TARGET_ORDER`, or without a reference, are skipped.
        references: target → the true signal, same layout (longer or shorter estimates
            are cut or zero-padded to it).
        sample_rate: of both, in Hz (``window`` and ``hop`` are in seconds).
        window: metric window in seconds (museval: 1 s).
        hop: hop between windows in seconds (museval: 1 s).
        backend: ``"fast"`` (:func:`bss_eval`) or ``"museval"`` (museval itself).
        device: where the fast backend computes (default CPU).
        stop: once set (from another thread), the fast backend stops at its next step;
            museval is stopped only between the two groups of targets.

    Returns:
        museval's per-track layout: ``{"targets": [{"name", "frames": [{"time",
        "duration", "metrics": {"SDR", "SIR", "SAR", "ISR"}}]}], "museval_version"}``,
        values rounded to 5 decimals, NaN where a window cannot be scored.

    Raises:
        ValueError: a true or estimated signal is silent throughout (museval refuses
            it), or ``backend`` is unknown.
        CancelledError: ``stop`` was set (:class:`concurrent.futures.CancelledError`).

    Vocals and accompaniment form their own 2-source problem; vocals, drums, bass and
    other are scored jointly (vocals is reported from its pair with accompaniment when
    both are there).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check = _checker(stop)
    targets = [t for t in TARGET_ORDER if t in estimates and t in references]
    win, step = int(window * sample_rate), int(hop * sample_rate)
    groups: list[tuple[list[str], list[str]]] = []  # (scored together, reported)
    has_acc = "vocals" in targets and "accompaniment" in targets
    rest = [t for t in targets if t != "accompaniment"] if has_acc else targets
    if len(rest) >= 2:
        groups.append((rest, [t for t in rest if not (has_acc and t == "vocals")]))
    if has_acc:
        groups.append((["vocals", "accompaniment"], ["vocals", "accompaniment"]))
    scores: dict[str, Any] = {"targets": [], "museval_version": MUSEVAL_VERSION}
    for names, reported in groups:
        check()
        refs = np.stack([references[t] for t in names])
        ests = np.stack([_fit(estimates[t], refs.shape[1]) for t in names])
        # museval refuses these (its validate()); both backends fail the track alike
        for kind, signals in (("true", refs), ("estimated", ests)):
            silent = [t for t, x in zip(names, signals, strict=True) if _silent(x)]
            if silent:
                stems = "stem is" if len(silent) == 1 else "stems are"
                raise ValueError(
                    f"the {kind} {', '.join(silent)} {stems} silent throughout (channels "
                    "summing to zero): BSSEval cannot score it"
                )
        if backend == "museval":
            values = _museval_eval(refs, ests, window=win, hop=step)
        else:
            values = bss_eval(refs, ests, window=win, hop=step, device=device, stop=stop)
        sdr, isr, sir, sar = values
        for i, name in enumerate(names):
            if name not in reported:
                continue
            frames = [
                {
                    "time": t * hop,
                    "duration": window,
                    "metrics": {
                        "SDR": _quantize(sdr[i][t]),
                        "SIR": _quantize(sir[i][t]),
                        "SAR": _quantize(sar[i][t]),
                        "ISR": _quantize(isr[i][t]),
                    },
                }
                for t in range(len(sdr[i]))
            ]
            scores["targets"].append({"name": name, "frames": frames})
    return scores


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    """Cut or zero-pad ``(samples, channels)`` to ``n`` samples (museval's padding)."""
    if x.shape[0] >= n:
        return x[:n]
    return np.pad(x, ((0, n - x.shape[0]), (0, 0)))

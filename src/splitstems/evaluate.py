"""Evaluation on MUSDB18-style data: museval's BSSEval v4 metrics, in torch.

- Datasets: MUSDB18 (``<root>/{train,test}/*.stem.mp4``, audio streams 0 mixture,
  1 drums, 2 bass, 3 other, 4 vocals) and MUSDB18-HQ (``<root>/{train,test}/<track>/``
  with ``mixture.wav``, ``drums.wav``, ``bass.wav``, ``other.wav``, ``vocals.wav``).
- Truth per model instrument: vocals, drums, bass and other are the stems; the 2-stem
  models' accompaniment is drums + bass + other (musdb's definition); piano (5 stems)
  has no truth in MUSDB and is not scored.
- Metrics: :func:`bss_eval` computes what ``museval.evaluate`` computes (BSSEval v4,
  "images" variant, time-invariant 512-tap distortion filters fitted on the whole track,
  metrics per 1 s window): the filters with museval's own numpy/scipy arithmetic (their
  linear system is singular on band-limited audio, so only the same operations give the
  same SIR/ISR/SAR), the per-window projections and ratios batched in torch, float64
  (agreement with museval: tests/test_evaluate.py). Tracks are scored like
  ``museval.eval_mus_track``: vocals and accompaniment as their own 2-source problem,
  drums/bass/other/vocals jointly.
- Output: one JSON per track in museval's layout (``<out>/<subset>/<track>.json``, readable
  by ``museval.EvalStore.add_eval_dir``), and a summary: the median over frames per track,
  then the median over tracks (the SiSEC 2018 protocol), per instrument and metric.

Needs scipy (``pip install 'splitstems[eval]'``, which also brings ``museval`` itself
for ``backend="museval"``: museval computes everything, about 2x slower on 2 sources).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splitstems import audio
from splitstems.errors import OutputError, SplitstemsError
from splitstems.files import atomic_write

__all__ = [
    "SOURCES",
    "METRICS",
    "DatasetError",
    "Track",
    "find_tracks",
    "reference_for",
    "bss_eval",
    "score_track",
    "Summary",
    "summarize",
    "evaluate",
]

#: MUSDB's sources, in the order of the streams 1..4 of a ``.stem.mp4``.
SOURCES = ("drums", "bass", "other", "vocals")
_STREAMS = {"mixture": 0, "drums": 1, "bass": 2, "other": 3, "vocals": 4}
#: Metrics, in the order of the summary table.
METRICS = ("SDR", "SIR", "ISR", "SAR")
#: musdb's order of targets (museval scores them in this order).
_TARGET_ORDER = ("vocals", "drums", "bass", "other", "accompaniment")
#: The museval release whose BSSEval v4 :func:`bss_eval` reproduces (written to the JSON).
MUSEVAL_VERSION = "0.4.1"
SAMPLE_RATE = 44100
#: Largest difference (seconds) tolerated between the stems' lengths, and between the
#: mixture's decoded length and its header's (codec priming and padding are ~50 ms).
LENGTH_TOLERANCE = 0.1


class DatasetError(SplitstemsError):
    """A MUSDB folder has no tracks, or a track lacks a stem."""


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class Track:
    """One MUSDB track: a ``.stem.mp4`` file or a MUSDB18-HQ folder of WAV files."""

    name: str
    subset: str
    path: Path

    @property
    def is_wav(self) -> bool:
        """Whether this is a MUSDB18-HQ folder."""
        return self.path.is_dir()

    def load(self, source: str = "mixture") -> np.ndarray:
        """Decode ``source`` ("mixture", "drums", "bass", "other", "vocals") at 44.1 kHz."""
        if source not in _STREAMS:
            raise ValueError(f"unknown source {source!r}")
        if self.is_wav:
            path = self.path / f"{source}.wav"
            if not path.is_file():
                others = sorted(p.name for p in self.path.glob(f"{source}.*"))
                hint = f" (found {', '.join(others)}; MUSDB18-HQ uses .wav)" if others else ""
                raise DatasetError(f"{self.path}: no {source}.wav{hint}")
            return audio.load(path, sample_rate=SAMPLE_RATE)
        return audio.load(self.path, stream=_STREAMS[source], sample_rate=SAMPLE_RATE)

    def load_all(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Return the mixture and the four sources, cut to a common length.

        Raises:
            DatasetError: the mixture decodes shorter than its header says (a truncated
                file), or the stems' lengths differ by more than :data:`LENGTH_TOLERANCE`.
        """
        mixture = self.load("mixture")
        sources = {name: self.load(name) for name in SOURCES}
        self._check_lengths({"mixture": mixture, **sources})
        n = min(x.shape[0] for x in [mixture, *sources.values()])
        return mixture[:n], {k: v[:n] for k, v in sources.items()}

    def _check_lengths(self, decoded: dict[str, np.ndarray]) -> None:
        seconds = {k: v.shape[0] / SAMPLE_RATE for k, v in decoded.items()}
        header = audio.probe(self.path / "mixture.wav" if self.is_wav else self.path).duration
        if header is not None and seconds["mixture"] < header - LENGTH_TOLERANCE:
            raise DatasetError(
                f"{self.path}: truncated: the mixture decodes to {seconds['mixture']:.2f} s "
                f"of the {header:.2f} s its header gives"
            )
        if max(seconds.values()) - min(seconds.values()) > LENGTH_TOLERANCE:
            lengths = ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items())
            raise DatasetError(f"{self.path}: the stems differ in length ({lengths})")


def find_tracks(
    root: str | os.PathLike[str], subset: str = "test", *, names: Sequence[str] | None = None
) -> list[Track]:
    """List the tracks of ``root/subset`` (MUSDB18 or MUSDB18-HQ), sorted by name.

    ``names`` keeps only those tracks (by name). Raises :class:`DatasetError` when none
    is found.
    """
    folder = Path(root) / subset
    if not folder.is_dir():
        hint = ""
        if Path(root).is_dir() and _tracks_in(Path(root), subset):
            hint = f"; {root} holds tracks itself: give the folder above it as --mus_dir"
        raise DatasetError(f"{folder}: no such folder (expected MUSDB18's train/ and test/){hint}")
    tracks = _tracks_in(folder, subset)
    if not tracks:
        raise DatasetError(
            f"{folder}: no MUSDB tracks (*.stem.mp4 files, or folders of mixture.wav, "
            "drums.wav, bass.wav, other.wav, vocals.wav)"
        )
    if names is not None:
        wanted = {_track_name(n) for n in names}
        missing = sorted(wanted - {t.name for t in tracks})
        if missing:
            raise DatasetError(f"{folder}: no track named {', '.join(repr(n) for n in missing)}")
        tracks = [t for t in tracks if t.name in wanted]
    seen: dict[str, Track] = {}
    for track in tracks:
        if track.name in seen:
            raise DatasetError(
                f"{folder}: two tracks named {track.name!r} ({seen[track.name].path.name} "
                f"and {track.path.name}); keep one"
            )
        seen[track.name] = track
    return tracks


def _track_name(name: str) -> str:
    """Return a track name given with or without ``.stem.mp4`` as the bare name."""
    return name[: -len(".stem.mp4")] if name.endswith(".stem.mp4") else name


def _tracks_in(folder: Path, subset: str) -> list[Track]:
    """List the ``.stem.mp4`` files and MUSDB18-HQ folders directly in ``folder``."""
    tracks = [
        Track(_track_name(path.name), subset, path)
        for path in folder.glob("*.stem.mp4")
        if path.is_file()
    ]
    # a -HQ folder with any stem is a track (one without mixture.wav then fails loudly)
    tracks += [
        Track(path.name, subset, path)
        for path in folder.iterdir()
        if path.is_dir() and any(any(path.glob(f"{stem}.*")) for stem in _STREAMS)
    ]
    return sorted(tracks, key=lambda t: (t.name, t.path.name))


def reference_for(instrument: str, sources: dict[str, np.ndarray]) -> np.ndarray | None:
    """Return the true signal of a model instrument, or None where MUSDB has none (piano)."""
    if instrument in sources:
        return sources[instrument]
    if instrument == "accompaniment":
        return sources["drums"] + sources["bass"] + sources["other"]
    return None


# --------------------------------------------------------------------------- metrics


def _frames(n_samples: int, window: int, hop: int) -> list[slice]:
    """Museval's ``Framing``: full windows every ``hop``; one window if it is too long."""
    if window >= n_samples:
        return [slice(0, n_samples)]
    n_windows = (n_samples - window + hop) // hop
    return [slice(t * hop, min(t * hop + window, n_samples)) for t in range(n_windows)]


def _museval_filters(
    ref: np.ndarray, est: np.ndarray, filters_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return the distortion filters, computed with museval's own operations.

    ``ref``, ``est``: (J, N, C) float64. Returns the filters of each estimate on all
    references (E, J, C_in, L, C_out) and on its own reference (J, C_in, L, C_out).

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
        ssf = np.real(fftpack.ifft(sf[j, c2] * np.conj(sf[i, c1])))
        ss = toeplitz(np.hstack((ssf[0], ssf[-1:-length:-1])), r=ssf[:length])
        gram[j, i, c2, c1] = ss
        gram[i, j, c1, c2] = ss.T

    def solve(g: np.ndarray, sf_: np.ndarray, estimate: np.ndarray) -> np.ndarray:
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
    ratio = num / den
    return torch.where(den == 0, torch.full_like(ratio, math.inf), 10 * torch.log10(ratio))


@torch.inference_mode()
def bss_eval(
    references: np.ndarray | torch.Tensor,
    estimates: np.ndarray | torch.Tensor,
    *,
    window: int = SAMPLE_RATE,
    hop: int = SAMPLE_RATE,
    filters_len: int = 512,
    device: torch.device | str | None = None,
    window_batch: int = 8,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """BSSEval v4 as ``museval.evaluate(references, estimates, win, hop)`` computes it.

    Args:
        references: ``(n_sources, n_samples, n_channels)``, the true sources.
        estimates: the same shape; zero-padded or cut to the references' length
            (museval's ``padding=True``).
        window: metric window in samples (museval: 1 s).
        hop: hop between windows in samples (museval: 1 s).
        filters_len: taps of the distortion filters (museval: 512).
        device: where to compute (float64; default CPU).
        window_batch: windows projected at once (memory vs speed).

    Returns:
        ``(SDR, ISR, SIR, SAR)``, each ``(n_sources, n_windows)`` float64 in dB; NaN in
        windows where a reference or estimate is silent, +inf where an error term is 0.

    How: the projection filters solve, once per track, the least-squares fit of each
    estimate by the delayed references (the Gram matrix of delays ``0..filters_len-1`` of
    every reference channel, museval's ``G + eps I``), with museval's own arithmetic
    (:func:`_museval_filters`); then, batched in torch, each window's references are
    filtered (their own source's filters give the image, all sources' the image plus
    interference) and the four energy ratios follow. SDR is the plain signal-to-error
    ratio of the window.
    """
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
    filters_np, own_np = _museval_filters(ref.cpu().numpy(), est.cpu().numpy(), filters_len)
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


BACKENDS = ("fast", "museval")


def check_backend(backend: str) -> None:
    """Fail early when ``backend`` is unknown or its packages are not installed."""
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


def score_track(
    estimates: dict[str, np.ndarray],
    sources: dict[str, np.ndarray],
    *,
    window: float = 1.0,
    hop: float = 1.0,
    backend: str = "fast",
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Score one track's estimates like ``museval.eval_mus_track``; return its JSON dict.

    ``estimates`` maps model instruments to ``(n_samples, 2)`` arrays; those without a
    truth in MUSDB (piano) are skipped. Vocals and accompaniment form their own
    2-source problem; vocals, drums, bass and other are scored jointly.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    targets = [t for t in _TARGET_ORDER if t in estimates]
    win, step = int(window * SAMPLE_RATE), int(hop * SAMPLE_RATE)
    groups: list[tuple[list[str], list[str]]] = []  # (scored together, reported)
    has_acc = "vocals" in targets and "accompaniment" in targets
    rest = [t for t in targets if t != "accompaniment"] if has_acc else targets
    if len(rest) >= 2:
        groups.append((rest, [t for t in rest if not (has_acc and t == "vocals")]))
    if has_acc:
        groups.append((["vocals", "accompaniment"], ["vocals", "accompaniment"]))
    scores: dict[str, Any] = {"targets": [], "museval_version": MUSEVAL_VERSION}
    for names, reported in groups:
        refs = np.stack([reference_for(t, sources) for t in names])  # type: ignore[misc]
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
            values = bss_eval(refs, ests, window=win, hop=step, device=device)
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


# --------------------------------------------------------------------------- summary


def _nanmedian(values: Sequence[float]) -> float:
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0 or np.isnan(data).all():
        return math.nan
    return float(np.nanmedian(data))


@dataclass
class Summary:
    """Scores of an evaluation: per track (median over frames) and overall.

    ``tracks[track][target][metric]`` is the median over the track's frames;
    ``scores[target][metric]`` the median of those over tracks (SiSEC 2018).
    """

    tracks: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    unscored: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)
    write_error: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    elapsed: float = 0.0

    def table(self) -> str:
        """Return the summary as a Markdown table (targets × metrics, dB)."""
        lines = [
            "| target | " + " | ".join(METRICS) + " |",
            "|---|" + "---:|" * len(METRICS),
        ]
        for target, values in self.scores.items():
            cells = " | ".join(f"{values.get(m, math.nan):.2f}" for m in METRICS)
            lines.append(f"| {target} | {cells} |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (NaN where nothing could be scored)."""
        return {
            "protocol": "BSSEval v4 (museval), 1 s windows; median over frames, "
            "then median over tracks",
            "scores": self.scores,
            "tracks": self.tracks,
            "unscored": self.unscored,
            "failed": self.failed,
            "resumed": self.resumed,
            "settings": self.settings,
            "elapsed_s": round(self.elapsed, 2),
        }


def summarize(track_scores: dict[str, dict[str, Any]]) -> Summary:
    """Aggregate museval track dicts (track name → JSON dict) as SiSEC 2018 does."""
    summary = Summary()
    for track, scores in track_scores.items():
        per_target: dict[str, dict[str, float]] = {}
        for target in scores["targets"]:
            per_target[target["name"]] = {
                metric: _nanmedian([float(f["metrics"][metric]) for f in target["frames"]])
                for metric in METRICS
            }
        summary.tracks[track] = per_target
    names: list[str] = []
    for per_target in summary.tracks.values():
        names += [t for t in per_target if t not in names]
    order = {t: i for i, t in enumerate(_TARGET_ORDER)}
    for target in sorted(names, key=lambda t: order.get(t, len(order))):
        summary.scores[target] = {
            metric: _nanmedian([v[target][metric] for v in summary.tracks.values() if target in v])
            for metric in METRICS
        }
    return summary


def load_summary(output_dir: str | os.PathLike[str], subset: str = "test") -> Summary:
    """Summarize the per-track JSON files already in ``output_dir/subset``."""
    folder = Path(output_dir) / subset
    scores = {
        path.name[: -len(".json")]: json.loads(path.read_text())
        for path in sorted(folder.glob("*.json"))
    }
    return summarize(scores)


# --------------------------------------------------------------------------- driver


_Loaded = tuple[np.ndarray, dict[str, np.ndarray]]


def _loaded(tracks: Sequence[Track]) -> Iterator[tuple[Track, _Loaded | SplitstemsError]]:
    """Decode each track; a track that cannot be read yields its error instead."""
    for track in tracks:
        try:
            yield track, track.load_all()
        except SplitstemsError as exc:
            yield track, exc


@dataclass
class _RunRecord:
    """What the per-track results in ``<out>/<subset>`` were computed with, and which.

    Saved as ``<out>/<subset>.settings.json`` when a run starts and after every track,
    so that a resumed run keeps exactly the results computed with its settings.
    """

    path: Path
    settings: dict[str, Any]
    done: list[str] = field(default_factory=list)
    targets: list[str] | None = None
    unscored: list[str] = field(default_factory=list)

    def save(self) -> None:
        """Write the record (whole or not at all)."""
        data = {
            "settings": self.settings,
            "done": self.done,
            "targets": self.targets,
            "unscored": self.unscored,
        }
        atomic_write(self.path, json.dumps(data, indent=2))

    def resumed(self) -> _RunRecord:
        """Return the earlier run's record; raise if there is none or it used other settings."""
        out = self.path.parent
        try:
            earlier = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise DatasetError(f"{out}: nothing to resume (no {self.path.name})") from None
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{self.path}: unreadable ({exc})") from None
        ok = isinstance(earlier, dict) and isinstance(earlier.get("settings"), dict)
        done, targets = (earlier.get("done"), earlier.get("targets")) if ok else (None, None)
        if not (
            ok
            and isinstance(done, list)
            and all(isinstance(n, str) for n in done)
            and (targets is None or isinstance(targets, list))
            and isinstance(earlier.get("unscored", []), list)
        ):
            raise DatasetError(f"{self.path}: not a record of a splitstems evaluation")
        if _compared(earlier["settings"]) != _compared(self.settings):
            old, new = _compared(earlier["settings"]), _compared(self.settings)
            changes = [
                f"{k} {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}"
                for k in sorted({*old, *new})
                if old.get(k) != new.get(k)
            ]
            raise DatasetError(
                f"{out}: cannot resume, the earlier run used other settings "
                f"({', '.join(changes)}); use another output folder"
            )
        unscored = [str(n) for n in earlier.get("unscored") or []]
        return _RunRecord(self.path, self.settings, list(done), targets, unscored)

    def result_path(self, name: str) -> Path:
        """Return where the result of track ``name`` is written: ``<out>/<subset>/name.json``."""
        return self.path.parent / self.settings["subset"] / f"{name}.json"

    def kept(self, tracks: Sequence[Track]) -> dict[str, dict[str, Any]]:
        """Read the results of ``tracks`` this record marks done and that are intact."""
        found: dict[str, dict[str, Any]] = {}
        for track in tracks:
            if track.name not in self.done:
                continue
            try:
                scores = json.loads(self.result_path(track.name).read_text())
            except (OSError, ValueError):
                scores = None
            if _intact(scores, self.targets):
                found[track.name] = scores
            else:  # redone
                self.done.remove(track.name)
        return found

    def add(self, name: str, scores: dict[str, Any]) -> None:
        """Mark ``name`` done with ``scores`` and save."""
        if self.targets is None:
            self.targets = [t["name"] for t in scores["targets"]]
        if name not in self.done:
            self.done.append(name)
        self.save()

    def drop(self, name: str) -> None:
        """Mark ``name`` not done (its result is gone) and save."""
        if name in self.done:
            self.done.remove(name)
            self.save()


def _intact(scores: Any, targets: list[str] | None) -> bool:
    """Whether ``scores`` is a whole museval track result (with ``targets``, if given)."""
    if not isinstance(scores, dict) or not isinstance(scores.get("targets"), list):
        return False
    names = []
    for target in scores["targets"]:
        frames = target.get("frames") if isinstance(target, dict) else None
        if not isinstance(frames, list) or not frames or not isinstance(target.get("name"), str):
            return False
        for frame in frames:
            metrics = frame.get("metrics") if isinstance(frame, dict) else None
            if not isinstance(metrics, dict) or not all(
                isinstance(metrics.get(m), int | float) for m in METRICS
            ):
                return False
        names.append(target["name"])
    return bool(names) and (targets is None or names == targets)


def check_resume(
    output_dir: str | os.PathLike[str],
    mus_dir: str | os.PathLike[str],
    subset: str = "test",
    *,
    backend: str = "fast",
    settings: dict[str, Any] | None = None,
) -> None:
    """Raise :class:`DatasetError` unless ``output_dir`` holds a run to resume with these."""
    run = _run_settings(mus_dir, subset, backend, settings)
    _RunRecord(_record_path(Path(output_dir), subset), run).resumed()


def _run_settings(
    mus_dir: str | os.PathLike[str], subset: str, backend: str, settings: dict[str, Any] | None
) -> dict[str, Any]:
    """Return what a run computes with: dataset, subset, metrics and the caller's settings."""
    dataset = str(Path(mus_dir).resolve())
    return {"mus_dir": dataset, "subset": subset, "backend": backend, **(settings or {})}


def _record_path(out: Path, subset: str) -> Path:
    return out / f"{subset}.settings.json"


def _cannot_write(path: Path, exc: OSError) -> OutputError:
    return OutputError(f"{path}: cannot write ({exc.strerror or exc})")


def _compared(settings: dict[str, Any]) -> dict[str, Any]:
    """Return the settings a resume must match.

    A model's name as typed is not compared when the sha256 of its configuration and
    weights is there (``./a.json`` is ``a.json``).
    """
    if "model_sha256" in settings:
        return {k: v for k, v in settings.items() if k != "model"}
    return settings


def _failure_message(track: Track, exc: Exception) -> str:
    """One line naming the track's file and the problem."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    return message if str(track.path) in message else f"{track.path}: {message}"


def evaluate(
    separate: Callable[[np.ndarray], dict[str, np.ndarray]],
    mus_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str] | None = None,
    *,
    subset: str = "test",
    tracks: Sequence[str] | None = None,
    backend: str = "fast",
    jobs: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
    on_failure: Callable[[Track, str], None] | None = None,
    resume: bool = False,
) -> Summary:
    """Separate and score every track of a MUSDB18(-HQ) subset.

    Args:
        separate: mixture ``(n_samples, 2)`` at 44.1 kHz → instrument → estimate, e.g.
            ``Separator(...).separate``.
        mus_dir: the dataset root (holding ``train/`` and ``test/``).
        output_dir: where to write ``<subset>/<track>.json`` and ``summary.json``
            (None: write nothing).
        subset: "test" or "train".
        tracks: only these track names.
        backend: "fast" (:func:`bss_eval`) or "museval" (museval itself, slower).
        jobs: tracks scored at the same time, in threads, while the next tracks are
            decoded and separated (torch and the decoders release the GIL).
        device: where the torch metrics are computed (default: CPU, float64).
        progress: show a progress bar (tqdm, on stderr).
        settings: recorded in the summary (what was evaluated).
        on_failure: called with the track and a one-line message when a track cannot
            be read, separated or scored; the other tracks go on either way.
        resume: keep the per-track results in ``output_dir`` that an earlier run with
            the same ``subset``, ``backend`` and ``settings`` finished (its record,
            ``<subset>.settings.json``, lists them) and score only the other tracks.

    Raises:
        DatasetError: ``resume`` without a record of an earlier run, or with one of other
            settings (nothing is separated then).
        OutputError: the record cannot be written (nothing is separated then). A
            ``summary.json`` that cannot be written is reported in
            :attr:`Summary.write_error` instead, so that the scores are not lost.

    Returns:
        The :class:`Summary`; instruments without a truth (piano) are listed in
        ``unscored``, tracks that failed in ``failed`` (name → message).
    """
    from tqdm.auto import tqdm

    from splitstems.engine import prefetch

    check_backend(backend)
    selected = find_tracks(mus_dir, subset, names=tracks)
    run = _run_settings(mus_dir, subset, backend, settings)
    out = Path(output_dir) if output_dir is not None else None
    results: dict[str, dict[str, Any]] = {}
    unscored: set[str] = set()
    record: _RunRecord | None = None
    if out is not None:
        record = _RunRecord(_record_path(out, subset), run)
        if resume:
            record = record.resumed()
            results = record.kept(selected)
            unscored.update(record.unscored)
        try:
            (out / subset).mkdir(parents=True, exist_ok=True)
            record.save()
        except OSError as exc:
            raise _cannot_write(record.path, exc) from None
    elif resume:
        raise ValueError("resume needs an output_dir")
    start = time.perf_counter()
    failed: dict[str, str] = {}
    pending: list[tuple[Track, Future[dict[str, Any]]]] = []
    bar = tqdm(total=len(selected), unit="track", disable=not progress, desc="evaluate")
    resumed = list(results)
    bar.update(len(resumed))

    def fail(track: Track, exc: Exception) -> None:
        failed[track.name] = message = _failure_message(track, exc)
        if record is not None:  # no stale scores beside this summary
            with contextlib.suppress(OSError):
                record.result_path(track.name).unlink(missing_ok=True)
                record.drop(track.name)
        bar.update(1)
        bar.set_postfix_str(f"{track.name[:20]}: failed", refresh=False)
        if on_failure is not None:
            with tqdm.external_write_mode(file=sys.stderr):
                on_failure(track, message)

    def collect(limit: int) -> None:
        while len(pending) > limit:
            track, future = pending.pop(0)
            try:
                scores = future.result()
            except (SplitstemsError, ValueError) as exc:
                fail(track, exc)
                continue
            if record is not None:
                path = record.result_path(track.name)
                try:
                    atomic_write(path, json.dumps(scores, indent=2, allow_nan=True))
                except OSError as exc:
                    fail(track, _cannot_write(path, exc))
                    continue
                try:
                    record.unscored = sorted(unscored)
                    record.add(track.name, scores)
                except OSError as exc:
                    fail(track, _cannot_write(record.path, exc))
                    continue
            results[track.name] = scores
            bar.update(1)
            bar.set_postfix_str(f"{track.name[:20]}: {_postfix(scores)}", refresh=False)

    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="splitstems-eval") as pool:
        try:
            todo = [t for t in selected if t.name not in results]
            for track, loaded in prefetch(_loaded(todo), depth=1):
                bar.set_description_str(f"evaluate {track.name[:30]}")
                try:
                    if isinstance(loaded, SplitstemsError):
                        raise loaded
                    mixture, sources = loaded
                    estimates = separate(mixture)
                except (SplitstemsError, ValueError) as exc:
                    fail(track, exc)
                    continue
                unscored.update(k for k in estimates if reference_for(k, sources) is None)
                scored = {
                    k: v for k, v in estimates.items() if reference_for(k, sources) is not None
                }
                future = pool.submit(score_track, scored, sources, backend=backend, device=device)
                pending.append((track, future))
                collect(max(1, jobs))
            collect(0)
        finally:
            bar.close()
    summary = summarize({t.name: results[t.name] for t in selected if t.name in results})
    summary.unscored = sorted(unscored)
    summary.failed = dict(sorted(failed.items()))
    summary.resumed = sorted(resumed)
    summary.elapsed = time.perf_counter() - start
    summary.settings = {**run, "tracks": len(selected)}
    if out is not None:
        path = out / "summary.json"
        try:
            atomic_write(path, json.dumps(_nan_to_none(summary.to_json()), indent=2))
        except OSError as exc:
            summary.write_error = str(_cannot_write(path, exc))
    return summary


def _nan_to_none(value: Any) -> Any:
    """Replace NaN by None (JSON null) throughout: strict JSON for the summary."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value


def _postfix(scores: dict[str, Any]) -> str:
    for target in scores["targets"]:
        if target["name"] == "vocals":
            sdr = _nanmedian([float(f["metrics"]["SDR"]) for f in target["frames"]])
            return f"vocals SDR {sdr:.2f} dB"
    return ""

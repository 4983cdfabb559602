"""Metrics: BSSEval v4 equal to museval's, museval's framing and track layout, stopping."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError
from pathlib import Path

import numpy as np
import pytest

from splitstems.evaluate import find_tracks, reference_for
from splitstems.metrics import _frames, bss_eval, check_backend, score_targets


@pytest.fixture(scope="module")
def musdb(shared_dir: Path) -> Path:
    return shared_dir / "audio" / "musdb7"


def test_framing_is_museval_s():
    assert _frames(308_700, 44100, 44100) == [slice(i * 44100, (i + 1) * 44100) for i in range(7)]
    assert _frames(1000, 44100, 44100) == [slice(0, 1000)]
    assert len(_frames(3 * 44100 - 1, 44100, 44100)) == 2


# Hollow Ground's references make a numerically singular system (band-limited AAC): only
# museval's own arithmetic for the filters gives museval's SIR/SAR there.
@pytest.mark.parametrize("name", ["BKS - Too Much", "Hollow Ground - Ill Fate"])
def test_bss_eval_agrees_with_museval_on_real_tracks(musdb, separator_2stems, name):
    museval = pytest.importorskip("museval")
    track = find_tracks(musdb, "test", names=[name])[0]
    mixture, sources = track.load_all()
    n = 3 * 44100 + 1234  # 3 full windows and a partial one, which museval drops
    estimates = separator_2stems.separate(mixture[:n])
    refs = np.stack([sources["vocals"][:n], reference_for("accompaniment", sources)[:n]])
    ests = np.stack([estimates["vocals"], estimates["accompaniment"]])
    expected = museval.evaluate(refs, ests)
    ours = bss_eval(refs, ests)
    for metric, a, b in zip(("SDR", "ISR", "SIR", "SAR"), expected, ours, strict=True):
        assert a.shape == b.shape == (2, 3)
        assert np.all(np.isfinite(b))
        assert np.max(np.abs(a - b)) < 0.01, metric


def test_bss_eval_agrees_with_museval_on_four_sources(musdb, rng):
    museval = pytest.importorskip("museval")
    track = find_tracks(musdb, "test", names=["Ben Carrigan - We'll Talk About It All Tonight"])[0]
    mixture, sources = track.load_all()
    n = 2 * 44100
    names = ("vocals", "drums", "bass", "other")
    refs = np.stack([sources[k][:n] for k in names])
    noise = 0.01 * rng.standard_normal((4, n, 2)).astype(np.float32)
    ests = 0.8 * refs + 0.05 * mixture[None, :n] + noise
    expected = museval.evaluate(refs, ests)
    ours = bss_eval(refs, ests)
    for metric, a, b in zip(("SDR", "ISR", "SIR", "SAR"), expected, ours, strict=True):
        assert a.shape == b.shape == (4, 2)
        assert np.max(np.abs(a - b)) < 0.01, metric


def test_bss_eval_marks_silent_windows_and_pads_short_estimates(rng):
    refs = rng.standard_normal((2, 3 * 1000, 2))
    refs[0, 1000:2000] = 0  # the first source is silent in the second window
    ests = refs[:, :-10] + 0.1 * rng.standard_normal((2, 3 * 1000 - 10, 2))
    sdr, isr, sir, sar = bss_eval(refs, ests, window=1000, hop=1000, filters_len=16)
    assert sdr.shape == (2, 3)
    assert np.isnan(sdr[:, 1]).all() and np.isnan(sar[:, 1]).all()
    assert np.all(sdr[:, 0] > 15) and np.all(np.isfinite(isr[:, [0, 2]]))


@pytest.mark.parametrize("backend", ["fast", "museval"])
@pytest.mark.parametrize("case", ["zeros", "antiphase", "silent estimate"])
def test_silent_stems_fail_alike_with_both_backends(rng, backend, case):
    if backend == "museval":
        pytest.importorskip("museval")
    sources = {k: rng.uniform(-0.2, 0.2, (44_100, 2)) for k in ("drums", "bass", "other")}
    left = rng.uniform(-0.2, 0.2, 44_100)
    sources["vocals"] = np.stack([left, -left], axis=1)  # channels sum to 0: silent to museval
    if case == "zeros":
        sources["vocals"] = np.zeros((44_100, 2))
    guess = rng.uniform(-0.1, 0.1, (44_100, 2))
    if case == "silent estimate":
        sources["vocals"] = guess
        guess = np.zeros_like(guess)
    estimates = {"vocals": guess, "accompaniment": sum(sources.values())}
    references = {
        "vocals": sources["vocals"],
        "accompaniment": sources["drums"] + sources["bass"] + sources["other"],
    }
    kind = "estimated" if case == "silent estimate" else "true"
    with pytest.raises(ValueError, match=f"the {kind} vocals stem is silent throughout"):
        score_targets(estimates, references, backend=backend)


def test_score_targets_groups_targets_as_eval_mus_track(rng):
    references = {k: rng.uniform(-0.2, 0.2, (3 * 44100, 2)) for k in ("vocals", "drums", "bass")}
    references["accompaniment"] = references["drums"] + references["bass"]
    estimates = {k: v + 0.01 * rng.standard_normal(v.shape) for k, v in references.items()}
    estimates["piano"] = estimates["bass"]  # no reference: not scored
    scores = score_targets(estimates, references)
    # vocals comes from its pair with accompaniment, after the joint drums/bass
    assert [t["name"] for t in scores["targets"]] == ["drums", "bass", "vocals", "accompaniment"]
    assert scores["museval_version"] == "0.4.1"
    frames = scores["targets"][0]["frames"]
    assert [f["time"] for f in frames] == [0.0, 1.0, 2.0]
    assert 15 < frames[0]["metrics"]["SDR"] < 30
    with pytest.raises(ValueError, match="backend must be one of"):
        check_backend("bsseval")
    with pytest.raises(ValueError, match="backend must be one of"):
        score_targets(estimates, references, backend="bsseval")


def test_a_set_stop_flag_ends_the_fast_backend(rng):
    refs = rng.uniform(-0.2, 0.2, (2, 4 * 44100, 2))
    ests = refs + 0.01 * rng.standard_normal(refs.shape)
    stop = threading.Event()
    assert bss_eval(refs, ests, stop=stop)[0].shape == (2, 4)
    stop.set()
    with pytest.raises(CancelledError):
        bss_eval(refs, ests, stop=stop)
    estimates = {"vocals": ests[0], "accompaniment": ests[1]}
    references = {"vocals": refs[0], "accompaniment": refs[1]}
    with pytest.raises(CancelledError):
        score_targets(estimates, references, stop=stop)


class _StopAfter:
    """A stop flag that turns set after ``n`` looks: it stops the work mid-way."""

    def __init__(self, n: int) -> None:
        self.looks = 0
        self.n = n

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks > self.n


# 4 sources of 10 s: 36 correlations and 8 solves for the filters (1 + 36 + 16 looks), then
# 2 batches of windows: stopped in each phase
@pytest.mark.parametrize("looks", [1, 20, 40, 54])
def test_the_fast_backend_looks_at_its_stop_flag_at_every_step(rng, looks):
    refs = rng.uniform(-0.2, 0.2, (4, 10 * 44100, 2))
    ests = refs + 0.01 * rng.standard_normal(refs.shape)
    stop = _StopAfter(looks)
    with pytest.raises(CancelledError):
        bss_eval(refs, ests, stop=stop, filters_len=32)
    assert stop.looks == looks + 1

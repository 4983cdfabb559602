"""The multichannel Wiener filter: equal to norbert, streamed, and to the original's --mwf."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fidelity import MIN_SDR_DB, sdr

from splitstems import audio
from splitstems.cli import main
from splitstems.engine import Engine
from splitstems.wiener import StreamingWiener, wiener


def random_problem(
    rng: np.random.Generator, n_frames: int = 40, n_bins: int = 33, n_sources: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Magnitudes (frames, bins, 2, sources) and a mixture STFT shaped like a real one."""
    shape = (n_frames, n_bins, 2)
    sources = (
        rng.standard_normal((*shape, n_sources)) + 1j * rng.standard_normal((*shape, n_sources))
    ) * rng.uniform(0.01, 30, (1, n_bins, 1, n_sources))
    x = sources.sum(axis=-1).astype(np.complex64)
    v = (np.abs(sources) * rng.uniform(0.5, 1.5, sources.shape)).astype(np.float32)
    v[:, -5:] = 0  # bins where the model says nothing (above F)
    return v, x


@pytest.mark.parametrize("iterations", [0, 1, 2])
@pytest.mark.parametrize("use_softmask", [True, False])
def test_wiener_equals_norbert(rng, iterations, use_softmask):
    norbert = pytest.importorskip("norbert")
    v, x = random_problem(rng)
    expected = norbert.wiener(v.copy(), x.copy(), iterations=iterations, use_softmask=use_softmask)
    ours = wiener(
        torch.from_numpy(v), torch.from_numpy(x), iterations=iterations, use_softmask=use_softmask
    ).numpy()
    assert ours.shape == expected.shape and ours.dtype == np.complex64
    for j in range(v.shape[-1]):
        assert sdr(expected[..., j], ours[..., j]) > 100.0, j


@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_streaming_wiener_equals_whole_track(rng, iterations):
    v, x = random_problem(rng, n_frames=57)
    expected = wiener(torch.from_numpy(v), torch.from_numpy(x), iterations=iterations)
    magnitudes = torch.from_numpy(v).permute(3, 2, 0, 1)  # (I, C, n, B)
    mixture = torch.from_numpy(x).permute(2, 0, 1)  # (C, n, B)
    n_used = v.shape[1] - 5  # the filter only sees the bins with estimates
    stream = StreamingWiener(v.shape[-1], 2, n_used, iterations=iterations)
    assert stream.n_passes == iterations + 1
    blocks = [(0, 7), (7, 30), (30, 31), (31, 57)]
    outputs = []
    for _ in range(stream.n_passes):
        for lo, hi in blocks:
            v_block = magnitudes[:, :, lo:hi, :n_used]
            x_block = mixture[:, lo:hi]
            if stream.collecting:
                stream.observe(v_block, x_block[..., :n_used], full_x=x_block)
            else:
                outputs.append(stream.apply(v_block, x_block[..., :n_used]))
        if stream.collecting:
            stream.end_pass()
    streamed = torch.cat(outputs, dim=2).permute(2, 3, 1, 0).numpy()
    whole = expected.numpy()
    assert np.all(whole[:, n_used:] == 0)  # no estimate above F: silence, as the original
    for j in range(v.shape[-1]):
        assert sdr(whole[:, :n_used, :, j], streamed[..., j]) > 100.0


@pytest.fixture(scope="module")
def mwf_engine(separator_2stems) -> Engine:
    """An MWF engine on the already loaded 2stems model."""
    base = separator_2stems.engine
    return Engine(base.model, base.config, device="cpu", mwf=True)


def test_mwf_matches_original_spleeter(mwf_engine, shared_dir):
    # concat_3 spans two model segments: the statistics cover both
    name = "concat_3"
    ref_dir = shared_dir / "audio" / "reference"
    waveform = audio.load(ref_dir / "inputs" / f"{name}.wav")
    stems = mwf_engine.separate(waveform)
    for instrument, estimate in stems.items():
        reference = audio.load(ref_dir / "2stems" / "mwf" / name / f"{instrument}.flac")
        assert estimate.shape == reference.shape == waveform.shape
        assert sdr(reference, estimate) >= MIN_SDR_DB, (name, instrument)


@pytest.mark.usefixtures("use_shared_models")
def test_separate_command_with_mwf_matches_original_spleeter(shared_dir, tmp_path):
    ref_dir = shared_dir / "audio" / "reference"
    args = ["separate", "--mwf", "--bit-depth", "32f", "-o", str(tmp_path), "--device", "cpu"]
    assert main([*args, str(ref_dir / "inputs" / "BKS_Too_Much.wav")]) == 0
    for instrument in ("vocals", "accompaniment"):
        reference = audio.load(ref_dir / "2stems" / "mwf" / "BKS_Too_Much" / f"{instrument}.flac")
        estimate = audio.load(tmp_path / "BKS_Too_Much" / f"{instrument}.wav")
        assert sdr(reference, estimate) >= MIN_SDR_DB, instrument


def test_average_extension_gives_the_filter_every_bin(separator_2stems, rng):
    base = separator_2stems.engine
    engine = Engine(base.model, base.config, mwf=True, mask_extension="average")
    estimates = torch.from_numpy(rng.uniform(0, 2, (2, 2, 5, base.config.F)).astype(np.float32))
    spec = torch.randn(2, 5, base.config.n_bins, dtype=torch.complex64)
    magnitudes, mixture = engine.wiener_inputs(estimates, spec)
    assert mixture.shape == spec.shape and magnitudes.shape == (2, 2, 5, base.config.n_bins)
    torch.testing.assert_close(magnitudes[..., : base.config.F], estimates)
    masks = estimates**2 / (estimates**2).sum(dim=0)
    expected = masks.mean(dim=-1, keepdim=True) * spec[..., base.config.F :].abs()
    torch.testing.assert_close(magnitudes[..., base.config.F :], expected, rtol=1e-4, atol=1e-6)


def test_mwf_exponent_raises_what_the_filter_sees(separator_2stems, rng):
    base = separator_2stems.engine
    plain = Engine(base.model, base.config, mwf=True, mask_extension="average")
    softer = Engine(base.model, base.config, mwf=True, mask_extension="average", mwf_exponent=0.7)
    estimates = torch.from_numpy(rng.uniform(0, 2, (2, 2, 5, base.config.F)).astype(np.float32))
    spec = torch.randn(2, 5, base.config.n_bins, dtype=torch.complex64)
    magnitudes, mixture = plain.wiener_inputs(estimates, spec)
    powered, same_mixture = softer.wiener_inputs(estimates, spec)
    torch.testing.assert_close(same_mixture, mixture)
    # per bin, divided by the largest source (the filter only uses ratios), then powered
    peak = magnitudes.amax(dim=0, keepdim=True)
    torch.testing.assert_close(powered, (magnitudes / peak) ** 0.7)
    ratios = powered[0] / powered[1]
    torch.testing.assert_close(ratios, (magnitudes[0] / magnitudes[1]) ** 0.7, rtol=1e-4, atol=0)


def test_mwf_exponent_changes_the_stems_and_one_is_the_original(mwf_engine, shared_dir):
    song = shared_dir / "audio" / "reference" / "inputs" / "BKS_Too_Much.wav"
    waveform = audio.load(song, duration=3.0)
    base = mwf_engine.separate(waveform)
    same = Engine(mwf_engine.model, mwf_engine.config, mwf=True, mwf_exponent=1.0)
    softer = Engine(mwf_engine.model, mwf_engine.config, mwf=True, mwf_exponent=0.7)
    out_same, out_soft = same.separate(waveform), softer.separate(waveform)
    for name in base:
        np.testing.assert_array_equal(out_same[name], base[name])
        assert sdr(base[name], out_soft[name]) < 60.0  # a different filter, not rounding


def test_a_large_mwf_exponent_neither_overflows_nor_silences(mwf_engine, shared_dir):
    song = shared_dir / "audio" / "reference" / "inputs" / "BKS_Too_Much.wav"
    loud = audio.load(song, duration=3.0)
    loud = loud / np.abs(loud).max()  # full scale: magnitudes in the hundreds
    engine = Engine(mwf_engine.model, mwf_engine.config, mwf=True, mwf_exponent=50.0)
    stems = engine.separate(loud)
    for name, samples in stems.items():
        assert np.isfinite(samples).all(), name
        assert np.sqrt(np.mean(samples**2)) > 1e-3, name


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf")])
def test_mwf_exponent_must_be_positive(mwf_engine, value):
    with pytest.raises(ValueError, match="mwf_exponent"):
        Engine(mwf_engine.model, mwf_engine.config, mwf=True, mwf_exponent=value)


def test_mwf_streams_in_any_chunks(mwf_engine, rng):
    waveform = rng.uniform(-0.5, 0.5, (3 * 44100 + 17, 2)).astype(np.float32)
    whole = mwf_engine.separate(waveform)
    cuts = [0, 1000, 50_000, 50_001, 100_000, waveform.shape[0]]
    pieces = [waveform[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    streamed = list(mwf_engine.stream(lambda: iter(pieces)))
    for name, samples in whole.items():
        joined = np.concatenate([chunk[name] for chunk in streamed])
        np.testing.assert_allclose(joined, samples, atol=1e-6)


def test_mwf_refuses_one_shot_iterators(mwf_engine):
    chunks = iter([np.zeros((44100, 2), np.float32)])
    with pytest.raises(ValueError, match="more than once"):
        list(mwf_engine.stream(chunks))


def test_shifts_average_delayed_separations(separator_2stems, rng):
    base = separator_2stems.engine
    engine = Engine(base.model, base.config, device="cpu", shifts=2)
    waveform = rng.uniform(-0.5, 0.5, (2 * 44100 + 5, 2)).astype(np.float32)
    delay = engine.shift_offsets[1]
    assert engine.shift_offsets == [0, delay] and delay > 0
    plain = base.separate(waveform)
    delayed = base.separate(np.concatenate([np.zeros((delay, 2), np.float32), waveform]))
    shifted = engine.separate(waveform)
    for name in plain:
        expected = (plain[name] + delayed[name][delay:]) / 2
        assert shifted[name].shape == waveform.shape
        np.testing.assert_allclose(shifted[name], expected, atol=1e-6)

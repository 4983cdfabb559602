"""The engine streams: any chunking gives the whole-track result, lengths are kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitstems.config import ModelConfig
from splitstems.engine import Engine, pick_device
from splitstems.models.unet import SpleeterModel

TINY = ModelConfig(
    name="tiny",
    instrument_list=("voice", "rest"),
    model_dir="tiny",
    frame_length=256,
    frame_step=64,
    T=64,
    F=64,
)


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    return Engine(SpleeterModel(TINY), TINY, device="cpu")


def test_chunked_stream_equals_whole(engine, rng):
    x = rng.uniform(-0.5, 0.5, (20_000, 2)).astype(np.float32)
    whole = engine.separate(x)
    for size in (1, 333, 4096, 7000, 50_000):
        chunks = [x[i : i + size] for i in range(0, len(x), size)] if size > 1 else [x[:5], x[5:]]
        parts = list(engine.stream(chunks))
        for name in TINY.instruments:
            joined = np.concatenate([p[name] for p in parts])
            np.testing.assert_array_equal(joined, whole[name])


@pytest.mark.parametrize("n", [1, 63, 64, 255, 256, 4031, 4032, 4033, 4096, 12_345])
def test_output_length_equals_input(engine, rng, n):
    x = rng.uniform(-0.5, 0.5, (n, 2)).astype(np.float32)
    out = engine.separate(x)
    assert set(out) == set(TINY.instruments)
    assert all(v.shape == (n, 2) and v.dtype == np.float32 for v in out.values())


def test_average_extension_stems_sum_to_mixture(rng):
    # Ratio masks sum to one; extended by "average" they cover every bin, so the stems
    # add up to the input whatever the weights: proves STFT, iSTFT and streaming carry.
    torch.manual_seed(1)
    engine = Engine(SpleeterModel(TINY), TINY, device="cpu", mask_extension="average")
    x = rng.uniform(-0.5, 0.5, (10_000, 2)).astype(np.float32)
    parts = list(engine.stream([x[:3000], x[3000:]]))
    total = sum(np.concatenate([p[name] for p in parts]) for name in TINY.instruments)
    np.testing.assert_allclose(total, x, atol=1e-5)


def test_zeros_extension_removes_high_frequencies(engine):
    # Above bin F the mask is zero: a tone at bin 100 (> F = 64) vanishes from every stem.
    t = np.arange(8192) / TINY.sample_rate
    tone = 0.5 * np.sin(2 * np.pi * (100 * TINY.sample_rate / TINY.frame_length) * t)
    out = engine.separate(np.stack([tone, tone], 1).astype(np.float32))
    assert max(np.abs(v[512:-512]).max() for v in out.values()) < 1e-3


def test_batched_segments_match_single(rng):
    torch.manual_seed(0)
    model = SpleeterModel(TINY)
    x = rng.uniform(-0.5, 0.5, (30_000, 2)).astype(np.float32)
    one = Engine(model, TINY, device="cpu", batch_segments=1).separate(x)
    three = Engine(model, TINY, device="cpu", batch_segments=3).separate(x)
    for name in TINY.instruments:
        np.testing.assert_allclose(three[name], one[name], atol=1e-5)


def test_rejects_wrong_channel_count(engine):
    with pytest.raises(ValueError, match="n_samples, 2"):
        engine.separate(np.zeros((100, 3), np.float32))


def test_pick_device_cpu_and_unavailable():
    assert pick_device("cpu").type == "cpu"
    assert pick_device(None).type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")

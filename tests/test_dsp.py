"""Spleeter-exact STFT framing, iSTFT, masks: checked against independent numpy code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitstems import dsp


def numpy_stft(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """tf.signal.stft(pad_end=True) of x after prepending n_fft zeros, written from the docs."""
    padded = np.concatenate([np.zeros(n_fft), x])
    n_frames = -(-len(padded) // hop)
    padded = np.pad(padded, (0, (n_frames - 1) * hop + n_fft - len(padded)))
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    frames = np.stack([padded[i * hop : i * hop + n_fft] for i in range(n_frames)])
    return np.fft.rfft(frames * window, axis=-1)


def test_frame_count_matches_tf_pad_end():
    # 300,000 samples + 4096 prepended → ceil(304096 / 1024) = 297 frames.
    assert dsp.n_frames_for(300_000, frame_length=4096, frame_step=1024) == 297
    assert dsp.n_frames_for(0, frame_length=4096, frame_step=1024) == 4
    assert dsp.n_frames_for(1, frame_length=4096, frame_step=1024) == 5


def test_periodic_hann_window():
    w = dsp.hann_window(8).numpy()
    np.testing.assert_allclose(w, 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(8) / 8), atol=1e-7)


def test_stft_matches_reference(rng):
    n_fft, hop = 256, 64
    x = rng.standard_normal(3001)
    expected = numpy_stft(x, n_fft, hop)
    n_frames = dsp.n_frames_for(len(x), frame_length=n_fft, frame_step=hop)
    padded = torch.nn.functional.pad(
        torch.tensor(x, dtype=torch.float32), (n_fft, (n_frames - 1) * hop + n_fft - n_fft - len(x))
    )
    got = dsp.stft_frames(padded, dsp.hann_window(n_fft), frame_step=hop).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_stft_written_into_out_in_blocks_is_the_same_bits(rng, monkeypatch):
    monkeypatch.setattr(dsp, "STFT_BLOCK", 7)
    window = dsp.hann_window(64)
    n_frames = 30  # 5 blocks, the last one short
    padded = torch.tensor(rng.standard_normal((2, (n_frames - 1) * 16 + 64)), dtype=torch.float32)
    expected = dsp.stft_frames(padded, window, frame_step=16)
    out = torch.zeros(2, n_frames + 3, 33, dtype=torch.complex64)  # written after 3 frames
    got = dsp.stft_frames(padded, window, frame_step=16, out=out[:, 3:])
    assert torch.equal(got, expected)
    assert torch.equal(out[:, 3:], expected) and not out[:, :3].any()


@pytest.mark.parametrize("n_fft,hop", [(16, 4), (12, 5)])
def test_overlap_add_matches_loop(rng, n_fft, hop):
    frames = torch.tensor(rng.standard_normal((2, 9, n_fft)), dtype=torch.float32)
    expected = np.zeros((2, 8 * hop + n_fft), np.float32)
    for i in range(9):
        expected[:, i * hop : i * hop + n_fft] += frames[:, i].numpy()
    np.testing.assert_allclose(dsp.overlap_add(frames, frame_step=hop).numpy(), expected, atol=1e-5)


def test_istft_of_stft_is_identity_with_compensation(rng):
    n_fft, hop = 4096, 1024
    x = torch.tensor(rng.standard_normal(20_000), dtype=torch.float32)
    window = dsp.hann_window(n_fft)
    n_frames = dsp.n_frames_for(len(x), frame_length=n_fft, frame_step=hop)
    padded = torch.nn.functional.pad(x, (n_fft, (n_frames - 1) * hop - len(x)))
    spec = dsp.stft_frames(padded, window, frame_step=hop)
    y = dsp.overlap_add(dsp.istft_frames(spec, window), frame_step=hop)[n_fft : n_fft + len(x)]
    np.testing.assert_allclose(y.numpy(), x.numpy(), atol=1e-4)


def test_fused_istft_equals_frames_then_overlap_add(rng):
    window = dsp.hann_window(64)
    spec = torch.tensor(
        rng.standard_normal((2, 7, 33)) + 1j * rng.standard_normal((2, 7, 33)),
        dtype=torch.complex64,
    )
    expected = dsp.overlap_add(dsp.istft_frames(spec, window), frame_step=16)
    torch.testing.assert_close(dsp.istft(spec, window, frame_step=16), expected)
    # Fewer bins: the missing ones are zero.
    padded = torch.cat([spec[..., :10], torch.zeros(2, 7, 23, dtype=torch.complex64)], -1)
    torch.testing.assert_close(
        dsp.istft(spec[..., :10], window, frame_step=16), dsp.istft(padded, window, frame_step=16)
    )


@pytest.mark.parametrize("n_frames", [3, 4, 9, 10, 11, 12, 13, 31, 40])
@pytest.mark.parametrize("block", [4, 5, 8])
def test_istft_in_blocks_is_the_same_bits(rng, n_frames, block):
    window = dsp.hann_window(64)  # 4 hops per frame, as Spleeter's
    spec = torch.tensor(
        rng.standard_normal((2, 3, n_frames, 33)) + 1j * rng.standard_normal((2, 3, n_frames, 33)),
        dtype=torch.complex64,
    )
    asked = []
    buffer = torch.empty(0, dtype=torch.complex64)

    def spectrum(a: int, b: int) -> torch.Tensor:
        asked.append((a, b))
        buffer.resize_(2, 3, b - a, 33).copy_(spec[..., a:b, :])  # one buffer, reused
        return buffer

    got = dsp.istft_blocks(n_frames, spectrum, window, frame_step=16, block=block)
    assert torch.equal(got, dsp.istft(spec, window, frame_step=16))
    # every frame asked for once, in order; no block but a lone one under 4 frames
    assert [f for a, b in asked for f in range(a, b)] == list(range(n_frames))
    assert all(b - a >= 4 for a, b in asked) or len(asked) == 1


def test_ratio_masks_formula_and_sum():
    out = torch.tensor([[3.0, 0.0], [4.0, 0.0]])
    masks = dsp.ratio_masks(out, exponent=2.0)
    np.testing.assert_allclose(masks[:, 0].numpy(), [9 / 25, 16 / 25], rtol=1e-6)
    # Silence: (0 + eps/2) / (0 + eps) = 1/2 for each instrument, as in the original.
    np.testing.assert_allclose(masks[:, 1].numpy(), [0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(masks.sum(0).numpy(), 1.0, rtol=1e-6)


def test_extend_mask_modes():
    mask = torch.tensor([[[0.2, 0.4, 0.9]]])
    zeros = dsp.extend_mask(mask, n_bins=5, mode="zeros")
    average = dsp.extend_mask(mask, n_bins=5, mode="average")
    assert zeros.shape == average.shape == (1, 1, 5)
    np.testing.assert_allclose(zeros[0, 0, 3:].numpy(), 0.0)
    np.testing.assert_allclose(average[0, 0, 3:].numpy(), 0.5, rtol=1e-6)
    with pytest.raises(ValueError):
        dsp.extend_mask(mask, n_bins=5, mode="bogus")

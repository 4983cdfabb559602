"""The fused inference form computes what the plain U-Nets compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from fidelity import randomise_batchnorm

from splitstems.config import load_config
from splitstems.models.fast import (
    _Conv,
    _pixel_shuffle,
    fuse_for_inference,
    phase_weights,
    polyphase_weight,
)
from splitstems.models.unet import SpleeterModel


def _transposed_conv(n_in: int, n_out: int):
    """A 5x5 stride-2 transposed convolution, an input and its TF "same" output (cropped)."""
    torch.manual_seed(0)
    deconv = torch.nn.ConvTranspose2d(n_in, n_out, 5, stride=2)
    x = torch.randn(2, n_in, 6, 10)
    return deconv, x, deconv(x)[..., 1:13, 1:21]


@pytest.mark.parametrize("n_in,n_out", [(4, 3), (3, 1)])
def test_polyphase_equals_cropped_transposed_conv(n_in, n_out):
    deconv, x, expected = _transposed_conv(n_in, n_out)
    poly = F.conv2d(
        F.pad(x, (1, 1, 1, 1)), polyphase_weight(deconv.weight), deconv.bias.repeat_interleave(4)
    )
    torch.testing.assert_close(F.pixel_shuffle(poly, 2), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["spleeter:2stems", "spleeter:4stems", "spleeter:5stems"])
def test_fused_model_matches_plain_model(name):
    torch.manual_seed(0)
    model = SpleeterModel(load_config(name)).eval()
    randomise_batchnorm(model)
    fast = fuse_for_inference(model)
    x = torch.rand(2, 2, 64, 128) * 2
    with torch.inference_mode():
        expected, got = model(x), fast(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_fused_model_moves_with_to():
    model = SpleeterModel(load_config("spleeter:2stems")).eval()
    fast = fuse_for_inference(model).to(dtype=torch.bfloat16)
    with torch.inference_mode():
        out = fast(torch.rand(1, 2, 64, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_fusing_leaves_the_model_alone():
    # The training flag stays, and no fused tensor is a view of a model parameter (a
    # later in-place change of one could not reach the other).
    model = SpleeterModel(load_config("spleeter:2stems")).train()
    fast = fuse_for_inference(model)
    assert model.training
    storages = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    for unet in fast.unets:
        tensors = [*unet.enc_weight, *unet.enc_bias, *unet.dec_bias, unet.last_weight]
        tensors += [w for phases in unet.dec_phases for _, _, w in phases]
        tensors += [unet.last_bias, unet.out_weight, unet.out_bias]
        tensors += [t for pair in (*unet.enc_bn, *unet.dec_bn, unet.last_bn) for t in pair]
        assert all(t.untyped_storage().data_ptr() not in storages for t in tensors)


def test_packed_convolutions_compute_what_conv2d_computes():
    # In inference mode the CPU convolutions use weights packed once into oneDNN's
    # layout; outside it, plain F.conv2d: on a whole segment (T=512, F=1024, where
    # F.conv2d runs oneDNN for every layer) the two agree bit for bit.
    torch.manual_seed(0)
    model = SpleeterModel(load_config("spleeter:2stems")).eval()
    randomise_batchnorm(model)
    x = torch.rand(1, 2, 512, 1024) * 2
    for dtype in (torch.float32, torch.bfloat16):
        fast = fuse_for_inference(model).to(dtype=dtype)
        with torch.no_grad():
            plain = fast(x.to(dtype))
        with torch.inference_mode():
            packed = fast(x.to(dtype))
            again = fast(x.to(dtype))  # the packed weights are reused
        assert torch.equal(packed, plain) and torch.equal(again, plain)


def test_packed_weights_are_kept_for_the_last_two_input_shapes_only():
    # the live path runs batches and windows of several sizes: every shape kept would
    # keep another ~98 MB of packed weights (2stems); evicted shapes are packed again
    torch.manual_seed(0)
    model = SpleeterModel(load_config("spleeter:2stems")).eval()
    fast = fuse_for_inference(model)
    first_conv = fast.unets[0].enc_conv[0]
    shapes = [(1, 2, 64, 1024), (2, 2, 64, 1024), (1, 2, 128, 1024), (1, 2, 64, 1024)]
    outputs = []
    with torch.inference_mode():
        for shape in shapes:
            outputs.append(fast(torch.rand(*shape, generator=torch.Generator().manual_seed(1))))
            assert len(first_conv.packed) <= _Conv.MAX_SHAPES == 2
        assert [key[:4] for key in first_conv.packed] == [(1, 2, 131, 1027), (1, 2, 67, 1027)]
        again = fast(torch.rand(*shapes[0], generator=torch.Generator().manual_seed(1)))
    assert torch.equal(again, outputs[0])  # packed again after eviction: the same numbers


@pytest.mark.parametrize("n_in,n_out", [(4, 3), (3, 1)])
def test_phase_convolutions_equal_cropped_transposed_conv(n_in, n_out):
    deconv, x, expected = _transposed_conv(n_in, n_out)
    phases = phase_weights(deconv.weight)
    assert sorted((p, q) for p, q, _ in phases) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for p, q, weight in phases:
        assert weight.shape[2:] == (2 + p, 2 + q)  # only the taps that reach the phase
        got = F.conv2d(x, weight, deconv.bias, padding=1)[..., :6, :10]
        torch.testing.assert_close(got, expected[..., p::2, q::2], rtol=1e-5, atol=1e-5)


def test_pixel_shuffle_into_channels_last():
    x = torch.randn(2, 8, 5, 7).contiguous(memory_format=torch.channels_last)
    got = _pixel_shuffle(x)
    assert torch.equal(got, F.pixel_shuffle(x, 2))
    assert got.is_contiguous(memory_format=torch.channels_last)

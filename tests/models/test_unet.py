"""The U-Net reproduces TensorFlow's layer semantics ("same" padding, transposed crop)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from splitstems.config import load_config
from splitstems.models.unet import DecoderBlock, EncoderBlock, SpleeterModel, UNet


def tf_same_conv(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """Conv2D padding="same" computed from TensorFlow's documented padding formula."""
    pads = []
    for n in reversed(x.shape[-2:]):  # width first, as F.pad wants
        out = math.ceil(n / stride)
        total = max((out - 1) * stride + weight.shape[-1] - n, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), weight, stride=stride)


def test_encoder_conv_is_tf_same_padding():
    torch.manual_seed(0)
    block = EncoderBlock(2, 4, "ELU")
    x = torch.randn(1, 2, 16, 24)
    expected = tf_same_conv(x, block.conv.weight, 2) + block.conv.bias[:, None, None]
    torch.testing.assert_close(block.convolve(x), expected)
    assert block.convolve(x).shape == (1, 4, 8, 12)


def test_transposed_conv_is_adjoint_of_same_conv():
    # TF's Conv2DTranspose "same" is the adjoint (gradient) of Conv2D "same".
    torch.manual_seed(0)
    enc = EncoderBlock(3, 5, "ELU")
    dec = DecoderBlock(5, 3, "ReLU", dropout=False)
    weight = torch.randn(5, 3, 5, 5)
    x, y = torch.randn(1, 3, 16, 20), torch.randn(1, 5, 8, 10)
    conv_x = tf_same_conv(x, weight, 2)
    dec.deconv.weight.data.copy_(weight)
    dec.deconv.bias.data.zero_()
    deconv_y = dec.deconv(y)[..., 1:17, 1:21]
    torch.testing.assert_close((conv_x * y).sum(), (deconv_y * x).sum(), rtol=1e-4, atol=1e-3)
    del enc


def test_unet_shapes_and_parameter_count():
    unet = UNet(2)
    n_params = sum(p.numel() for p in unet.parameters())
    assert 9.6e6 < n_params < 10.0e6  # ~9.8 M as the original's
    out = unet.eval()(torch.rand(2, 2, 64, 128))
    assert out.shape == (2, 2, 64, 128)


def test_skip_connection_uses_raw_convolution():
    # Changing a BatchNorm of the encoder must not change what the skip carries.
    torch.manual_seed(0)
    unet = UNet(2).eval()
    x = torch.rand(1, 2, 64, 64)
    conv = unet.encoder[0].convolve(x)
    unet.encoder[0].bn.running_mean.fill_(100.0)
    assert torch.equal(unet.encoder[0].convolve(x), conv)


@pytest.mark.parametrize("name", ["spleeter:2stems", "spleeter:5stems"])
def test_model_outputs_per_instrument(name):
    config = load_config(name)
    model = SpleeterModel(config).eval()
    magnitude = torch.rand(1, 2, 64, 64)
    with torch.inference_mode():
        out = model(magnitude)
    assert out.shape == (1, len(config.instruments), 2, 64, 64)
    assert (out >= 0).all()
    if config.model_type == "unet.softmax_unet":
        # Softmax masks across instruments sum to one: estimates sum to the input.
        torch.testing.assert_close(out.sum(1), magnitude, rtol=1e-5, atol=1e-6)
    else:
        assert (out <= magnitude.unsqueeze(1) + 1e-6).all()  # sigmoid masks


def test_state_dict_names_follow_instruments():
    model = SpleeterModel(load_config("spleeter:4stems"))
    names = model.state_dict().keys()
    assert "unets.drums.encoder.0.conv.weight" in names
    assert "unets.other.decoder.5.bn.running_var" in names
    assert "unets.bass.output.weight" in names


def test_uninitialised_models_draw_no_random_numbers():
    from splitstems.models.unet import uninitialised

    config = load_config("spleeter:2stems")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with uninitialised():
        SpleeterModel(config)
    assert torch.equal(torch.rand(3), expected)  # no initialisation ran
    torch.manual_seed(0)
    initialised = SpleeterModel(config)  # outside: as torch initialises (training)
    assert not torch.equal(torch.rand(3), expected)
    torch.manual_seed(0)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            initialised.state_dict().values(),
            SpleeterModel(config).state_dict().values(),
            strict=True,
        )
    )

"""Spleeter's U-Net and softmax U-Net as plain ``nn.Module``s.

Tensors in, tensors out: the model sees magnitude spectrograms shaped
``(batch, n_channels, T, F)`` (time frames are the height axis, frequency bins the
width axis) and returns one magnitude estimate per instrument. Layer for layer the
Keras graph of ``spleeter/model/functions/unet.py``, including TensorFlow's asymmetric
"same" padding, the transposed-convolution crop and the skip connections taken
before BatchNorm.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from splitstems.config import DEFAULT_CONV_N_FILTERS, ModelConfig
from splitstems.errors import CheckpointError

__all__ = ["UNet", "SpleeterModel", "ENCODER_FILTERS", "DECODER_FILTERS"]

ENCODER_FILTERS = DEFAULT_CONV_N_FILTERS  # (16, 32, 64, 128, 256, 512)
DECODER_FILTERS = (256, 128, 64, 32, 16, 1)
KERNEL = 5
BN_EPSILON = 1e-3  # Keras BatchNormalization default
BN_MOMENTUM = 0.01  # Keras momentum 0.99


_init = threading.local()


@contextlib.contextmanager
def uninitialised() -> Iterator[None]:
    """Build models whose convolutions skip their random initialisation (this thread only).

    For models whose weights are loaded right after (all of them: :meth:`load_weights`
    refuses a state dict that leaves any out); saves ~0.08 s per 2stems model.
    """
    before = getattr(_init, "skip", False)
    _init.skip = True
    try:
        yield
    finally:
        _init.skip = before


class _SkippableInit:
    """Mixin for torch layers: their initialisation is skipped inside :func:`uninitialised`."""

    def reset_parameters(self) -> None:
        """Initialise as torch does, unless inside :func:`uninitialised`."""
        if not getattr(_init, "skip", False):
            super().reset_parameters()  # type: ignore[misc]


class Conv2d(_SkippableInit, nn.Conv2d):
    """``nn.Conv2d`` whose initialisation :func:`uninitialised` can skip."""


class ConvTranspose2d(_SkippableInit, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` whose initialisation :func:`uninitialised` can skip."""


def make_activation(name: str) -> nn.Module:
    """Return the activation Spleeter builds for a config name (LeakyReLU slope 0.2)."""
    if name == "ReLU":
        return nn.ReLU()
    if name == "ELU":
        return nn.ELU()
    return nn.LeakyReLU(0.2)


class EncoderBlock(nn.Module):
    """Conv2D 5x5 stride 2 "same" (TF padding) followed by BatchNorm and activation."""

    def __init__(self, in_channels: int, out_channels: int, activation: str) -> None:
        super().__init__()
        self.conv = Conv2d(in_channels, out_channels, KERNEL, stride=2)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPSILON, momentum=BN_MOMENTUM)
        self.act = make_activation(activation)

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        """Return the raw convolution (the skip connection): (B, C, H, W) → (B, C', H/2, W/2)."""
        # TF "same" at stride 2 with k=5 pads 1 before and 2 after on both axes.
        return self.conv(F.pad(x, (1, 2, 1, 2)))

    def activate(self, conv: torch.Tensor) -> torch.Tensor:
        """Return activation(BatchNorm(conv)), the input of the next block."""
        return self.act(self.bn(conv))


class DecoderBlock(nn.Module):
    """Conv2DTranspose 5x5 stride 2 "same" followed by activation, BatchNorm, dropout."""

    def __init__(self, in_channels: int, out_channels: int, activation: str, dropout: bool) -> None:
        super().__init__()
        self.deconv = ConvTranspose2d(in_channels, out_channels, KERNEL, stride=2)
        self.act = make_activation(activation)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPSILON, momentum=BN_MOMENTUM)
        self.dropout = nn.Dropout(0.5) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, C', 2H, 2W)."""
        height, width = x.shape[-2:]
        # PyTorch gives 2n + 3 outputs; TF's "same" output is the slice [1 : 1 + 2n].
        up = self.deconv(x)[..., 1 : 1 + 2 * height, 1 : 1 + 2 * width]
        return self.dropout(self.bn(self.act(up)))


class UNet(nn.Module):
    """One instrument's U-Net (~9.8 M parameters), returning a mask or mask logits.

    ``conv_n_filters`` are the six encoder filter counts (Spleeter's model parameter of the
    same name); the decoder mirrors them: ``(f[4], f[3], f[2], f[1], f[0], 1)``.
    """

    def __init__(
        self,
        n_channels: int = 2,
        *,
        conv_activation: str = "LeakyReLU",
        deconv_activation: str = "ReLU",
        conv_n_filters: tuple[int, ...] = ENCODER_FILTERS,
    ) -> None:
        super().__init__()
        encoder_filters = tuple(conv_n_filters)
        decoder_filters = (*reversed(encoder_filters[:-1]), 1)  # 256, 128, 64, 32, 16, 1
        in_channels = (n_channels, *encoder_filters[:-1])
        self.encoder = nn.ModuleList(
            EncoderBlock(i, o, conv_activation)
            for i, o in zip(in_channels, encoder_filters, strict=True)
        )
        skips = tuple(reversed(encoder_filters[:-1]))  # 256, 128, 64, 32, 16
        dec_in = (
            encoder_filters[-1],
            *(s + d for s, d in zip(skips, decoder_filters[:-1], strict=True)),
        )
        self.decoder = nn.ModuleList(
            DecoderBlock(i, o, deconv_activation, dropout=j < 3)
            for j, (i, o) in enumerate(zip(dec_in, decoder_filters, strict=True))
        )
        # Conv2D(n_channels, 4x4, dilation 2, "same"): symmetric padding 3.
        self.output = Conv2d(decoder_filters[-1], n_channels, 4, dilation=2, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Magnitudes (B, n_channels, T, F) → mask logits (B, n_channels, T, F)."""
        skips = []
        h = x
        for i, block in enumerate(self.encoder):
            conv = block.convolve(h)
            skips.append(conv)
            if i < len(self.encoder) - 1:  # the 6th activation is computed and discarded
                h = block.activate(conv)
        h = skips.pop()  # the decoder starts from the raw 6th convolution
        for block in self.decoder:
            h = block(h)
            if skips:
                h = torch.cat([skips.pop(), h], dim=1)  # skip first, as Keras concatenates
        return self.output(h)


class SpleeterModel(nn.Module):
    """All instruments' U-Nets of a Spleeter model (``unet.unet`` or ``unet.softmax_unet``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.instruments = tuple(config.instruments)
        self.softmax = config.model_type == "unet.softmax_unet"
        self.unets = nn.ModuleDict(
            {
                name: UNet(
                    config.n_channels,
                    conv_activation=config.conv_activation,
                    deconv_activation=config.deconv_activation,
                    conv_n_filters=config.conv_n_filters,
                )
                for name in self.instruments
            }
        )

    def load_weights(self, state: dict[str, torch.Tensor], *, source: str) -> SpleeterModel:
        """Load a state dict that must fit exactly (BatchNorm step counters aside).

        The model takes the tensors of ``state`` as they are (no copy; converted only
        where their dtype differs from the model's): pass tensors nothing else changes.

        Raises:
            CheckpointError: names missing or unexpected, or shapes that differ;
                ``source`` names the weights in the message.
        """
        own = {k: v for k, v in self.state_dict().items() if not k.endswith("num_batches_tracked")}
        missing = sorted(own.keys() - state.keys())
        unexpected = sorted(state.keys() - own.keys())
        if missing or unexpected:
            problems = [
                f"{len(names)} {what}: {', '.join(names[:2])}{', ...' if len(names) > 2 else ''}"
                for what, names in (("missing", missing), ("unexpected", unexpected))
                if names
            ]
            raise CheckpointError(
                f"{source}: the weights do not fit the model ({'; '.join(problems)})"
            )
        wrong = [
            f"{name} {tuple(state[name].shape)}, expected {tuple(own[name].shape)}"
            for name in sorted(own)
            if tuple(state[name].shape) != tuple(own[name].shape)
        ]
        if wrong:
            more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
            raise CheckpointError(
                f"{source}: the weights do not fit the model (shapes: {'; '.join(wrong[:3])}{more})"
            )
        try:
            # assign: the loaded tensors become the parameters, no copy (30 ms, 2stems)
            state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
            self.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as exc:
            cause = " ".join(str(exc).split())
            raise CheckpointError(f"{source}: the weights do not fit the model ({cause})") from None
        return self

    def forward(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Magnitudes (B, n_channels, T, F) → estimates (B, n_instruments, n_channels, T, F)."""
        logits = torch.stack([unet(magnitude) for unet in self.unets.values()], dim=1)
        masks = torch.softmax(logits, dim=1) if self.softmax else torch.sigmoid(logits)
        return masks * magnitude.unsqueeze(1)

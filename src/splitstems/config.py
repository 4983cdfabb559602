"""Model configurations: Spleeter's JSON format and names like ``spleeter:4stems-16kHz``.

A :class:`ModelConfig` is a frozen view of one Spleeter JSON config. Released models are
named ``spleeter:<2stems|4stems|5stems>[-16kHz]`` (the ``spleeter:`` prefix is optional);
anything else is read as a path to a JSON file in the same format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from splitstems.errors import ConfigError

__all__ = [
    "DEFAULT_CONV_N_FILTERS",
    "ModelConfig",
    "RELEASED_MODELS",
    "MODEL_TYPES",
    "ACTIVATIONS",
    "load_config",
    "checkpoint_name",
]

#: Released model names (without the ``spleeter:`` prefix), in display order.
RELEASED_MODELS: tuple[str, ...] = (
    "2stems",
    "4stems",
    "5stems",
    "2stems-16kHz",
    "4stems-16kHz",
    "5stems-16kHz",
)
MODEL_TYPES = ("unet.unet", "unet.softmax_unet")
ACTIVATIONS = ("ReLU", "ELU", "LeakyReLU")
MASK_EXTENSIONS = ("zeros", "average")
#: Encoder filters of Spleeter's U-Net (``model.params.conv_n_filters``; the decoder mirrors
#: them). Every released model uses these.
DEFAULT_CONV_N_FILTERS: tuple[int, ...] = (16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class ModelConfig:
    """One model's configuration, field for field Spleeter's JSON config.

    Attributes mirror the JSON keys (``T`` is ``n_segment_frames``'s original name and
    kept as is, like ``F``). ``name`` is the model's display name and ``model_dir`` the
    name of the checkpoint folder (``2stems`` for both ``2stems`` and ``2stems-16kHz``).
    """

    name: str
    instrument_list: tuple[str, ...]
    model_dir: str
    mix_name: str = "mix"
    sample_rate: int = 44100
    frame_length: int = 4096
    frame_step: int = 1024
    T: int = 512
    F: int = 1024
    n_channels: int = 2
    separation_exponent: float = 2.0
    mask_extension: str = "zeros"
    model_type: str = "unet.unet"
    conv_activation: str = "LeakyReLU"
    deconv_activation: str = "ReLU"
    conv_n_filters: tuple[int, ...] = DEFAULT_CONV_N_FILTERS
    train: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def instruments(self) -> tuple[str, ...]:
        """The instruments, in output order."""
        return self.instrument_list

    @property
    def n_bins(self) -> int:
        """Number of STFT bins of a frame (``frame_length // 2 + 1``)."""
        return self.frame_length // 2 + 1

    def to_json_dict(self) -> dict[str, Any]:
        """Return the config in Spleeter's JSON layout (round-trips through ``from_dict``)."""
        out: dict[str, Any] = dict(self.train)
        params: dict[str, Any] = {
            "conv_activation": self.conv_activation,
            "deconv_activation": self.deconv_activation,
        }
        if self.conv_n_filters != DEFAULT_CONV_N_FILTERS:
            params["conv_n_filters"] = list(self.conv_n_filters)
        out.update(
            {
                "model_dir": self.model_dir,
                "mix_name": self.mix_name,
                "instrument_list": list(self.instrument_list),
                "sample_rate": self.sample_rate,
                "frame_length": self.frame_length,
                "frame_step": self.frame_step,
                "T": self.T,
                "F": self.F,
                "n_channels": self.n_channels,
                "separation_exponent": self.separation_exponent,
                "mask_extension": self.mask_extension,
                "model": {"type": self.model_type, "params": params},
            }
        )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, name: str, source: str) -> ModelConfig:
        """Build a config from a parsed Spleeter JSON dict; ``source`` names it in errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a model config must be a JSON object")
        try:
            instruments = data["instrument_list"]
        except KeyError:
            raise ConfigError(f"{source}: missing key 'instrument_list'") from None
        if (
            not isinstance(instruments, list)
            or not instruments
            or not all(isinstance(i, str) and i for i in instruments)
        ):
            raise ConfigError(f"{source}: 'instrument_list' must be a non-empty list of names")
        if len(set(instruments)) != len(instruments):
            raise ConfigError(f"{source}: 'instrument_list' has duplicate names")
        model = data.get("model", {}) or {}
        if not isinstance(model, dict):
            raise ConfigError(f"{source}: 'model' must be an object with 'type' and 'params'")
        params = model.get("params", {}) or {}
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key in ("mix_name", "model_dir", "mask_extension"):
            if key in data:
                kwargs[key] = str(data[key])
        for key in ("sample_rate", "frame_length", "frame_step", "T", "F", "n_channels"):
            if key in data:
                value = data[key]
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise ConfigError(
                        f"{source}: '{key}' must be a positive integer, got {value!r}"
                    )
                kwargs[key] = value
        if "separation_exponent" in data:
            value = data["separation_exponent"]
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{source}: 'separation_exponent' must be a positive number")
            kwargs["separation_exponent"] = float(value)
        if "conv_n_filters" in params:
            filters = params["conv_n_filters"]
            if (
                not isinstance(filters, list)
                or len(filters) != len(DEFAULT_CONV_N_FILTERS)
                or not all(
                    isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in filters
                )
            ):
                raise ConfigError(
                    f"{source}: 'conv_n_filters' must be a list of "
                    f"{len(DEFAULT_CONV_N_FILTERS)} positive integers, got {filters!r}"
                )
            kwargs["conv_n_filters"] = tuple(filters)
        kwargs.setdefault("model_dir", name)
        config = cls(
            name=name,
            instrument_list=tuple(instruments),
            model_type=str(model.get("type", "unet.unet")),
            conv_activation=str(params.get("conv_activation", "LeakyReLU")),
            deconv_activation=str(params.get("deconv_activation", "ReLU")),
            train={k: v for k, v in data.items() if k not in known and k != "model"},
            **kwargs,
        )
        config._validate(source)
        return config

    def _validate(self, source: str) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(
                f"{source}: unknown model type {self.model_type!r} "
                f"(known: {', '.join(MODEL_TYPES)})"
            )
        for key in ("conv_activation", "deconv_activation"):
            if getattr(self, key) not in ACTIVATIONS:
                raise ConfigError(
                    f"{source}: unknown {key} {getattr(self, key)!r} "
                    f"(known: {', '.join(ACTIVATIONS)})"
                )
        if self.mask_extension not in MASK_EXTENSIONS:
            raise ConfigError(
                f"{source}: 'mask_extension' must be one of {', '.join(MASK_EXTENSIONS)}"
            )
        if self.frame_length % self.frame_step:
            raise ConfigError(f"{source}: 'frame_length' must be a multiple of 'frame_step'")
        if self.F > self.n_bins:
            raise ConfigError(
                f"{source}: 'F' ({self.F}) exceeds the {self.n_bins} bins of a "
                f"{self.frame_length}-sample frame"
            )
        if self.F % 64 or self.T % 64:
            raise ConfigError(f"{source}: 'T' and 'F' must be multiples of 64 for the U-Net")


def _released_name(descriptor: str) -> str | None:
    """Return the released model name a descriptor refers to, or None."""
    name = descriptor.removeprefix("spleeter:")
    for known in RELEASED_MODELS:
        if name.lower() == known.lower():
            return known
    return None


def checkpoint_name(config_or_name: ModelConfig | str) -> str:
    """Return the checkpoint folder name of a model (``2stems`` for ``2stems-16kHz``)."""
    if isinstance(config_or_name, ModelConfig):
        return config_or_name.model_dir
    released = _released_name(config_or_name)
    if released is None:
        raise ConfigError(f"{config_or_name}: not a released model name")
    return released.removesuffix("-16kHz")


def load_config(descriptor: str | Path) -> ModelConfig:
    """Return the config for a model name (``spleeter:4stems``) or a JSON config path.

    Raises:
        ConfigError: the name is unknown, or the file is missing or not a valid config.
    """
    text = str(descriptor)
    released = _released_name(text)
    if released is not None and not Path(text).is_file():
        raw = resources.files("splitstems.resources").joinpath(f"{released}.json").read_text()
        return ModelConfig.from_dict(json.loads(raw), name=f"spleeter:{released}", source=released)
    path = Path(text).expanduser()
    if path.suffix.lower() != ".json" and not path.exists():
        raise ConfigError(
            f"{text}: unknown model (known: "
            + ", ".join(f"spleeter:{n}" for n in RELEASED_MODELS)
            + ", or a path to a JSON config)"
        )
    if path.is_dir():
        path = path / "config.json"
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: model config not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read model config ({exc})") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    return ModelConfig.from_dict(data, name=str(path), source=str(path))

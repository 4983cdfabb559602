"""Training options: the training keys of a Spleeter JSON config, checked.

Spleeter keeps the training settings in the same JSON file as the model (``train_csv``,
``validation_csv``, ``learning_rate``, ``batch_size``, ``train_max_steps``,
``save_checkpoints_steps``, ``random_seed``, ...). :class:`~splitstems.config.ModelConfig`
keeps every key it does not know in ``config.train``; :meth:`TrainOptions.from_config`
reads them from there, with the original's defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from splitstems.config import ModelConfig
from splitstems.errors import ConfigError

__all__ = ["AUGMENTATIONS", "BATCH_NORM_MODES", "TrainOptions"]

#: ``"none"`` (the original's training), ``"spectrogram"`` (the original's random time
#: stretch and pitch shift: bilinear resizing of the magnitude crops) or ``"audio"``
#: (Rubber Band time stretch and pitch shift of the waveform, through ``pedalboard``).
AUGMENTATIONS = ("none", "spectrogram", "audio")
#: ``"moving"``: how the original actually trained (Keras layers called in inference mode:
#: BatchNorm normalises with its moving statistics, which are never updated, so they stay
#: 0 and 1 and BatchNorm is a learned per-channel scale and shift; no dropout). Every
#: released checkpoint shows it (all moving means 0, variances 1), and fine-tuning one
#: needs it. ``"batch"``: textbook Keras ``training=True`` (batch statistics, moving
#: averages updated with momentum 0.99, dropout 0.5 after the first three decoder blocks).
BATCH_NORM_MODES = ("moving", "batch")


@dataclass(frozen=True)
class TrainOptions:
    """The training settings of one run (Spleeter's config keys, same defaults).

    Attributes:
        train_csv: CSV of training songs (``mix_path,<instrument>_path,...,duration``).
        validation_csv: CSV of validation songs (same columns), or None.
        learning_rate: Adam's learning rate.
        batch_size: crops per step.
        train_max_steps: the step at which training stops.
        save_checkpoints_steps: a checkpoint (and a validation) every N steps.
        save_summary_steps: a line in ``train_log.jsonl`` every N steps.
        random_seed: seeds the data order, the crops, augmentation and dropout.
        n_chunks_per_song: chunks cut from each training song.
        chunk_duration: seconds per training chunk (validation chunks: 12 s).
        training_cache: folder of the decoded chunks (default ``<model_dir>/cache``).
        validation_cache: the same for validation chunks (default: ``training_cache``).
        augmentation: one of :data:`AUGMENTATIONS` (our key; the original trains
            without augmentation).
        batch_norm: one of :data:`BATCH_NORM_MODES` (our key).
    """

    train_csv: str | None = None
    validation_csv: str | None = None
    learning_rate: float = 1e-4
    batch_size: int = 4
    train_max_steps: int = 200_000
    save_checkpoints_steps: int = 1000
    save_summary_steps: int = 5
    random_seed: int = 0
    n_chunks_per_song: int = 2
    chunk_duration: float = 20.0
    validation_chunk_duration: float = 12.0
    training_cache: str | None = None
    validation_cache: str | None = None
    augmentation: str = "none"
    batch_norm: str = "moving"

    @classmethod
    def from_config(cls, config: ModelConfig, **overrides: Any) -> TrainOptions:
        """Read the training keys of ``config`` (``config.train``); ``overrides`` win.

        Overrides whose value is None are ignored. Raises :class:`ConfigError` for a
        value of the wrong type or range, naming the key.
        """
        data = dict(config.train)
        source = config.name
        kwargs: dict[str, Any] = {}
        for key in ("train_csv", "validation_csv", "training_cache", "validation_cache"):
            if data.get(key) is not None:
                kwargs[key] = str(data[key])
        for key in (
            "batch_size",
            "train_max_steps",
            "save_checkpoints_steps",
            "save_summary_steps",
            "n_chunks_per_song",
        ):
            if key in data:
                kwargs[key] = _positive_int(data[key], key, source)
        if "random_seed" in data:
            value = data["random_seed"]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{source}: 'random_seed' must be an integer >= 0")
            kwargs["random_seed"] = value
        for key in ("learning_rate", "chunk_duration", "validation_chunk_duration"):
            if key in data:
                kwargs[key] = _positive_float(data[key], key, source)
        for key in ("augmentation", "batch_norm"):
            if key in data:
                kwargs[key] = str(data[key])
        options = cls(**kwargs)
        options = replace(options, **{k: v for k, v in overrides.items() if v is not None})
        options.check(config)
        return options

    def check(self, config: ModelConfig) -> None:
        """Raise :class:`ConfigError` if the options cannot work with ``config``."""
        source = config.name
        if self.augmentation not in AUGMENTATIONS:
            raise ConfigError(
                f"{source}: 'augmentation' must be one of {', '.join(AUGMENTATIONS)}, "
                f"got {self.augmentation!r}"
            )
        if self.batch_norm not in BATCH_NORM_MODES:
            raise ConfigError(
                f"{source}: 'batch_norm' must be one of {', '.join(BATCH_NORM_MODES)}, "
                f"got {self.batch_norm!r}"
            )
        for key in ("batch_size", "train_max_steps", "save_checkpoints_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{source}: {key!r} must be an integer >= 1, got {value!r}")
        for key, seconds in (
            ("chunk_duration", self.chunk_duration),
            ("validation_chunk_duration", self.validation_chunk_duration),
        ):
            n_frames = (seconds * config.sample_rate - config.frame_length) / config.frame_step
            if n_frames + 1 < config.T:
                # The original refuses this too (DatasetBuilder.check_parameters_compatibility).
                need = ((config.T - 1) * config.frame_step + config.frame_length) / (
                    config.sample_rate
                )
                raise ConfigError(
                    f"{source}: {key!r} of {seconds:g} s is shorter than T={config.T} frames "
                    f"({need:.2f} s); lower T or raise {key!r}"
                )


def _positive_int(value: object, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source}: {key!r} must be an integer >= 1, got {value!r}")
    return value


def _positive_float(value: object, key: str, source: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{source}: {key!r} must be a number > 0, got {value!r}")
    return float(value)

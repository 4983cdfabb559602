"""Training keys of Spleeter configs, and the conv_n_filters model parameter."""

from __future__ import annotations

import json

import pytest
from trainkit import write_config

from splitstems.config import DEFAULT_CONV_N_FILTERS, ModelConfig, load_config
from splitstems.errors import ConfigError
from splitstems.models.unet import SpleeterModel
from splitstems.train import TrainOptions


def test_released_configs_are_unchanged_by_conv_n_filters():
    config = load_config("spleeter:2stems")
    assert config.conv_n_filters == DEFAULT_CONV_N_FILTERS
    assert "conv_n_filters" not in config.to_json_dict()["model"]["params"]


def test_conv_n_filters_builds_a_small_unet_and_round_trips(tmp_path, previews):
    config = load_config(write_config(tmp_path, previews))
    assert config.conv_n_filters == (4, 8, 16, 32, 64, 128)
    again = ModelConfig.from_dict(
        json.loads(json.dumps(config.to_json_dict())), name="x", source="x"
    )
    assert again.conv_n_filters == config.conv_n_filters
    n_params = sum(p.numel() for p in SpleeterModel(config).parameters())
    assert n_params < 1_300_000  # two U-Nets of ~0.6 M; the released ones have ~9.8 M each
    decoder = SpleeterModel(config).unets["vocals"].decoder
    assert [b.deconv.out_channels for b in decoder] == [64, 32, 16, 8, 4, 1]


@pytest.mark.parametrize("bad", [[4, 8], [4, 8, 16, 32, 64, 0], "16"])
def test_bad_conv_n_filters_is_a_config_error(bad):
    data = {"instrument_list": ["vocals"], "model": {"params": {"conv_n_filters": bad}}}
    with pytest.raises(ConfigError, match="conv_n_filters"):
        ModelConfig.from_dict(data, name="x", source="x")


def test_training_keys_and_defaults(tmp_path, previews):
    config = load_config(write_config(tmp_path, previews))
    options = TrainOptions.from_config(config, train_max_steps=7)
    assert options.learning_rate == 1e-3 and options.batch_size == 4
    assert options.train_max_steps == 7 and options.random_seed == 7
    assert options.save_checkpoints_steps == 100 and options.augmentation == "none"
    defaults = TrainOptions.from_config(load_config("spleeter:2stems"))
    assert (defaults.learning_rate, defaults.batch_size, defaults.n_chunks_per_song) == (1e-4, 4, 2)
    assert defaults.chunk_duration == 20.0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("batch_size", 0, "batch_size"),
        ("learning_rate", "fast", "learning_rate"),
        ("augmentation", "reverb", "augmentation"),
        ("random_seed", -1, "random_seed"),
    ],
)
def test_bad_training_keys_are_config_errors(tmp_path, previews, key, value, message):
    config = load_config(write_config(tmp_path, previews, **{key: value}))
    with pytest.raises(ConfigError, match=message):
        TrainOptions.from_config(config)

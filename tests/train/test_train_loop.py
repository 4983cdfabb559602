"""Training overfits a tiny model, resumes exactly after Ctrl-C, and writes a usable model."""

from __future__ import annotations

import json
import os
import signal
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from trainkit import TRACKS, write_config

from splitstems import audio
from splitstems.cli import main
from splitstems.device import baseline_threads
from splitstems.errors import CheckpointError, ConfigError
from splitstems.train import train
from splitstems.train.checkpoint import LOG, STATE, saved_step
from splitstems.train.metrics import sdr


@pytest.fixture(scope="module")
def run(previews: Path, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted, seeded 300-step run of the tiny model on two previews."""
    folder = tmp_path_factory.mktemp("run")
    config = write_config(folder, previews)
    return config, train(config, data_root=previews, progress=False)


def test_training_loss_halves_within_300_steps(run):
    _, result = run
    assert result.step == 300 and not result.interrupted
    losses = [result.losses[s] for s in range(1, 301)]
    first, last = statistics.fmean(losses[:10]), statistics.fmean(losses[-10:])
    assert last <= 0.5 * first, (first, last)
    # Validation (here: the same songs, central 12 s) improves as well.
    before, after = result.validation[0], result.validation[-1]
    assert [v["step"] for v in result.validation] == [0, 100, 200, 300]
    assert after["val_loss"] < 0.7 * before["val_loss"]
    assert after["val_sdr"]["vocals"] > before["val_sdr"]["vocals"] + 3.0
    log = [json.loads(line) for line in (result.model_dir / LOG).read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(10, 301, 10))
    assert any("val_sdr" in r for r in log)


def test_ctrl_c_saves_and_resume_reproduces_the_losses(run, previews, tmp_path):
    config, full = run
    out = tmp_path / "model"

    def ctrl_c(step: int, loss: float) -> None:
        if step == 20:
            os.kill(os.getpid(), signal.SIGINT)

    # A separation earlier in the process may have left any thread count (the engine picks
    # one from the load); training pins its own, so the sums round as in the full run.
    torch.set_num_threads(1 if baseline_threads() > 1 else 2)
    first = train(
        config, data_root=previews, output=out, on_step=ctrl_c, validate=False, progress=False
    )
    assert torch.get_num_threads() == baseline_threads()
    assert first.interrupted and first.step == 20 and saved_step(out) == 20
    with pytest.raises(ConfigError, match="--resume"):
        train(config, data_root=previews, output=out, progress=False)
    second = train(
        config,
        data_root=previews,
        output=out,
        resume=True,
        max_steps=40,
        validate=False,
        progress=False,
    )
    assert second.step == 40 and sorted(second.losses) == list(range(21, 41))
    # Bit-for-bit the uninterrupted run's losses (which also validated in between).
    assert [first.losses[s] for s in range(1, 21)] == [full.losses[s] for s in range(1, 21)]
    assert [second.losses[s] for s in range(21, 41)] == [full.losses[s] for s in range(21, 41)]
    log = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20, 30, 40]


def test_resume_without_a_run_is_refused(previews, tmp_path):
    config = write_config(tmp_path, previews)
    with pytest.raises(CheckpointError, match="no training run"):
        train(config, data_root=previews, output=tmp_path / "none", resume=True, progress=False)


def test_trained_model_separates_like_a_released_one(run, previews, tmp_path):
    _, result = run
    model_dir = result.model_dir
    assert {"config.json", "model.safetensors", STATE} <= {p.name for p in model_dir.iterdir()}
    weights = load_file(str(model_dir / "model.safetensors"))
    assert not any(k.endswith("num_batches_tracked") for k in weights)
    song = previews / TRACKS[0].replace(" ", "_")
    out = tmp_path / "out"
    assert (
        main(
            [
                "separate",
                "-p",
                str(model_dir),  # the folder, or its config.json (below)
                "--batch-segments",
                "64",
                "-o",
                str(out),
                str(song / "mix.wav"),
            ]
        )
        == 0
    )
    vocals = audio.load(out / "mix" / "vocals.wav")
    truth = audio.load(song / "vocals.wav")
    assert vocals.shape == truth.shape
    assert sdr(truth, vocals) > 2.0  # the trained tiny model, not noise (~ -2 dB untrained)
    # The config works as well (hub: model.safetensors next to config.json).
    from splitstems.separator import load_model

    model, config = load_model(model_dir / "config.json")
    assert config.conv_n_filters == (4, 8, 16, 32, 64, 128)
    assert torch.equal(
        model.state_dict()["unets.vocals.output.weight"], weights["unets.vocals.output.weight"]
    )


def test_fine_tune_released_model_with_frozen_encoder(previews, tmp_path, use_shared_models):
    # The released 2stems U-Nets are fully convolutional: a short STFT keeps this fast.
    config = write_config(
        tmp_path,
        previews,
        batch_size=1,
        train_max_steps=2,
        learning_rate=1e-4,
        F=64,
        model={"type": "unet.unet", "params": {}},
        batch_norm="moving",  # the default, as the original trained
    )
    from splitstems.separator import load_model

    released, _ = load_model("spleeter:2stems")
    before = released.state_dict()
    result = train(
        config,
        data_root=previews,
        init="spleeter:2stems",
        freeze_encoder=True,
        validate=False,
        progress=False,
    )
    after = load_file(str(result.model_dir / "model.safetensors"))
    encoder = [k for k in after if ".encoder." in k]
    decoder = [k for k in after if ".decoder." in k and k.endswith("deconv.weight")]
    assert encoder and decoder
    assert all(torch.equal(after[k], before[k]) for k in encoder)  # incl. BN statistics
    assert all(not torch.equal(after[k], before[k]) for k in decoder)
    # As the original trained: BatchNorm on its moving statistics, which stay 0 and 1.
    stats = [k for k in after if k.endswith(("running_mean", "running_var"))]
    assert all(torch.equal(after[k], before[k]) for k in stats)
    assert float(before["unets.vocals.decoder.0.bn.running_var"].mean()) == 1.0


def test_fine_tune_refuses_another_architecture(previews, tmp_path, use_shared_models):
    config = write_config(tmp_path, previews)  # tiny filters: not the released U-Net
    with pytest.raises(ConfigError, match="cannot start from spleeter:2stems"):
        train(config, data_root=previews, init="spleeter:2stems", progress=False)


def test_batch_mode_uses_dropout_and_keras_batchnorm(previews, tmp_path):
    from splitstems.config import load_config
    from splitstems.train.trainer import build_model

    model = build_model(load_config(write_config(tmp_path, previews))).train()
    x = torch.rand(2, 2, 64, 128)
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.equal(a, b)  # dropout active in training mode
    bn = model.unets["vocals"].encoder[0].bn
    assert bn.momentum == pytest.approx(0.01) and bn.eps == pytest.approx(1e-3)
    assert np.isfinite(a.detach().numpy()).all()

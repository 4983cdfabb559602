"""The training loop: Spleeter's loss and optimizer, checkpoints, exact resume, Ctrl-C.

Loss as the original: for each instrument the mean absolute error between the model's
masked magnitude and the true magnitude, summed over instruments; Adam. BatchNorm and
dropout work as the original's training ran them (``batch_norm="moving"``: its Keras
layers were called in inference mode, so BatchNorm used its moving statistics, never
updated, and dropout was off; the released checkpoints hold moving means of exactly 0 and
variances of 1), or in textbook training mode (``"batch"``: batch statistics, moving
averages, dropout 0.5).

Randomness is a pure function of ``random_seed`` and the step (data order, crops,
augmentation; dropout is reseeded from ``(seed, step)`` before every step), and the
weights, BatchNorm statistics and Adam's moments are saved exactly, so a run resumed
from a checkpoint computes the same losses, bit for bit, as one that never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from splitstems.config import ModelConfig, load_config
from splitstems.errors import CheckpointError, ConfigError
from splitstems.models.unet import SpleeterModel
from splitstems.readahead import prefetch
from splitstems.train import checkpoint
from splitstems.train.data import (
    DataError,
    Skipped,
    TrainingSet,
    ValidationSet,
    musdb_songs,
    prepare_chunks,
    read_csv,
)
from splitstems.train.metrics import sdr
from splitstems.train.options import TrainOptions

__all__ = ["TrainResult", "train", "spleeter_loss", "evaluate", "build_model"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run did.

    Attributes:
        model_dir: where the model, its config and the checkpoint are.
        step: the last completed (and saved) step.
        losses: step → training loss, for the steps this call ran.
        validation: the validation records (step, loss, SDR per instrument).
        interrupted: stopped early by Ctrl-C (SIGINT), SIGTERM or SIGHUP, after saving.
        stop_signal: the number of the signal that stopped it (None: not stopped).
        skipped: songs left out of training or validation, with the reason.
        n_songs: songs listed (training, validation).
        steps_per_second: optimizer steps per second (validation time excluded).
    """

    model_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)
    validation: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    skipped: list[Skipped] = field(default_factory=list)
    n_songs: tuple[int, int] = (0, 0)
    steps_per_second: float = 0.0
    stop_signal: int | None = None


def spleeter_loss(estimates: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over instruments of the mean absolute error: ``(B, I, C, T, F)`` both."""
    return (estimates - targets).abs().mean(dim=(0, 2, 3, 4)).sum()


def build_model(
    config: ModelConfig,
    *,
    init: str | os.PathLike[str] | None = None,
    init_model_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> SpleeterModel:
    """Return a fresh model for ``config``, or one holding ``init``'s weights.

    Fresh weights are drawn from ``seed`` (the caller's RNG state is left alone). ``init``
    is a released model name (``spleeter:2stems``) or a model config/folder; its
    instruments and architecture must be the config's.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SpleeterModel(config)
    if init is None:
        return model
    from splitstems.separator import load_model

    source, source_config = load_model(init, model_dir=init_model_dir)
    mine = (
        config.instruments,
        config.n_channels,
        config.model_type,
        config.conv_activation,
        config.deconv_activation,
        config.conv_n_filters,
    )
    theirs = (
        source_config.instruments,
        source_config.n_channels,
        source_config.model_type,
        source_config.conv_activation,
        source_config.deconv_activation,
        source_config.conv_n_filters,
    )
    if mine != theirs:
        raise ConfigError(
            f"cannot start from {init}: its model (instruments, channels, type, activations, "
            f"filters) {theirs} differs from the config's {mine}"
        )
    model.load_state_dict(source.state_dict())
    return model


def _set_mode(model: SpleeterModel, *, batch_norm: str, freeze_encoder: bool) -> None:
    """Put the model in the training form of ``batch_norm`` (see ``BATCH_NORM_MODES``).

    ``"moving"``: eval mode (BatchNorm on its moving statistics, never updated; no
    dropout), as the original trained. ``"batch"``: train mode, except a frozen encoder,
    which keeps its BatchNorm statistics.
    """
    if batch_norm == "moving":
        model.eval()
        return
    model.train()
    if freeze_encoder:
        for unet in model.unets.values():
            unet.encoder.eval()


@torch.no_grad()
def evaluate(
    model: SpleeterModel,
    valid: ValidationSet,
    config: ModelConfig,
    *,
    device: torch.device,
) -> dict[str, Any]:
    """Return validation loss (central T frames) and median SDR per instrument (whole chunks).

    The SDR separates each chunk as ``splitstems separate`` would (ratio masks, iSTFT).
    Leaves the model in eval mode.
    """
    from splitstems.engine import Engine

    model.eval()
    losses = []
    for i in range(len(valid)):
        mix, targets = valid.crop(i)
        estimates = model(mix[None].to(device))
        losses.append(float(spleeter_loss(estimates, targets[None].to(device))))
    longest = max(c.n_samples for c in valid.chunks)
    n_segments = math.ceil((longest + config.frame_length) / config.frame_step / config.T) + 1
    # One model call per chunk; the plain modules (the training graph, no fusion).
    # The training's own thread count (not one chosen from the load): reductions, and so
    # the losses after this validation, round the same in a run that never validates.
    engine = Engine(
        model,
        config,
        device=device,
        fuse=False,
        batch_segments=min(n_segments, 64),
        threads=torch.get_num_threads(),
    )
    scores: dict[str, list[float]] = {name: [] for name in config.instruments}
    for i in range(len(valid)):
        mix, targets = valid.waveforms(i)
        stems = engine.separate(mix)
        for k, name in enumerate(config.instruments):
            scores[name].append(sdr(targets[k], stems[name]))
    return {
        "val_loss": statistics.fmean(losses),
        "val_sdr": {name: statistics.median(v) for name, v in scores.items()},
    }


def _step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step, 3]).generate_state(1, np.uint64)[0] >> 1)


class _StopSignal:
    """The first SIGINT, SIGTERM or SIGHUP asks the loop to save and stop.

    A second SIGINT aborts. A signal the process inherited as ignored stays ignored:
    under ``nohup`` a hang-up does not stop the training.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None  # the first signal received
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        if threading.current_thread() is threading.main_thread():
            for name in ("SIGINT", "SIGTERM", "SIGHUP"):
                signum = getattr(signal, name, None)
                if signum is None or signal.getsignal(signum) in (signal.SIG_IGN, None):
                    continue  # ignored (nohup), or a handler Python cannot restore
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.signum = signum
        self.requested = True
        log.warning("stopping: saving a checkpoint after this step (Ctrl-C again to abort)")

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class _RunLog:
    """``train_log.jsonl``: kept up to the resumed step, appended to."""

    def __init__(self, path: Path, *, keep_until: int | None) -> None:
        self.path = path
        lines = []
        if keep_until is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= keep_until:
                        lines.append(line)
                except (ValueError, AttributeError):
                    continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def _resolve(path: str | None, base: Path) -> Path | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def train(
    config: ModelConfig | str | os.PathLike[str],
    *,
    data_root: str | os.PathLike[str] | None = None,
    mus_dir: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    resume: bool = False,
    init: str | os.PathLike[str] | None = None,
    init_model_dir: str | os.PathLike[str] | None = None,
    freeze_encoder: bool = False,
    device: str | torch.device | None = None,
    max_steps: int | None = None,
    augmentation: str | None = None,
    batch_norm: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    validate: bool = True,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train (or fine-tune) a Spleeter model as ``spleeter train -p config -d data_root``.

    Args:
        config: a :class:`ModelConfig`, a JSON config path or a released model name.
        data_root: folder the CSV paths are relative to (default: the working directory).
            ``train_csv``/``validation_csv`` are relative to the working directory, as in
            the original.
        mus_dir: a MUSDB18 or MUSDB18-HQ root to train on instead of the CSVs.
        output: model folder (default: the config's ``model_dir``).
        resume: continue the run saved in the model folder (same losses as if it had
            never stopped). Without it, a folder holding a run is refused.
        init: start from these weights (``spleeter:2stems`` or a model config/folder).
        init_model_dir: where ``init``'s weights are (as ``--model-dir``).
        freeze_encoder: train the decoders only (encoder weights and statistics fixed).
        device: "cpu", "cuda", "mps" or None (automatic).
        max_steps: override ``train_max_steps``.
        augmentation: override the ``augmentation`` key ("none", "spectrogram", "audio").
        batch_norm: override the ``batch_norm`` key ("moving", as the original, or
            "batch"; see :data:`~splitstems.train.options.BATCH_NORM_MODES`).
        cache_dir: folder of the decoded chunks (default: ``training_cache`` or
            ``<model_dir>/cache``).
        validate: compute validation loss and SDR at the start and at each checkpoint.
        progress: show progress bars (on a terminal).
        on_step: called with ``(step, loss)`` after each step.

    Raises:
        ConfigError: bad config or options (:class:`DataError` for unusable data).
        CheckpointError: the checkpoint to resume is missing or broken.
    """
    from tqdm import tqdm

    from splitstems.device import baseline_threads, pick_device, set_threads

    if not isinstance(config, ModelConfig):
        config = load_config(config)
    options = TrainOptions.from_config(
        config, train_max_steps=max_steps, augmentation=augmentation, batch_norm=batch_norm
    )
    cwd = Path.cwd()
    model_dir = Path(output) if output is not None else Path(config.model_dir)
    existing = checkpoint.saved_step(model_dir)
    if resume and existing is None:
        raise CheckpointError(f"{model_dir}: no training run to resume (no {checkpoint.STATE})")
    if not resume and existing is not None:
        raise ConfigError(
            f"{model_dir}: holds a training run at step {existing}; pass --resume to "
            "continue it, or choose another model folder"
        )
    torch_device = device if isinstance(device, torch.device) else pick_device(device)
    # One fixed thread count for the whole run (an idle machine's, never one picked from the
    # load, nor one a separation earlier in this process left): float sums then round the
    # same in a resumed run as in one that never stopped.
    set_threads(baseline_threads())

    # ---- data (all checks before the first step)
    if mus_dir is not None:
        train_songs, valid_songs = musdb_songs(mus_dir, config)
        valid_songs = valid_songs if validate else []
    else:
        if options.train_csv is None:
            raise ConfigError(f"{config.name}: no 'train_csv' in the config (or pass --mus_dir)")
        root = Path(data_root) if data_root is not None else cwd
        train_songs = read_csv(_resolve(options.train_csv, cwd), root, config)
        valid_songs = []
        if options.validation_csv is not None and validate:
            valid_songs = read_csv(_resolve(options.validation_csv, cwd), root, config)
    cache = Path(cache_dir) if cache_dir is not None else None
    train_cache = cache or _resolve(options.training_cache, cwd) or model_dir / "cache"
    valid_cache = cache or _resolve(options.validation_cache, cwd) or train_cache
    prepared = prepare_chunks(
        train_songs,
        config,
        cache_dir=train_cache,
        n_chunks=options.n_chunks_per_song,
        chunk_duration=options.chunk_duration,
        what="training",
        progress=progress,
    )
    if not prepared.chunks:
        reasons = "; ".join(f"{s.song}: {s.reason}" for s in prepared.skipped[:3])
        raise DataError(f"no usable training song (all {prepared.n_songs} skipped: {reasons})")
    prepared_valid = prepare_chunks(
        valid_songs,
        config,
        cache_dir=valid_cache,
        n_chunks=1,
        chunk_duration=options.validation_chunk_duration,
        what="validation",
        progress=progress,
    )
    skipped = prepared.skipped + prepared_valid.skipped
    if skipped:
        log.warning(
            "%d of %d training and %d of %d validation songs skipped",
            len(prepared.skipped),
            prepared.n_songs,
            len(prepared_valid.skipped),
            prepared_valid.n_songs,
        )
    data = TrainingSet(
        prepared.chunks,
        config,
        seed=options.random_seed,
        batch_size=options.batch_size,
        augmentation=options.augmentation,
    )
    valid = ValidationSet(prepared_valid.chunks, config)

    # ---- model, optimizer, state
    if resume:
        start, weights, optimizer_state = checkpoint.load_checkpoint(model_dir)
        model = SpleeterModel(config).load_weights(weights, source=str(model_dir))
    else:
        start, optimizer_state = 0, None
        model = build_model(
            config, init=init, init_model_dir=init_model_dir, seed=options.random_seed
        )
    model.to(torch_device)
    if freeze_encoder:
        for unet in model.unets.values():
            unet.encoder.requires_grad_(False)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=options.learning_rate)
    if optimizer_state is not None:
        try:
            optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{model_dir}: optimizer state does not fit (was --freeze-encoder changed?): {exc}"
            ) from None
    info = {
        "init": str(init or ""),
        "freeze_encoder": str(freeze_encoder),
        "batch_norm": options.batch_norm,
    }

    result = TrainResult(
        model_dir=model_dir,
        step=start,
        skipped=skipped,
        n_songs=(prepared.n_songs, prepared_valid.n_songs),
    )
    run_log = _RunLog(model_dir / checkpoint.LOG, keep_until=start if resume else None)
    stop_at = options.train_max_steps
    bar = tqdm(
        total=stop_at,
        initial=start,
        unit="step",
        desc="training",
        disable=not progress,
        dynamic_ncols=True,
    )
    postfix: dict[str, str] = {}

    def run_validation(step: int) -> None:
        if not validate or not len(valid):
            return
        record = {"step": step, **evaluate(model, valid, config, device=torch_device)}
        _set_mode(model, batch_norm=options.batch_norm, freeze_encoder=freeze_encoder)
        run_log.write(record)
        result.validation.append(record)
        postfix["val_loss"] = f"{record['val_loss']:.4f}"
        first = config.instruments[0]
        postfix[f"val_sdr_{first}"] = f"{record['val_sdr'][first]:.2f}"
        bar.set_postfix(postfix)

    if start == 0:
        run_validation(0)
    _set_mode(model, batch_norm=options.batch_norm, freeze_encoder=freeze_encoder)
    step = start
    train_seconds = 0.0
    window: list[float] = []
    batches = prefetch(data.batches(start, stop_at), depth=2)
    try:
        with _StopSignal() as stop:
            for batch_step, mix, targets in batches:
                began = time.perf_counter()
                torch.manual_seed(_step_seed(options.random_seed, batch_step))
                mix = mix.to(torch_device, non_blocking=True)
                targets = targets.to(torch_device, non_blocking=True)
                loss = spleeter_loss(model(mix), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = loss.item()
                train_seconds += time.perf_counter() - began
                step = batch_step + 1
                if not math.isfinite(value):
                    raise DataError(f"the training loss is {value} at step {step}")
                result.losses[step] = value
                window.append(value)
                if on_step is not None:
                    on_step(step, value)
                postfix["loss"] = f"{value:.4f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if step % options.save_summary_steps == 0 or step == stop_at:
                    run_log.write(
                        {
                            "step": step,
                            "loss": statistics.fmean(window),
                            "steps_per_s": (step - start) / train_seconds,
                        }
                    )
                    window = []
                done = step == stop_at
                if step % options.save_checkpoints_steps == 0 or done or stop.requested:
                    checkpoint.save_checkpoint(
                        model_dir, model, optimizer, config, step=step, info=info
                    )
                    result.step = step
                if stop.requested and not done:
                    result.interrupted = True
                    result.stop_signal = stop.signum
                    break
                if step % options.save_checkpoints_steps == 0 or done:
                    run_validation(step)
    finally:
        batches.close()
        bar.close()
    model.eval()
    result.steps_per_second = (step - start) / train_seconds if train_seconds else 0.0
    return result

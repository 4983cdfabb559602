"""``splitstems train``: train or fine-tune a model."""

from __future__ import annotations

import argparse
import signal
import sys

from splitstems.cli.options import EXIT_OK, positive_int


def add_parser(sub: argparse._SubParsersAction, **kwargs: object) -> None:
    """Add the ``train`` command to ``sub``."""
    tr = sub.add_parser(
        "train",
        **kwargs,
        help="train or fine-tune a model (Spleeter's JSON config and CSVs, or MUSDB18)",
    )
    tr.add_argument(
        "-p",
        "--params_filename",
        dest="params",
        required=True,
        help="JSON config in Spleeter's format (training keys included), or a model name",
    )
    tr.add_argument(
        "-d",
        "--data",
        dest="data_root",
        default=None,
        help="folder the CSV paths are in (default: .)",
    )
    tr.add_argument(
        "--mus_dir",
        default=None,
        help="MUSDB18 or MUSDB18-HQ root instead of CSVs (default: the config's CSVs)",
    )
    tr.add_argument(
        "-o", "--output", default=None, help="model folder (default: the config's model_dir)"
    )
    tr.add_argument("--resume", action="store_true", help="continue the run in the model folder")
    tr.add_argument(
        "--init",
        default=None,
        help="start from a model (spleeter:2stems, a folder; default: random weights)",
    )
    tr.add_argument("--freeze-encoder", action="store_true", help="train the decoders only")
    tr.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="steps to train to (default: the config's train_max_steps)",
    )
    tr.add_argument(
        "--augment",
        choices=("none", "spectrogram", "audio"),
        default=None,
        help="augmentation (default: the config's augmentation, else none)",
    )
    tr.add_argument(
        "--batch-norm",
        choices=("moving", "batch"),
        default=None,
        help="moving: as the original trained (default); batch: batch statistics + dropout",
    )
    tr.add_argument(
        "--cache-dir",
        default=None,
        help="decoded chunks (default: the config's training_cache, relative to the working "
        "folder; <model folder>/cache when the config has none)",
    )
    tr.add_argument(
        "--model-dir",
        default=None,
        help="where the weights of --init are (default: as separate --model-dir)",
    )
    tr.add_argument("--no-validation", action="store_true", help="skip validation")
    tr.add_argument("--device", default=None, help="cpu, cuda, mps (default: automatic)")
    tr.add_argument("--verbose", action="store_true", help="more logging")
    tr.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``splitstems train``; return the exit code."""
    from splitstems.train import train

    result = train(
        args.params,
        data_root=args.data_root,
        mus_dir=args.mus_dir,
        output=args.output,
        resume=args.resume,
        init=args.init,
        init_model_dir=args.model_dir,
        freeze_encoder=args.freeze_encoder,
        device=args.device,
        max_steps=args.steps,
        augmentation=args.augment,
        batch_norm=args.batch_norm,
        cache_dir=args.cache_dir,
        validate=not args.no_validation,
        progress=sys.stderr.isatty(),
    )
    if result.skipped:
        print(
            f"{len(result.skipped)} of {sum(result.n_songs)} songs skipped "
            f"(see the warnings above)",
            file=sys.stderr,
        )
    summary = f"step {result.step}, {result.steps_per_second:.2f} steps/s"
    if result.validation:
        last = result.validation[-1]
        sdrs = ", ".join(f"{k} {v:.2f} dB" for k, v in last["val_sdr"].items())
        summary += f"; validation loss {last['val_loss']:.4f}, SDR {sdrs}"
    print(f"{result.model_dir}: {summary}")
    if result.interrupted:
        print(
            f"interrupted: checkpoint saved at step {result.step}; --resume continues",
            file=sys.stderr,
        )
        return 128 + (result.stop_signal or signal.SIGINT)  # 130 Ctrl-C, 143, 129 (SIGHUP)
    return EXIT_OK

"""``splitstems models`` and ``splitstems convert``: what is cached, and conversion."""

from __future__ import annotations

import argparse
from pathlib import Path

from splitstems.cli.options import EXIT_OK


def add_parsers(sub: argparse._SubParsersAction, **kwargs: object) -> None:
    """Add the ``models`` and ``convert`` commands to ``sub``."""
    models = sub.add_parser(
        "models", help="list the released models and whether each is cached", **kwargs
    )
    models.add_argument(
        "--model-dir",
        default=None,
        help="also look in this folder (default: $SPLITSTEMS_MODEL_DIR, then $MODEL_PATH)",
    )
    models.set_defaults(handler=run_models, imports_torch=False)

    conv = sub.add_parser(
        "convert",
        help="convert a TensorFlow Spleeter checkpoint to safetensors + JSON config",
        **kwargs,
    )
    conv.add_argument("checkpoint", help="checkpoint folder (model.index, model.data-...)")
    conv.add_argument(
        "-p",
        "--params_filename",
        dest="params",
        default="spleeter:2stems",
        help="the model the checkpoint belongs to: name or JSON config (default: %(default)s)",
    )
    conv.add_argument("-o", "--output", required=True, help="folder to write the model to")
    conv.set_defaults(handler=run_convert, imports_torch=False)


def run_models(args: argparse.Namespace) -> int:
    """Run ``splitstems models``; return the exit code."""
    from splitstems import hub
    from splitstems.config import load_config

    for entry in hub.list_models(model_dir=args.model_dir):
        config = load_config(entry.name)
        state = "available" if entry.available else "not cached (downloads on first use)"
        print(f"{entry.name:24} {', '.join(config.instruments):38} {state}")
    return EXIT_OK


def run_convert(args: argparse.Namespace) -> int:
    """Run ``splitstems convert``; return the exit code."""
    from splitstems.config import load_config
    from splitstems.convert import convert_checkpoint

    config = load_config(args.params)
    path = convert_checkpoint(args.checkpoint, args.output, config)
    print(f"wrote {path} and {Path(path).parent / 'config.json'}")
    return EXIT_OK

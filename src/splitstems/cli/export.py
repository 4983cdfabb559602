"""``splitstems export``: a model to an ONNX folder (model.onnx + config.json), checked."""

from __future__ import annotations

import argparse
import sys
import time

from splitstems.cli.options import EXIT_OK, add_model_options, duration, positive_int


def add_parser(sub: argparse._SubParsersAction, **kwargs: object) -> None:
    """Add the ``export`` command to ``sub``."""
    exp = sub.add_parser(
        "export",
        help="export a model to ONNX (model.onnx + config.json) for runtimes without PyTorch",
        **kwargs,
    )
    add_model_options(exp)
    exp.add_argument("--format", default="onnx", choices=("onnx",), help="export format")
    exp.add_argument("-o", "--output", required=True, help="folder to write the export to")
    exp.add_argument(
        "--precision",
        default="float32",
        choices=("float32", "float16"),
        help="weights' precision: float32 (exact) or float16 (half the size; ~60-75 dB SDR "
        "from float32 on music and tones, ~45 dB on the synthetic check signal; slower on "
        "most CPUs; see docs/export.md)",
    )
    exp.add_argument(
        "--check-audio",
        default=None,
        metavar="FILE",
        help="audio the export check separates with torch and onnxruntime, besides a 440 Hz "
        "tone (default: a seeded synthetic mixture, harder on float16 than music)",
    )
    exp.add_argument(
        "--check-seconds",
        type=duration,
        default=20.0,
        help="seconds of --check-audio to check with",
    )
    exp.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads of the check (default: as separate chooses them)",
    )
    exp.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Run ``splitstems export``; return the exit code."""
    import numpy as np

    from splitstems import audio
    from splitstems.errors import AudioError
    from splitstems.export import export_model
    from splitstems.separator import load_model

    started = time.perf_counter()
    model, config = load_model(args.params, model_dir=args.model_dir)
    waveform = None
    if args.check_audio is not None:
        waveform = audio.load(
            args.check_audio,
            duration=args.check_seconds,
            sample_rate=config.sample_rate,
            n_channels=config.n_channels,
        )
        if not np.any(waveform):
            raise AudioError(f"{args.check_audio}: silent: it cannot check the export")

    def step(line: str) -> None:
        print(f"{line} ...", file=sys.stderr, flush=True)

    result = export_model(
        model,
        config,
        args.output,
        precision=args.precision,
        waveform=waveform,
        threads=args.threads,
        on_step=step,
    )
    worst = min(result.sdr_db.values())
    if waveform is None:
        checked = "the synthetic check signal"
    else:
        checked = f"{args.check_audio} ({waveform.shape[0] / config.sample_rate:.1f} s)"
    print(
        f"wrote {result.onnx_path} ({result.size / 1e6:.1f} MB) and {result.config_path}; "
        f"onnxruntime vs torch: {worst:.1f} dB SDR at worst on {checked} and a 440 Hz tone "
        f"({time.perf_counter() - started:.0f} s)"
    )
    return EXIT_OK

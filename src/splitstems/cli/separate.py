"""``splitstems separate``: audio files, folders or globs in, one file per stem out."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from splitstems.audio import DEFAULT_BIT_DEPTH, DEFAULT_BITRATE
from splitstems.cli.options import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_model_options,
    add_quality_options,
    add_run_options,
    duration,
    offset,
    positive_float,
    positive_int,
    separator_options,
)
from splitstems.errors import SplitstemsError

CODECS = ("wav", "mp3", "ogg", "m4a", "wma", "flac")
log = logging.getLogger("splitstems")
#: What ``--ray ADDRESS`` takes for an address; any other value is an input file.
RAY_ADDRESS = re.compile(r"auto|local|ray://\S+|\S+:[0-9]+")


def non_negative_float(text: str) -> float:
    """Parse a finite number ``>= 0``."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0: {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction, **kwargs: object) -> None:
    """Add the ``separate`` command to ``sub``."""
    sep = sub.add_parser("separate", help="separate audio files into stems", **kwargs)
    sep.add_argument(
        "files", nargs="*", metavar="INPUT", help="audio files, folders or glob patterns"
    )
    sep.add_argument("-i", "--inputs", nargs="+", default=[], help=argparse.SUPPRESS)
    add_model_options(sep)
    sep.add_argument(
        "-o",
        "--output_path",
        default=str(Path(tempfile.gettempdir()) / "separated_audio"),
        help="output directory (default: %(default)s, as Spleeter)",
    )
    sep.add_argument("-c", "--codec", default="wav", choices=CODECS, help="output codec")
    sep.add_argument(
        "-b",
        "--bitrate",
        default=None,
        help=f"bitrate of lossy codecs (default: {DEFAULT_BITRATE}; wav and flac have none)",
    )
    sep.add_argument(
        "--bit-depth",
        default=None,
        choices=("16", "24", "32f"),
        help=f"sample format of wav output (flac: 16 or 24; default: {DEFAULT_BIT_DEPTH})",
    )
    sep.add_argument("-s", "--offset", type=offset, default=0.0, help="start offset in seconds")
    sep.add_argument(
        "-d",
        "--duration",
        type=duration,
        default=None,
        help="seconds to process (default: the whole file; the original stopped at 600)",
    )
    sep.add_argument(
        "-f",
        "--filename_format",
        default="{filename}/{instrument}.{codec}",
        help="output path inside -o; keys {filename}, {foldername}, {instrument}, {codec}",
    )
    add_quality_options(sep)
    rerun = sep.add_mutually_exclusive_group()
    rerun.add_argument(
        "--overwrite",
        action="store_true",
        help="overwrite stems of earlier runs: the default, as Spleeter (kept for scripts)",
    )
    rerun.add_argument(
        "--resume",
        action="store_true",
        help="skip inputs whose stems are complete and were made from the same input with "
        "the same model and settings (a hidden record beside each input's stems says so); "
        "redo the others and say why",
    )
    sep.add_argument(
        "--batch-segments",
        type=positive_int,
        default=1,
        help="model segments (~11.9 s each) computed at once",
    )
    add_run_options(
        sep,
        fast_help="bfloat16 on the CPU, float16 on GPUs: faster, ~45 dB from the faithful output",
    )
    add_ray_options(sep)
    sep.set_defaults(handler=run)


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    """``--ray [ADDRESS]``, ``--ray-cpus-per-worker`` and ``--ray-gpus-per-worker``."""
    parser.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="separate on a Ray cluster (pip install 'splitstems[cluster]'): auto, host:port "
        "or ray://host:port; no value: the Ray running on this machine, else a new one. "
        "-o must be a folder every node sees; see docs/cluster.md (default: off, this "
        "machine only)",
    )
    parser.add_argument(
        "--ray-cpus-per-worker",
        metavar="N",
        type=positive_float,
        default=1.0,
        help="CPUs of each Ray worker (one model each; its torch threads)",
    )
    parser.add_argument(
        "--ray-gpus-per-worker",
        metavar="N",
        type=non_negative_float,
        default=0.0,
        help="GPUs of each Ray worker (0.5: two workers share a GPU)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``splitstems separate``; return the exit code."""
    from splitstems.audio import check_encoding
    from splitstems.batch import FileResult, expand_inputs, separate_files
    from splitstems.config import load_config
    from splitstems.errors import OutputError
    from splitstems.separator import Separator, output_paths

    if args.ray and not RAY_ADDRESS.fullmatch(args.ray):  # `--ray song.mp3`: an input
        args.files, args.ray = [args.ray, *args.files], ""
    files = expand_inputs([*args.files, *args.inputs])
    if not files:
        given = " ".join([*args.files, *args.inputs])
        print(
            f"error: no input files{f' found in {given}' if given else ' given'}", file=sys.stderr
        )
        return EXIT_USAGE
    bitrate = args.bitrate or DEFAULT_BITRATE
    bit_depth = args.bit_depth or DEFAULT_BIT_DEPTH
    try:  # None: not given (a codec that ignores it warns only when it was)
        warnings = check_encoding(args.codec, bitrate=args.bitrate, bit_depth=args.bit_depth)
        options = {"batch_segments": args.batch_segments, **separator_options(args)}
        if args.ray is None:
            separator = Separator(args.params, **options)
            instruments = separator.instruments
        else:  # the Ray workers load the model
            instruments = load_config(args.params).instruments
        output_paths(
            files[0],
            args.output_path,
            instruments,
            codec=args.codec,
            filename_format=args.filename_format,
        )
        out = Path(args.output_path)
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out}: output path exists and is not a folder")
    except (SplitstemsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for warning in warnings:  # once, before the first file
        print(f"warning: {warning}", file=sys.stderr)

    def report(result: FileResult) -> None:
        if result.status == "failed":
            print(f"error: {result.reason}", file=sys.stderr)
            return
        folder = Path(os.path.commonpath(list(result.outputs.values())))
        if result.outputs and len(result.outputs) == 1:
            folder = folder.parent
        if result.status == "skipped":
            print(
                f"{result.path}: skipped, stems complete and made with the same settings "
                f"in {folder}"
            )
            return
        for path in result.outputs.values():
            log.info("File %s written successfully", path)
        speed = (
            f", {result.seconds / result.elapsed:.1f}x real time"
            if result.seconds and result.elapsed
            else ""
        )
        redone = f" (redone: {result.redone})" if result.redone else ""
        print(
            f"{result.path}: {len(result.outputs)} stems in {result.elapsed:.1f} s{speed} "
            f"-> {folder}{redone}"
        )

    settings = {
        "codec": args.codec,
        "bitrate": bitrate,
        "bit_depth": bit_depth,
        "offset": args.offset,
        "duration": args.duration,
        "filename_format": args.filename_format,
        "resume": args.resume,
        "on_result": report,
    }
    if args.ray is not None:
        from splitstems.cluster import connect, disconnect, separate_on_ray

        connect(args.ray or None, verbose=args.verbose)
        try:
            batch = separate_on_ray(
                args.params,
                files,
                args.output_path,
                separator_options=options,
                cpus_per_worker=args.ray_cpus_per_worker,
                gpus_per_worker=args.ray_gpus_per_worker,
                **settings,
            )
        finally:  # a Ray started here stops with the command
            disconnect()
        print(batch.summary(), file=sys.stderr if batch.failed else sys.stdout)
        return EXIT_FAILED if batch.failed else EXIT_OK
    batch = separate_files(separator, files, args.output_path, **settings)
    if len(files) > 1:  # one line, on stderr when something failed
        print(batch.summary(), file=sys.stderr if batch.failed else sys.stdout)
    return EXIT_FAILED if batch.failed else EXIT_OK

"""Argument types and option groups shared by the commands (no command logic here)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn

#: Exit codes: success, some inputs failed, usage/model/configuration error.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``splitstems evaluate: error: ...``)."""

    def error(self, message: str) -> NoReturn:
        """Print the problem on one line and exit 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default (``(default: ...)``) unless its help already does."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == []:
            return text
        if default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action) or text


def seconds(text: str, *, allow_zero: bool) -> float:
    """Parse a finite number of seconds (``> 0``, or ``>= 0`` with ``allow_zero``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(
            f"must be a finite number of seconds {'>= 0' if allow_zero else '> 0'}: {text!r}"
        )
    return value


def offset(text: str) -> float:
    """Parse a start offset in seconds (``>= 0``)."""
    return seconds(text, allow_zero=True)


def duration(text: str) -> float:
    """Parse a duration in seconds (``> 0``)."""
    return seconds(text, allow_zero=False)


#: Largest ``--overlap``: segments start at least 1/8 of a segment apart (the engine's
#: ``MIN_STEP``, which checks the step it derives for API callers too).
MAX_OVERLAP = 0.875


def overlap(text: str) -> float:
    """Parse an overlap of model segments, from 0 to :data:`MAX_OVERLAP`."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= MAX_OVERLAP:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to {MAX_OVERLAP:g}: {text!r}")
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    """Return an argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}: {text!r}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive_float(text: str) -> float:
    """Parse a finite number ``> 0``."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0: {text!r}")
    return value


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``-p`` and ``--model-dir``."""
    parser.add_argument(
        "-p",
        "--params_filename",
        dest="params",
        default="spleeter:2stems",
        help="model name (spleeter:2stems, spleeter:4stems, spleeter:5stems, with -16kHz "
        "variants) or path to a JSON config (default: %(default)s)",
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="folder with the weights: converted files or Spleeter's pretrained_models "
        "layout (default: $SPLITSTEMS_MODEL_DIR, then $MODEL_PATH, then the cache, then "
        "download)",
    )


def add_quality_options(parser: argparse.ArgumentParser) -> None:
    """Options that change what is computed (separate and evaluate share them)."""
    parser.add_argument(
        "--mwf",
        action="store_true",
        help="multichannel Wiener filter (norbert's, as the original; reads the input twice)",
    )
    parser.add_argument(
        "--mwf-iterations",
        type=non_negative_int,
        default=None,
        help="EM iterations of the Wiener filter (default 1, as the original; 0: its soft "
        "mask only)",
    )
    parser.add_argument(
        "--mwf-exponent",
        type=positive_float,
        default=None,
        help="raise the model's magnitudes to this power before the Wiener filter "
        "(default 1, as the original; 0.7 scores better, see docs/quality.md)",
    )
    parser.add_argument(
        "--shifts",
        type=positive_int,
        default=1,
        help="average over this many time-shifted separations (4 helps, see docs/quality.md)",
    )
    parser.add_argument(
        "--mask-extension",
        default=None,
        choices=("zeros", "average"),
        help="bins above the model's F: zeros (the default, the original) or the mask's average",
    )
    parser.add_argument(
        "--overlap",
        type=overlap,
        default=0.0,
        help=f"overlap of consecutive model segments, 0 to {MAX_OVERLAP:g} (0 is the "
        f"original's output; 0.5 removes seams and doubles the model's work, {MAX_OVERLAP:g} "
        "is 8x)",
    )
    parser.add_argument(
        "--latency",
        type=positive_float,
        default=None,
        help="separate through the live path with at most this delay in seconds (what "
        "'splitstems stream' computes; see docs/live.md); not with --mwf, --shifts, --overlap "
        "(default: off, the offline engine)",
    )


THREADS_HELP = (
    "CPU threads, fixed (default: one per CPU this process may use, affinity and cgroup "
    "quota, fewer while other processes keep CPUs busy; $OMP_NUM_THREADS when set)"
)


def add_run_options(
    parser: argparse.ArgumentParser, *, fast_help: str, threads_help: str = THREADS_HELP
) -> None:
    """``--fast``, ``--device``, ``--threads`` and ``--verbose``."""
    parser.add_argument("--fast", action="store_true", help=fast_help)
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N, mps (default: automatic)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help=threads_help,
    )
    parser.add_argument("--verbose", action="store_true", help="more logging")


def separator_options(args: argparse.Namespace) -> dict[str, object]:
    """Return the ``Separator`` keywords that the shared options give (model, quality, run)."""
    return {
        "model_dir": args.model_dir,
        "MWF": args.mwf,
        "mwf_iterations": args.mwf_iterations,
        "mwf_exponent": args.mwf_exponent,
        "shifts": args.shifts,
        "mask_extension": args.mask_extension,
        "overlap": args.overlap,
        "precision": "fast" if args.fast else "float32",
        "device": args.device,
        "threads": args.threads,
        "latency": getattr(args, "latency", None),
    }


def check_mwf_options(args: argparse.Namespace) -> str | None:
    """Fill in the Wiener filter defaults; return a usage error if given without --mwf."""
    if not hasattr(args, "mwf"):
        return None
    given = [
        name
        for name, value in (
            ("--mwf-exponent", args.mwf_exponent),
            ("--mwf-iterations", args.mwf_iterations),
        )
        if value is not None
    ]
    if given and not args.mwf:
        need = "needs" if len(given) == 1 else "need"
        return f"{' and '.join(given)} {need} --mwf (Wiener filter options)"
    args.mwf_exponent = 1.0 if args.mwf_exponent is None else args.mwf_exponent
    args.mwf_iterations = 1 if args.mwf_iterations is None else args.mwf_iterations
    return None

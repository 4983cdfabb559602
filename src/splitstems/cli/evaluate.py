"""``splitstems evaluate``: separate a MUSDB18(-HQ) subset and score it."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from splitstems.cli.options import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_model_options,
    add_quality_options,
    add_run_options,
    positive_int,
    separator_options,
)
from splitstems.errors import SplitstemsError

if TYPE_CHECKING:
    from splitstems.evaluate import Summary


def add_parser(sub: argparse._SubParsersAction, **kwargs: object) -> None:
    """Add the ``evaluate`` command to ``sub``."""
    ev = sub.add_parser(
        "evaluate",
        **kwargs,
        help="separate a MUSDB18(-HQ) subset and score it (BSSEval v4, as museval)",
    )
    add_model_options(ev)
    ev.add_argument("--mus_dir", required=True, help="MUSDB18 or MUSDB18-HQ root (train/, test/)")
    ev.add_argument(
        "-o", "--output_path", required=True, help="folder for <subset>/<track>.json and summary"
    )
    ev.add_argument(
        "--subset",
        default="test",
        choices=("test", "train"),
        help="the MUSDB subset folder to score (default: test)",
    )
    ev.add_argument(
        "--tracks",
        nargs="+",
        default=None,
        help="only these tracks (names, .stem.mp4 optional; default: all)",
    )
    add_quality_options(ev)
    ev.add_argument(
        "--backend",
        default="fast",
        choices=("fast", "museval"),
        help="metrics: fast (museval's numbers, batched in torch) or museval itself",
    )
    ev.add_argument(
        "--jobs", type=positive_int, default=1, help="tracks scored in parallel (default 1)"
    )
    ev.add_argument(
        "--resume",
        action="store_true",
        help="keep the track results of an interrupted run with the same settings in the "
        "output folder and score only the rest",
    )
    add_run_options(ev, fast_help="bfloat16 on the CPU, float16 on GPUs")
    ev.set_defaults(handler=run)


def _writable_folder(folder: Path) -> str | None:
    """Create ``folder`` and try a file in it; return the problem, or None."""
    if folder.exists() and not folder.is_dir():
        return f"{folder}: exists and is not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"{folder}: cannot write there ({exc.strerror or exc})"
    return None


def run(args: argparse.Namespace) -> int:
    """Run ``splitstems evaluate``; return the exit code."""
    from splitstems.evaluate import check_backend, check_resume, evaluate, find_tracks
    from splitstems.separator import Separator

    # bad datasets, options and output folders fail before anything is created
    selected = find_tracks(args.mus_dir, args.subset, names=args.tracks)
    check_backend(args.backend)
    if not args.output_path.strip():
        print("error: -o/--output_path is empty", file=sys.stderr)
        return EXIT_USAGE
    options = separator_options(args)
    try:
        separator = Separator(args.params, **options)
    except (SplitstemsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    settings = {
        "model": args.params,
        "model_sha256": separator.fingerprint(),
        "mwf": args.mwf,
        "mwf_iterations": args.mwf_iterations,
        "mwf_exponent": args.mwf_exponent,
        "overlap": args.overlap,
        "shifts": args.shifts,
        "mask_extension": separator.engine.mask_extension,
        "precision": options["precision"],
        **({"latency": args.latency} if args.latency is not None else {}),
    }
    output = Path(args.output_path)
    if args.resume:
        check_resume(output, args.mus_dir, args.subset, backend=args.backend, settings=settings)
    for folder in (output, output / args.subset):
        problem = _writable_folder(folder)
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_USAGE
    summary = evaluate(
        separator.separate,
        args.mus_dir,
        output,
        subset=args.subset,
        tracks=args.tracks,
        backend=args.backend,
        jobs=args.jobs,
        progress=sys.stderr.isatty(),
        settings=settings,
        on_failure=lambda _track, message: print(f"error: {message}", file=sys.stderr),
        resume=args.resume,
    )
    _report_evaluation(summary, output / args.subset, {t.name for t in selected})
    if summary.write_error:
        print(f"error: {summary.write_error}", file=sys.stderr)
    if summary.failed:
        listed = "" if summary.write_error else '; listed under "failed" in summary.json'
        print(
            f"{len(summary.failed)} of {summary.settings['tracks']} tracks failed "
            f"(not in the table{listed})",
            file=sys.stderr,
        )
    return EXIT_FAILED if summary.failed or summary.write_error else EXIT_OK


def _report_evaluation(summary: Summary, folder: Path, names: set[str]) -> None:
    """Print an evaluation's table, and warn of other tracks' results in ``folder``."""
    notes = []
    if summary.failed or summary.resumed:
        notes.append(f"{len(summary.tracks) - len(summary.resumed)} scored now")
    if summary.resumed:
        notes.append(f"{len(summary.resumed)} kept from the earlier run")
    if summary.failed:
        notes.append(f"{len(summary.failed)} failed")
    counts = f" ({', '.join(notes)})" if notes else ""
    print(
        f"{summary.settings['tracks']} {summary.settings['subset']} tracks{counts} in "
        f"{summary.elapsed:.1f} s; median over frames, then over tracks (dB):"
    )
    print(summary.table() if summary.tracks else "no track could be scored")
    if summary.unscored:
        print(f"not scored (no truth in MUSDB): {', '.join(summary.unscored)}")
    print(f"per track: {folder}/*.json")
    others = sorted(p.name for p in folder.glob("*.json") if p.stem not in names)
    if others:
        print(
            f"warning: {folder} also holds {len(others)} result file(s) of other tracks, "
            f"e.g. {others[0]!r} (not in this summary; museval's EvalStore would mix them in)",
            file=sys.stderr,
        )

"""Command line: ``splitstems separate|models|convert|train|evaluate``, Spleeter's flags.

Only parses arguments, calls the library and maps its errors to one-line messages and
exit codes (0 success, 1 some inputs failed, 2 usage, model or configuration errors).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from splitstems import __version__
from splitstems.errors import SplitstemsError

if TYPE_CHECKING:
    from splitstems.evaluate import Summary

CODECS = ("wav", "mp3", "ogg", "m4a", "wma", "flac")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
log = logging.getLogger("splitstems")


def _seconds(text: str, *, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(
            f"must be a finite number of seconds {'>= 0' if allow_zero else '> 0'}: {text!r}"
        )
    return value


def _offset(text: str) -> float:
    return _seconds(text, allow_zero=True)


def _duration(text: str) -> float:
    return _seconds(text, allow_zero=False)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to below 1: {text!r}")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
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


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0: {text!r}")
    return value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
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
        "layout (default: $SPLITSTEMS_MODEL_DIR, then the cache, then download)",
    )


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``splitstems evaluate: error: ...``)."""

    def error(self, message: str) -> NoReturn:
        """Print the problem on one line and exit 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``splitstems`` command."""
    parser = _Parser(
        prog="splitstems",
        description="Split music into stems with Deezer's Spleeter models, in PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"splitstems {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    sep = sub.add_parser("separate", help="separate audio files into stems")
    sep.add_argument(
        "files", nargs="*", metavar="INPUT", help="audio files, folders or glob patterns"
    )
    sep.add_argument("-i", "--inputs", nargs="+", default=[], help=argparse.SUPPRESS)
    _add_model_options(sep)
    sep.add_argument(
        "-o",
        "--output_path",
        default=str(Path(tempfile.gettempdir()) / "separated_audio"),
        help="output directory (default: %(default)s, as Spleeter)",
    )
    sep.add_argument("-c", "--codec", default="wav", choices=CODECS, help="output codec")
    sep.add_argument("-b", "--bitrate", default="128k", help="bitrate of lossy codecs (128k)")
    sep.add_argument(
        "--bit-depth",
        default="16",
        choices=("16", "24", "32f"),
        help="sample format of wav/flac output (default 16)",
    )
    sep.add_argument("-s", "--offset", type=_offset, default=0.0, help="start offset in seconds")
    sep.add_argument(
        "-d",
        "--duration",
        type=_duration,
        default=None,
        help="seconds to process (default: the whole file; the original stopped at 600)",
    )
    sep.add_argument(
        "-f",
        "--filename_format",
        default="{filename}/{instrument}.{codec}",
        help="output path inside -o; keys {filename}, {foldername}, {instrument}, {codec}",
    )
    _add_quality_options(sep)
    sep.add_argument(
        "--overwrite", action="store_true", help="redo files whose stems exist already"
    )
    sep.add_argument(
        "--fast",
        action="store_true",
        help="bfloat16 on the CPU, float16 on GPUs: faster, ~45 dB from the faithful output",
    )
    sep.add_argument(
        "--batch-segments",
        type=_positive_int,
        default=1,
        help="model segments (~11.9 s each) computed at once (default 1)",
    )
    sep.add_argument("--device", default=None, help="cpu, cuda, mps (default: automatic)")
    sep.add_argument("--verbose", action="store_true", help="more logging")

    models = sub.add_parser("models", help="list the released models and whether each is cached")
    models.add_argument("--model-dir", default=None, help="also look in this folder")

    conv = sub.add_parser(
        "convert", help="convert a TensorFlow Spleeter checkpoint to safetensors + JSON config"
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
    _add_evaluate_parser(sub)
    _add_train_parser(sub)
    return parser


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser(
        "train",
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
        "-d", "--data", dest="data_root", default=None, help="folder the CSV paths are in (.)"
    )
    tr.add_argument("--mus_dir", default=None, help="MUSDB18 or MUSDB18-HQ root (no CSVs)")
    tr.add_argument("-o", "--output", default=None, help="model folder (config's model_dir)")
    tr.add_argument("--resume", action="store_true", help="continue the run in the model folder")
    tr.add_argument("--init", default=None, help="start from a model (spleeter:2stems, a folder)")
    tr.add_argument("--freeze-encoder", action="store_true", help="train the decoders only")
    tr.add_argument("--steps", type=_positive_int, default=None, help="train_max_steps")
    tr.add_argument(
        "--augment", choices=("none", "spectrogram", "audio"), default=None, help="augmentation"
    )
    tr.add_argument(
        "--batch-norm",
        choices=("moving", "batch"),
        default=None,
        help="moving: as the original trained (default); batch: batch statistics + dropout",
    )
    tr.add_argument("--cache-dir", default=None, help="decoded chunks (<model folder>/cache)")
    tr.add_argument("--model-dir", default=None, help="where the weights of --init are")
    tr.add_argument("--no-validation", action="store_true", help="skip validation")
    tr.add_argument("--device", default=None, help="cpu, cuda, mps (default: automatic)")
    tr.add_argument("--verbose", action="store_true", help="more logging")


def _add_quality_options(parser: argparse.ArgumentParser) -> None:
    """Options that change what is computed (separate and evaluate share them)."""
    parser.add_argument(
        "--mwf",
        action="store_true",
        help="multichannel Wiener filter (norbert's, as the original; reads the input twice)",
    )
    parser.add_argument(
        "--mwf-iterations",
        type=_non_negative_int,
        default=None,
        help="EM iterations of the Wiener filter (default 1, as the original; 0: its soft "
        "mask only)",
    )
    parser.add_argument(
        "--mwf-exponent",
        type=_positive_float,
        default=None,
        help="raise the model's magnitudes to this power before the Wiener filter "
        "(default 1, as the original; 0.7 scores better, see README)",
    )
    parser.add_argument(
        "--shifts",
        type=_positive_int,
        default=1,
        help="average over this many time-shifted separations (default 1; 4 helps, see README)",
    )
    parser.add_argument(
        "--mask-extension",
        default=None,
        choices=("zeros", "average"),
        help="bins above the model's F: zeros (the original) or the mask's average",
    )
    parser.add_argument(
        "--overlap",
        type=_fraction,
        default=0.0,
        help="overlap of consecutive model segments, 0 to <1 (0.5 removes seams; "
        "default 0: the original's output)",
    )


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "evaluate",
        help="separate a MUSDB18(-HQ) subset and score it (BSSEval v4, as museval)",
    )
    _add_model_options(ev)
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
        "--tracks", nargs="+", default=None, help="only these tracks (names, .stem.mp4 optional)"
    )
    _add_quality_options(ev)
    ev.add_argument("--fast", action="store_true", help="bfloat16/float16 model")
    ev.add_argument(
        "--backend",
        default="fast",
        choices=("fast", "museval"),
        help="metrics: fast (museval's numbers, batched in torch) or museval itself",
    )
    ev.add_argument(
        "--jobs", type=_positive_int, default=1, help="tracks scored in parallel (default 1)"
    )
    ev.add_argument(
        "--resume",
        action="store_true",
        help="keep the track results of an interrupted run with the same settings in the "
        "output folder and score only the rest",
    )
    ev.add_argument("--device", default=None, help="cpu, cuda, mps (default: automatic)")
    ev.add_argument("--verbose", action="store_true", help="more logging")


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


def _evaluate(args: argparse.Namespace) -> int:
    from splitstems.evaluate import check_backend, check_resume, evaluate, find_tracks
    from splitstems.separator import Separator

    # bad datasets, options and output folders fail before anything is created
    selected = find_tracks(args.mus_dir, args.subset, names=args.tracks)
    check_backend(args.backend)
    if not args.output_path.strip():
        print("error: -o/--output_path is empty", file=sys.stderr)
        return EXIT_USAGE
    precision = "fast" if args.fast else "float32"
    try:
        separator = Separator(
            args.params,
            MWF=args.mwf,
            model_dir=args.model_dir,
            device=args.device,
            precision=precision,
            overlap=args.overlap,
            mwf_iterations=args.mwf_iterations,
            mwf_exponent=args.mwf_exponent,
            shifts=args.shifts,
            mask_extension=args.mask_extension,
        )
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
        "precision": precision,
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


def _separate(args: argparse.Namespace) -> int:
    from splitstems.audio import check_encoding
    from splitstems.batch import FileResult, expand_inputs, separate_files
    from splitstems.errors import OutputError
    from splitstems.separator import Separator, output_paths

    files = expand_inputs([*args.files, *args.inputs])
    if not files:
        given = " ".join([*args.files, *args.inputs])
        print(
            f"error: no input files{f' found in {given}' if given else ' given'}", file=sys.stderr
        )
        return EXIT_USAGE
    try:
        check_encoding(args.codec, bitrate=args.bitrate, bit_depth=args.bit_depth)
        separator = Separator(
            args.params,
            MWF=args.mwf,
            model_dir=args.model_dir,
            device=args.device,
            precision="fast" if args.fast else "float32",
            overlap=args.overlap,
            batch_segments=args.batch_segments,
            mwf_iterations=args.mwf_iterations,
            mwf_exponent=args.mwf_exponent,
            shifts=args.shifts,
            mask_extension=args.mask_extension,
        )
        output_paths(
            files[0],
            args.output_path,
            separator.instruments,
            codec=args.codec,
            filename_format=args.filename_format,
        )
        out = Path(args.output_path)
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out}: output path exists and is not a folder")
    except (SplitstemsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    def report(result: FileResult) -> None:
        if result.status == "failed":
            print(f"error: {result.reason}", file=sys.stderr)
            return
        folder = Path(next(iter(result.outputs.values()))).parent
        if result.status == "skipped":
            print(f"{result.path}: skipped, outputs exist in {folder} (--overwrite to redo)")
            return
        for path in result.outputs.values():
            log.info("File %s written successfully", path)
        speed = (
            f", {result.seconds / result.elapsed:.1f}x real time"
            if result.seconds and result.elapsed
            else ""
        )
        print(
            f"{result.path}: {len(result.outputs)} stems in {result.elapsed:.1f} s{speed} "
            f"-> {folder}"
        )

    batch = separate_files(
        separator,
        files,
        args.output_path,
        codec=args.codec,
        bitrate=args.bitrate,
        bit_depth=args.bit_depth,
        offset=args.offset,
        duration=args.duration,
        filename_format=args.filename_format,
        overwrite=args.overwrite,
        on_result=report,
    )
    if len(files) > 1:
        print(batch.summary())
    if batch.failed:
        print(f"{len(batch.failed)} of {len(files)} files failed", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _models(args: argparse.Namespace) -> int:
    from splitstems import hub
    from splitstems.config import load_config

    for entry in hub.list_models(model_dir=args.model_dir):
        config = load_config(entry.name)
        state = "available" if entry.available else "not cached (downloads on first use)"
        print(f"{entry.name:24} {', '.join(config.instruments):38} {state}")
    return EXIT_OK


def _convert(args: argparse.Namespace) -> int:
    from splitstems.config import load_config
    from splitstems.convert import convert_checkpoint

    config = load_config(args.params)
    path = convert_checkpoint(args.checkpoint, args.output, config)
    print(f"wrote {path} and {Path(path).parent / 'config.json'}")
    return EXIT_OK


def _train(args: argparse.Namespace) -> int:
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
        return 130
    return EXIT_OK


class _Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP, raised like Ctrl-C so that partial outputs are removed."""


def _on_signal(signum: int, frame: object) -> None:
    raise _Terminated(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = build_parser().parse_args(argv)
    if hasattr(args, "mwf"):
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
            options = " and ".join(given)
            print(f"error: {options} {need} --mwf (Wiener filter options)", file=sys.stderr)
            return EXIT_USAGE
        args.mwf_exponent = 1.0 if args.mwf_exponent is None else args.mwf_exponent
        args.mwf_iterations = 1 if args.mwf_iterations is None else args.mwf_iterations
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), _on_signal)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s:%(name)s:%(message)s",
    )
    handlers = {
        "separate": _separate,
        "models": _models,
        "convert": _convert,
        "train": _train,
        "evaluate": _evaluate,
    }
    try:
        return handlers[args.command](args)
    except SplitstemsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except _Terminated as exc:
        print("terminated", file=sys.stderr)
        return 128 + int(exc.args[0])
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run() -> NoReturn:
    """Console entry point: :func:`main`, then exit without the interpreter's teardown.

    Once the command has returned, every output is written, closed and renamed; tearing
    down torch's modules would only add ~0.3 s to each command, so the process ends
    right away after flushing the logs and standard streams.
    """
    try:
        code = main()
    except BrokenPipeError:  # the reader of our output went away (`| head`)
        code = EXIT_FAILED
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()

"""The one place that builds the ``splitstems`` parser and maps errors to exit codes.

Exit codes: 0 success, 1 some inputs failed, 2 usage, model or configuration errors,
128 + N when stopped by signal N (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

from splitstems import __version__
from splitstems.cli import evaluate, models, separate, serve, train
from splitstems.cli import export as export_command
from splitstems.cli import stream as stream_command
from splitstems.cli.options import (
    EXIT_FAILED,
    EXIT_USAGE,
    HelpFormatter,
    Parser,
    check_mwf_options,
)
from splitstems.device import keep_freed_memory, load_meter
from splitstems.errors import SplitstemsError


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``splitstems`` command."""
    parser = Parser(
        prog="splitstems",
        description="Split music into stems with Deezer's Spleeter models, in PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"splitstems {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    common = {"formatter_class": HelpFormatter}
    # in the order of --help: separating first, then the tools around the models
    separate.add_parser(sub, **common)
    stream_command.add_parser(sub, **common)
    serve.add_parser(sub, **common)
    models.add_parsers(sub, **common)
    export_command.add_parser(sub, **common)
    evaluate.add_parser(sub, **common)
    train.add_parser(sub, **common)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP, raised like Ctrl-C so that partial outputs are removed."""


def _on_signal(signum: int, frame: object) -> None:
    raise _Terminated(signum)


def install_signal_handlers() -> None:
    """Turn SIGTERM and SIGHUP into :class:`_Terminated` (only in the main thread).

    A signal whose inherited disposition is not the default is left alone: under
    ``nohup`` SIGHUP is ignored, and it stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is signal.SIG_DFL:
            signal.signal(number, _on_signal)


class LogFormatter(logging.Formatter):
    """Log lines as the command's own messages: ``warning: <message>``, ``error: ...``.

    The level in lower case, then the message. With ``verbose`` (``--verbose``), and
    always for other libraries' loggers, the logger's name comes in between
    (``warning: splitstems.audio: ...``) to tell where a line comes from.
    """

    def __init__(self, *, verbose: bool = False) -> None:
        super().__init__("%(message)s")
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        """Return ``<level>: [<logger>: ]<message>`` (a traceback, if any, below it)."""
        ours = record.name == "splitstems" or record.name.startswith("splitstems.")
        where = f"{record.name}: " if self.verbose or not ours else ""
        return f"{record.levelname.lower()}: {where}{super().format(record)}"


def setup_logging(*, verbose: bool) -> None:
    """Log to stderr with :class:`LogFormatter`: warnings and worse, and info if ``verbose``."""
    handler = logging.StreamHandler()
    handler.setFormatter(LogFormatter(verbose=verbose))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


def finish_startup(args: argparse.Namespace) -> None:
    """Import torch with the garbage collector paused, then freeze what start-up made.

    Only where :func:`run` (the console entry point) paused the collector; a caller of
    :func:`main` keeps its own. Importing torch makes ~380 collections (0.12 s), and the
    ~10^5 objects it leaves were walked again by each full collection of the command
    (0.09 s in a 3-minute separation, 2026-11-30); frozen, no collection looks at them.
    Commands that never import torch (``models``, ``convert``) skip it.

    Glibc's malloc is told to keep freed memory first (:func:`keep_freed_memory`),
    except for commands that keep running (``serve``), whose memory goes back to the
    system when a job is done.
    """
    if gc.isenabled():
        return
    if not getattr(args, "long_running", False):
        keep_freed_memory()
    try:
        if getattr(args, "imports_torch", True):
            import torch  # noqa: F401 - imported here for the collector's sake
    finally:
        gc.freeze()
        gc.enable()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    load_meter()  # start-up is the first window in which other processes' load is seen
    args = build_parser().parse_args(argv)
    problem = check_mwf_options(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    install_signal_handlers()
    setup_logging(verbose=getattr(args, "verbose", False))
    try:
        finish_startup(args)  # inside: Ctrl-C while torch is imported is an interrupt too
        return args.handler(args)
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
    gc.disable()  # until the start-up imports are done (see finish_startup)
    try:
        code = main()
    except BrokenPipeError:  # the reader of our output went away (`| head`)
        code = EXIT_FAILED
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)

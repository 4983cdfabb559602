"""Helpers of the tests that signal a command: start it as a terminal would."""

from __future__ import annotations

import signal


def as_in_a_terminal() -> None:
    """``preexec_fn``: SIGINT, SIGTERM and SIGHUP at their defaults in the child.

    A child inherits ignored signals: under ``nohup`` SIGHUP is ignored, and a shell's
    background job ignores SIGINT. Our commands keep an inherited ignore (as they
    should), so a test that sends one of them must not depend on how the test run
    itself was started.
    """
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def as_under_nohup() -> None:
    """``preexec_fn``: as :func:`as_in_a_terminal`, but SIGHUP ignored, as ``nohup`` does."""
    as_in_a_terminal()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

"""Command line: ``splitstems separate|models|convert|train|evaluate``, Spleeter's flags.

One module per command (``add_parser`` + ``run``); :mod:`splitstems.cli.main` builds the
parser and maps the library's errors to one-line messages and exit codes (0 success,
1 some inputs failed, 2 usage, model or configuration errors). Nothing else here
computes anything: the commands only translate between people and the library.
"""

from splitstems.cli.main import build_parser, main, run

__all__ = ["build_parser", "main", "run"]

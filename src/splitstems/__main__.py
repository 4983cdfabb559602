"""``python -m splitstems``: the same as the ``splitstems`` command."""

from splitstems.cli import run

run()

"""``python -m splitstems``: the same as the ``splitstems`` command."""

import sys

from splitstems.cli import main

sys.exit(main())

"""``python -m gpt2forge``: the same as the ``gpt2forge`` command."""

import sys

from .commands import main

sys.exit(main())

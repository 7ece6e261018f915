"""``python -m gpt2forge.cli``: the ``gpt2forge`` command for launchers (torchrun, accelerate launch) that need
a module to run. The commands live in ``gpt2forge.commands``."""

import sys

from .commands import main

if __name__ == "__main__":
    sys.exit(main())

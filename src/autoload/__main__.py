"""``python -m autoload``: the ``autoload`` command."""

import sys

from autoload.cli import main

sys.exit(main())

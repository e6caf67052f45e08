"""``python -m jacbatch``: the same as the ``jacbatch`` command."""

import sys

from .cli import main

sys.exit(main())

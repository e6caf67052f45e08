"""``python -m jacbatch ...``: the same as the ``jacbatch`` command."""

from .cli import main

raise SystemExit(main())

"""``python -m fastabsld``: the command line (see ``fastabsld.cli``)."""

from fastabsld.cli import main

raise SystemExit(main())

"""``python -m fastabsld``: the command line (see ``fastabsld.study.cli``)."""

from fastabsld.study.cli import main

raise SystemExit(main())

"""``python -m fastabsld``: the command line (see ``fastabsld.recipe.cli``)."""

from fastabsld.recipe.cli import main

raise SystemExit(main())

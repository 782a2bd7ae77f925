"""`python -m castlib` runs the command-line tool."""
import gc
import sys

gc.set_threshold(50_000, *gc.get_threshold()[1:])   # as cli._fewer_collections, before its imports

from .cli import main  # noqa: E402

sys.exit(main())

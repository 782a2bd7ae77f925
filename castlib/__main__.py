"""`python -m castlib` runs the command-line tool."""
import sys

from . import _fewer_collections

_fewer_collections()   # before the command's imports

from .cli import main  # noqa: E402

sys.exit(main())

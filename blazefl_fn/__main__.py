"""``python -m blazefl_fn``: the same command line as ``blazefl-fn``."""

import sys

from .cli import main

sys.exit(main())

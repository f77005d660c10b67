"""``python -m sdegen.cli``: the same as the ``sdegen`` console script (torchrun runs it this way)."""

import sys

from . import main

sys.exit(main())

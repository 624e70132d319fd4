"""``python -m vlmcut.cli``: the same as the ``vlmcut`` command."""

import sys

from . import main

sys.exit(main())

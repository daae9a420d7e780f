"""`python -m openjamba ...`: the same commands as the `openjamba` script."""

import sys

from .cli import main

sys.exit(main())

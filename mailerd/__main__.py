"""`python -m mailerd` runs the same entry point as the `mailerd` console script."""

import sys

from mailerd.cli import main

sys.exit(main())

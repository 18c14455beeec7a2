"""`python -m gradkit` runs the same command line as `gradkit`."""

import sys

from gradkit.cli import main

sys.exit(main())

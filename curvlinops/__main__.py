"""Entry point of ``python -m curvlinops`` (the demo, see :mod:`curvlinops.demo`)."""

import sys

from .demo import main

sys.exit(main())

"""python -m minimixer COMMAND ...: the same as the `minimixer` console script."""
import sys

from .commands import main

sys.exit(main())

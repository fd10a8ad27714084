import sys

from . import main
from ..cli import run

sys.exit(run(main, prog="python -m minimixer.coursework"))

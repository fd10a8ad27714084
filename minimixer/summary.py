"""python -m minimixer.summary: a model's parameters, MACs and where the time goes (the code is in commands/summary.py)."""
import sys

from .commands.summary import command, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(command())

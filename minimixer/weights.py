"""python -m minimixer.weights: download, convert, resize and describe checkpoints (the code is in commands/weights.py)."""
import sys

from .commands.weights import command, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(command())

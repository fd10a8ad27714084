"""python -m minimixer.train: train or fine-tune a Mixer, with checkpoints and resume (the code is in commands/train.py)."""
import sys

from .commands.train import command, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(command())

"""python -m minimixer.eval: top-1/top-5 accuracy of a Mixer on a folder of images, as timm's validate.py (the code is in commands/eval.py)."""
import sys

from .commands.eval import command, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(command())

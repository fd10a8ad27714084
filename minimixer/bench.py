"""python -m minimixer.bench: speed and memory against timm, ONNX Runtime and OpenVINO (the code is in commands/bench.py)."""
import sys

from .commands.bench import command, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(command())

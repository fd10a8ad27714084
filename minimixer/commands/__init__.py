"""The commands a user runs: `minimixer NAME ...` or `python -m minimixer.NAME ...`.

Each module parses its arguments, calls the library and reports; `command(argv)` runs it as
the shell would (exit status, user errors as one line on stderr).
"""
import importlib
import sys

COMMANDS = {
    "eval": "top-1/top-5 accuracy on a folder of images (timm's validate.py)",
    "predict": "the top-k classes of images",
    "train": "train or fine-tune, with checkpoints and resume",
    "weights": "download, convert and describe checkpoints",
    "summary": "parameters, MACs and where the time goes",
    "bench": "speed and memory against timm, ONNX Runtime and OpenVINO",
    "coursework": "release a student edition, grade submissions",
}

USAGE = "usage: minimixer COMMAND [ARGS...]   (minimixer COMMAND --help for its options)\n\ncommands:\n" + "".join(
    f"  {name:<11} {what}\n" for name, what in COMMANDS.items())


def main(argv=None):
    """The `minimixer` console script: `minimixer eval --backend cupy` = `python -m minimixer.eval --backend cupy`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"minimixer: unknown command {name!r}\n\n{USAGE}", end="", file=sys.stderr)
        return 2
    if name == "coursework":
        from ..coursework.cli import main as coursework_main
        return coursework_main(rest, prog="minimixer coursework")
    module = importlib.import_module(f"{__name__}.{name}")
    return module.command(rest, prog=f"minimixer {name}")

"""python -m minimixer.predict IMAGE...: the top-k classes of images (the code is in commands/predict.py).

Only `python -m` runs this file. Importing it would bind the module to the name
`minimixer.predict` on the package, in place of the function `mm.predict`, so an import
stops with a line that says where to look instead.
"""
import sys

if __name__ != "__main__":
    raise ImportError("minimixer.predict is the command (python -m minimixer.predict); the function is "
                      "mm.predict, and the command's code is minimixer.commands.predict")

from minimixer.commands.predict import command  # noqa: E402

sys.exit(command())

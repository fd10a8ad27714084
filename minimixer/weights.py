"""python -m minimixer.weights download NAME [--to DIR] | list: fetch timm's pretrained Mixer weights.

The loading and saving functions live in minimixer.weights_io (minimixer.load_weights, save_weights).
"""
import sys

from .pretrained import main

if __name__ == "__main__":
    sys.exit(main())

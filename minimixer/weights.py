"""python -m minimixer.weights download NAME [--to DIR] | list: fetch pretrained Mixer weights.

The checkpoint table lives in minimixer/checkpoints/registry.py; loading and saving in
minimixer/checkpoints/safetensors_io.py (minimixer.load_weights, save_weights).
"""
import os
import sys

from .checkpoints.registry import CHECKPOINTS, WeightsNotFound, download, local_name
from .checkpoints.safetensors_io import atomic_copy
from .cli import ArgumentParser, run


def main(argv=None):
    """python -m minimixer.weights download NAME [--to DIR] | list"""
    p = ArgumentParser(prog="python -m minimixer.weights", description="pretrained Mixer weights")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="fetch a checkpoint from the Hugging Face hub")
    d.add_argument("model", help="e.g. mixer_b16_224 or mixer_l16_224.goog_in21k")
    d.add_argument("--to", metavar="DIR", help="also copy it to DIR/<model>.safetensors (e.g. weights/)")
    d.add_argument("--cache-dir", help="huggingface_hub cache folder (default: its own)")
    sub.add_parser("list", help="list the known checkpoints")
    args = p.parse_args(argv)
    if args.command == "list":
        for tag, ck in CHECKPOINTS.items():
            where = ck.repo_id or "bundled: minimixer/assets/mixer_digits.safetensors"
            print(f"{tag:36s} {ck.num_classes:6d} classes  {where}")
        return 0
    try:
        path = download(args.model, cache_dir=args.cache_dir)
    except (WeightsNotFound, ValueError) as e:
        print(f"python -m minimixer.weights: error: {e}", file=sys.stderr)
        return 2
    if args.to:
        os.makedirs(args.to, exist_ok=True)
        dest = os.path.join(args.to, local_name(args.model))
        atomic_copy(path, dest)
        path = dest
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="python -m minimixer.weights"))

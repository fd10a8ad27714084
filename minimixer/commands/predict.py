"""python -m minimixer.predict IMAGE...: top-k classes of images.

    python -m minimixer.predict cat.jpg dog.png --model mixer_b16_224 --weights auto
    python -m minimixer.predict digit.png                    # the bundled digits model
    python -m minimixer.predict *.jpg --model mixer_b16_224 --checkpoint W.safetensors -b 32 --json

The function of the same name is `mm.predict` (the fast path). To call the command from
Python: `from minimixer.commands.predict import main`.
"""
import json
import math
import sys

import numpy as np

from . import cli
from ..runtime import distributed
from ..backend import BACKENDS, to_backend, to_numpy, xp_for
from ..data import eval_transform, open_image, strict_pixel_limit
from ..fast import predict
from ..checkpoints.registry import class_names, data_config

PROG = "python -m minimixer.predict"


def parse_args(argv, prog=PROG):
    p = cli.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="+", metavar="IMAGE")
    cli.add_model_args(p, default_model="mixer_digits")
    cli.add_weights_args(p)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {file, topk: [{index, label, prob}]} (prob null if not finite)")
    p.add_argument("--backend", choices=BACKENDS, default="numpy")
    p.add_argument("-b", "--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    if args.topk < 1:
        p.error("--topk must be >= 1")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def json_number(x):
    """A float for JSON: NaN and Inf (weights loaded with --allow-nonfinite) become null,
    since bare NaN is not JSON."""
    return float(x) if math.isfinite(x) else None


def print_text(r):
    print(cli.shown_path(r["file"]))  # any bytes in a file name, not a UnicodeEncodeError
    for rank, t in enumerate(r["topk"], 1):
        prob = f"{t['prob']:7.2%}" if t["prob"] is not None else "    nan"
        print(f"  {rank}. {prob}  {t['label']}  ({t['index']})", flush=True)


def main(argv=None, prog=PROG):
    args = parse_args(argv, prog)
    cfg = cli.config_from_args(args)
    dcfg = data_config(args.model, args.weights)
    xp_for(args.backend)
    strict_pixel_limit()
    weights, params = cli.load_model_weights(args, cfg)
    names = class_names(args.model, cfg.num_classes, weights)
    transform = eval_transform(cfg.image_hw[0], crop_pct=dcfg.crop_pct, interpolation=dcfg.interpolation,
                               mean=dcfg.mean, std=dcfg.std, pipeline=dcfg.pipeline)
    decode = getattr(transform, "decode", open_image)  # OpenCV for the MMPretrain pipeline
    mode = "L" if cfg.in_chans == 1 else "RGB"
    k = min(args.topk, cfg.num_classes)

    results, failed = [], 0
    images = distributed.shard(args.images)  # this rank's share (all of them on one process)
    alone = distributed.size() == 1  # one process prints as results come, so Ctrl-C keeps them
    try:
        for start in range(0, len(images), args.batch_size):
            files, arrays = [], []
            for path in images[start:start + args.batch_size]:
                try:
                    arrays.append(transform(decode(path, mode)))
                    files.append(path)
                except Exception as e:  # noqa: BLE001 - report the file, go on with the others
                    failed += 1
                    print(f"{prog}: error: cannot read image {path}: {e}", file=sys.stderr)
            if not files:
                continue
            logits = to_numpy(predict(params, to_backend(np.stack(arrays), args.backend), cfg))
            probs = softmax(logits.astype(np.float64))
            for path, p in zip(files, probs):
                top = np.argsort(-p, kind="stable")[:k]
                r = {"file": path, "topk": [{"index": int(i), "label": names[i], "prob": json_number(p[i])}
                                            for i in top]}
                results.append(r)
                if alone and not args.json:
                    print_text(r)
    except KeyboardInterrupt:  # keep the results so far: print them, and say so
        if args.json:
            print(json.dumps(results, indent=2, allow_nan=False))
        print(f"{prog}: interrupted after {len(results)} of {len(args.images)} images", file=sys.stderr)
        return 130
    results, (failed,) = distributed.gather_lists(results), distributed.sum_counts(failed)  # in input order
    if not distributed.is_root():
        return 2 if failed else 0
    if not alone and not args.json:
        for r in results:
            print_text(r)
    if args.json:
        print(json.dumps(results, indent=2, allow_nan=False))
    return 2 if failed else 0


def command(argv=None, prog=PROG):
    """Run the command as its shell would: exit status, errors as one line."""
    return cli.run(lambda a: main(a, prog), argv, prog=prog)

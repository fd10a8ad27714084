"""python -m minimixer.predict IMAGE...: top-k classes of images.

    python -m minimixer.predict cat.jpg dog.png --model mixer_b16_224 --weights auto
    python -m minimixer.predict digit.png                    # the bundled digits model
    python -m minimixer.predict *.jpg --model mixer_b16_224 --weights W.safetensors --json
"""
import json
import sys

import numpy as np

from . import cli, distributed
from .backend import to_backend, to_numpy, xp_for
from .data import eval_transform, open_image
from .fast import predict
from .checkpoints.registry import WeightsNotFound, class_names, data_config, find_weights
from .checkpoints.safetensors_io import load_weights


def parse_args(argv):
    p = cli.ArgumentParser(prog="python -m minimixer.predict", description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="+", metavar="IMAGE")
    cli.add_model_args(p, default_model="mixer_digits")
    p.add_argument("--weights", default="auto", help="a safetensors file, or 'auto' (bundled, ./weights/, or download)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print a JSON list of {file, topk: [{index, label, prob}]}")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    if args.topk < 1:
        p.error("--topk must be >= 1")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def main(argv=None):
    args = parse_args(argv)
    cfg = cli.config_from_args(args)
    dcfg = data_config(args.model)
    xp_for(args.backend)
    try:
        weights = find_weights(args.model, args.weights)
    except WeightsNotFound as e:
        raise cli.UserError(str(e)) from None
    params = load_weights(weights, cfg, backend=args.backend)
    names = class_names(args.model, cfg.num_classes)
    transform = eval_transform(cfg.image_hw[0], crop_pct=dcfg.crop_pct, interpolation=dcfg.interpolation,
                               mean=dcfg.mean, std=dcfg.std)
    mode = "L" if cfg.in_chans == 1 else "RGB"
    k = min(args.topk, cfg.num_classes)

    results, failed = [], 0
    images = distributed.shard(args.images)  # this rank's share (all of them on one process)
    for start in range(0, len(images), args.batch_size):
        files, arrays = [], []
        for path in images[start:start + args.batch_size]:
            try:
                arrays.append(transform(open_image(path, mode)))
                files.append(path)
            except Exception as e:  # noqa: BLE001 - report the file, go on with the others
                failed += 1
                print(f"python -m minimixer.predict: error: cannot read image {path}: {e}", file=sys.stderr)
        if not files:
            continue
        probs = softmax(to_numpy(predict(params, to_backend(np.stack(arrays), args.backend), cfg)).astype(np.float64))
        for path, p in zip(files, probs):
            top = np.argsort(-p)[:k]
            results.append({"file": path, "topk": [{"index": int(i), "label": names[i], "prob": float(p[i])}
                                                   for i in top]})
    results, (failed,) = distributed.gather_lists(results), distributed.sum_counts(failed)  # in input order
    if not distributed.is_root():
        return 2 if failed else 0
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(r["file"])
            for rank, t in enumerate(r["topk"], 1):
                print(f"  {rank}. {t['prob']:7.2%}  {t['label']}  ({t['index']})")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="python -m minimixer.predict"))

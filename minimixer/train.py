"""python -m minimixer.train: train or fine-tune a Mixer on the bundled digits or an image folder.

    python -m minimixer.train                                   # mixer_digits on the digits
    python -m minimixer.train --model mixer_s32_224 --data DIR  # DIR/train, DIR/val in ImageFolder layout
    python -m minimixer.train --model mixer_b16_224 --data DIR --init-from weights/mixer_b16_224.safetensors
    python -m minimixer.train --out runs/x --resume             # continue exactly where it stopped
"""
import os
import sys
from dataclasses import asdict, fields

import numpy as np

from . import cli, distributed
from .backend import to_backend, xp_for
from .config import param_shapes
from .data import ArrayLoader, ImageLoader, digits_split, eval_transform, find_images, train_transform
from .params import init_params
from .train_loop import TrainSettings, fit, load_checkpoint
from .checkpoints.safetensors_io import check_state_dict, read_safetensors


def parse_args(argv):
    p = cli.ArgumentParser(prog="python -m minimixer.train", description=__doc__.split("\n")[0])
    cli.add_model_args(p, default_model="mixer_digits")
    p.add_argument("--data", default="digits", help="'digits' (bundled) or DIR with train/ and val/ class folders")
    d = TrainSettings()
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--min-lr", type=float, default=d.min_lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="decoupled (AdamW) or L2 (SGD); biases and norm weights are exempt")
    g.add_argument("--warmup", type=float, default=d.warmup, help="epochs of linear warmup")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default=d.schedule)
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default=d.optimizer)
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD's (nesterov) momentum")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g.add_argument("--drop-path", type=float, default=d.drop_path, help="stochastic depth rate")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout before the head")
    g.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max global grad norm (0: off)")
    g.add_argument("--seed", type=int, default=d.seed)
    r = p.add_argument_group("run")
    r.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    r.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    r.add_argument("--out", default=None, help="output folder (default runs/<model>)")
    r.add_argument("--init-from", metavar="WEIGHTS", help="start from these weights; a head of another size is replaced")
    r.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue from a checkpoint (default OUT/checkpoint.safetensors)")
    r.add_argument("--stop-after", type=int, metavar="STEPS", help="stop after this many steps, with a checkpoint")
    r.add_argument("--workers", type=int, default=4, help="image decoding threads (image folders)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("lr", "weight_decay", "warmup", "clip_grad", "min_lr"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("label_smoothing", "drop_path", "dropout"):
        if not 0 <= getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1)")
    return args


def make_loaders(data, cfg, settings, workers):
    """(train_loader, test_loader, class names)."""
    if data == "digits":
        expected = (1, 8, 8)
        if (cfg.in_chans, *cfg.image_hw) != expected:
            raise cli.UserError(f"the digits are 1x8x8 images, but the model takes {cfg.in_chans}x"
                                f"{cfg.image_hw[0]}x{cfg.image_hw[1]}; use --model mixer_digits "
                                "or --in-chans 1 --img-size 8 --patch-size 2")
        x_train, y_train, x_test, y_test = digits_split()
        return (ArrayLoader(x_train, y_train, settings.batch_size, shuffle=True, seed=settings.seed),
                ArrayLoader(x_test, y_test, 256), [str(i) for i in range(10)])
    if not os.path.isdir(data):
        raise cli.UserError(f"--data: no such directory: {data}")
    train_dir, val_dir = os.path.join(data, "train"), os.path.join(data, "val")
    if not (os.path.isdir(train_dir) and os.path.isdir(val_dir)):
        raise cli.UserError(f"--data {data}: expected train/ and val/ subfolders in ImageFolder layout")
    if cfg.in_chans != 3 or cfg.image_hw[0] != cfg.image_hw[1]:
        raise cli.UserError("image folders need a model with 3 input channels and a square img_size")
    train_samples, classes = find_images(train_dir)
    val_samples, val_classes = find_images(val_dir)
    if val_classes != classes:
        raise cli.UserError(f"--data {data}: train/ and val/ have different class folders")
    size = cfg.image_hw[0]
    return (ImageLoader(train_samples, train_transform(size), settings.batch_size, shuffle=True,
                        seed=settings.seed, workers=workers, drop_last=True),
            ImageLoader(val_samples, eval_transform(size), 64, workers=workers), classes)


def init_from(path, cfg, dtype, seed):
    """Weights from a file; if its head has another number of classes, a fresh (zero) head."""
    tensors = read_safetensors(path)
    head = tensors.get("head.weight")
    file_classes = head.shape[0] if head is not None and head.ndim == 2 else cfg.num_classes
    check_state_dict({k: v.shape for k, v in tensors.items()}, param_shapes(cfg.replace(num_classes=file_classes)), path)
    params = {k: v.astype(dtype) for k, v in tensors.items()}
    if file_classes != cfg.num_classes:
        fresh = init_params(cfg, seed=seed, dtype=dtype)
        params["head.weight"], params["head.bias"] = fresh["head.weight"], fresh["head.bias"]
        print(f"replaced the {file_classes}-class head with a new {cfg.num_classes}-class head")
    return params


def main(argv=None):
    args = parse_args(argv)
    xp_for(args.backend)  # fail early and clearly without a GPU
    if not distributed.is_root():  # under mpiexec, rank 0 alone reports
        sys.stdout, args.no_progress = open(os.devnull, "w"), True
    out = args.out or os.path.join("runs", args.model)
    resume = None
    if args.resume:
        path = os.path.join(out, "checkpoint.safetensors") if args.resume == "auto" else args.resume
        if not os.path.exists(path):
            raise cli.UserError(f"--resume: no checkpoint at {path}")
        resume = load_checkpoint(path)
        cfg, settings = resume["config"], resume["settings"]
        params = resume["params"]
        print(f"resuming from {path} at step {resume['step']}")
    else:
        settings = TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings)})
        data_classes = None
        if args.data != "digits" and args.num_classes is None and os.path.isdir(os.path.join(args.data, "train")):
            data_classes = len(find_images(os.path.join(args.data, "train"))[1])
        cfg = cli.config_from_args(args, **({"num_classes": data_classes} if data_classes else {}))
        params = (init_from(args.init_from, cfg, args.dtype, settings.seed) if args.init_from
                  else init_params(cfg, seed=settings.seed, dtype=args.dtype))
    train_loader, test_loader, classes = make_loaders(args.data, cfg, settings, args.workers)
    if len(classes) > cfg.num_classes:
        raise cli.UserError(f"the data has {len(classes)} classes but the model only {cfg.num_classes}")
    params = to_backend(params, args.backend)
    print(f"training {args.model} ({sum(int(np.prod(v.shape)) for v in params.values()):,} params) on "
          f"{args.data}: {len(train_loader)} steps/epoch x {settings.epochs} epochs, backend {args.backend}")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in asdict(settings).items()))
    try:
        metrics = fit(params, cfg, settings, train_loader, test_loader, out, backend=args.backend,
                      resume=resume, stop_after=args.stop_after, progress=not args.no_progress)
    except KeyboardInterrupt:
        return 130
    if metrics:
        print(f"done: test top-1 {metrics[-1]['test_top1']:.2f}%; weights in {os.path.join(out, 'model.safetensors')}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="python -m minimixer.train"))

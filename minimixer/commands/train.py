"""python -m minimixer.train: train or fine-tune a Mixer on the bundled digits or an image folder.

    python -m minimixer.train                                   # mixer_digits on the digits
    python -m minimixer.train --model mixer_s32_224 --data DIR  # DIR/train, DIR/val in ImageFolder layout
    python -m minimixer.train --model mixer_b16_224 --data DIR --init-from weights/mixer_b16_224.safetensors
    python -m minimixer.train --out runs/x --resume             # continue exactly where it stopped

A resumed run takes its model, settings and data from the checkpoint. --epochs may change (the
schedule is re-planned, as with timm); --data must name the same images; run flags (--out, --backend,
--workers, --stop-after, --no-progress) apply; any other flag that differs from the checkpoint is refused.
Unreadable images are named on stderr and left out before the schedule is planned. timm's spellings
(--output, --initial-checkpoint, --smoothing, --warmup-epochs, --opt, --sched, --drop, -b, -j) are
aliases of the same flags.
"""
import argparse
import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields, replace

import numpy as np

from . import cli
from ..runtime import distributed
from ..runtime.allocator import keep_freed_memory
from ..backend import BACKENDS, to_backend, xp_for
from ..config import as_pair, param_shapes
from ..data import (ArrayLoader, ImageLoader, digits_split, eval_transform, find_images, open_image, read_class_map,
                    train_transform)
from ..optim import SCHEDULES
from ..params import init_params
from ..training.loop import Interrupted, fit
from ..training.settings import OPTIMIZERS, SETTING_RULES, TrainSettings, setting_problem
from ..training.transfer import describe_frozen, frozen_names, reset_head
from ..checkpoints.convert import check_numerics, read_checkpoint
from ..checkpoints.resize import fit_to, resized_config
from ..checkpoints.training_state import load_training_state
from ..checkpoints.safetensors_io import check_state_dict, check_writable
from ..checkpoints.preprocessing import DataConfig

PROG = "python -m minimixer.train"
EVAL_DATA = DataConfig()  # the validation transform's settings, recorded in model.safetensors
EVAL_KWARGS = {k: v for k, v in asdict(EVAL_DATA).items() if k != "pipeline"}
DEFAULT_MODEL = "mixer_digits"
# Flags a resumed run may give with a value other than the checkpoint's: --epochs re-plans the
# schedule (as timm's --epochs does on resume); the others do not change what a step computes.
MAY_CHANGE_ON_RESUME = ("epochs", "data", "class_map", "out", "resume", "backend", "workers", "stop_after", "no_progress")


def setting_type(name):
    """argparse type for a TrainSettings field: converts, then checks with the field's rule."""
    kind = SETTING_RULES[name][0]

    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        problem = setting_problem(name, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return convert


def positive_int(text):
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def build_parser(prog=PROG):
    """The parser, and {dest: the flag's spellings} for messages ('--label-smoothing/--smoothing').

    Every training flag defaults to None, so that what was typed can be told from a default;
    TrainSettings holds the defaults. timm's spellings are aliases in the same definition."""
    p = cli.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    cli.add_model_args(p, default_model=None)
    spellings = {}

    def add(group, *names, **kw):
        action = group.add_argument(*names, **kw)
        spellings[action.dest] = "/".join(action.option_strings)

    add(p, "--data", help="'digits' (bundled, the default) or DIR with train/ and val/ class folders; "
                          "on --resume, the checkpoint's data")
    add(p, "--class-map", metavar="FILE", help="timm's class map for the class folders (.txt, one name per line, "
                                              "or .pkl); on --resume, the checkpoint's")
    d = TrainSettings()
    g = p.add_argument_group("training (timm's spellings are accepted too)")
    for names, dest, help in [
        (("--epochs",), "epochs", "epochs to train; the one setting that may change on --resume"),
        (("-b", "--batch-size"), "batch_size", None),
        (("--lr",), "lr", None),
        (("--min-lr",), "min_lr", None),
        (("--weight-decay",), "weight_decay", "decoupled (AdamW) or L2 (SGD); biases and norm weights are exempt"),
        (("--warmup", "--warmup-epochs"), "warmup", "epochs of linear warmup"),
        (("--schedule", "--sched"), "schedule", None),
        (("--optimizer", "--opt"), "optimizer", "adamw, or sgd (nesterov momentum, as timm's 'sgd')"),
        (("--momentum",), "momentum", "SGD's (nesterov) momentum"),
        (("--label-smoothing", "--smoothing"), "label_smoothing", None),
        (("--drop-path",), "drop_path", "stochastic depth rate"),
        (("--dropout", "--drop"), "dropout", "dropout before the head (timm's drop_rate)"),
        (("--clip-grad",), "clip_grad", "max global grad norm (0: off)"),
        (("--seed",), "seed", None),
        (("--freeze",), "freeze", "keep these fixed: trunk (all but the head: a linear probe), stem, norm, head, "
                                  "blocks, blocks.I or blocks.I-J, comma-separated"),
        (("--train-blocks",), "train_blocks", "train only these blocks, e.g. 6-7 (and the final norm and head)"),
    ]:
        choices = {"schedule": SCHEDULES, "optimizer": tuple(OPTIMIZERS)}.get(dest)
        default = f"default {getattr(d, dest)!r}" if isinstance(getattr(d, dest), str) and not choices \
            else f"default {getattr(d, dest)}"
        add(g, *names, dest=dest, metavar=None if choices else dest.upper(), choices=choices,
            type=None if choices else setting_type(dest), help=f"{help} ({default})" if help else f"({default})")
    r = p.add_argument_group("run")
    add(r, "--backend", choices=BACKENDS, default="numpy")
    add(r, "--dtype", choices=["float32", "float64"], help="(default float32)")
    add(r, "--out", "--output", help="output folder (default runs/<model>); unlike timm's --output, "
                                     "the files go in this folder itself")
    add(r, "--init-from", "--initial-checkpoint", metavar="WEIGHTS",
        help="start from these weights; a head of another size is replaced")
    add(r, "--resume", nargs="?", const="auto", metavar="CHECKPOINT",
        help="continue from a checkpoint (default OUT/checkpoint.safetensors)")
    add(r, "--stop-after", type=positive_int, metavar="STEPS", help="stop after this many steps, with a checkpoint")
    add(r, "-j", "--workers", type=positive_int, default=4, help="image decoding threads (image folders)")
    add(r, "--no-progress", action="store_true", help="no progress bar")
    return p, spellings


def parse_args(argv):
    return build_parser()[0].parse_args(argv)


# --- data ------------------------------------------------------------------------------------

def folder_samples(data, class_map=None):
    """DIR/train and DIR/val in ImageFolder layout: (train samples, val samples, class names).
    Class indices as timm's (natural order, folders with images), or from class_map {name: index}."""
    if not os.path.isdir(data):
        raise cli.UserError(f"--data: no such directory: {data}")
    train_dir, val_dir = os.path.join(data, "train"), os.path.join(data, "val")
    if not (os.path.isdir(train_dir) and os.path.isdir(val_dir)):
        raise cli.UserError(f"--data {data}: expected train/ and val/ subfolders in ImageFolder layout")
    train_samples, classes = find_images(train_dir, class_map=class_map)
    val_samples, val_classes = find_images(val_dir, class_map=class_map)
    if val_classes != classes:
        raise cli.UserError(f"--data {data}: train/ and val/ have different class folders")
    return train_samples, val_samples, classes


def readable(samples, workers, what):
    """The samples whose image decodes, and how many did not: each of those is named on stderr.
    Decoding every image once up front lets the schedule count the images that are really used."""
    def problem(sample):
        try:
            open_image(sample[0])
            return None
        except Exception as e:  # noqa: BLE001 - any decoding failure is reported by file name
            return str(e) or type(e).__name__

    pool = ThreadPoolExecutor(workers)
    try:
        problems = list(pool.map(problem, samples))
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C, do not decode the rest first
    for (path, _), p in zip(samples, problems):
        if p is not None:
            print(f"skipped unreadable {what} image {path}: {p}", file=sys.stderr)
    return [s for s, p in zip(samples, problems) if p is None], sum(p is not None for p in problems)


def make_loaders(data, cfg, settings, workers, folder=None, class_map=None):
    """(train_loader, test_loader, class names, data info). The info (source, image counts, skipped
    images, a sha256 of the samples) goes into the checkpoint, so a resume can check its data."""
    if data == "digits":
        expected = (1, 8, 8)
        if (cfg.in_chans, *cfg.image_hw) != expected:
            raise cli.UserError(f"the digits are 1x8x8 images, but the model takes {cfg.in_chans}x"
                                f"{cfg.image_hw[0]}x{cfg.image_hw[1]}; use --model mixer_digits "
                                "or --in-chans 1 --img-size 8 --patch-size 2")
        x_train, y_train, x_test, y_test = digits_split()
        digest = hashlib.sha256(b"".join(a.tobytes() for a in (x_train, y_train, x_test, y_test))).hexdigest()
        info = {"source": "digits", "train_images": len(y_train), "test_images": len(y_test),
                "skipped": {"train": 0, "test": 0}, "sha256": digest,
                "preprocessing": "digits", "classes": [str(i) for i in range(10)]}  # for model.safetensors
        return (ArrayLoader(x_train, y_train, settings.batch_size, shuffle=True, seed=settings.seed),
                ArrayLoader(x_test, y_test, 256), [str(i) for i in range(10)], info)
    train_samples, val_samples, classes = folder or folder_samples(data, class_map)
    if cfg.in_chans != 3 or cfg.image_hw[0] != cfg.image_hw[1]:
        raise cli.UserError("image folders need a model with 3 input channels and a square img_size")
    train_used, train_skipped = readable(train_samples, workers, "training")
    val_used, val_skipped = readable(val_samples, workers, "validation")
    for used, split in ((train_used, "train"), (val_used, "val")):
        if not used:
            raise cli.UserError(f"--data {data}: no readable images in {os.path.join(data, split)}")
    if len(train_used) < settings.batch_size:
        raise cli.UserError(f"--batch-size {settings.batch_size} is larger than the {len(train_used)} usable "
                            f"training images in {os.path.join(data, 'train')}; use --batch-size "
                            f"{len(train_used)} or less")
    listing = "".join(f"{split}\t{os.path.relpath(path, data)}\t{label}\n"
                      for split, used in (("train", train_used), ("val", val_used)) for path, label in used)
    info = {"source": os.path.abspath(data), "train_images": len(train_used), "test_images": len(val_used),
            "skipped": {"train": train_skipped, "test": val_skipped},
            "sha256": hashlib.sha256(listing.encode()).hexdigest(),
            "preprocessing": asdict(EVAL_DATA), "classes": classes}  # for model.safetensors
    if class_map is not None:
        info["class_map"] = class_map  # a resumed run reads the folders with it again
    size = cfg.image_hw[0]

    def named(path, e):  # an image that decoded at start-up but not now
        print(f"skipped unreadable validation image {path}: {e}", file=sys.stderr)

    # training stops on such an image (strict): skipping it would shift the steps from the schedule
    return (ImageLoader(train_used, train_transform(size), settings.batch_size, shuffle=True,
                        seed=settings.seed, workers=workers, drop_last=True, strict=True),
            ImageLoader(val_used, eval_transform(size, **EVAL_KWARGS), 64, workers=workers, on_error=named),
            classes, info)


def init_from(path, cfg, dtype, seed):
    """Weights from a file of any format (read_checkpoint: safetensors, timm's .pth and training
    checkpoints, MMPretrain, JAX); if its head has another number of classes, a new head as
    timm's reset_classifier makes it."""
    ck = read_checkpoint(path)
    for note in ck.notes:
        print(note)
    check_numerics(ck, cfg)  # a file trained with other ln_eps/gelu: a NumericsWarning says how to match it
    tensors = ck.params
    tensors, resized = fit_to(tensors, cfg, path)  # made for another image size (checkpoints/resize.py)
    if resized:
        print(resized)
    head = tensors.get("head.weight")
    file_classes = head.shape[0] if head is not None and head.ndim == 2 else cfg.num_classes
    check_state_dict({k: v.shape for k, v in tensors.items()}, param_shapes(cfg.replace(num_classes=file_classes)),
                     path)
    params = {k: np.asarray(v).astype(dtype) for k, v in tensors.items()}
    if file_classes != cfg.num_classes:
        params["head.weight"], params["head.bias"] = reset_head(params, cfg.num_classes, seed, dtype)
        print(f"replaced the {file_classes}-class head with a new {cfg.num_classes}-class head "
              "(initialized as timm's reset_classifier)")
    return params


# --- resume ------------------------------------------------------------------------------------

def resume_conflict(args, spellings, state, path):
    """The first flag the user gave that contradicts the checkpoint, as one line, or None."""
    cfg, settings = state["config"], state["settings"]
    dtype = str(next(iter(state["params"].values())).dtype)
    for dest in sorted(k for k, v in vars(args).items() if v is not None and v is not False):
        if dest in MAY_CHANGE_ON_RESUME:
            continue
        flag, value = spellings.get(dest, "--" + dest.replace("_", "-")), getattr(args, dest)
        if dest == "init_from":
            return f"{flag} cannot be combined with --resume: the checkpoint {path} holds the weights"
        if dest == "model":
            theirs = state["model"]
        elif dest == "dtype":
            theirs = dtype
        elif dest in cli.OVERRIDES:
            theirs = getattr(cfg, dest)
            if dest in ("img_size", "mlp_ratio"):
                value, theirs = as_pair(value), as_pair(theirs)
        else:
            theirs = getattr(settings, dest)
        if dest == "model" and theirs is None:
            return f"{flag}: the checkpoint {path} does not record its model's name; leave {flag} out"
        if value != theirs:
            shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
            return (f"{flag} {shown} conflicts with the checkpoint {path}, which has {dest} {theirs}; a resumed run "
                    f"keeps its settings (only --epochs, --data with the same images, --out, --backend, --workers, "
                    f"--stop-after and --no-progress may be given)")
    return None


# --- the output folder -------------------------------------------------------------------------

LOCK_NAME = ".lock"
_held = []  # (path, fd, folder created) of this process's locks: closing the fd releases the lock


def lock_out(out):
    """Create --out, check that it can be written, and lock it while the command runs (fcntl.flock
    on OUT/.lock, which the kernel releases when the process ends, however it ends), so a second
    training into the same folder stops at once instead of mixing checkpoints."""
    created = not os.path.lexists(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise cli.UserError(f"--out {out}: cannot create this folder ({e.strerror or e})") from None
    if not os.path.isdir(out):
        raise cli.UserError(f"--out {out}: not a folder")
    path = os.path.join(out, LOCK_NAME)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the write check alone
        fcntl = None
    for _ in range(10):
        try:
            check_writable(os.path.join(out, "checkpoint.safetensors"))
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise cli.UserError(f"--out {out}: cannot write in this folder ({e.strerror or e})") from None
        if fcntl is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise cli.UserError(f"--out {out}: another training is writing into this folder"
                                + (f" (process {holder})" if holder.isdigit() else "")
                                + "; wait for it to end, or give another --out") from None
        try:  # the lock is ours if the file is still the one at `path` (its last holder removes it)
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            _held.append((path, fd, created))
            return
        os.close(fd)
    raise cli.UserError(f"--out {out}: could not lock {path}")


def unlock_out():
    """Remove the lock file, then release the lock (a waiter that opened the removed file sees so);
    a folder that lock_out created and nothing was written into goes too."""
    while _held:
        path, fd, created = _held.pop()
        try:
            os.unlink(path)
            if created:
                os.rmdir(os.path.dirname(path))  # fails, as it should, unless empty
        except OSError:
            pass
        os.close(fd)


# --- main --------------------------------------------------------------------------------------

def main(argv=None, prog=PROG):
    """Exit 130 and one line on Ctrl-C, wherever it comes."""
    try:
        return train(argv, prog)
    except Interrupted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 128 + (getattr(e, "signum", None) or 2)  # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP
    except KeyboardInterrupt:
        print(f"{prog}: interrupted before training started; nothing was written", file=sys.stderr)
        return 130
    finally:
        unlock_out()  # the lock ends with the command (in-process callers may train again)


def resumed_run(args, spellings, out):
    """The run a checkpoint continues, after checking the flags given against it."""
    path = os.path.join(out, "checkpoint.safetensors") if args.resume == "auto" else args.resume
    if not os.path.exists(path):
        raise cli.UserError(f"--resume: no checkpoint at {path}")
    resume = load_training_state(path)
    conflict = resume_conflict(args, spellings, resume, path)
    if conflict:
        raise cli.UserError(conflict)
    cfg, settings, notes = resume["config"], resume["settings"], []
    if args.epochs is not None and args.epochs != settings.epochs:
        notes.append(f"applying --epochs {args.epochs} (the checkpoint planned {settings.epochs}): "
                     "the learning-rate schedule is recomputed")
        settings = replace(settings, epochs=args.epochs)
    if args.stop_after is not None and args.stop_after <= resume["step"]:
        raise cli.UserError(f"--stop-after {args.stop_after}: the checkpoint is already at step {resume['step']}")
    data = args.data or (resume["data"] or {}).get("source") or "digits"
    if data != "digits" and not os.path.isdir(data) and not args.data:
        raise cli.UserError(f"--data: the checkpoint's data folder {data} is gone; give --data")
    model = resume["model"] or f"the checkpoint's Mixer ({cfg.num_blocks} blocks, width {cfg.embed_dim})"
    print(f"resuming from {path} at step {resume['step']}: {model}")
    class_map = read_class_map(args.class_map) if args.class_map else (resume["data"] or {}).get("class_map")
    return dict(cfg=cfg, settings=settings, params=lambda: resume["params"], model=resume["model"], shown=model,
                data=data, folder=None, resume=resume, notes=notes, class_map=class_map)


def fresh_run(args, out):
    """A new run from the flags: settings, config (classes counted from an image folder), params."""
    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings)
                                if getattr(args, f.name) is not None})
    data, folder, data_classes, class_map, notes = args.data or "digits", None, None, None, []
    if data != "digits":
        class_map = read_class_map(args.class_map) if args.class_map else None
        folder = folder_samples(data, class_map)
        if args.num_classes is None:
            data_classes = max(class_map.values()) + 1 if class_map else len(folder[2])
    args.model = args.model or DEFAULT_MODEL
    cfg = cli.config_from_args(args, **({"num_classes": data_classes} if data_classes else {}))
    dtype = args.dtype or "float32"

    if args.init_from:  # the token hidden width of the weights resized to --img-size
        cfg = resized_config(args.init_from, cfg)
    try:
        frozen_names(settings, param_shapes(cfg))  # a block the model lacks: now, before any work
    except ValueError as e:
        raise cli.UserError(str(e)) from None
    loaded = init_from(args.init_from, cfg, dtype, settings.seed) if args.init_from else None

    def params():  # after the data checks: a large model takes seconds to initialize
        return loaded if loaded is not None else init_params(cfg, seed=settings.seed, dtype=dtype)
    if args.momentum is not None and settings.optimizer != "sgd":
        notes.append(f"note: --momentum is not used by {settings.optimizer} (only by --optimizer sgd)")
    if os.path.exists(os.path.join(out, "checkpoint.safetensors")):
        notes.append(f"note: starting afresh; the checkpoint in {out} is replaced after the first epoch "
                     "(--resume continues it instead)")
    return dict(cfg=cfg, settings=settings, params=params, model=args.model, shown=args.model, data=data,
                folder=folder, resume=None, notes=notes, class_map=class_map)


def check_resumed_data(resume, data, info, steps_per_epoch, settings):
    """The resumed run must see the same images, and not have trained past --epochs already."""
    theirs = resume["data"]
    if theirs is not None and any(theirs.get(k) != info[k] for k in ("train_images", "test_images", "sha256")):
        raise cli.UserError(f"--data {data}: these are not the images the checkpoint was trained on "
                            f"({info['train_images']} train / {info['test_images']} val usable now, "
                            f"{theirs.get('train_images')} / {theirs.get('test_images')} then)")
    done = resume["step"] // steps_per_epoch
    if settings.epochs < done:
        raise cli.UserError(f"--epochs {settings.epochs}: the checkpoint has already trained {done} epochs")
    return resume["step"] >= settings.epochs * steps_per_epoch and not resume["partial_epoch"]["seen"]


def train(argv, prog=PROG):
    parser, spellings = build_parser(prog)
    args = parser.parse_args(argv)
    xp_for(args.backend)  # fail early and clearly without a GPU
    keep_freed_memory()  # each step reuses the last one's freed activations instead of faulting them in
    if not distributed.is_root():  # under mpiexec, rank 0 alone reports
        sys.stdout, args.no_progress = open(os.devnull, "w"), True
    out = args.out or os.path.join("runs", args.model or DEFAULT_MODEL)
    if distributed.is_root():
        lock_out(out)  # before the data is read: a read-only or busy --out is known at once
    run = resumed_run(args, spellings, out) if args.resume else fresh_run(args, out)
    cfg, settings, data = run["cfg"], run["settings"], run["data"]
    if data == "digits" and args.class_map:
        raise cli.UserError("--class-map names class folders; the digits have none (give --data DIR)")
    train_loader, test_loader, classes, data_info = make_loaders(data, cfg, settings, args.workers, run["folder"],
                                                                 run["class_map"])
    if run["class_map"] is not None:
        top = max(run["class_map"][c] for c in classes)
        if top >= cfg.num_classes:
            raise cli.UserError(f"--class-map: index {top} is outside the model's {cfg.num_classes} classes")
    elif len(classes) > cfg.num_classes:
        raise cli.UserError(f"the data has {len(classes)} classes but the model only {cfg.num_classes}")
    steps_per_epoch = len(train_loader)
    if run["resume"] and check_resumed_data(run["resume"], data, data_info, steps_per_epoch, settings):
        print(f"nothing to do: the checkpoint has finished all {settings.epochs} epochs; "
              "give a larger --epochs to train on")
        return 0
    cli.check_fits(cfg, 32, f"training {run['shown']}")  # float64 init, weights, grads, two moments
    params = to_backend(run["params"](), args.backend)
    skipped = data_info["skipped"]
    images = f"{data_info['train_images']} images"
    if skipped["train"]:
        images += f" ({skipped['train']} unreadable skipped)"
    print(f"training {run['shown']} ({sum(int(np.prod(v.shape)) for v in params.values()):,} params) on {data}: "
          f"{images}, {steps_per_epoch} steps/epoch x {settings.epochs} epochs, backend {args.backend}")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in asdict(settings).items()))
    for note in run["notes"]:
        print(note)
    frozen = describe_frozen(frozen_names(settings, params), params)
    if frozen:
        print(frozen)
    metrics = fit(params, cfg, settings, train_loader, test_loader, out, backend=args.backend, resume=run["resume"],
                  stop_after=args.stop_after, progress=not args.no_progress, model=run["model"], data=data_info)
    if metrics and metrics[-1]["epoch"] == settings.epochs:
        total = skipped["train"] + skipped["test"]
        print(f"done: test top-1 {metrics[-1]['test_top1']:.2f}%; weights in {os.path.join(out, 'model.safetensors')}"
              + (f"; {total} unreadable images skipped ({skipped['train']} train, {skipped['test']} val), "
                 "named above" if total else ""))
    return 0


def command(argv=None, prog=PROG):
    """Run the command as its shell would: exit status, errors as one line."""
    return cli.run(lambda a: main(a, prog), argv, prog=prog)

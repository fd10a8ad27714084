"""python -m minimixer.eval: top-1/top-5 accuracy of a Mixer, in the style of timm's validate.py.

    python -m minimixer.eval                                  # the bundled digits model, offline
    python -m minimixer.eval --model mixer_b16_224 --weights auto --data /data/imagenet/val
    python -m minimixer.eval --model mixer_b16_224 --weights W.safetensors --data val/ --labels LOC_val_solution.csv
    python -m minimixer.eval /data/imagenet/val --model mixer_b16_224 --checkpoint W.safetensors -b 64 -j 4  # timm's

DIR is either in ImageFolder layout (class subfolders; sorted names give the class
index, as in timm; ImageNet wnid folders map to ImageNet-1k indices), or a flat folder
of images with a label file.
"""
import csv
import io
import json
import math
import os
import sys
import time

from . import cli
from ..runtime import distributed
from ..runtime.allocator import keep_freed_memory
from ..backend import BACKENDS, xp_for
from ..config import param_count
from ..data import (IMG_EXTENSIONS, WNID, ArrayLoader, ImageLoader, digits_split, eval_transform, find_images,
                   read_class_map, read_label_file, strict_pixel_limit)
from ..checkpoints.registry import data_config, imagenet_classes
from ..training.metrics import Tally, evaluate
from ..checkpoints.safetensors_io import atomic_write_bytes, check_writable

RESULT_COLUMNS = ["model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct",
                  "interpolation", "count", "skipped", "img_per_sec"]
PROG = "python -m minimixer.eval"
LABEL_FILE_NAMES = ("LOC_val_solution.csv", "val_labels.txt", "labels.txt")


def parse_args(argv, prog=PROG):
    p = cli.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    # timm's validate.py spellings are the same options (one definition each): DIR or
    # --data-dir, -b, -j, --checkpoint
    p.add_argument("data_dir", nargs="?", metavar="DIR", help="the data, as timm takes it: the same as --data DIR")
    cli.add_model_args(p, default_model="mixer_digits")
    cli.add_weights_args(p)
    p.add_argument("--data", "--data-dir", dest="data", metavar="DIR",
                   help="'digits' (the bundled held-out split; the default) or an image folder")
    p.add_argument("--labels", metavar="FILE", help="label file for a flat image folder")
    p.add_argument("--class-map", metavar="FILE", help="timm's class map for class folders: a .txt with one "
                   "folder name per line (its line number is its index) or a .pkl dict")
    p.add_argument("--backend", choices=BACKENDS, default="numpy")
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("-j", "--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding threads")
    p.add_argument("--results-file", metavar="F", help="write the results row to F.json or F.csv")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    g = p.add_argument_group("preprocessing (defaults: the checkpoint's own)")
    g.add_argument("--mean", type=float, nargs="+")
    g.add_argument("--std", type=float, nargs="+")
    g.add_argument("--crop-pct", type=float)
    g.add_argument("--interpolation", choices=["bicubic", "bilinear", "nearest", "lanczos", "box"])
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.data_dir is not None and args.data is not None and args.data_dir != args.data:
        p.error(f"the data is given twice: DIR {args.data_dir} and --data {args.data}")
    args.data = args.data or args.data_dir or "digits"
    for name in ("batch_size", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        p.error("--crop-pct must be in (0, 1]")
    for flag, values, least in (("--mean", args.mean, None), ("--std", args.std, 0)):
        problem = preprocessing_problem(values, least)
        if problem:
            p.error(f"{flag} {' '.join(map(str, values))}: {problem}")
    if args.data == "digits":
        given = [f for f, v in (("--mean", args.mean), ("--std", args.std), ("--crop-pct", args.crop_pct),
                                ("--interpolation", args.interpolation)) if v is not None]
        if given:
            p.error(f"{'/'.join(given)}: the digits are 8x8 arrays, normalized as the digits model was trained "
                    "(mean 0.5, std 0.5), not images to resize; these flags apply to image folders (--data DIR)")
    if args.labels and os.path.isdir(args.labels):
        p.error(f"--labels {args.labels} is a directory; it takes a label file")
    if args.results_file and not args.results_file.endswith((".json", ".csv")):
        p.error("--results-file must end in .json or .csv")
    return args


def preprocessing_problem(values, above=None):
    """What is wrong with --mean or --std values (NaN, Inf, and for --std anything <= 0), or None."""
    if values is None:
        return None
    if not all(math.isfinite(v) for v in values):
        return "every value must be a finite number"
    if above is not None and not all(v > above for v in values):
        return f"every value must be > {above} (images are divided by it)"
    return None


def build_loader(args, cfg, dcfg, on_error, on_skip=None, notes=None):
    """(loader, number of images) for --data. on_skip(path, reason) hears of what the folder
    scan left out (unreadable folders, links to folders already read, non-regular files);
    notes (a list) gets lines for the end of the report."""
    notes = [] if notes is None else notes
    if args.data == "digits":
        if (cfg.in_chans, *cfg.image_hw) != (1, 8, 8):
            raise cli.UserError(f"the digits are 1x8x8 images; --model {args.model} takes "
                                f"{cfg.in_chans}x{cfg.image_hw[0]}x{cfg.image_hw[1]} (pass --data DIR)")
        _, _, x, y = digits_split()
        x, y = distributed.shard(x[:args.limit]), distributed.shard(y[:args.limit])  # this rank's share
        return ArrayLoader(x, y, args.batch_size), len(y)
    if not os.path.isdir(args.data):
        raise cli.UserError(f"--data: no such directory: {args.data}")
    if len(dcfg.mean) != cfg.in_chans or len(dcfg.std) != cfg.in_chans:
        raise cli.UserError(f"--mean/--std need {cfg.in_chans} values for this model")
    wnid_index = {wnid: i for i, (wnid, _) in enumerate(imagenet_classes())} if cfg.num_classes == 1000 else None
    entries = list(os.scandir(args.data))
    subdirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    files = sorted(e.name for e in entries if e.name.lower().endswith(IMG_EXTENSIONS) and not e.is_dir())
    label_file = args.labels or (next((os.path.join(d, n) for n in LABEL_FILE_NAMES
                                       for d in (args.data, os.path.dirname(os.path.abspath(args.data)))
                                       if os.path.isfile(os.path.join(d, n))), None) if files else None)
    # The rule: images directly in DIR make it a flat folder, labelled by a label file; class
    # subfolders are read only when DIR itself holds no image. Never one silently for the other.
    if files and subdirs:
        if label_file is None:
            raise cli.UserError(f"{args.data} holds both images and subfolders: pass --labels FILE to evaluate "
                                "it as a flat folder, or move the images into class folders")
        notes.append(f"   {args.data} is a flat folder with the label file {label_file}; its {len(subdirs)} "
                     "subfolder(s) were not read")
    if files:
        if args.class_map:
            raise cli.UserError(f"--class-map names class folders, but {args.data} is a flat folder of images "
                                "(its labels come from the label file)")
        if label_file is None:
            raise cli.UserError(f"{args.data} is a flat folder of images: pass --labels FILE "
                                "(LOC_val_solution.csv, 'filename label' lines, or one label per line)")
        labels = read_label_file(label_file, files, wnid_index)
        bad = [v for v in labels if not 0 <= v < cfg.num_classes]
        if bad:
            raise cli.UserError(f"{label_file}: label {bad[0]} is outside the model's {cfg.num_classes} classes")
        samples = [(os.path.join(args.data, f), v) for f, v in zip(files, labels)]
    elif not subdirs:
        raise cli.UserError(f"{args.data}: no class subfolders and no images")
    elif args.labels:
        raise cli.UserError(f"--labels {args.labels}: {args.data} holds no image itself (only class "
                            "subfolders); a label file is for a flat folder of images")
    else:
        class_map = read_class_map(args.class_map) if args.class_map else None
        samples, classes = find_images(args.data, on_skip, class_map)
        empty = [c for c in subdirs if c not in classes and (class_map is None or c in class_map)]
        if empty:
            notes.append(f"   {len(empty)} folder(s) hold no image and are not classes (as in timm): "
                         + ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else ""))
        if class_map is not None:
            top = max(label for _, label in samples)
            if top >= cfg.num_classes:
                raise cli.UserError(f"--class-map {args.class_map}: index {top} is outside the model's "
                                    f"{cfg.num_classes} classes")
        else:
            check_wnid_folders(args.data, classes, wnid_index)
            if wnid_index and all(c in wnid_index for c in classes):  # ImageNet folders: wnid -> ImageNet index
                samples = [(path, wnid_index[classes[i]]) for path, i in samples]
            elif len(classes) > cfg.num_classes:
                raise cli.UserError(f"{args.data} has {len(classes)} class folders but the model has "
                                    f"{cfg.num_classes} classes")
    samples = distributed.shard(samples[:args.limit])  # this rank's share (all of it on one process)
    size = cfg.image_hw[0]
    transform = eval_transform(size, crop_pct=dcfg.crop_pct, interpolation=dcfg.interpolation,
                               mean=dcfg.mean, std=dcfg.std, pipeline=dcfg.pipeline)
    loader = ImageLoader(samples, transform, args.batch_size, workers=args.workers, strict=args.strict,
                         on_error=on_error, mode="L" if cfg.in_chans == 1 else "RGB")
    return loader, len(samples)


def check_wnid_folders(root, classes, wnid_index):
    """Folders named by ImageNet wnids map to ImageNet indices; one stray folder among them
    would silently switch to sorted indices and shift every label. Refuse it by name."""
    wnids = [c for c in classes if WNID.match(c)]
    if 2 * len(wnids) <= len(classes):
        return  # not an ImageNet-style folder: sorted indices, as timm
    stray = [c for c in classes if not WNID.match(c)]
    what = ("an ImageNet wnid", "ImageNet wnids")
    if not stray and wnid_index:
        stray = [c for c in classes if c not in wnid_index]
        what = ("an ImageNet-1k class", "ImageNet-1k classes")
    if stray:
        one = len(stray) == 1
        shown = ", ".join(stray[:5]) + (f", ... ({len(stray) - 5} more)" if len(stray) > 5 else "")
        raise cli.UserError(f"{root}: {len(wnids)} of {len(classes)} class folders are ImageNet wnids, but "
                            f"{shown} {'is' if one else 'are'} not {what[0] if one else what[1]}: move "
                            f"{'it' if one else 'them'} out (the labels would be sorted positions, not ImageNet's)")


def results_row(args, cfg, dcfg, correct1, correct5, count, skipped, seconds):
    top1 = 100.0 * correct1 / max(count, 1)
    top5 = 100.0 * correct5 / max(count, 1)
    return {"model": args.model, "top1": round(top1, 4), "top1_err": round(100 - top1, 4),
            "top5": round(top5, 4), "top5_err": round(100 - top5, 4),
            "param_count": round(param_count(cfg) / 1e6, 2), "img_size": cfg.image_hw[0],
            "crop_pct": dcfg.crop_pct, "interpolation": dcfg.interpolation,
            "count": count, "skipped": skipped, "img_per_sec": round(count / max(seconds, 1e-9), 2)}


def partial_name(path):
    """Where an interrupted run's results go: F.partial.json for F.json, so a complete results
    file is never replaced by a partial row that nothing marks as partial."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.partial{ext}"


def results_target(path):
    """The file to write: a symbolic link's target (written through, not replaced by a file)."""
    return os.path.realpath(path) if os.path.islink(path) else path


def write_results(path, row):
    path = results_target(path)
    if path.endswith(".json"):
        data = json.dumps(row, indent=2).encode()
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerow(row)
        data = buf.getvalue().encode()
    atomic_write_bytes(path, data)


def main(argv=None, prog=PROG):
    args = parse_args(argv, prog)
    if args.results_file:
        check_writable(results_target(args.results_file))  # now, not after the whole evaluation
    cfg = cli.config_from_args(args)
    dcfg = data_config(args.model, args.weights, mean=args.mean, std=args.std, crop_pct=args.crop_pct,
                       interpolation=args.interpolation)
    xp_for(args.backend)  # a clear error now if the GPU is missing
    strict_pixel_limit()
    keep_freed_memory()  # every batch reuses the last one's freed blocks instead of faulting them in
    skipped, left_out = [], []  # unreadable images; folders and files the scan left out

    def on_error(path, exc):
        skipped.append(path)
        print(f"skipping unreadable image {path}: {exc}", file=sys.stderr)

    def on_skip(path, reason):
        left_out.append(path)
        print(f"skipping {path}: {reason}", file=sys.stderr)

    notes = []
    loader, total = build_loader(args, cfg, dcfg, on_error, on_skip, notes)
    weights, params = cli.load_model_weights(args, cfg)

    bar = None
    if not args.no_progress and distributed.is_root():
        from tqdm import tqdm
        bar = tqdm(total=total, unit="img", desc=f"eval {args.model}", dynamic_ncols=True, file=sys.stderr)
    def show(t):
        bar.update(t.count + len(skipped) - bar.n)  # skipped images are done too
        bar.set_postfix(acc1=f"{100 * t.correct1 / t.count:.2f}", acc5=f"{100 * t.correct5 / t.count:.2f}")

    tally, interrupted = Tally(), False
    start = time.perf_counter()
    try:
        evaluate(params, cfg, loader.batches(), args.backend, tally=tally, on_batch=None if bar is None else show)
    except KeyboardInterrupt:
        interrupted = True
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.update(tally.count + len(skipped) - bar.n)
        bar.close()
    correct1, correct5, count, total, n_skipped, interrupted = distributed.sum_counts(
        tally.correct1, tally.correct5, tally.count, total, len(skipped), interrupted)  # over all ranks
    if not distributed.is_root():
        return 130 if interrupted else 0

    if count == 0:  # no accuracy to report: an error (or Ctrl-C), never a result of 0%
        if interrupted:
            print(f"{prog}: interrupted before any image was evaluated: no results", file=sys.stderr)
            return 130
        raise cli.UserError(f"no images were evaluated: all {total} could not be read (see above)")
    row = results_row(args, cfg, dcfg, correct1, correct5, count, n_skipped, seconds)
    if interrupted:
        print(f"interrupted after {count} of {total} images: partial results", file=sys.stderr)
    # the file before stdout: output that cannot be printed (a closed pipe) must not lose it
    if args.results_file:
        if interrupted:
            write_results(partial_name(args.results_file), row)
            print(f"partial results written to {cli.shown_path(partial_name(args.results_file), sys.stderr)}; "
                  f"{cli.shown_path(args.results_file, sys.stderr)} is left as it was", file=sys.stderr)
        else:
            write_results(args.results_file, row)
    print(f" * Acc@1 {row['top1']:.3f} ({row['top1_err']:.3f}) Acc@5 {row['top5']:.3f} ({row['top5_err']:.3f})")
    shown = cli.shown_path(os.path.relpath(weights) if os.path.abspath(weights).startswith(os.getcwd() + os.sep)
                           else weights)
    print(f"   {args.model}  weights {shown}  images {count}  skipped {n_skipped}  "
          f"params {row['param_count']}M  {row['img_per_sec']:.1f} img/s  backend {args.backend}")
    for note in notes:
        print(note, file=sys.stderr)
    if left_out:
        print(f"   the folder scan left out {len(left_out)} folder(s) or file(s), named above", file=sys.stderr)
    return 130 if interrupted else 0


def command(argv=None, prog=PROG):
    """Run the command as its shell would: exit status, errors as one line."""
    return cli.run(lambda a: main(a, prog), argv, prog=prog)

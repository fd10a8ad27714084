"""python -m minimixer.weights download NAME | list | convert SRC | resize SRC --img-size S: Mixer weights.

    python -m minimixer.weights list
    python -m minimixer.weights download mixer_b16_224 --to weights/    # checked: docs/reliability.md
    python -m minimixer.weights convert mixer-base-p16_3rdparty_64xb64_in1k_20211124-1377e3e0.pth \\
        --out weights/mixer_b16_224.mmpretrain.safetensors
    python -m minimixer.weights resize weights/mixer_s32_224.safetensors --img-size 448 --out s32_448.safetensors

The checkpoint table lives in minimixer/checkpoints/registry.py; loading every format in
minimixer/checkpoints/convert.py (minimixer.load_weights, load_checkpoint); writing in
minimixer/checkpoints/safetensors_io.py (minimixer.save_weights); resizing to another image size
in minimixer/checkpoints/resize.py (docs/transfer.md).
"""
import os
import sys

from ..checkpoints.convert import convert, describe
from ..checkpoints.resize import METHODS, resize_file
from ..checkpoints.registry import CHECKPOINTS, PREPROCESSING, WeightsNotFound, download, local_name, resolve
from ..checkpoints.safetensors_io import atomic_copy
from ..layers import GELU_FORMS
from .cli import ArgumentParser, run

PROG = "python -m minimixer.weights"


def main(argv=None, prog=PROG):
    """python -m minimixer.weights download NAME [--to DIR] | list | convert SRC --out DST
    | resize SRC --img-size S --out DST"""
    p = ArgumentParser(prog=prog, description="pretrained Mixer weights")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="fetch a checkpoint (the Hugging Face hub, or the original file)")
    d.add_argument("model", help="e.g. mixer_b16_224, mixer_l16_224.goog_in21k or mixer_b16_224.mmpretrain")
    d.add_argument("--to", metavar="DIR", help="also write it to DIR/<model>.safetensors (e.g. weights/)")
    d.add_argument("--cache-dir", help="download cache folder (default: $MINIMIXER_CACHE or ~/.cache/minimixer)")
    d.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="give up on a download after this long (default: $MINIMIXER_DOWNLOAD_TIMEOUT or 600)")
    sub.add_parser("list", help="list the known checkpoints")
    c = sub.add_parser("convert", help="any Mixer checkpoint (timm safetensors, MMPretrain .pth, JAX .npz) "
                                       "to timm-named safetensors that record their numerics")
    c.add_argument("src", help="the file to convert; its format is detected from its contents")
    c.add_argument("--out", required=True, metavar="DST", help="the .safetensors file to write")
    c.add_argument("--model", help="the preset or tag SRC must be (an error names the variant otherwise)")
    c.add_argument("--img-size", type=int, nargs="+", metavar="H [W]",
                   help="the input size, for a patch grid that is not square")
    c.add_argument("--ln-eps", type=float, help="record this LayerNorm eps (default: the source's; 1e-6 for timm)")
    c.add_argument("--gelu", choices=GELU_FORMS, help="record this GELU (default: the source's; erf for timm)")
    c.add_argument("--use-ema", action="store_true", help="a timm training checkpoint's EMA weights (state_dict_ema)")
    c.add_argument("--preprocessing", choices=list(PREPROCESSING),
                   help="record this input pipeline (default: the source's own; none for timm files)")
    r = sub.add_parser("resize", help="a Mixer for another image size: new token MLPs from the pretrained ones "
                                      "(the paper's Appendix C where the patch grid grows by a whole factor)")
    r.add_argument("src", help="the weights to resize (any format convert reads)")
    r.add_argument("--img-size", type=int, nargs="+", required=True, metavar="H [W]", help="the new input size")
    r.add_argument("--out", required=True, metavar="DST", help="the .safetensors file to write")
    r.add_argument("--model", help="the preset or tag SRC is (for its image size, if its grid is not square)")
    r.add_argument("--method", choices=METHODS, help="appendix_c (the default where the grid grows by whole "
                                                     "factors) or resample (any size; docs/transfer.md)")
    args = p.parse_args(argv)
    try:
        if args.command == "list":
            return list_checkpoints()
        if args.command in ("convert", "resize"):
            if not args.out.endswith(".safetensors"):
                p.error("--out must end in .safetensors")
            if args.img_size and len(args.img_size) > 2:
                p.error("--img-size takes H or H W")
            img_size = tuple(args.img_size) if args.img_size and len(args.img_size) == 2 else \
                (args.img_size[0] if args.img_size else None)
            like = resolve(args.model)[0] if args.model else None  # the variant SRC must be
        if args.command == "resize":
            old, new, method = resize_file(args.src, args.out, img_size, like=like, method=args.method)
            print(f"{args.out}: {describe(new)}, token hidden {new.token_hidden} (mlp_ratio "
                  f"{new.mlp_ratio[0]:g}, {new.mlp_ratio[1]:g}), by {method} from {old.image_hw[0]}x{old.image_hw[1]}")
            return 0
        if args.command == "convert":
            ck, cfg = convert(args.src, args.out, like=like, preprocessing=args.preprocessing,
                              img_size=img_size, ln_eps=args.ln_eps, gelu=args.gelu, use_ema=args.use_ema)
            print(f"{args.out}: {describe(cfg)} from {ck.source} ({ck.format}); "
                  f"ln_eps {cfg.ln_eps:g}, gelu {cfg.gelu}, preprocessing {args.preprocessing or ck.preprocessing}")
            return 0
        if args.timeout is not None and not 0 < args.timeout < float("inf"):
            p.error(f"--timeout {args.timeout:g}: give a positive number of seconds")
        # an explicit download hashes a cached file again; --weights auto only reads its header
        path = download(args.model, cache_dir=args.cache_dir, timeout=args.timeout, full_check=True)
        if args.to:
            os.makedirs(args.to, exist_ok=True)
            dest = os.path.join(args.to, local_name(args.model))
            if path.endswith(".safetensors"):
                atomic_copy(path, dest)
            else:  # an original .pth/.npz: write it converted, with its numerics recorded
                convert(path, dest, like=resolve(args.model)[0])
            path = dest
    except (WeightsNotFound, ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def list_checkpoints():
    print(f"{'tag':36s} {'classes':>7s}  {'numerics':15s} {'preprocessing':13s} where")
    for tag, ck in CHECKPOINTS.items():
        where = ck.repo_id or ck.url or "bundled: minimixer/assets/mixer_digits.safetensors"
        numerics = f"eps {ck.numerics['ln_eps']:g} {ck.numerics['gelu']}"
        pre = next(name for name, d in PREPROCESSING.items() if d == ck.data)
        print(f"{tag:36s} {ck.num_classes:7d}  {numerics:15s} {pre:13s} {where}")
    return 0


def command(argv=None, prog=PROG):
    """Run the command as its shell would: exit status, errors as one line."""
    return run(lambda a: main(a, prog), argv, prog=prog)

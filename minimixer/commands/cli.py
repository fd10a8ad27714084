"""Shared command-line plumbing: one-line errors with exit status 2, and model/config flags."""
import argparse
import os
import sys
import warnings
from contextlib import contextmanager

from ..runtime import distributed
from ..backend import BackendError
from ..config import PRESETS


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument prints one line (no usage dump) and exits with status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit status 2, no traceback."""


def run(main, argv=None, prog="minimixer"):
    """Call main(argv); turn user-facing errors into one line on stderr and exit status 2,
    and Ctrl-C into one line and exit status 130 (128 + SIGINT, as shells report it).
    A command that has partial results catches KeyboardInterrupt itself, prints them and
    returns 130."""
    try:
        with notes_as_lines(prog):
            return main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, OSError, BackendError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {msg}", file=sys.stderr)
        distributed.abort(2)  # under mpiexec, the other ranks would wait forever: end them too
        return 2


@contextmanager
def notes_as_lines(prog):
    """minimixer's own notes about a weights file (NumericsWarning, CheckpointNote) as one line
    on stderr, 'prog: note: ...', instead of Python's two-line warning with a source line."""
    from ..checkpoints.convert import CheckpointNote, NumericsWarning
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (CheckpointNote, NumericsWarning)):
            print(f"{prog}: note: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def add_weights_args(p):
    """--weights (timm: --checkpoint) and --allow-nonfinite, the same for every command that loads a model."""
    p.add_argument("--weights", "--checkpoint", dest="weights", default="auto", metavar="FILE",
                   help="a safetensors file, a .pth (timm's, a training checkpoint, MMPretrain's), a JAX .npz, "
                        "or 'auto' (bundled, ./weights/, or download)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load weights that hold NaN or Inf (refused by default: they give NaN logits)")
    p.add_argument("--use-ema", action="store_true",
                   help="a timm training checkpoint's EMA weights (state_dict_ema), as timm's validate.py --use-ema")


def add_model_args(p, default_model):
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default_model,
                   help=f"a preset ({', '.join(PRESETS)}) or a pretrained tag (python -m minimixer.weights list)")
    g.add_argument("--num-classes", type=int)
    g.add_argument("--img-size", type=int)
    g.add_argument("--in-chans", type=int)
    g.add_argument("--patch-size", type=int)
    g.add_argument("--num-blocks", type=int)
    g.add_argument("--embed-dim", type=int)
    g.add_argument("--mlp-ratio", type=float, nargs=2, metavar=("TOKEN", "CHANNEL"))
    g.add_argument("--ln-eps", type=float)
    g.add_argument("--gelu", choices=["erf", "tanh"])


OVERRIDES = ("num_classes", "img_size", "in_chans", "patch_size", "num_blocks", "embed_dim",
             "mlp_ratio", "ln_eps", "gelu")


def config_from_args(args, **defaults):
    """The config of --model (a preset or a pretrained tag), then what a --weights FILE records
    (ln_eps, gelu, classes), then the override flags that were given, and `defaults` for the rest."""
    from ..checkpoints.convert import config_for_file
    from ..checkpoints.registry import resolve
    overrides = dict(defaults)
    overrides.update({k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None})
    if overrides.get("mlp_ratio") is not None:
        overrides["mlp_ratio"] = tuple(overrides["mlp_ratio"])
    cfg = resolve(args.model)[0]
    weights = getattr(args, "weights", None)
    if isinstance(weights, str) and os.path.isfile(weights):
        cfg = config_for_file(weights, cfg)
    return cfg.replace(**overrides)

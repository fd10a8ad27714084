"""Shared command-line plumbing: one-line errors with exit status 2, and model/config flags."""
import argparse
import dataclasses
import os
import sys

from ..runtime import distributed
from ..backend import BackendError
from ..config import PRESETS, MixerConfig
from ..layers import GELU_FORMS


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
        return main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, OSError, BackendError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {msg}", file=sys.stderr)
        distributed.abort(2)  # under mpiexec, the other ranks would wait forever: end them too
        return 2


def add_weights_args(p):
    """--weights (timm: --checkpoint) and --allow-nonfinite, the same for every command that loads a model."""
    p.add_argument("--weights", "--checkpoint", dest="weights", default="auto", metavar="FILE",
                   help="a safetensors file, or 'auto' (bundled, ./weights/, or download)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load weights that hold NaN or Inf (refused by default: they give NaN logits)")


def add_model_args(p, default_model):
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default_model,
                   help=f"a preset ({', '.join(PRESETS)}) or a pretrained tag (python -m minimixer.weights list)")
    for f in dataclasses.fields(MixerConfig):  # one flag per field: --num-classes, --img-size, ...
        g.add_argument("--" + f.name.replace("_", "-"), **FLAG_FORMS.get(f.name, {"type": type(f.default)}))


OVERRIDES = tuple(f.name for f in dataclasses.fields(MixerConfig))  # every config field has its flag
# the fields whose flag is not simply of its default's type (img_size takes one int: square, as timm's)
FLAG_FORMS = {"mlp_ratio": dict(type=float, nargs=2, metavar=("TOKEN", "CHANNEL")), "gelu": dict(choices=GELU_FORMS)}


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

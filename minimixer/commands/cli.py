"""Shared command-line plumbing: one-line errors with exit status 2, and model/config flags."""
import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import warnings

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


# The signals that end a command as Ctrl-C does: schedulers, `docker stop` and `timeout` send
# SIGTERM, a closed terminal SIGHUP. Each raises KeyboardInterrupt, so partial results are kept
# and checkpoints written by the same code; the exit status is still 128 + the signal's number.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def signal_name(signum):
    return {2: "Ctrl-C"}.get(int(signum), signal.Signals(signum).name)


class _Stopped:
    """While a command runs: SIGTERM and SIGHUP raise KeyboardInterrupt, as SIGINT does, and the
    last one received is remembered for the exit status."""

    def __init__(self):
        self.signum, self.previous = None, {}

    def _handler(self, signum, frame):
        self.signum = signum
        raise KeyboardInterrupt(signal_name(signum))

    def __enter__(self):
        for s in STOP_SIGNALS:
            try:
                self.previous[s] = signal.signal(s, self._handler)
            except (ValueError, OSError):  # not the main thread, or not settable here
                pass
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def status(self, code):
        """130 (Ctrl-C) becomes 128 + the signal that stopped the command, as shells report it."""
        return 128 + self.signum if code == 130 and self.signum else code


@contextlib.contextmanager
def _printable_stdout():
    """A safety net under shown_path: while a command runs, text stdout cannot encode (a file name's
    undecodable bytes, which os.fsdecode made surrogates) is printed as backslash escapes instead of
    raising UnicodeEncodeError after the work is done."""
    out = sys.stdout
    errors = getattr(out, "errors", None)
    changed = errors == "strict" and hasattr(out, "reconfigure")
    if changed:
        try:
            out.reconfigure(errors="backslashreplace")
        except (ValueError, OSError):
            changed = False
    try:
        yield
    finally:
        if changed:
            try:
                out.reconfigure(errors=errors)
            except (ValueError, OSError):
                pass


def run(main, argv=None, prog="minimixer"):
    """Call main(argv); turn user-facing errors into one line on stderr and exit status 2,
    and Ctrl-C (or SIGTERM, SIGHUP) into one line and exit status 128 + the signal's number.
    A command that has partial results catches KeyboardInterrupt itself, prints them and
    returns 130."""
    with _Stopped() as stopped, _printable_stdout(), notes_as_lines(prog):
        try:
            return stopped.status(main(argv))
        except KeyboardInterrupt:
            named = stopped.signum not in (None, signal.SIGINT)  # Ctrl-C says only "interrupted", as before
            print(f"{prog}: interrupted" + (f" ({signal_name(stopped.signum)})" if named else ""),
                  file=sys.stderr)
            return stopped.status(130)
        except MemoryError as e:  # NumPy's names the size: "Unable to allocate 112. GiB for an array ..."
            print(f"{prog}: error: out of memory: {str(e) or 'an allocation failed'} (a smaller model, "
                  "image size or batch?)", file=sys.stderr)
            distributed.abort(2)
            return 2
        except (UserError, ValueError, OSError, BackendError, KeyError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"{prog}: error: {msg}", file=sys.stderr)
            distributed.abort(2)  # under mpiexec, the other ranks would wait forever: end them too
            return 2


def shown_path(path, stream=None):
    """A path as text that `stream` (default stdout) can print, whatever bytes its name holds:
    a name that is not valid UTF-8 (os.fsdecode made its bytes surrogates) shows them as \\xNN,
    where print() would raise UnicodeEncodeError and lose the rest of the output."""
    encoding = getattr(stream or sys.stdout, "encoding", None) or "utf-8"
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return text.encode(encoding, "backslashreplace").decode(encoding)


def physical_memory():
    """Bytes of memory on this machine, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(cfg, bytes_per_param, what):
    """A one-line error, before any allocation, when cfg's parameters alone (bytes_per_param each:
    the float64 initialization, the weights, grads and optimizer moments) exceed this machine's
    memory: an allocation that large may pass the kernel's overcommit and meet the OOM killer
    instead of a MemoryError."""
    from ..config import param_count
    need, have = param_count(cfg) * bytes_per_param, physical_memory()
    if have and need > have:
        raise UserError(f"{what} needs {need / 2**30:.1f} GiB for its parameters alone; this machine has "
                        f"{have / 2**30:.1f} GiB (a smaller --embed-dim, --img-size or --num-blocks?)")


@contextlib.contextmanager
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


def load_model_weights(args, cfg):
    """(path, params): the weights that --model and --weights name (one line if none is found),
    loaded for cfg on --backend (eval's and predict's shared first step)."""
    from ..checkpoints.convert import load_weights
    from ..checkpoints.registry import WeightsNotFound, find_weights
    try:
        weights = find_weights(args.model, args.weights)
    except WeightsNotFound as e:
        raise UserError(str(e)) from None
    return weights, load_weights(weights, cfg, backend=args.backend, allow_nonfinite=args.allow_nonfinite,
                                 use_ema=args.use_ema)


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

"""python -m minimixer.summary MODEL: parameters, multiply-accumulates, and where the time goes.

    python -m minimixer.summary mixer_b16_224              # every layer, then the totals
    python -m minimixer.summary mixer_l16_224 --depth 1    # one row per block
    python -m minimixer.summary mixer_s32_224 --profile --batch-size 8
    python -m minimixer.summary mixer_b16_224 --img-size 384 --json

MACs are counted the way mmcv 1.x's get_model_complexity_info counts them, which is what
MMPretrain's model table prints as "Flops (G)": every multiply-accumulate of a Linear or Conv,
plus one per output element for the conv's bias, plus two per element for LayerNorm's affine.
GELU, the residual adds, the mean pool and the Linear biases count nothing. FLOPs = 2 x MACs.

--profile times the clear path (model.py) layer kind by layer kind, forward and backward, on the
chosen backend: the table that shows channel mixing is most of the cost.
"""
import json
import statistics
import time
from contextlib import contextmanager

import numpy as np

from . import cli
from .. import layers, model
from ..backend import BACKENDS, get_xp, to_backend
from ..config import param_count
from ..params import init_params

PROG = "python -m minimixer.summary"


# --- counting --------------------------------------------------------------------------------

def layer_rows(cfg):
    """One row per layer in forward order: name, output shape (one image), params, MACs."""
    D, N, C, P, K = cfg.embed_dim, cfg.num_patches, cfg.in_chans, cfg.patch_size, cfg.num_classes
    DS, DC = cfg.token_hidden, cfg.channel_hidden

    def row(name, shape, params, macs):
        return {"name": name, "shape": shape, "params": params, "macs": macs}

    def norm(name):
        return row(name, (N, D), 2 * D, 2 * N * D)  # affine: one multiply and one add per element

    rows = [row("stem.proj", (N, D), D * C * P * P + D, N * D * C * P * P + N * D)]  # conv bias counts
    for i in range(cfg.num_blocks):
        b = f"blocks.{i}"
        rows += [
            norm(f"{b}.norm1"),
            row(f"{b}.mlp_tokens.fc1", (D, DS), DS * N + DS, D * N * DS),  # each channel's N tokens -> DS
            row(f"{b}.mlp_tokens.fc2", (D, N), N * DS + N, D * DS * N),
            norm(f"{b}.norm2"),
            row(f"{b}.mlp_channels.fc1", (N, DC), DC * D + DC, N * D * DC),  # each token's D channels -> DC
            row(f"{b}.mlp_channels.fc2", (N, D), D * DC + D, N * DC * D),
        ]
    rows += [norm("norm"), row("pool", (D,), 0, 0), row("head", (K,), K * D + K, D * K)]
    return rows


def by_block(rows):
    """Rows with each block's layers summed into one row (--depth 1)."""
    out = []
    for r in rows:
        name = ".".join(r["name"].split(".")[:2]) if r["name"].startswith("blocks.") else r["name"]
        if out and out[-1]["name"] == name:
            out[-1] = {**out[-1], "shape": r["shape"], "params": out[-1]["params"] + r["params"],
                       "macs": out[-1]["macs"] + r["macs"]}
        else:
            out.append({**r, "name": name})
    return out


def totals(cfg, rows):
    """The summed columns, with two other conventions beside mmcv's for comparison."""
    N, D = cfg.num_patches, cfg.embed_dim
    macs = sum(r["macs"] for r in rows)
    norms = 2 * cfg.num_blocks + 1
    matmul = macs - 2 * N * D * norms - N * D  # Linear and Conv multiply-accumulates alone
    params = sum(r["params"] for r in rows)
    assert params == param_count(cfg), "the table must account for every parameter"
    return {"params": params, "macs": macs, "flops": 2 * macs, "matmul_macs": matmul,
            "fvcore_macs": matmul + 5 * N * D * norms}  # mmengine's newer counter: LayerNorm 5/element, no biases


def si(n, unit):
    return f"{n / 1e6:.2f} M" if unit == "M" else f"{n / 1e9:.2f} G"


def print_table(cfg, name, rows, tot):
    h, w = cfg.image_hw
    print(f"{name}: {cfg.num_blocks} blocks, D {cfg.embed_dim}, N {cfg.num_patches} tokens "
          f"({cfg.grid_size[0]}x{cfg.grid_size[1]} patches of {cfg.patch_size}px), "
          f"DS {cfg.token_hidden}, DC {cfg.channel_hidden}, {h}x{w} input, {cfg.num_classes} classes")
    print(f"{'layer':28s} {'output (per image)':>18s} {'params':>14s} {'MACs':>16s}")
    for r in rows:
        print(f"{r['name']:28s} {str(tuple(r['shape'])):>18s} {r['params']:>14,d} {r['macs']:>16,d}")
    print(f"{'total':28s} {'':>18s} {tot['params']:>14,d} {tot['macs']:>16,d}")
    print()
    print(f"params  {si(tot['params'], 'M'):>9s}  ({tot['params']:,})")
    print(f"MACs    {si(tot['macs'], 'G'):>9s}  per image: Linear/Conv multiply-accumulates + conv bias + LayerNorm "
          f"affine (2/element), as mmcv 1.x counts; MMPretrain's \"Flops (G)\"")
    print(f"FLOPs   {si(tot['flops'], 'G'):>9s}  = 2 x MACs: a multiply and an add each")
    print(f"        matmuls alone {tot['matmul_macs'] / 1e9:.3f} G MACs; mmengine's fvcore-style counter "
          f"(LayerNorm 5/element) {tot['fvcore_macs'] / 1e9:.3f} G")


# --- profiling -------------------------------------------------------------------------------

# Which kind of work each layer function is. linear_* and mlp_* belong to whoever calls them
# (token mixing, channel mixing, the stem); called from the model itself, linear is the head.
KINDS = {"patch_embed": "stem", "layernorm": "LayerNorm", "gelu": "GELU",
         "token_mixing": "token mixing", "channel_mixing": "channel mixing",
         "mixer_block": "residual adds", "drop_path": "residual adds",
         "mean_pool": "pool + head", "dropout": "pool + head"}
INHERIT = ("linear", "mlp")
PROFILED = [f"{base}_{phase}" for base in [*KINDS, *INHERIT] for phase in ("forward", "backward")]


class LayerTimer:
    """Wraps the layer functions that layers.py and model.py call, and adds up each one's own
    time (its total less the wrapped calls inside it) under its kind, forward and backward apart."""

    def __init__(self, sync):
        self.sync = sync
        self.seconds = {"forward": {}, "backward": {}}
        self.stack = []  # [kind, start, seconds spent in wrapped callees]

    def wrap(self, fn):
        base, phase = fn.__name__.rsplit("_", 1)

        def timed(*args, **kwargs):
            parent = self.stack[-1][0] if self.stack else "pool + head"
            kind = KINDS.get(base, parent)  # linear/mlp inherit; at the top level that is the head
            self.sync()
            frame = [kind, time.perf_counter(), 0.0]
            self.stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                elapsed = time.perf_counter() - frame[1]
                self.stack.pop()
                table = self.seconds[phase]
                table[kind] = table.get(kind, 0.0) + elapsed - frame[2]
                if self.stack:
                    self.stack[-1][2] += elapsed
        return timed

    @contextmanager
    def installed(self):
        saved = []
        for module in (layers, model):
            for name in PROFILED:
                if hasattr(module, name):
                    saved.append((module, name, getattr(module, name)))
                    setattr(module, name, self.wrap(getattr(module, name)))
        try:
            yield self
        finally:
            for module, name, fn in saved:
                setattr(module, name, fn)


def profile(cfg, *, batch_size, backend="numpy", dtype="float32", repeats=2, warmup=1, seed=0):
    """Seconds per layer kind, forward and backward, averaged over `repeats` passes of the clear path."""
    params = to_backend(init_params(cfg, seed=seed, dtype=dtype), backend)
    rng = np.random.default_rng(seed)
    x = to_backend(rng.standard_normal((batch_size, cfg.in_chans, *cfg.image_hw)).astype(dtype), backend)
    xp = get_xp(x)
    dlogits = xp.ones((batch_size, cfg.num_classes), dtype=x.dtype) / batch_size
    stream = getattr(getattr(xp, "cuda", None), "get_current_stream", None)
    sync = (lambda: stream().synchronize()) if stream else (lambda: None)
    for _ in range(warmup):
        model.mixer_backward(dlogits, model.mixer_forward(params, x, cfg)[1])
    runs = []
    for _ in range(repeats):
        timer = LayerTimer(sync)
        with timer.installed():
            logits, cache = model.mixer_forward(params, x, cfg)
            model.mixer_backward(dlogits, cache)
        runs.append(timer.seconds)
    kinds = sorted({k for r in runs for phase in r.values() for k in phase})
    return {phase: {k: statistics.median(r[phase].get(k, 0.0) for r in runs) for k in kinds}
            for phase in ("forward", "backward")}


def print_profile(prof, *, name, batch_size, backend, dtype, repeats):
    fwd, bwd = prof["forward"], prof["backward"]
    total_f, total_b = sum(fwd.values()), sum(bwd.values())
    total = total_f + total_b
    print(f"where the time goes: {name}, batch {batch_size}, {backend} {dtype}, the clear path (model.py), "
          f"median of {repeats}")
    print(f"{'kind':16s} {'forward ms':>11s} {'share':>7s} {'backward ms':>12s} {'share':>7s} {'of all':>7s}")
    for k in sorted(fwd, key=lambda k: -(fwd[k] + bwd[k])):
        print(f"{k:16s} {1e3 * fwd[k]:11.1f} {100 * fwd[k] / total_f:6.1f}% {1e3 * bwd[k]:12.1f} "
              f"{100 * bwd[k] / total_b:6.1f}% {100 * (fwd[k] + bwd[k]) / total:6.1f}%")
    print(f"{'total':16s} {1e3 * total_f:11.1f} {'':7s} {1e3 * total_b:12.1f}")
    print("token/channel mixing: their Linear layers (matmuls, biases, transposes); GELU and LayerNorm apart")


# --- command ---------------------------------------------------------------------------------

def parse_args(argv, prog=PROG):
    p = cli.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("name", nargs="?", metavar="MODEL", help="a preset or pretrained tag (default mixer_b16_224)")
    cli.add_model_args(p, default_model="mixer_b16_224")
    p.add_argument("--depth", type=int, choices=[1, 2], default=2, help="1: a row per block; 2: every layer")
    p.add_argument("--profile", action="store_true", help="time forward and backward per layer kind")
    p.add_argument("--batch-size", type=int, default=4, help="--profile's batch (default 4)")
    p.add_argument("--backend", choices=BACKENDS, default="numpy")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the same data as JSON")
    args = p.parse_args(argv)
    if args.name:
        args.model = args.name
    if args.batch_size < 1 or args.repeats < 1:
        p.error("--batch-size and --repeats must be >= 1")
    return args


def main(argv=None, prog=PROG):
    args = parse_args(argv, prog)
    cfg = cli.config_from_args(args)
    rows = layer_rows(cfg)
    tot = totals(cfg, rows)
    shown = by_block(rows) if args.depth == 1 else rows
    prof = None
    if args.profile:
        cli.check_fits(cfg, 24, f"--profile of {args.model}")  # params, grads, float64 init
        prof = profile(cfg, batch_size=args.batch_size, backend=args.backend, dtype=args.dtype,
                       repeats=args.repeats)
    if args.json:
        out = {"model": args.model, "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
               "layers": [{**r, "shape": list(r["shape"])} for r in shown], "totals": tot}
        if prof is not None:
            out["profile"] = {"batch_size": args.batch_size, "backend": args.backend, "dtype": args.dtype,
                              "path": "clear", "seconds": prof}
        print(json.dumps(out, indent=1))
        return 0
    print_table(cfg, args.model, shown, tot)
    if prof is not None:
        print()
        print_profile(prof, name=args.model, batch_size=args.batch_size, backend=args.backend,
                      dtype=args.dtype, repeats=args.repeats)
    return 0


def command(argv=None, prog=PROG):
    """Run the command as its shell would: exit status, errors as one line."""
    return cli.run(lambda a: main(a, prog), argv, prog=prog)

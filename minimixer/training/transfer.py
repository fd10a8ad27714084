"""Fine-tuning helpers: a new head, and which parameters stay frozen.

    reset_head(params, cfg, seed)        # timm's reset_classifier: a fresh nn.Linear(D, K)
    frozen_names(settings, names)        # the params --freeze / --train-blocks keep fixed

A frozen parameter is left out of the optimizer: no update, no weight decay, no optimizer
state, and its gradient is left out of the clipping norm (as requires_grad=False does in
torch). Its gradient is still computed by the backward pass.
"""
import math
import re

import numpy as np

# --freeze PART[,PART...]: these names, or blocks.I / blocks.I-J
FREEZE_PARTS = ("trunk", "stem", "blocks", "norm", "head")
_BLOCKS = re.compile(r"(\d+)(?:-(\d+))?")


def _block_range(text, what):
    m = _BLOCKS.fullmatch(text)
    if not m:
        raise ValueError(f"{what}: {text!r} is not a block index or range like 6 or 6-7")
    lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
    if hi < lo:
        raise ValueError(f"{what}: the range {text!r} runs backwards")
    return lo, hi


def parse_freeze(text):
    """[(part, lo, hi)] from '--freeze trunk' or 'stem,blocks.0-5'; ValueError naming what is wrong."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if item in FREEZE_PARTS:
            out.append((item, None, None))
        elif item.startswith("blocks."):
            out.append(("blocks", *_block_range(item[len("blocks."):], "--freeze")))
        else:
            raise ValueError(f"--freeze: unknown part {item!r}; parts: {', '.join(FREEZE_PARTS)}, blocks.I, blocks.I-J")
    return out


def parse_blocks(text):
    """[(lo, hi)] from '--train-blocks 6-7' or '0,6-7'."""
    return [_block_range(t.strip(), "--train-blocks") for t in text.split(",") if t.strip()]


def spec_problem(kind, text):
    """None if text is a valid --freeze (kind 'freeze') or --train-blocks value, else the reason."""
    try:
        (parse_freeze if kind == "freeze" else parse_blocks)(text)
    except ValueError as e:
        return str(e).split(": ", 1)[1]
    return None


def _block_of(name):
    return int(name.split(".")[1]) if name.startswith("blocks.") else None


def frozen_names(settings, names):
    """The parameter names that --freeze and --train-blocks keep fixed (a set). ValueError for a
    block index the model does not have, or when nothing would be left to train."""
    names = list(names)
    num_blocks = 1 + max((_block_of(n) for n in names if _block_of(n) is not None), default=-1)
    frozen = set()

    def check(lo, hi, flag):
        if hi >= num_blocks:
            raise ValueError(f"{flag}: block {hi} does not exist: the model has blocks 0-{num_blocks - 1}")

    for part, lo, hi in parse_freeze(getattr(settings, "freeze", "") or ""):
        if part == "trunk":
            frozen.update(n for n in names if not n.startswith("head."))
        elif part == "blocks" and lo is not None:
            check(lo, hi, "--freeze")
            frozen.update(n for n in names if _block_of(n) is not None and lo <= _block_of(n) <= hi)
        else:
            frozen.update(n for n in names if n.startswith(part + "."))
    ranges = parse_blocks(getattr(settings, "train_blocks", "") or "")
    for lo, hi in ranges:
        check(lo, hi, "--train-blocks")
    if ranges:  # only these blocks (and the final norm and head) train
        frozen.update(n for n in names if n.startswith("stem.") or (
            _block_of(n) is not None and not any(lo <= _block_of(n) <= hi for lo, hi in ranges)))
    if frozen and len(frozen) == len(names):
        raise ValueError("--freeze/--train-blocks leave nothing to train")
    return frozen


def describe_frozen(frozen, params):
    """'frozen: 98 of 102 tensors (18,978,304 of 19,014,724 values); training head.weight, ...'"""
    if not frozen:
        return None
    size = {k: math.prod(v.shape) for k, v in params.items()}
    free = [k for k in params if k not in frozen]
    shown = ", ".join(free[:4]) + (f", ... ({len(free) - 4} more)" if len(free) > 4 else "")
    return (f"frozen: {len(frozen)} of {len(params)} parameter tensors ({sum(size[k] for k in frozen):,} of "
            f"{sum(size.values()):,} values); training {shown}")


def reset_head(params, num_classes, seed, dtype):
    """A new head of num_classes outputs, as timm's reset_classifier makes it: nn.Linear's own
    init, weight and bias uniform in +-1/sqrt(D) (kaiming_uniform with a=sqrt(5)), not the zeros
    timm's __init__ gives a head. Returns (weight, bias)."""
    dim = params["head.weight"].shape[1]
    bound = 1.0 / math.sqrt(dim)
    rng = np.random.default_rng([seed, 0x4EAD])
    weight = rng.uniform(-bound, bound, (num_classes, dim)).astype(dtype)
    bias = rng.uniform(-bound, bound, (num_classes,)).astype(dtype)
    return weight, bias

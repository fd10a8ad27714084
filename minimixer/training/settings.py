"""Training settings: what a run may be told (TrainSettings), and the one rule per setting that
both TrainSettings and the train command's flags check values with."""
import math
from dataclasses import dataclass, fields

from ..optim import SCHEDULES
from .transfer import spec_problem

OPTIMIZERS = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}  # name -> state per param


def _between(lo, hi, closed_hi=False):
    def ok(v):
        return math.isfinite(v) and lo <= v and (v <= hi if closed_hi else v < hi)
    return ok


# What each setting may hold: (type, test, what the test says). TrainSettings checks its fields
# with it and the train command's flags check their values with it: one definition of each range.
SETTING_RULES = {
    "epochs": (int, lambda v: v >= 1, "must be >= 1"),
    "batch_size": (int, lambda v: v >= 1, "must be >= 1"),
    "lr": (float, _between(0, math.inf), "must be a finite number >= 0"),
    "min_lr": (float, _between(0, math.inf), "must be a finite number >= 0"),
    "weight_decay": (float, _between(0, math.inf), "must be a finite number >= 0"),
    "warmup": (float, _between(0, 1e6, closed_hi=True), "must be a number of epochs in [0, 1e6]"),
    "schedule": (str, lambda v: v in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
    "optimizer": (str, lambda v: v in OPTIMIZERS, f"must be one of {', '.join(OPTIMIZERS)}"),
    "momentum": (float, _between(0, 1), "must be in [0, 1)"),
    "label_smoothing": (float, _between(0, 1), "must be in [0, 1)"),
    "drop_path": (float, _between(0, 1), "must be in [0, 1)"),
    "dropout": (float, _between(0, 1), "must be in [0, 1)"),
    "clip_grad": (float, _between(0, math.inf), "must be a finite number >= 0"),
    "seed": (int, lambda v: v >= 0, "must be >= 0"),
    "freeze": (str, lambda v: spec_problem("freeze", v) is None, "must be parts like trunk, or stem,blocks.0-5"),
    "train_blocks": (str, lambda v: spec_problem("train_blocks", v) is None, "must be blocks like 6-7, or 0,6-7"),
}
OPTIONAL_SETTINGS = ("freeze", "train_blocks")  # newer than some checkpoints: absent means the default


def setting_problem(name, value):
    """None if value is a valid value of setting `name`, else what is wrong, e.g. 'must be >= 1'."""
    kind, test, says = SETTING_RULES[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        return f"must be {'an integer' if kind is int else 'a number' if kind is float else 'a string'}, got {value!r}"
    return None if test(value) else f"{says}, got {value!r}"


@dataclass
class TrainSettings:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05  # biases and norm weights are exempt (the usual recipe)
    warmup: float = 1.0  # epochs of linear warmup
    schedule: str = "cosine"
    optimizer: str = "adamw"  # or "sgd" (nesterov momentum)
    momentum: float = 0.9
    label_smoothing: float = 0.0
    drop_path: float = 0.0
    dropout: float = 0.0  # before the head (timm's drop_rate)
    clip_grad: float = 1.0  # global gradient norm; 0 turns clipping off
    seed: int = 0
    freeze: str = ""  # parameters left out of the optimizer (training/transfer.py): "trunk", "stem,blocks.0-5"
    train_blocks: str = ""  # train only these blocks (with the final norm and head): "6-7"

    def __post_init__(self):
        problems = [f"{f.name} {p}" for f in fields(self) if (p := setting_problem(f.name, getattr(self, f.name)))]
        if self.optimizer == "sgd" and self.momentum == 0:
            problems.append("momentum must be > 0 for sgd (nesterov)")
        if problems:
            raise ValueError("invalid TrainSettings: " + "; ".join(problems))
        for f in fields(self):  # ints given for floats become floats, so a JSON round trip is exact
            if SETTING_RULES[f.name][0] is float:
                setattr(self, f.name, float(getattr(self, f.name)))

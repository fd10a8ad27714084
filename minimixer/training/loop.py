"""Training: one step, evaluation, checkpoints and the epoch loop behind `python -m minimixer.train`.

    loss = train_step(params, opt, x, y, cfg, lr=...)     # forward, loss, backward, clip, update

Randomness is a function of (seed, epoch) for the batch order and of (seed, step)
for dropout/stochastic-depth masks, so a run resumed from a checkpoint at step k
is identical to one that never stopped: params, optimizer state and every metrics row.
"""
import csv
import hashlib
import io
import json
import math
import os
import re
import signal
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import numpy as np
import safetensors.numpy

from ..backend import get_xp, to_backend, to_numpy
from ..config import MixerConfig, param_shapes
from ..layers import softmax_cross_entropy
from .metrics import count_correct
from ..runtime import distributed
from ..runtime.threads import parallel_map, pool_for
from .. import fast
from ..fast import AdamW  # optim.AdamW, each update one fused pass where Numba is installed
from ..optim import SCHEDULES, SGD, bias_and_norm, clip_grad_norm, lr_at
from ..checkpoints.safetensors_io import (atomic_target, atomic_write_bytes, check_state_dict, read_safetensors,
                                         remove_orphans, save_weights)

CHECKPOINT_FORMAT = "minimixer-checkpoint-2"  # 2: sha256 of the whole file, model name, data fingerprint
OLD_FORMATS = ("minimixer-checkpoint-1",)  # still read: no checksum, no model name or data fingerprint
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
    "warmup": (float, _between(0, math.inf), "must be a finite number >= 0"),
    "schedule": (str, lambda v: v in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
    "optimizer": (str, lambda v: v in OPTIMIZERS, f"must be one of {', '.join(OPTIMIZERS)}"),
    "momentum": (float, _between(0, 1), "must be in [0, 1)"),
    "label_smoothing": (float, _between(0, 1), "must be in [0, 1)"),
    "drop_path": (float, _between(0, 1), "must be in [0, 1)"),
    "dropout": (float, _between(0, 1), "must be in [0, 1)"),
    "clip_grad": (float, _between(0, math.inf), "must be a finite number >= 0"),
    "seed": (int, lambda v: v >= 0, "must be >= 0"),
}


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

    def __post_init__(self):
        problems = [f"{f.name} {p}" for f in fields(self) if (p := setting_problem(f.name, getattr(self, f.name)))]
        if self.optimizer == "sgd" and self.momentum == 0:
            problems.append("momentum must be > 0 for sgd (nesterov)")
        if problems:
            raise ValueError("invalid TrainSettings: " + "; ".join(problems))
        for f in fields(self):  # ints given for floats become floats, so a JSON round trip is exact
            if SETTING_RULES[f.name][0] is float:
                setattr(self, f.name, float(getattr(self, f.name)))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped training between two steps; args[0] says where the checkpoint is."""


class Diverged(ValueError):
    """The loss became NaN or infinite; args[0] names the step and the checkpoint that was kept."""


def make_optimizer(params, s):
    if s.optimizer == "adamw":
        return AdamW(params, lr=s.lr, weight_decay=s.weight_decay, no_decay=bias_and_norm)
    if s.optimizer == "sgd":
        return SGD(params, lr=s.lr, momentum=s.momentum, nesterov=True, weight_decay=s.weight_decay,
                   no_decay=bias_and_norm, run=pool_for(params))
    raise ValueError(f"unknown optimizer {s.optimizer!r}; expected 'adamw' or 'sgd'")


def train_step(params, opt, x, y, cfg, *, lr, label_smoothing=0.0, clip_grad=0.0,
               drop_path=0.0, dropout=0.0, rng=None):
    """One update: forward, loss, backward, gradient clipping, optimizer step. Returns the loss.

    It runs fast.forward/fast.backward, which compute what model.mixer_forward/mixer_backward
    compute (tests/test_fast.py), with the same dropout and stochastic-depth masks for an rng."""
    total = len(y)
    rows, rng = distributed.batch_share(total, rng)  # this rank's rows (all on one process); masks of the whole batch
    x, y = x[rows], y[rows]
    if len(y):
        logits, cache = fast.forward(params, x, cfg, drop_path_rate=drop_path, drop_rate=dropout, rng=rng)
        loss, dlogits = softmax_cross_entropy(logits, y, label_smoothing=label_smoothing)
        _, grads = fast.backward(dlogits, cache)
    else:  # more ranks than rows in this batch
        loss, grads = 0.0, {k: get_xp(v).zeros_like(v) for k, v in params.items()}
    loss = distributed.allreduce_mean(grads, loss, len(y), total)  # the global batch's mean loss and gradients
    if clip_grad:
        clip_grad_norm(grads, clip_grad, run=parallel_map)
    opt.lr = lr
    opt.step(grads)
    return loss


def evaluate(params, cfg, batches, backend="numpy"):
    """Top-1 / top-5 accuracy (%) and mean loss over an iterable of (x, y) NumPy batches."""
    correct1 = correct5 = count = 0
    loss_sum = 0.0
    for x, y in batches:
        logits = to_numpy(fast.predict(params, to_backend(x, backend), cfg))
        loss_sum += softmax_cross_entropy(logits, y)[0] * len(y)
        hits1, hits5 = count_correct(logits, y)
        correct1, correct5, count = correct1 + hits1, correct5 + hits5, count + len(y)
    if count == 0:
        return {"top1": float("nan"), "top5": float("nan"), "loss": float("nan"), "count": 0}
    return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count,
            "loss": loss_sum / count, "count": count}


# --- checkpoints -------------------------------------------------------------------------
#
# One safetensors file: params/<name> and opt/<name>/<state> tensors, and metadata entries
# format, config, settings, step, optimizer, rng, metrics, partial_epoch, model, data and
# sha256, the digest of the whole file written with 64 zeros in place of the digest itself.

_UNSIGNED = "0" * 64


def _sha256_field(digest):
    return f'"sha256":"{digest}"'.encode()


def _signed(arrays, meta):
    """(header, body) of a checkpoint file: safetensors with meta and its sha256 (see above). The
    body, all but the few-kB header, is a view: a large checkpoint is not copied to be signed."""
    data = safetensors.numpy.save(arrays, metadata={**meta, "sha256": _UNSIGNED})
    header_end = 8 + int.from_bytes(data[:8], "little")
    head = data[:header_end]
    assert head.count(_sha256_field(_UNSIGNED)) == 1
    digest = hashlib.sha256(data).hexdigest()
    return head.replace(_sha256_field(_UNSIGNED), _sha256_field(digest)), memoryview(data)[header_end:]


def checkpoint_bytes(arrays, meta):
    """The bytes of a checkpoint file with these tensors and metadata (and its checksum)."""
    head, body = _signed(arrays, meta)
    return head + bytes(body)


def save_checkpoint(path, params, opt, *, cfg, settings, step, metrics, partial_epoch, model=None, data=None):
    """Params, optimizer state, step, RNG state (seed and step), settings, metrics, the model's
    name and the data's fingerprint, in one safetensors file with a checksum, written atomically."""
    opt_state = opt.state_dict()
    tensors = {f"params/{k}": v for k, v in to_numpy(params).items()}
    for name, state in opt_state["state"].items():
        tensors.update({f"opt/{name}/{k}": v for k, v in to_numpy(state).items()})
    meta = {
        "format": CHECKPOINT_FORMAT,
        "config": json.dumps(asdict(cfg)),
        "settings": json.dumps(asdict(settings)),
        "step": str(step),
        "optimizer": json.dumps({k: opt_state[k] for k in ("lr", "weight_decay", "step")}),
        "rng": json.dumps({"seed": settings.seed, "step": step}),
        "metrics": json.dumps(metrics),
        "partial_epoch": json.dumps(partial_epoch),
        "model": json.dumps(model),
        "data": json.dumps(data),
    }
    head, body = _signed({k: np.ascontiguousarray(v) for k, v in tensors.items()}, meta)
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(head)
        f.write(body)
        f.flush()
        os.fsync(f.fileno())


def _header_and_metadata(path):
    """The raw header bytes and the metadata dict of a safetensors file already read successfully."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = f.read(size)
    meta = json.loads(header).get("__metadata__") or {}
    return header, meta


def _verify_checksum(path, header, meta):
    digest = meta.get("sha256", "")
    if not re.fullmatch(r"[0-9a-f]{64}", digest) or header.count(_sha256_field(digest)) != 1:
        raise ValueError(f"{path}: the checkpoint's checksum entry is missing or damaged")
    h = hashlib.sha256(len(header).to_bytes(8, "little"))
    h.update(header.replace(_sha256_field(digest), _sha256_field(_UNSIGNED), 1))
    with open(path, "rb") as f:
        f.seek(8 + len(header))
        while chunk := f.read(1 << 24):
            h.update(chunk)
    if h.hexdigest() != digest:
        raise ValueError(f"{path}: checksum mismatch: the checkpoint was changed or damaged after it was written")


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def load_checkpoint(path):
    """Read and check a checkpoint written by save_checkpoint.

    Anything that is not a complete, intact checkpoint of a consistent run (a weights file,
    damaged bytes, malformed or mismatched metadata, missing optimizer state, non-finite values)
    raises ValueError with one line that names the path and the problem."""
    path = os.fspath(path)
    tensors = read_safetensors(path)  # ValueError (naming the path) for what is not safetensors at all
    header, meta = _header_and_metadata(path)
    fmt = meta.get("format")
    if fmt not in (CHECKPOINT_FORMAT, *OLD_FORMATS):
        raise ValueError(f"{path}: not a minimixer training checkpoint (no '{CHECKPOINT_FORMAT}' metadata); "
                         "to start from model weights use --init-from")
    if fmt == CHECKPOINT_FORMAT:
        _verify_checksum(path, header, meta)
    state = _parse_metadata(path, meta)
    state["params"], opt_state = _check_tensors(path, tensors, state["config"], state["settings"], state["step"])
    state["optimizer"]["state"] = opt_state
    return state


def _parse_metadata(path, meta):
    """The metadata entries, each checked for its type and fields (ValueError naming path and entry)."""
    def bad(what):
        return ValueError(f"{path}: {what}")

    def entry(key, kind, check=None, default=...):
        if key not in meta:
            if default is not ...:
                return default
            raise bad(f"the metadata has no '{key}' entry")
        try:
            value = json.loads(meta[key])
        except ValueError:
            raise bad(f"metadata '{key}' is not valid JSON") from None
        if not isinstance(value, kind) or (check is not None and not check(value)):
            raise bad(f"metadata '{key}' is malformed: {meta[key][:80]!r}")
        return value

    def dataclass_entry(key, cls):
        value, known = entry(key, dict), {f.name for f in fields(cls)}
        unknown, missing = sorted(set(value) - known), sorted(known - set(value))
        if unknown or missing:
            raise bad(f"metadata '{key}' " + (f"has unknown field(s) {unknown}" if unknown else f"lacks {missing}"))
        try:
            return cls.from_dict(value) if cls is MixerConfig else cls(**value)
        except Exception as e:  # noqa: BLE001 - any malformed value (TypeError, OverflowError...), in one line
            raise bad(f"metadata '{key}': {e}") from None

    cfg, settings = dataclass_entry("config", MixerConfig), dataclass_entry("settings", TrainSettings)
    if not re.fullmatch(r"[0-9]{1,15}", meta.get("step", "")):
        raise bad(f"metadata 'step' is not a step number: {meta.get('step', '(missing)')[:80]!r}")
    step = int(meta["step"])
    optimizer = entry("optimizer", dict, lambda o: set(o) == {"lr", "weight_decay", "step"} and _number(o["lr"])
                      and _number(o["weight_decay"]) and _count(o["step"]) and o["step"] == step)
    metrics = entry("metrics", list, lambda rows: all(
        isinstance(r, dict) and r.get("epoch") == i and all(_number(v) for v in r.values())
        for i, r in enumerate(rows, 1)))
    partial = entry("partial_epoch", dict, lambda p: set(p) == {"loss_sum", "seen", "time"}
                    and _number(p["loss_sum"]) and _count(p["seen"]) and _number(p["time"]))
    return {"config": cfg, "settings": settings, "step": step, "optimizer": optimizer, "metrics": metrics,
            "partial_epoch": partial, "model": entry("model", (str, type(None)), default=None),
            "data": entry("data", (dict, type(None)), lambda d: d is None or isinstance(d.get("source"), str),
                          default=None)}


def _check_tensors(path, tensors, cfg, settings, step):
    """(params, optimizer state): exactly the config's params, every param's optimizer state
    (after step 0), matching shapes and dtypes, all finite. Arrays are copied (writable)."""
    def bad(what):
        return ValueError(f"{path}: {what}")

    stray = [k for k in tensors if not k.startswith(("params/", "opt/"))]
    if stray:
        raise bad(f"unexpected tensor {stray[0]!r}")
    params = {k[len("params/"):]: v for k, v in tensors.items() if k.startswith("params/")}
    if cfg.num_blocks > len(params):  # before param_shapes builds a table of 12 names per block
        raise bad(f"its config has {cfg.num_blocks} blocks, but it holds only {len(params)} parameter tensors")
    shapes = param_shapes(cfg)
    check_state_dict({k: v.shape for k, v in params.items()}, shapes, f"{path}: checkpoint")
    dtypes = sorted({str(v.dtype) for v in params.values()})
    if dtypes not in (["float32"], ["float64"]):
        raise bad(f"parameters must all be float32 or all float64, got {dtypes}")
    opt_state = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            name, _, key = k[len("opt/"):].rpartition("/")
            opt_state.setdefault(name, {})[key] = v
    keys = OPTIMIZERS[settings.optimizer]
    if set(opt_state) - set(params):
        raise bad(f"optimizer state for unknown parameter {sorted(set(opt_state) - set(params))[0]!r}")
    missing = [f"{n}/{k}" for n in shapes for k in keys if k not in opt_state.get(n, {})]
    if step > 0 and missing:
        raise bad(f"optimizer state is missing for {len(missing)} of {len(params) * len(keys)} entries "
                  f"(first: {missing[0]}); it cannot be resumed exactly")
    for name, state in opt_state.items():
        for key, v in state.items():
            if key not in keys or v.shape != params[name].shape or v.dtype != params[name].dtype:
                raise bad(f"optimizer state opt/{name}/{key} does not fit {settings.optimizer} and "
                          f"the parameter {name} {tuple(params[name].shape)} {params[name].dtype}")
    for name, v in [*params.items(), *((f"opt/{n}/{k}", v) for n, s in opt_state.items() for k, v in s.items())]:
        if not np.isfinite(v).all():
            raise bad(f"tensor {name} holds NaN or infinite values")
    return ({k: v.copy() for k, v in params.items()},
            {n: {k: v.copy() for k, v in s.items()} for n, s in opt_state.items()})


def write_metrics(out_dir, metrics):
    """metrics.json and metrics.csv, one row per epoch, each written atomically."""
    atomic_write_bytes(os.path.join(out_dir, "metrics.json"), json.dumps(metrics, indent=1).encode())
    buf = io.StringIO()
    if metrics:
        writer = csv.DictWriter(buf, fieldnames=list(metrics[0]))
        writer.writeheader()
        writer.writerows(metrics)
    atomic_write_bytes(os.path.join(out_dir, "metrics.csv"), buf.getvalue().encode())


OUTPUT_FILES = ("checkpoint.safetensors", "model.safetensors", "metrics.json", "metrics.csv")  # written atomically


# --- the loop ------------------------------------------------------------------------------

class _StopRequest:
    """Ctrl-C sets a flag that the loop checks between steps, so an update is never cut in half.
    A second Ctrl-C interrupts at once."""

    def __init__(self, message):
        self.requested = False
        self.message = message

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self.previous = None
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise Interrupted(self.message())
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


@contextmanager
def _quiet_overflow():
    """A diverging run overflows inside NumPy; the loop reports the non-finite loss in one line
    instead of NumPy's warnings (a global filter, so the optimizer's worker threads obey it too)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"(overflow|invalid value|divide by zero) encountered", RuntimeWarning)
        yield


@contextmanager
def _closing(get_bar):
    """Close the progress bar however the loop ends, so a last message starts on a clean line."""
    try:
        yield
    finally:
        if get_bar() is not None:
            get_bar().close()


def fit(params, cfg, settings, train_loader, test_loader, out_dir, *, backend="numpy", resume=None,
        stop_after=None, progress=True, log=print, model=None, data=None):
    """Train params in place for settings.epochs, evaluating and checkpointing every epoch.

    Writes out_dir/checkpoint.safetensors (resumable), out_dir/model.safetensors (timm-compatible
    weights) and out_dir/metrics.{json,csv}. Returns the list of per-epoch metrics.
    resume: a dict from load_checkpoint. stop_after: stop (with a checkpoint) after this many steps.
    model, data: the model's name and a dict describing the data (data["skipped"]: {"train": n,
    "test": n}, unreadable images left out), kept in the checkpoint and the metrics rows.
    Ctrl-C stops between steps with a checkpoint and raises Interrupted; a non-finite loss raises
    Diverged and keeps the last checkpoint as it was.
    """
    os.makedirs(out_dir, exist_ok=True)
    orphans = sorted(n for name in OUTPUT_FILES for n in remove_orphans(os.path.join(out_dir, name)))
    if orphans:
        log(f"removed {len(orphans)} temporary file(s) left in {out_dir} by an interrupted write: {', '.join(orphans)}")
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"the training data gives no batch of {settings.batch_size}: it has fewer images than that")
    opt = make_optimizer(params, settings)
    total_steps = settings.epochs * steps_per_epoch
    warmup_steps = round(settings.warmup * steps_per_epoch)
    skipped = (data or {}).get("skipped", {})
    step, metrics, partial = 0, [], {"loss_sum": 0.0, "seen": 0, "time": 0.0}
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        step, metrics, partial = resume["step"], list(resume["metrics"]), dict(resume["partial_epoch"])
        pending = 1 if partial["seen"] and step % steps_per_epoch == 0 else 0  # its epoch end is still to do
        if len(metrics) != step // steps_per_epoch - pending:
            raise ValueError(f"the checkpoint's {len(metrics)} metrics rows do not fit its step {step} at "
                             f"{steps_per_epoch} steps per epoch: other data or batch size?")
    ckpt_path = os.path.join(out_dir, "checkpoint.safetensors")
    saved = {"step": step if resume is not None and os.path.exists(ckpt_path) else None}

    def lr_for(s):
        return lr_at(s, base_lr=settings.lr, total_steps=total_steps, warmup_steps=warmup_steps,
                     decay=settings.schedule, min_lr=settings.min_lr)

    root = distributed.is_root()  # rank 0 alone writes files and draws the progress bar

    def checkpoint():
        if root:
            save_checkpoint(ckpt_path, params, opt, cfg=cfg, settings=settings, step=step, metrics=metrics,
                            partial_epoch=partial, model=model, data=data)
        saved["step"] = step

    def kept():
        if saved["step"] is None:
            return "no checkpoint was written yet"
        return f"the checkpoint of step {saved['step']} is kept ({ckpt_path})"

    def end_epoch(epoch):
        """Evaluate, record the epoch's metrics row, write metrics, weights and the checkpoint."""
        nonlocal partial
        test = evaluate(params, cfg, test_loader.batches(), backend)
        row = {"epoch": epoch + 1, "step": step, "lr": lr_for(step - 1),
               "train_loss": partial["loss_sum"] / max(1, partial["seen"]),
               "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"],
               "train_img_per_s": partial["seen"] / max(partial["time"], 1e-9),
               "train_images": partial["seen"], "test_images": test["count"],
               "train_skipped": skipped.get("train", 0), "test_skipped": skipped.get("test", 0)}
        metrics.append(row)
        partial = {"loss_sum": 0.0, "seen": 0, "time": 0.0}
        log(f"epoch {epoch + 1:3d}/{settings.epochs}  train loss {row['train_loss']:.4f}  "
            f"test loss {row['test_loss']:.4f}  test top-1 {row['test_top1']:.2f}%  "
            f"top-5 {row['test_top5']:.2f}%  {row['train_img_per_s']:.0f} img/s")
        if root:
            write_metrics(out_dir, metrics)
            save_weights(params, os.path.join(out_dir, "model.safetensors"))
        checkpoint()

    def stop_here(stop):
        """After a Ctrl-C or at --stop-after: say where the checkpoint is, and stop."""
        nonlocal bar
        if bar is not None:
            bar.close()
            bar = None
        if stop.requested:
            raise Interrupted(f"interrupted after step {step}: checkpoint written to {ckpt_path} "
                              "(resume with --resume)")
        log(f"stopped after step {step}: checkpoint written to {ckpt_path} (resume with --resume)")
        return metrics

    def at_once():
        return f"interrupted at once (second Ctrl-C) after step {step}; {kept()}"

    bar = None
    with _StopRequest(at_once) as stop, _quiet_overflow(), _closing(lambda: bar):
        if partial["seen"] and step % steps_per_epoch == 0:  # stopped on an epoch's last step before its end
            end_epoch(step // steps_per_epoch - 1)
        for epoch in range(step // steps_per_epoch, settings.epochs):
            start = step - epoch * steps_per_epoch
            if progress and root:
                from tqdm import tqdm
                bar = tqdm(total=steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{settings.epochs}",
                           leave=False, dynamic_ncols=True)
            t0 = time.perf_counter() - partial["time"]
            stopping = False
            for x, y in train_loader.batches(epoch, start):
                loss = train_step(params, opt, to_backend(x, backend), to_backend(y, backend), cfg, lr=lr_for(step),
                                  label_smoothing=settings.label_smoothing, clip_grad=settings.clip_grad,
                                  drop_path=settings.drop_path, dropout=settings.dropout,
                                  rng=np.random.default_rng([settings.seed, step]))
                if not math.isfinite(loss):
                    raise Diverged(f"the loss became {loss} at step {step + 1} (epoch {epoch + 1}); {kept()}; "
                                   + ("lower --lr" if settings.clip_grad else "lower --lr or set --clip-grad"))
                step += 1
                partial["loss_sum"] += loss * len(y)
                partial["seen"] += len(y)
                partial["time"] = time.perf_counter() - t0
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{partial['seen'] / partial['time']:.0f}")
                    bar.update(1)
                stopping = distributed.any_rank(stop.requested) or (stop_after is not None and step >= stop_after)
                if stopping and step % steps_per_epoch:  # mid-epoch: the epoch ends after the resume
                    checkpoint()
                    return stop_here(stop)
            if bar is not None:
                bar.close()
                bar = None
            if step != (epoch + 1) * steps_per_epoch:
                raise ValueError(f"the train loader gave {step - epoch * steps_per_epoch} batches in epoch "
                                 f"{epoch + 1}, not the {steps_per_epoch} it promised")
            if stop.requested:
                checkpoint()  # a second Ctrl-C during the evaluation loses nothing
            end_epoch(epoch)
            # a Ctrl-C during the evaluation stops here too; every rank reaches the same answer
            if stopping or distributed.any_rank(stop.requested) or (stop_after is not None and step >= stop_after):
                return stop_here(stop)
    return metrics

"""Training: one step, evaluation, checkpoints and the epoch loop behind `python -m minimixer.train`.

    loss = train_step(params, opt, x, y, cfg, lr=...)     # forward, loss, backward, clip, update

Randomness is a function of (seed, epoch) for the batch order and of (seed, step)
for dropout/stochastic-depth masks, so a run resumed from a checkpoint at step k
is identical to one that never stopped.
"""
import csv
import io
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass

import numpy as np
import safetensors.numpy
from safetensors import safe_open

from .backend import get_xp, to_backend, to_numpy
from .config import MixerConfig
from .layers import softmax_cross_entropy
from .metrics import count_correct
from . import distributed, fast
from .optim import SGD, AdamW, bias_and_norm, clip_grad_norm, lr_at
from .checkpoints.safetensors_io import atomic_write_bytes, read_safetensors, save_weights

CHECKPOINT_FORMAT = "minimixer-checkpoint-1"


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


def make_optimizer(params, s):
    if s.optimizer == "adamw":
        return AdamW(params, lr=s.lr, weight_decay=s.weight_decay, no_decay=bias_and_norm)
    if s.optimizer == "sgd":
        return SGD(params, lr=s.lr, momentum=s.momentum, nesterov=True, weight_decay=s.weight_decay,
                   no_decay=bias_and_norm)
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
        grads, _ = fast.backward(dlogits, cache)
    else:  # more ranks than rows in this batch
        loss, grads = 0.0, {k: get_xp(v).zeros_like(v) for k, v in params.items()}
    loss = distributed.allreduce_mean(grads, loss, len(y), total)  # the global batch's mean loss and gradients
    if clip_grad:
        clip_grad_norm(grads, clip_grad)
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

def save_checkpoint(path, params, opt, *, cfg, settings, step, metrics, partial_epoch):
    """Params, optimizer state, step, RNG state (seed and step), settings and metrics, in one
    safetensors file written atomically."""
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
    }
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    atomic_write_bytes(path, safetensors.numpy.save(arrays, metadata=meta))


def load_checkpoint(path):
    """Read a checkpoint written by save_checkpoint; ValueError (naming the path) if it is not one."""
    tensors = read_safetensors(path)
    with safe_open(path, framework="np") as f:
        meta = f.metadata() or {}
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a minimixer training checkpoint (no '{CHECKPOINT_FORMAT}' metadata); "
                         "to start from model weights use --init-from")
    params = {k[len("params/"):]: v.copy() for k, v in tensors.items() if k.startswith("params/")}
    opt_state = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            name, _, key = k[len("opt/"):].rpartition("/")
            opt_state.setdefault(name, {})[key] = v.copy()
    optimizer = json.loads(meta["optimizer"])
    return {"params": params, "optimizer": {**optimizer, "state": opt_state},
            "config": MixerConfig.from_dict(json.loads(meta["config"])),
            "settings": TrainSettings(**json.loads(meta["settings"])),
            "step": int(meta["step"]), "metrics": json.loads(meta["metrics"]),
            "partial_epoch": json.loads(meta["partial_epoch"])}


def write_metrics(out_dir, metrics):
    """metrics.json and metrics.csv, one row per epoch, each written atomically."""
    atomic_write_bytes(os.path.join(out_dir, "metrics.json"), json.dumps(metrics, indent=1).encode())
    buf = io.StringIO()
    if metrics:
        writer = csv.DictWriter(buf, fieldnames=list(metrics[0]))
        writer.writeheader()
        writer.writerows(metrics)
    atomic_write_bytes(os.path.join(out_dir, "metrics.csv"), buf.getvalue().encode())


# --- the loop ------------------------------------------------------------------------------

class _StopRequest:
    """Ctrl-C sets a flag that the loop checks between steps, so an update is never cut in half.
    A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self.previous = None
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def fit(params, cfg, settings, train_loader, test_loader, out_dir, *, backend="numpy", resume=None,
        stop_after=None, progress=True, log=print):
    """Train params in place for settings.epochs, evaluating and checkpointing every epoch.

    Writes out_dir/checkpoint.safetensors (resumable), out_dir/model.safetensors (timm-compatible
    weights) and out_dir/metrics.{json,csv}. Returns the list of per-epoch metrics.
    resume: a dict from load_checkpoint. stop_after: stop (with a checkpoint) after this many steps.
    """
    os.makedirs(out_dir, exist_ok=True)
    opt = make_optimizer(params, settings)
    steps_per_epoch = len(train_loader)
    total_steps = settings.epochs * steps_per_epoch
    warmup_steps = round(settings.warmup * steps_per_epoch)
    step, metrics, partial = 0, [], {"loss_sum": 0.0, "seen": 0, "time": 0.0}
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        step, metrics, partial = resume["step"], resume["metrics"], resume["partial_epoch"]
    ckpt_path = os.path.join(out_dir, "checkpoint.safetensors")

    root = distributed.is_root()  # rank 0 alone writes files and draws the progress bar

    def checkpoint():
        if root:
            save_checkpoint(ckpt_path, params, opt, cfg=cfg, settings=settings, step=step,
                            metrics=metrics, partial_epoch=partial)

    bar = None
    with _StopRequest() as stop:
        for epoch in range(step // steps_per_epoch, settings.epochs):
            start = step - epoch * steps_per_epoch
            if progress and root:
                from tqdm import tqdm
                bar = tqdm(total=steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{settings.epochs}",
                           leave=False, dynamic_ncols=True)
            t0 = time.perf_counter() - partial["time"]
            for x, y in train_loader.batches(epoch, start):
                lr = lr_at(step, base_lr=settings.lr, total_steps=total_steps, warmup_steps=warmup_steps,
                           decay=settings.schedule, min_lr=settings.min_lr)
                loss = train_step(params, opt, to_backend(x, backend), to_backend(y, backend), cfg, lr=lr,
                                  label_smoothing=settings.label_smoothing, clip_grad=settings.clip_grad,
                                  drop_path=settings.drop_path, dropout=settings.dropout,
                                  rng=np.random.default_rng([settings.seed, step]))
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {step}; lower --lr or enable --clip-grad")
                step += 1
                partial["loss_sum"] += loss * len(y)
                partial["seen"] += len(y)
                partial["time"] = time.perf_counter() - t0
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{partial['seen'] / partial['time']:.0f}")
                    bar.update(1)
                if distributed.any_rank(stop.requested) or (stop_after is not None and step >= stop_after):
                    if bar is not None:
                        bar.close()
                    checkpoint()
                    why = "interrupted" if stop.requested else f"stopped after step {step}"
                    log(f"{why}: checkpoint written to {ckpt_path} (resume with --resume)")
                    if stop.requested:
                        raise KeyboardInterrupt
                    return metrics
            if bar is not None:
                bar.close()
            test = evaluate(params, cfg, test_loader.batches(), backend)
            row = {"epoch": epoch + 1, "step": step, "lr": lr,
                   "train_loss": partial["loss_sum"] / max(1, partial["seen"]),
                   "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"],
                   "train_img_per_s": partial["seen"] / max(partial["time"], 1e-9)}
            metrics.append(row)
            partial = {"loss_sum": 0.0, "seen": 0, "time": 0.0}
            log(f"epoch {epoch + 1:3d}/{settings.epochs}  train loss {row['train_loss']:.4f}  "
                f"test loss {row['test_loss']:.4f}  test top-1 {row['test_top1']:.2f}%  "
                f"top-5 {row['test_top5']:.2f}%  {row['train_img_per_s']:.0f} img/s")
            if root:
                write_metrics(out_dir, metrics)
                save_weights(params, os.path.join(out_dir, "model.safetensors"))
            checkpoint()
    return metrics


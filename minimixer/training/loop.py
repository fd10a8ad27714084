"""Training: one step and the epoch loop behind `python -m minimixer.train`.

    loss = train_step(params, opt, x, y, cfg, lr=...)     # forward, loss, backward, clip, update
    metrics = fit(params, cfg, settings, train_loader, test_loader, out_dir)

Randomness is a function of (seed, epoch) for the batch order and of (seed, step)
for dropout/stochastic-depth masks, so a run resumed from a checkpoint at step k
is identical to one that never stopped: params, optimizer state and every metrics row.
The checkpoint's format is checkpoints/training_state.py; the settings, settings.py.
"""
import csv
import io
import json
import math
import os
import signal
import time
import warnings
from contextlib import contextmanager

import numpy as np

from .. import fast
from ..backend import get_xp, to_backend
from ..checkpoints.convert import trained_metadata
from ..checkpoints.safetensors_io import atomic_write_bytes, remove_orphans, save_weights
from ..checkpoints.training_state import save_training_state
from ..fast import AdamW  # optim.AdamW, each update one fused pass where Numba is installed
from ..layers import softmax_cross_entropy
from ..optim import SGD, bias_and_norm, clip_grad_norm, lr_at
from ..runtime import distributed
from ..runtime.threads import parallel_map, pool_for
from .metrics import evaluate
from .transfer import frozen_names
from .settings import TrainSettings  # noqa: F401  (fit's settings; imported from here by notebooks)

OUTPUT_FILES = ("checkpoint.safetensors", "model.safetensors", "metrics.json", "metrics.csv")  # written atomically


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped training between two steps; args[0] says where the checkpoint is."""


class Diverged(ValueError):
    """The loss became NaN or infinite; args[0] names the step and the checkpoint that was kept."""


def make_optimizer(params, s):
    """The optimizer over the parameters that train: frozen ones (s.freeze, s.train_blocks) get
    no update, no weight decay and no state."""
    frozen = frozen_names(s, params)
    params = {k: v for k, v in params.items() if k not in frozen} if frozen else params
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
    if len(opt.params) < len(grads):  # frozen params: out of the reduction and the clipping norm
        grads = {k: grads[k] for k in opt.params}
    loss = distributed.allreduce_mean(grads, loss, len(y), total)  # the global batch's mean loss and gradients
    if clip_grad:
        clip_grad_norm(grads, clip_grad, run=parallel_map)
    opt.lr = lr
    opt.step(grads)
    return loss


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


class _StopRequest:
    """Ctrl-C, SIGTERM or SIGHUP sets a flag that the loop checks between steps, so an update is
    never cut in half (schedulers, `docker stop` and closed terminals send the other two). A second
    one interrupts at once. The Interrupted that leaves carries .signum, the signal received."""
    SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))

    def __init__(self, message):
        self.requested = False
        self.message = message
        self.signum = None

    def __enter__(self):
        self.previous = {}
        for s in self.SIGNALS:
            try:
                self.previous[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def _handler(self, signum, frame):
        self.signum = signum
        if self.requested:
            raise Interrupted(self.message())
        self.requested = True

    def __exit__(self, kind, exc, tb):
        for s, previous in self.previous.items():
            signal.signal(s, previous)
        if isinstance(exc, Interrupted):
            exc.signum = self.signum


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
    resume: a dict from load_training_state. stop_after: stop (with a checkpoint) after this many steps.
    model, data: the model's name and a dict describing the data (data["skipped"]: {"train": n,
    "test": n}, unreadable images left out), kept in the checkpoint and the metrics rows.
    Ctrl-C stops between steps with a checkpoint and raises Interrupted; a non-finite loss raises
    Diverged and keeps the last checkpoint as it was.
    """
    run = _Run(params, cfg, settings, train_loader, test_loader, out_dir, backend=backend, resume=resume,
               stop_after=stop_after, progress=progress, log=log, model=model, data=data)
    return run.train()


def _fresh_partial():
    """The running totals of an epoch's training steps (kept in checkpoints, to resume mid-epoch)."""
    return {"loss_sum": 0.0, "seen": 0, "time": 0.0}


class _Run:
    """One call of fit: what it was given, and the state it carries from step to step (step,
    metrics rows, the epoch's partial totals, the optimizer, the last checkpoint's step)."""

    def __init__(self, params, cfg, settings, train_loader, test_loader, out_dir, *, backend, resume,
                 stop_after, progress, log, model, data):
        self.params, self.cfg, self.settings, self.backend = params, cfg, settings, backend
        self.train_loader, self.test_loader, self.out_dir = train_loader, test_loader, out_dir
        self.stop_after, self.log, self.model, self.data = stop_after, log, model, data
        os.makedirs(out_dir, exist_ok=True)
        orphans = sorted(n for name in OUTPUT_FILES for n in remove_orphans(os.path.join(out_dir, name)))
        if orphans:
            log(f"removed {len(orphans)} temporary file(s) left in {out_dir} by an interrupted write: "
                f"{', '.join(orphans)}")
        self.steps_per_epoch = len(train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training data gives no batch of {settings.batch_size}: it has fewer images than that")
        self.opt = make_optimizer(params, settings)
        self.total_steps = settings.epochs * self.steps_per_epoch
        self.warmup_steps = round(settings.warmup * self.steps_per_epoch)
        self.skipped = (data or {}).get("skipped", {})
        self.step, self.metrics, self.partial = 0, [], _fresh_partial()
        if resume is not None:
            self._resume(resume)
        self.ckpt_path = os.path.join(out_dir, "checkpoint.safetensors")
        self.saved_step = self.step if resume is not None and os.path.exists(self.ckpt_path) else None
        self.root = distributed.is_root()  # rank 0 alone writes files and draws the progress bar
        self.progress = progress and self.root
        self.bar = None
        self.stop = None  # the _StopRequest, while train() runs

    def _resume(self, resume):
        self.opt.load_state_dict(resume["optimizer"])
        self.step, self.metrics, self.partial = resume["step"], list(resume["metrics"]), dict(resume["partial_epoch"])
        pending = 1 if self.partial["seen"] and self.step % self.steps_per_epoch == 0 else 0  # its epoch end is still to do
        if len(self.metrics) != self.step // self.steps_per_epoch - pending:
            raise ValueError(f"the checkpoint's {len(self.metrics)} metrics rows do not fit its step {self.step} at "
                             f"{self.steps_per_epoch} steps per epoch: other data or batch size?")

    def train(self):
        """Every epoch still to run: its steps, then its end (evaluation, files, checkpoint)."""
        with _StopRequest(self.at_once) as self.stop, _quiet_overflow(), _closing(lambda: self.bar):
            if self.partial["seen"] and self.step % self.steps_per_epoch == 0:  # stopped on an epoch's last step
                self.end_epoch(self.step // self.steps_per_epoch - 1)  # before its end
            for epoch in range(self.step // self.steps_per_epoch, self.settings.epochs):
                stopping = self.run_steps(epoch)
                if stopping and self.step % self.steps_per_epoch:  # mid-epoch: the epoch ends after the resume
                    self.checkpoint()
                    return self.stop_here()
                self.check_epoch_length(epoch)
                if self.stop.requested:
                    self.checkpoint()  # a second Ctrl-C during the evaluation loses nothing
                self.end_epoch(epoch)
                # a Ctrl-C during the evaluation stops here too; every rank reaches the same answer
                if stopping or self.stop_asked():
                    return self.stop_here()
        return self.metrics

    def run_steps(self, epoch):
        """The epoch's training steps from where the run stands. Returns True when a stop was asked
        for (Ctrl-C on any rank, or --stop-after reached) at the last step it ran; mid-epoch, that
        step is the last."""
        start = self.step - epoch * self.steps_per_epoch
        if self.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=self.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{self.settings.epochs}",
                            leave=False, dynamic_ncols=True)
        t0 = time.perf_counter() - self.partial["time"]
        stopping = False
        for x, y in self.train_loader.batches(epoch, start):
            loss = self.one_step(x, y, epoch)
            self.partial["loss_sum"] += loss * len(y)
            self.partial["seen"] += len(y)
            self.partial["time"] = time.perf_counter() - t0
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{self.partial['seen'] / self.partial['time']:.0f}")
                self.bar.update(1)
            stopping = self.stop_asked()
            if stopping and self.step % self.steps_per_epoch:
                break
        self.close_bar()
        return stopping

    def one_step(self, x, y, epoch):
        s = self.settings
        loss = train_step(self.params, self.opt, to_backend(x, self.backend), to_backend(y, self.backend), self.cfg,
                          lr=self.lr_for(self.step), label_smoothing=s.label_smoothing, clip_grad=s.clip_grad,
                          drop_path=s.drop_path, dropout=s.dropout, rng=np.random.default_rng([s.seed, self.step]))
        if not math.isfinite(loss):
            raise Diverged(f"the loss became {loss} at step {self.step + 1} (epoch {epoch + 1}); {self.kept()}; "
                           + ("lower --lr" if s.clip_grad else "lower --lr or set --clip-grad"))
        self.step += 1
        return loss

    def check_epoch_length(self, epoch):
        if self.step != (epoch + 1) * self.steps_per_epoch:
            raise ValueError(f"the train loader gave {self.step - epoch * self.steps_per_epoch} batches in epoch "
                             f"{epoch + 1}, not the {self.steps_per_epoch} it promised")

    def stop_asked(self):
        return (distributed.any_rank(self.stop.requested)
                or (self.stop_after is not None and self.step >= self.stop_after))

    def end_epoch(self, epoch):
        """Evaluate, record the epoch's metrics row, write metrics, weights and the checkpoint."""
        test = evaluate(self.params, self.cfg, self.test_loader.batches(), self.backend)
        partial = self.partial
        row = {"epoch": epoch + 1, "step": self.step, "lr": self.lr_for(self.step - 1),
               "train_loss": partial["loss_sum"] / max(1, partial["seen"]),
               "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"],
               "train_img_per_s": partial["seen"] / max(partial["time"], 1e-9),
               "train_images": partial["seen"], "test_images": test["count"],
               "train_skipped": self.skipped.get("train", 0), "test_skipped": self.skipped.get("test", 0)}
        self.metrics.append(row)
        self.partial = _fresh_partial()
        self.log(f"epoch {epoch + 1:3d}/{self.settings.epochs}  train loss {row['train_loss']:.4f}  "
                 f"test loss {row['test_loss']:.4f}  test top-1 {row['test_top1']:.2f}%  "
                 f"top-5 {row['test_top5']:.2f}%  {row['train_img_per_s']:.0f} img/s")
        if self.root:
            write_metrics(self.out_dir, self.metrics)
            save_weights(self.params, os.path.join(self.out_dir, "model.safetensors"),
                         metadata=trained_metadata(self.cfg, self.model, self.data))  # its numerics, input, classes
        self.checkpoint()

    def lr_for(self, step):
        s = self.settings
        return lr_at(step, base_lr=s.lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                     decay=s.schedule, min_lr=s.min_lr)

    def checkpoint(self):
        if self.root:
            save_training_state(self.ckpt_path, self.params, self.opt, cfg=self.cfg, settings=self.settings,
                                step=self.step, metrics=self.metrics, partial_epoch=self.partial, model=self.model,
                                data=self.data)
        self.saved_step = self.step

    def kept(self):
        if self.saved_step is None:
            return "no checkpoint was written yet"
        return f"the checkpoint of step {self.saved_step} is kept ({self.ckpt_path})"

    def stop_here(self):
        """After a Ctrl-C or at --stop-after: say where the checkpoint is, and stop."""
        self.close_bar()
        if self.stop.requested:
            raise Interrupted(f"interrupted after step {self.step}: checkpoint written to {self.ckpt_path} "
                              "(resume with --resume)")
        self.log(f"stopped after step {self.step}: checkpoint written to {self.ckpt_path} (resume with --resume)")
        return self.metrics

    def at_once(self):
        return f"interrupted at once (second Ctrl-C) after step {self.step}; {self.kept()}"

    def close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

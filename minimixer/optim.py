"""Optimizers, gradient clipping and learning-rate schedules, step for step as in PyTorch.

    opt = AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05,
                no_decay=bias_and_norm)          # optional: exempt parameters by name
    for step in range(total):
        opt.lr = lr_at(step, base_lr=1e-3, total_steps=total, warmup_steps=100)
        clip_grad_norm(grads, 1.0)
        opt.step(grads)                          # updates the params dict in place

The update rules are those of torch.optim.SGD and torch.optim.AdamW, written out
one line per equation; tests/test_train.py checks them against torch.
"""
import math

import numpy as np

from .backend import get_xp, to_backend, to_numpy


def bias_and_norm(name):
    """The usual weight-decay exemption: biases and LayerNorm weights (1-d tensors)."""
    return name.endswith(".bias") or ".norm" in name or name.startswith("norm")


class Optimizer:
    """Shared plumbing: the params dict, lr, which params decay, and state (de)serialization."""

    def __init__(self, params, lr, weight_decay, no_decay, run=None):
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.params = params
        self.lr = lr
        self.weight_decay = weight_decay
        self.no_decay = no_decay or (lambda name: False)
        self.step_count = 0
        self.state = {}  # name -> dict of arrays, created lazily on the first step
        self.run = run or _in_order  # run(fn, items): the fast path passes a thread pool's map

    def decay_for(self, name):
        return 0.0 if self.no_decay(name) else self.weight_decay

    def step(self, grads):
        missing = set(self.params) - set(grads)
        if missing:
            raise KeyError(f"no gradient for {sorted(missing)}")
        self.step_count += 1
        for name in self.params:
            self.state.setdefault(name, {})
        # each parameter's update is independent (a pool may run them at once: largest first)
        names = sorted(self.params, key=lambda k: -self.params[k].size)
        self.run(lambda name: self.update(name, self.params[name], grads[name], self.state[name]), names)

    def state_dict(self):
        """Hyperparameters, the step count and a NumPy copy of every state array (a GPU's state is
        copied to the host one array at a time, never duplicated on the device)."""
        return {"lr": self.lr, "weight_decay": self.weight_decay, "step": self.step_count,
                "state": {k: {n: _host_copy(a) for n, a in s.items()} for k, s in self.state.items()}}

    def load_state_dict(self, state):
        unknown = set(state["state"]) - set(self.params)
        if unknown:
            raise KeyError(f"optimizer state for unknown params {sorted(unknown)}")
        backend = "numpy" if get_xp(*self.params.values()) is np else "cupy"
        self.lr, self.weight_decay, self.step_count = state["lr"], state["weight_decay"], state["step"]
        self.state = {k: {n: to_backend(a, backend).astype(self.params[k].dtype, copy=True) for n, a in s.items()}
                      for k, s in state["state"].items()}


def _in_order(fn, items):
    return [fn(i) for i in items]


def _host_copy(a):
    host = to_numpy(a)
    return host.copy() if host is a else host  # .get() already made a fresh host array


class SGD(Optimizer):
    """torch.optim.SGD with dampening 0: L2 weight decay added to the gradient, then momentum.

        g = g + wd·p
        buf = g                  (first step)
        buf = momentum·buf + g   (later steps)
        g = g + momentum·buf     (nesterov)   or   g = buf
        p = p - lr·g
    """

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0, no_decay=None, run=None):
        super().__init__(params, lr, weight_decay, no_decay, run)
        if nesterov and momentum <= 0:
            raise ValueError("nesterov momentum requires momentum > 0")
        self.momentum, self.nesterov = momentum, nesterov

    def update(self, name, p, g, state):
        wd = self.decay_for(name)
        if wd:
            g = g + wd * p
        if self.momentum:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = g.copy()
            else:
                state["momentum_buffer"] *= self.momentum
                state["momentum_buffer"] += g
            buf = state["momentum_buffer"]
            g = g + self.momentum * buf if self.nesterov else buf
        p -= self.lr * g


class AdamW(Optimizer):
    """torch.optim.AdamW: Adam with decoupled weight decay.

        p = p·(1 - lr·wd)
        m = m + (1 - β1)·(g - m)
        v = β2·v + (1 - β2)·g²
        p = p - lr/(1 - β1ᵗ) · m / (√v / √(1 - β2ᵗ) + eps)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, no_decay=None, run=None):
        super().__init__(params, lr, weight_decay, no_decay, run)
        self.betas, self.eps = tuple(betas), eps

    def update(self, name, p, g, state):
        beta1, beta2 = self.betas
        xp = get_xp(p)
        ### BEGIN SOLUTION
        if not state:
            state["exp_avg"], state["exp_avg_sq"] = xp.zeros_like(p), xp.zeros_like(p)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        t = self.step_count
        p *= 1.0 - self.lr * self.decay_for(name)
        m += (1.0 - beta1) * (g - m)
        v *= beta2
        v += (1.0 - beta2) * g * g
        step_size = self.lr / (1.0 - beta1**t)
        denom = xp.sqrt(v) / math.sqrt(1.0 - beta2**t) + self.eps
        p -= step_size * (m / denom)
        ### END SOLUTION


def clip_grad_norm(grads, max_norm, run=None):
    """Scale all gradients in place so their global L2 norm is at most max_norm
    (torch.nn.utils.clip_grad_norm_). Returns the norm before clipping. run(fn, items): as the optimizers'."""
    xp = get_xp(*grads.values())
    if xp is np:  # fsum rounds exactly, so neither the dict's order nor the run's matters.
        # einsum, not vdot: BLAS's dot splits a long vector over its threads, so its rounding would
        # depend on the thread count
        total = math.sqrt(math.fsum((run or _in_order)(lambda g: float(np.einsum("i,i->", g.ravel(), g.ravel())),
                                                       grads.values())))
    else:  # on the GPU's stream, from this thread, in one fixed order: one sync to read the total
        squares = [xp.vdot(grads[k].ravel(), grads[k].ravel()) for k in sorted(grads)]
        total = math.sqrt(float(xp.stack(squares).sum()))
    scale = min(1.0, max_norm / (total + 1e-6))
    if scale < 1.0:
        for g in grads.values():
            g *= scale
    return total


SCHEDULES = ("cosine", "linear", "constant")


def lr_at(step, *, base_lr, total_steps, warmup_steps=0, decay="cosine", min_lr=0.0):
    """The learning rate for update number `step` (0-based): linear warmup to base_lr
    over warmup_steps, then cosine or linear decay to min_lr at total_steps."""
    if decay not in SCHEDULES:
        raise ValueError(f"unknown schedule {decay!r}; expected one of {SCHEDULES}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if decay == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + (base_lr - min_lr) * (1.0 - progress)

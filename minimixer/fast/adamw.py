"""AdamW for the fast path: optim.AdamW with each parameter's update fused into one pass (Numba)."""
import math

import numpy as np

from .. import optim
from ..runtime import threads
from .kernels import numba_kernels


class AdamW(optim.AdamW):
    """optim.AdamW with each parameter's update fused into one pass (Numba), where it can be: the
    clear update makes about ten passes over each parameter and its two moments. The updates of
    different parameters run on the thread pool."""

    def __init__(self, params, *args, run=None, **kwargs):
        super().__init__(params, *args, run=run or threads.pool_for(params), **kwargs)

    def update(self, name, p, g, state):
        nk = numba_kernels(p)
        if nk is None or not (p.flags.c_contiguous and g.flags.c_contiguous and g.dtype == p.dtype):
            return super().update(name, p, g, state)
        if not state:
            state["exp_avg"], state["exp_avg_sq"] = np.zeros_like(p), np.zeros_like(p)
        beta1, beta2 = self.betas
        t = self.step_count
        nk.adamw_update(p.reshape(-1), g.reshape(-1), state["exp_avg"].reshape(-1), state["exp_avg_sq"].reshape(-1),
                        1.0 - self.lr * self.decay_for(name), beta1, beta2, self.lr / (1.0 - beta1**t),
                        math.sqrt(1.0 - beta2**t), self.eps)

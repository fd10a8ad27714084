"""Parameter initialization, as timm's MlpMixer does it (timm.models.mlp_mixer._init_weights).

- stem conv: LeCun normal, truncated to ±2σ (σ rescaled so the truncated std is √(1/fan_in)); bias 0
- block linears: Xavier uniform; biases N(0, 1e-6²) (timm: 'mlp' layers)
- LayerNorms: weight 1, bias 0
- head: weight 0, bias 0 (so a fresh model predicts uniform logits)

Same distributions as timm, not the same random numbers: PyTorch's generator is not NumPy's.
"""
import math

import numpy as np

from .backend import float_dtype, to_backend
from .config import param_shapes

TRUNC_NORMAL_STD = 0.87962566103423978  # std of a standard normal truncated to (-2, 2)


def _truncated_normal(rng, shape, std):
    z = rng.standard_normal(shape)
    outside = np.abs(z) > 2.0
    while outside.any():  # resample the tails until everything lies in (-2, 2)
        z[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(z) > 2.0
    return z * std


def init_params(cfg, *, seed=0, dtype="float32", backend="numpy"):
    """Fresh parameters for cfg: a dict keyed by timm's names, with timm's shapes and init."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name == "stem.proj.weight":
            fan_in = math.prod(shape[1:])  # C·P·P
            value = _truncated_normal(rng, shape, math.sqrt(1.0 / fan_in) / TRUNC_NORMAL_STD)
        elif name.startswith("head.") or name.endswith(("norm1.bias", "norm2.bias")) or name in ("norm.bias", "stem.proj.bias"):
            value = np.zeros(shape)
        elif name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
            value = np.ones(shape)
        elif name.endswith(".weight"):  # the four linears in each block
            fan_out, fan_in = shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            value = rng.uniform(-bound, bound, shape)
        else:  # block linear biases
            value = rng.normal(0.0, 1e-6, shape)
        params[name] = value
    return to_backend(params, backend, dtype=float_dtype(dtype))

# %% [markdown]
# # 2. LayerNorm and GELU: forward, backward, and gradient checks
#
# Every Mixer block uses both layers twice. Each one is a pair of functions:
# `out, cache = name_forward(...)` and `dx, ... = name_backward(dout, cache)`. We check every
# backward pass against central differences in float64, using a random upstream gradient and
# non-trivial parameters. Expect relative errors of about 1e-10.

# %%
import math

import matplotlib.pyplot as plt
import numpy as np

from minimixer import layers
from minimixer.erf import erf

rng = np.random.default_rng(0)


def numerical_gradient(f, x, h=1e-5):
    """d f() / dx by central differences, one element at a time."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm = f()
        x[i] = old
        grad[i] = (fp - fm) / (2 * h)
    return grad


def rel_error(a, b):
    return np.abs(a - b).max() / max(np.abs(a).max(), np.abs(b).max())


# %% [markdown]
# ## LayerNorm
# timm's Mixer normalizes each token over its D channels with the biased variance and
# **eps = 1e-6**, which differs from PyTorch's default of 1e-5. The cache keeps only
# `(x, w, mean, rstd)`: the mean and the reciprocal standard deviation, not a normalized copy.

# %%
x = rng.standard_normal((2, 5, 8)) * 3 + 1
w, b = 1 + 0.3 * rng.standard_normal(8), 0.3 * rng.standard_normal(8)
out, cache = layers.layernorm_forward(x, w, b, eps=1e-6)
print("per-token mean of (out - b)/w:", np.round(((out - b) / w).mean(-1)[0], 12))
print("per-token var  of (out - b)/w:", np.round(((out - b) / w).var(-1)[0], 6))
print("cache:", [getattr(c, "shape", c) for c in cache])

dout = rng.standard_normal(out.shape)
dx, dw, db = layers.layernorm_backward(dout, cache)
for name, analytic, param in [("dx", dx, x), ("dw", dw, w), ("db", db, b)]:
    numeric = numerical_gradient(lambda: float((layers.layernorm_forward(x, w, b)[0] * dout).sum()), param)
    print(f"{name}: relative error {rel_error(analytic, numeric):.2e}")

# %% [markdown]
# ## GELU
# `nn.GELU()`, and so timm's Mixer, is the exact form 0.5·x·(1 + erf(x/√2)). The tanh form is a
# common approximation, and it differs from the exact one by up to 4.7e-4, which is enough to
# move logits visibly. NumPy has no erf, so `minimixer/erf.py` supplies one that is exact to float64
# precision:

# %%
grid = np.linspace(-6, 6, 100001)
print("max |minimixer erf - math.erf| (float64):", np.abs(erf(grid) - np.vectorize(math.erf)(grid)).max())
print("max |... | (float32):", np.abs(erf(grid.astype(np.float32)) - np.vectorize(math.erf)(grid)).max())

xs = np.linspace(-5, 3, 801)
exact = layers.gelu_forward(xs, "erf")[0]
approx = layers.gelu_forward(xs, "tanh")[0]
fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
a1.plot(xs, exact, label="exact (erf)")
a1.plot(xs, np.maximum(xs, 0), "--", lw=0.8, label="ReLU")
a1.legend()
a1.set_title("GELU(x) = x·Φ(x)")
a2.plot(xs, approx - exact)
a2.set_title(f"tanh form − exact form (max |Δ| = {np.abs(approx - exact).max():.1e})")
plt.tight_layout()
plt.show()

# %%
for form in ("erf", "tanh"):
    x = rng.standard_normal((4, 7)) * 2.5
    out, cache = layers.gelu_forward(x, form)
    dout = rng.standard_normal(out.shape)
    dx = layers.gelu_backward(dout, cache)
    numeric = numerical_gradient(lambda: float((layers.gelu_forward(x, form)[0] * dout).sum()), x)
    print(f"GELU {form}: dx relative error {rel_error(dx, numeric):.2e}")

# %% [markdown]
# # 2. LayerNorm and GELU: forward, backward, and gradient checks
#
# **Needs:** assignment A1 (`layernorm_forward/backward`, `gelu_forward/backward`).
#
# Every Mixer block uses both layers twice. Each one is a pair of functions:
# `out, cache = name_forward(...)` and `dx, ... = name_backward(dout, cache)`. We check every
# backward pass against central differences in float64, using a random upstream gradient and
# non-trivial parameters. Expect relative errors of about 1e-10.

# %%
import course

course.setup()
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
#
# **Derive the backward first.** For one token x ∈ ℝᴰ:
#
# $$\mu = \tfrac1D\sum_i x_i,\quad \sigma^2 = \tfrac1D\sum_i (x_i-\mu)^2,\quad
#   r = (\sigma^2+\varepsilon)^{-1/2},\quad \hat x = (x-\mu)\,r,\quad y = w\odot\hat x + b.$$
#
# The parameters are easy: $\partial L/\partial b = \sum_{\text{tokens}} g_y$ and
# $\partial L/\partial w = \sum_{\text{tokens}} g_y\odot\hat x$, where $g_y$ = `dout`. For x, call
# $g = w\odot g_y$ the gradient at $\hat x$. Two small derivatives:
# $\partial\mu/\partial x_i = 1/D$, and, because $\sum_j (x_j-\mu) = 0$,
# $\partial\sigma^2/\partial x_i = \tfrac2D (x_i-\mu)$, so
# $\partial r/\partial x_i = -\tfrac12 r^3\cdot\tfrac2D(x_i-\mu) = -\tfrac{r^2}{D}\,\hat x_i$. With
# $x_j-\mu = \hat x_j/r$ and the product rule on $\hat x_j = (x_j-\mu)\,r$:
#
# $$\frac{\partial \hat x_j}{\partial x_i} = r\Big(\delta_{ij} - \frac1D - \frac{\hat x_j\,\hat x_i}{D}\Big)
# \quad\Longrightarrow\quad
# dx_i = \sum_j g_j \frac{\partial \hat x_j}{\partial x_i}
#      = r\,\big(g_i - \overline{g} - \hat x_i\,\overline{g\odot\hat x}\big),$$
#
# with bars for means over the D channels. It is exact with ε too (ε only sits inside r). The three
# lines of `layernorm_backward` are this formula: subtract the mean path, subtract the variance
# path, multiply by rstd. Now check it against central differences:

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
# move logits visibly. NumPy has no erf, so `minimixer/erf.py` supplies one: exact to float64
# precision in float64, and the Abramowitz–Stegun 7.1.26 formula in float32. We measure both at
# the same inputs (a float32 input is compared with math.erf of that very float32 value). The
# float32 error peaks near |x| ≈ 0.05, where 1 − poly·e^(−x²) cancels; an exhaustive scan of the
# float32 values with 2⁻⁹ ≤ |x| ≤ 6 puts its worst case at 6.7e-7 (x ≈ ±0.0464), so the figure
# to quote is **below 7e-7**. A sample of 500,000 points finds nearly that:

# %%
grid = np.linspace(-6, 6, 100001)
print(f"float64: max |minimixer erf - math.erf| = {np.abs(erf(grid) - np.vectorize(math.erf)(grid)).max():.1e}")
x32 = np.concatenate([grid, np.random.default_rng(1).uniform(-0.1, 0.1, 400_000)]).astype(np.float32)
err32 = np.abs(erf(x32).astype(np.float64) - np.vectorize(math.erf)(x32.astype(np.float64)))
print(f"float32: max |minimixer erf - math.erf| = {err32.max():.1e} at x = {x32[err32.argmax()]:.4f}")

# %% [markdown]
# **Derive both GELU derivatives.** With Φ the standard normal CDF and φ(x) = e^(−x²/2)/√(2π)
# its density (Φ(x) = ½(1 + erf(x/√2)), and Φ' = φ):
#
# - exact: GELU(x) = x·Φ(x), so **GELU'(x) = Φ(x) + x·φ(x)**;
# - tanh: GELU(x) ≈ ½x(1 + t) with t = tanh(u), u = √(2/π)(x + 0.044715x³). The chain rule with
#   tanh' = 1 − t² gives **GELU'(x) ≈ ½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715x²)**.
#
# `gelu_backward` is these two lines times `dout`. Three quick sanity values of the exact one:
# GELU'(0) = Φ(0) = ½; GELU'(x) → 1 as x → +∞ and → 0 as x → −∞; and it overshoots 1 a little
# (x·φ(x) > 0 for x > 0), which ReLU's step never does. The figure shows GELU next to ReLU, and how
# far the tanh form strays from the exact one:

# %%
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

# %% [markdown]
# Expect about 1e-10 for both forms (central differences with h = 1e-5 in float64).
#
# ## Exercises
# Write the code where the cell says so; the `assert` judges it. The graded versions of these layers
# (hidden test cases) are assignment A1 of the coursework: `python -m minimixer.coursework check`.
#
# **Exercise 2.1.** Build the full D×D Jacobian ∂y/∂x of LayerNorm for one token from the
# formula above (diag(w) times r(I − 1/D − x̂x̂ᵀ/D)), multiply by `dout`, and compare with
# `layernorm_backward`. How close should they be, and why?

# %%
D = 8
xt = rng.standard_normal(D) * 2 + 0.5
wt, bt = 1 + 0.3 * rng.standard_normal(D), 0.3 * rng.standard_normal(D)
gt = rng.standard_normal(D)
yt, ct = layers.layernorm_forward(xt, wt, bt)
with course.exercise("2.1"):
    def layernorm_jacobian(x, w, eps=1e-6):
        """J[j, i] = dy_j / dx_i for one token x (D,)."""
        ### BEGIN SOLUTION
        r = 1.0 / np.sqrt(x.var() + eps)
        xhat = (x - x.mean()) * r
        return w[:, None] * r * (np.eye(len(x)) - 1.0 / len(x) - np.outer(xhat, xhat) / len(x))
        ### END SOLUTION

    J = layernorm_jacobian(xt, wt)
    err = np.abs(J.T @ gt - layers.layernorm_backward(gt, ct)[0]).max()
    print(f"Jacobian-vector product vs layernorm_backward: max |Δ| = {err:.1e}")
    assert J.shape == (D, D) and err < 1e-13

# %% [markdown]
# <!-- BEGIN ANSWER -->
# *Answer:* to about 1e-15: it is the same math, reordered, so only rounding separates them.
# <!-- END ANSWER -->
#
# **Exercise 2.2.** Why does LayerNorm's dx sum to zero over the channels of each token? Answer
# from the formula (write it below), then check it on a (2, 5, 8) batch.
#
# <!-- BEGIN ANSWER -->
# *Answer:* Σᵢ dxᵢ = r(Σg − D·ḡ − (Σx̂)·mean(g⊙x̂)) = r(0 − 0) = 0, because Σᵢ x̂ᵢ = 0. Said
# differently: adding a constant c to every channel of x leaves y unchanged, so the directional
# derivative along (1, …, 1) is zero. The same fact makes `mlp_tokens.fc2.bias`'s gradient zero
# (notebook 4).
# <!-- END ANSWER -->

# %%
x = rng.standard_normal((2, 5, 8)) * 3 + 1
out, cache = layers.layernorm_forward(x, w, b)
dx = layers.layernorm_backward(rng.standard_normal(out.shape), cache)[0]
print(f"max |Σ_channels dx| = {np.abs(dx.sum(-1)).max():.1e}  (against max |dx| = {np.abs(dx).max():.1f})")
assert np.abs(dx.sum(-1)).max() < 1e-12

# %% [markdown]
# **Exercise 2.3.** GELU dips below zero before it rises. Find its minimum, the x where GELU'(x) = 0,
# by bisection on `gelu_backward` (with `dout` = 1) between −2 and −0.1, to 1e-9. Before you run it:
# what is GELU'(0), from the derivative formula?

# %%
with course.exercise("2.3"):
    def gelu_minimum(lo=-2.0, hi=-0.1):
        ### BEGIN SOLUTION
        while hi - lo > 1e-10:  # GELU'(x) = Φ(x) + x·φ(x) is negative at -2 and positive at -0.1
            mid = 0.5 * (lo + hi)
            if layers.gelu_backward(np.ones(1), (np.array([mid]), "erf"))[0] < 0:
                lo = mid
            else:
                hi = mid
        return lo
        ### END SOLUTION

    xmin = gelu_minimum()
    grid = np.linspace(-2, -0.1, 190001)
    print(f"minimum at x = {xmin:.6f}, GELU there = {layers.gelu_forward(np.array([xmin]))[0][0]:.6f}")
    assert abs(xmin - grid[layers.gelu_forward(grid)[0].argmin()]) < 2e-5
    assert abs(layers.gelu_backward(np.ones(1), (np.array([xmin]), "erf"))[0]) < 1e-8
    print("GELU'(0) =", float(layers.gelu_backward(np.ones(1), (np.zeros(1), "erf"))[0]))

# %% [markdown]
# # 2b. The Mixer block's backward pass, line by line
#
# **Needs:** nothing from the coursework (plain NumPy). **Prepares:** assignment A2's
# `mixer_block_backward`.
#
# Here you write the backward pass of one whole Mixer block yourself, one line per intermediate,
# in the spirit of Karpathy's "Becoming a backprop ninja". The forward pass below is spelled out
# one operation per line, and every line's result has a name. For each name you write the line
# that computes the gradient of the loss with respect to it, `d<name>`, from gradients you already
# have. After each line `check` compares your array with **central differences of the forward pass
# itself**: it nudges that one intermediate, reruns the rest of the block, and watches the loss. So
# nothing here hands you the answer, and a wrong line fails its own check only: when a line is
# wrong, the lines after it are given the numerical gradient and checked on their own.
#
# Shapes (the module's legend): B batch, N tokens, D channels, DS and DC the two hidden widths.

# %%
import course

course.setup()
import numpy as np

from minimixer.erf import erf

rng = np.random.default_rng(0)
B, N, D, DS, DC, eps = 2, 4, 6, 3, 8, 1e-6
p = {"norm1.weight": 1 + 0.3 * rng.standard_normal(D), "norm1.bias": 0.3 * rng.standard_normal(D),
     "fc1.weight": rng.standard_normal((DS, N)) / 2, "fc1.bias": 0.3 * rng.standard_normal(DS),
     "fc2.weight": rng.standard_normal((N, DS)) / 2, "fc2.bias": 0.3 * rng.standard_normal(N),
     "norm2.weight": 1 + 0.3 * rng.standard_normal(D), "norm2.bias": 0.3 * rng.standard_normal(D),
     "fc3.weight": rng.standard_normal((DC, D)) / 2, "fc3.bias": 0.3 * rng.standard_normal(DC),
     "fc4.weight": rng.standard_normal((D, DC)) / 2, "fc4.bias": 0.3 * rng.standard_normal(D)}
x = rng.standard_normal((B, N, D))  # the block's input
G = rng.standard_normal((B, N, D))  # a random upstream gradient: the loss is sum(out * G)


def Phi(z):  # the standard normal CDF
    return 0.5 * (1 + erf(z / np.sqrt(2)))


def phi(z):  # its density
    return np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)


def block(x, p, at=None):
    """The Mixer block, one operation per line. Returns the loss and every intermediate;
    `at=(name, array)` uses `array` in place of that intermediate (that is how `check` nudges it)."""
    v = {}

    def keep(name, value):
        v[name] = at[1] if at is not None and at[0] == name else value
        return v[name]

    # token mixing: u = x + MLP(LayerNorm(x)ᵀ)ᵀ
    mu1 = keep("mu1", x.mean(-1, keepdims=True))  # (B, N, 1)
    xc1 = keep("xc1", x - mu1)  # (B, N, D)
    var1 = keep("var1", (xc1 ** 2).mean(-1, keepdims=True))  # (B, N, 1)
    rstd1 = keep("rstd1", (var1 + eps) ** -0.5)  # (B, N, 1)
    xhat1 = keep("xhat1", xc1 * rstd1)  # (B, N, D)
    ln1 = keep("ln1", xhat1 * p["norm1.weight"] + p["norm1.bias"])  # (B, N, D)
    t = keep("t", ln1.transpose(0, 2, 1))  # (B, D, N)
    h1 = keep("h1", t @ p["fc1.weight"].T + p["fc1.bias"])  # (B, D, DS)
    a1 = keep("a1", h1 * Phi(h1))  # (B, D, DS)  exact GELU
    m1 = keep("m1", a1 @ p["fc2.weight"].T + p["fc2.bias"])  # (B, D, N)
    u = keep("u", x + m1.transpose(0, 2, 1))  # (B, N, D)
    # channel mixing: out = u + MLP(LayerNorm(u))
    mu2 = keep("mu2", u.mean(-1, keepdims=True))  # (B, N, 1)
    xc2 = keep("xc2", u - mu2)  # (B, N, D)
    var2 = keep("var2", (xc2 ** 2).mean(-1, keepdims=True))  # (B, N, 1)
    rstd2 = keep("rstd2", (var2 + eps) ** -0.5)  # (B, N, 1)
    xhat2 = keep("xhat2", xc2 * rstd2)  # (B, N, D)
    ln2 = keep("ln2", xhat2 * p["norm2.weight"] + p["norm2.bias"])  # (B, N, D)
    h2 = keep("h2", ln2 @ p["fc3.weight"].T + p["fc3.bias"])  # (B, N, DC)
    a2 = keep("a2", h2 * Phi(h2))  # (B, N, DC)
    m2 = keep("m2", a2 @ p["fc4.weight"].T + p["fc4.bias"])  # (B, N, D)
    out = keep("out", u + m2)  # (B, N, D)
    return float((out * G).sum()), v


loss, v = block(x, p)
globals().update(v)  # every intermediate by its name: mu1, xc1, ..., out


def check(name, mine):
    """Your d<name> against the numerical gradient; a parameter's name is its key in p."""
    if name in p:
        return course.cmp(name, mine, lambda: block(x, p)[0], p[name])
    if name == "dx":  # the block's input
        probe = x.copy()
        return course.cmp(name, mine, lambda: block(probe, p)[0], probe)
    probe = v[name[1:]].copy()
    return course.cmp(name, mine, lambda: block(x, p, at=(name[1:], probe))[0], probe)


print(f"loss {loss:.4f}; intermediates:", ", ".join(f"{k} {a.shape}" for k, a in v.items()))

# %% [markdown]
# ## Exercise 2b.1: channel mixing, from the top
# `loss = sum(out * G)`, so `dout = G`. The block ends with `out = u + m2`: a sum passes its
# gradient to both terms unchanged. A linear layer `y = a @ W.T + b` gives `da = dy @ W`,
# `dW = Σ dyᵀ a` over all rows and `db = Σ dy`. For the exact GELU, `a = h·Φ(h)`, the derivative
# is `Φ(h) + h·φ(h)` (notebook 2). Write each line, run the cell, fix what says WRONG.

# %%
dout = G
dm2 = dout  # SOLUTION LINE
dm2 = check("dm2", dm2)
da2 = dm2 @ p["fc4.weight"]  # SOLUTION LINE
da2 = check("da2", da2)
dfc4_w = dm2.reshape(-1, D).T @ a2.reshape(-1, DC)  # SOLUTION LINE
check("fc4.weight", dfc4_w)
dfc4_b = dm2.sum((0, 1))  # SOLUTION LINE
check("fc4.bias", dfc4_b)
dh2 = da2 * (Phi(h2) + h2 * phi(h2))  # SOLUTION LINE
dh2 = check("dh2", dh2)
dln2 = dh2 @ p["fc3.weight"]  # SOLUTION LINE
dln2 = check("dln2", dln2)
dfc3_w = dh2.reshape(-1, DC).T @ ln2.reshape(-1, D)  # SOLUTION LINE
check("fc3.weight", dfc3_w)
dfc3_b = dh2.sum((0, 1))  # SOLUTION LINE
check("fc3.bias", dfc3_b)

# %% [markdown]
# ## Exercise 2b.2: the LayerNorm, one small step at a time
# Go backwards through `ln2 = xhat2·w + b`, `xhat2 = xc2·rstd2`, `rstd2 = (var2 + ε)^(-1/2)`,
# `var2 = mean(xc2²)`, `xc2 = u − mu2`, `mu2 = mean(u)`. Two rules do all the work: a value that
# was broadcast in the forward pass (rstd2, mu2: one per token, used by all D channels) collects
# a **sum** over that axis in the backward pass; a value used in two places (xc2 feeds var2 and
# xhat2; u feeds mu2, xc2 and the residual) gets the **sum** of both gradients. `du` is the last
# line: u reaches the loss three ways.

# %%
dnorm2_w = (dln2 * xhat2).sum((0, 1))  # SOLUTION LINE
check("norm2.weight", dnorm2_w)
dnorm2_b = dln2.sum((0, 1))  # SOLUTION LINE
check("norm2.bias", dnorm2_b)
dxhat2 = dln2 * p["norm2.weight"]  # SOLUTION LINE
dxhat2 = check("dxhat2", dxhat2)
drstd2 = (dxhat2 * xc2).sum(-1, keepdims=True)  # SOLUTION LINE
drstd2 = check("drstd2", drstd2)
dvar2 = -0.5 * (var2 + eps) ** -1.5 * drstd2  # SOLUTION LINE
dvar2 = check("dvar2", dvar2)
dxc2 = dxhat2 * rstd2 + dvar2 * 2 * xc2 / D  # SOLUTION LINE
dxc2 = check("dxc2", dxc2)
dmu2 = -dxc2.sum(-1, keepdims=True)  # SOLUTION LINE
dmu2 = check("dmu2", dmu2)
du = dout + dxc2 + dmu2 / D  # SOLUTION LINE
du = check("du", du)

# %% [markdown]
# ## Exercise 2b.3: token mixing
# The same steps, with one twist: the token MLP works on the transposed table (B, D, N), so
# `u = x + m1ᵀ` hands `m1` the transposed `du`, and `t = ln1ᵀ` hands its gradient back transposed.

# %%
dm1 = du.transpose(0, 2, 1)  # SOLUTION LINE
dm1 = check("dm1", dm1)
da1 = dm1 @ p["fc2.weight"]  # SOLUTION LINE
da1 = check("da1", da1)
dfc2_w = dm1.reshape(-1, N).T @ a1.reshape(-1, DS)  # SOLUTION LINE
check("fc2.weight", dfc2_w)
dfc2_b = dm1.sum((0, 1))  # SOLUTION LINE
check("fc2.bias", dfc2_b)
dh1 = da1 * (Phi(h1) + h1 * phi(h1))  # SOLUTION LINE
dh1 = check("dh1", dh1)
dt = dh1 @ p["fc1.weight"]  # SOLUTION LINE
dt = check("dt", dt)
dfc1_w = dh1.reshape(-1, DS).T @ t.reshape(-1, N)  # SOLUTION LINE
check("fc1.weight", dfc1_w)
dfc1_b = dh1.sum((0, 1))  # SOLUTION LINE
check("fc1.bias", dfc1_b)
dln1 = dt.transpose(0, 2, 1)  # SOLUTION LINE
dln1 = check("dln1", dln1)
dnorm1_w = (dln1 * xhat1).sum((0, 1))  # SOLUTION LINE
check("norm1.weight", dnorm1_w)
dnorm1_b = dln1.sum((0, 1))  # SOLUTION LINE
check("norm1.bias", dnorm1_b)
dxhat1 = dln1 * p["norm1.weight"]  # SOLUTION LINE
dxhat1 = check("dxhat1", dxhat1)
drstd1 = (dxhat1 * xc1).sum(-1, keepdims=True)  # SOLUTION LINE
drstd1 = check("drstd1", drstd1)
dvar1 = -0.5 * (var1 + eps) ** -1.5 * drstd1  # SOLUTION LINE
dvar1 = check("dvar1", dvar1)
dxc1 = dxhat1 * rstd1 + dvar1 * 2 * xc1 / D  # SOLUTION LINE
dxc1 = check("dxc1", dxc1)
dmu1 = -dxc1.sum(-1, keepdims=True)  # SOLUTION LINE
dmu1 = check("dmu1", dmu1)
dx = du + dxc1 + dmu1 / D  # SOLUTION LINE
dx = check("dx", dx)

# %% [markdown]
# ## Exercise 2b.4: the LayerNorm in three lines
# Six small lines took the gradient through one LayerNorm. Fold them into the three-line form
# that notebook 2 derived, `dx = rstd·(g − mean(g) − x̂·mean(g·x̂))` with `g = dln·w`, and check it
# against the `dx` of your six lines for the channel-mixing LayerNorm (its input is `u`; the
# residual's `dout` is not part of it).

# %%
with course.exercise("2b.4"):
    def layernorm_dx(dln, xhat, rstd, w):
        ### BEGIN SOLUTION
        g = dln * w  # (B, N, D)
        return rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
        ### END SOLUTION

    three = layernorm_dx(dln2, xhat2, rstd2, p["norm2.weight"])
    six = du - dout  # what reached u through the LayerNorm
    print(f"three lines vs six: max |Δ| = {np.abs(three - six).max():.1e}")
    assert np.abs(three - six).max() < 1e-6 * np.abs(six).max()  # six may hold numerical gradients

# %% [markdown]
# When every check says ok, you have written `mixer_block_backward`: assignment A2 asks for the same
# gradients, organised into `layernorm_backward`, `mlp_backward`, `token_mixing_backward` and
# `channel_mixing_backward`. One more thing to notice: `fc2.bias` adds the same number to every
# channel of a token. The LayerNorm of the channel branch removes it; only the residual path carries it
# to `out`. In the whole model a final LayerNorm reads the residual stream, so there that gradient
# is exactly zero (notebook 4 shows it).

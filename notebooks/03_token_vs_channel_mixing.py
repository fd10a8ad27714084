# %% [markdown]
# # 3. Token mixing vs channel mixing
#
# A Mixer block has two MLPs, and each mixes along one axis of the (N tokens × D channels) table:
# - **token mixing** acts on each channel's column of N values. It is shared by all channels and
#   mixes information *between* patches;
# - **channel mixing** acts on each token's row of D values. It is shared by all tokens and mixes
#   information *within* a patch.
#
# In code, the only difference is a transpose: `(MLP(LayerNorm(x)ᵀ))ᵀ` against `MLP(LayerNorm(x))`.

# %%
import matplotlib.pyplot as plt
import numpy as np

import minimixer as mm
from minimixer import layers

cfg = mm.get_config("mixer_s32_224", embed_dim=32, num_blocks=1)  # 224 px, 32 px patches: N = 49
N, D, DS, DC = cfg.num_patches, cfg.embed_dim, cfg.token_hidden, cfg.channel_hidden
print(f"N = {N} tokens, D = {D} channels, token hidden DS = {DS}, channel hidden DC = {DC}")
params = {k: v for k, v in mm.init_params(cfg, seed=0, dtype="float64").items()}
rng = np.random.default_rng(0)
p = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in mm.model.block_params(params, 0).items()}
for k in layers.TOKEN_MIXING_KEYS + layers.CHANNEL_MIXING_KEYS:
    print(f"  {k:26s} {p[k].shape}")

# %% [markdown]
# The shapes tell the story. `mlp_tokens.fc1.weight` is (DS, **N**), so its input size is the number
# of patches. A Mixer trained at 224 pixels with 32-pixel patches has N = 49, and it cannot run on
# another resolution without new token-mixing weights. A CNN or a ViT with interpolated position
# embeddings can. The channel MLP's weights only depend on D.

# %%
x = rng.standard_normal((1, N, D))
t, _ = layers.token_mixing_forward(x, *(p[k] for k in layers.TOKEN_MIXING_KEYS))
c, _ = layers.channel_mixing_forward(x, *(p[k] for k in layers.CHANNEL_MIXING_KEYS))
print("token mixing out", t.shape, " channel mixing out", c.shape)
other = mm.get_config("mixer_s32_224", img_size=160, embed_dim=32, num_blocks=1)
try:
    layers.token_mixing_forward(np.zeros((1, other.num_patches, D)), *(p[k] for k in layers.TOKEN_MIXING_KEYS))
except ValueError as e:
    print(f"at 160 px (N = {other.num_patches}) the 49-token MLP fails:", str(e).splitlines()[0][:90])

# %% [markdown]
# **Who influences whom?** Change one token and see which outputs move. Channel mixing only
# changes that token's own row. Token mixing changes (almost) every token, but within each
# channel it only mixes values across tokens (the LayerNorm before it is the one place where channels meet).

# %%
def influence(fn, token=20):
    base = fn(x)
    bumped = x.copy()
    bumped[0, token] += 1.0
    return np.abs(fn(bumped) - base)[0]  # (N, D)


tok = influence(lambda v: layers.token_mixing_forward(v, *(p[k] for k in layers.TOKEN_MIXING_KEYS))[0])
chan = influence(lambda v: layers.channel_mixing_forward(v, *(p[k] for k in layers.CHANNEL_MIXING_KEYS))[0])
fig, axes = plt.subplots(1, 2, figsize=(9, 4))
for ax, m, title in [(axes[0], tok, "token mixing"), (axes[1], chan, "channel mixing")]:
    ax.imshow(m.sum(1).reshape(cfg.grid_size), cmap="viridis")
    ax.set_title(f"{title}: |Δ output| per token\nafter changing token 20")
    ax.axis("off")
plt.tight_layout()
plt.show()
print("tokens changed by channel mixing:", int((chan.sum(1) > 0).sum()), " by token mixing:", int((tok.sum(1) > 0).sum()))

# %% [markdown]
# Both are just MLPs. The token one sees the transposed table, and its backward pass transposes
# the gradient back. A float64 gradient check confirms the transposes in the backward pass:

# %%
out, cache = layers.token_mixing_forward(x, *(p[k] for k in layers.TOKEN_MIXING_KEYS))
dout = rng.standard_normal(out.shape)
dx = layers.token_mixing_backward(dout, cache)[0]
h = 1e-5
i = (0, 7, 3)
xp_, xm_ = x.copy(), x.copy()
xp_[i] += h
xm_[i] -= h
f = lambda v: float((layers.token_mixing_forward(v, *(p[k] for k in layers.TOKEN_MIXING_KEYS))[0] * dout).sum())  # noqa: E731
print(f"dx{i}: analytic {dx[i]:.10f}  numeric {(f(xp_) - f(xm_)) / (2 * h):.10f}")

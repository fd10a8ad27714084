# %% [markdown]
# # 3. Token mixing vs channel mixing, and the paper's ideas in code
#
# **Needs:** assignments A1 and A2 (the MLP, token and channel mixing, the block).
#
# A Mixer block has two MLPs, and each mixes along one axis of the (N tokens × D channels) table
# (the paper's S × C; notebook 1 has the notation map):
# - **token mixing** acts on each channel's column of N values. It is shared by all channels and
#   mixes information *between* patches;
# - **channel mixing** acts on each token's row of D values. It is shared by all tokens and mixes
#   information *within* a patch.
#
# In code, the only difference is a transpose: `(MLP(LayerNorm(x)ᵀ))ᵀ` against `MLP(LayerNorm(x))`.
# Each claim the paper makes about these two layers is checked below with numbers.

# %%
import course

course.setup()
import matplotlib.pyplot as plt
import numpy as np

import minimixer as mm
from minimixer import layers

cfg = mm.get_config("mixer_s32_224", embed_dim=32, num_blocks=1)  # 224 px, 32 px patches: N = 49
N, D, DS, DC = cfg.num_patches, cfg.embed_dim, cfg.token_hidden, cfg.channel_hidden
print(f"N = {N} tokens, D = {D} channels, token hidden DS = {DS}, channel hidden DC = {DC}")
params = mm.init_params(cfg, seed=0, dtype="float64")
rng = np.random.default_rng(0)
p = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in mm.model.block_params(params, 0).items()}
TOK = [p[k] for k in layers.TOKEN_MIXING_KEYS]
CHAN = [p[k] for k in layers.CHANNEL_MIXING_KEYS]
for k in layers.TOKEN_MIXING_KEYS + layers.CHANNEL_MIXING_KEYS:
    print(f"  {k:26s} {p[k].shape}")

# %% [markdown]
# ## The token MLP is tied to the resolution
# `mlp_tokens.fc1.weight` is (DS, **N**): its input size is the number of patches. A Mixer trained
# at 224 px with 32 px patches has N = 49 and cannot run at another resolution without new
# token-mixing weights. A CNN can, and so can a ViT once its position embeddings are interpolated.
# The channel MLP's weights depend only on D.

# %%
x = rng.standard_normal((1, N, D))
t, _ = layers.token_mixing_forward(x, *TOK)
c, _ = layers.channel_mixing_forward(x, *CHAN)
print("token mixing out", t.shape, " channel mixing out", c.shape)
other = mm.get_config("mixer_s32_224", img_size=160, embed_dim=32, num_blocks=1)
x160 = np.zeros((1, other.num_patches, D))
print(f"at 160 px: the transposed table is (B, D, N) = {x160.transpose(0, 2, 1).shape}, "
      f"but fc1.weight is (DS, N) = {p['mlp_tokens.fc1.weight'].shape}: N = {other.num_patches} ≠ {N}")
try:
    layers.token_mixing_forward(x160, *TOK)
    raise AssertionError("expected a shape error")
except ValueError:
    print("so the matmul fails (a ValueError from NumPy), while channel mixing runs:",
          layers.channel_mixing_forward(x160, *CHAN)[0].shape)

# %% [markdown]
# ## Who influences whom?
# Change one token and see which outputs move. The change must be a **random vector over the
# channels**: adding the same constant to every channel of a token does nothing at all, because
# the LayerNorm in front of both MLPs subtracts each token's mean: the first line below shows it.
# We count a token as changed when its output moves by more than 1e-9, far above rounding (1e-16)
# and far below the real effect.

# %%
def influence(fn, delta, token=20):
    """|fn(x + delta at one token) - fn(x)| per output token and channel: (N, D)."""
    bumped = x.copy()
    bumped[0, token] += delta
    return np.abs(fn(bumped) - fn(x))[0]


token_fn = lambda v: layers.token_mixing_forward(v, *TOK)[0]  # noqa: E731
chan_fn = lambda v: layers.channel_mixing_forward(v, *CHAN)[0]  # noqa: E731
print(f"a constant +1 on every channel of token 20: max |Δ| = {influence(token_fn, 1.0).max():.1e} (rounding only)")
delta = rng.standard_normal(D)  # a random direction over the channels
tok, chan = influence(token_fn, delta), influence(chan_fn, delta)
TOL = 1e-9
changed_tok, changed_chan = int((tok.max(1) > TOL).sum()), int((chan.max(1) > TOL).sum())
print(f"token mixing:   max |Δ| = {tok.max():.3f}, tokens changed: {changed_tok} of {N}")
print(f"channel mixing: max |Δ| = {chan.max():.3f}, tokens changed: {changed_chan} of {N} "
      f"(token {int(chan.max(1).argmax())}); elsewhere max |Δ| = {np.delete(chan, 20, 0).max():.0e}")
assert tok.max() > 1e-3 and chan.max() > 1e-3 and changed_chan == 1 and changed_tok == N

fig, axes = plt.subplots(1, 2, figsize=(9, 4))
row, col = divmod(20, cfg.grid_size[1])  # where token 20 sits on the 7×7 grid
for ax, m, title in [(axes[0], tok, "token mixing"), (axes[1], chan, "channel mixing")]:
    im = ax.imshow(m.max(1).reshape(cfg.grid_size), cmap="viridis")
    ax.add_patch(plt.Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    ax.set_title(f"{title}: max |Δ output| per token\n(red box: token 20, the one changed)")
    ax.axis("off")
    fig.colorbar(im, ax=ax, shrink=0.8, label="max |Δ output|")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Token mixing is a depthwise convolution with a full receptive field
# The paper (§2) reads the token MLP as a *single-channel depthwise convolution* whose kernel
# covers the whole grid, with the same kernel for every channel. In matrices: apply `fc1` along
# the tokens of the (N, D) table and take the Jacobian of the flattened output with respect to the
# flattened input, in channel-major order. It is **block-diagonal over channels** (no channel
# reaches another) **with D identical N→DS blocks**, each equal to `fc1.weight`. A convolution
# shares its kernel across positions; this one shares it across channels.

# %%
W1, b1 = p["mlp_tokens.fc1.weight"], p["mlp_tokens.fc1.bias"]  # (DS, N), (DS,)


def fc1_over_tokens(y):  # y (N, D) -> (DS, D): one linear map per channel column, shared
    return W1 @ y + b1[:, None]


# the Jacobian, column by column: d out / d y[n, d] for every input entry (channel-major order)
J = np.zeros((D * DS, D * N))
for d in range(D):
    for n in range(N):
        e = np.zeros((N, D))
        e[n, d] = 1.0
        J[:, d * N + n] = (fc1_over_tokens(e) - fc1_over_tokens(np.zeros((N, D)))).T.ravel()  # (D·DS,)
blocks = [J[d * DS:(d + 1) * DS, d * N:(d + 1) * N] for d in range(D)]
off = J.copy()
for d in range(D):
    off[d * DS:(d + 1) * DS, d * N:(d + 1) * N] = 0
print(f"Jacobian {J.shape}: max |off-diagonal block| = {np.abs(off).max():.0e}, "
      f"max |block_d - fc1.weight| = {max(np.abs(B - W1).max() for B in blocks):.0e}")
lim = np.abs(W1).max()
plt.figure(figsize=(9, 2.6))
plt.imshow(J[:4 * DS, :4 * N], cmap="RdBu_r", vmin=-lim, vmax=lim)
plt.title("the Jacobian's first 4 channels: 4 identical (DS × N) blocks on the diagonal, zeros elsewhere")
plt.colorbar(label="∂ out / ∂ in (white: 0)", shrink=0.9)
plt.axis("off")
plt.show()

# %% [markdown]
# Through the whole token MLP (fc1, GELU, fc2) the Jacobian stays block-diagonal: GELU acts
# elementwise, so it scales each channel's block by its own gate, and the blocks stop being exactly
# equal, but no weight ever connects two channels. The LayerNorm in front is the one place where
# the channels of a token meet.
#
# **Channel mixing is a 1×1 convolution.** Lay the tokens back on the grid as a (D, h, w) image.
# `mlp_channels.fc1` is then a 1×1 convolution with kernel (DC, D, 1, 1): the same D→DC map at
# every position, looking at one position only.

# %%
y = rng.standard_normal((1, N, D))
Wc, bc = p["mlp_channels.fc1.weight"], p["mlp_channels.fc1.bias"]  # (DC, D), (DC,)
as_linear = layers.linear_forward(y, Wc, bc)[0]  # (1, N, DC)
image = y.transpose(0, 2, 1).reshape(1, D, *cfg.grid_size)  # (1, D, h, w)
as_conv = np.einsum("od,bdhw->bohw", Wc, image) + bc[None, :, None, None]  # 1×1 conv: (1, DC, h, w)
print("max |linear over channels - 1×1 conv| =", np.abs(as_linear - as_conv.reshape(1, DC, N).transpose(0, 2, 1)).max())

# %% [markdown]
# ## Fixed mixing against attention's data-dependent mixing
# Self-attention mixes tokens with a matrix A = softmax(QKᵀ/√d) that it computes *from the image*;
# the token MLP mixes them with `fc1.weight`, a parameter that is the same for every image. Two
# different inputs give two different attention matrices, and the same mixing weights:

# %%
Wq, Wk = rng.standard_normal((2, D, D)) / np.sqrt(D)


def attention_matrix(z):  # z (N, D) -> A (N, N), rows sum to 1
    s = (z @ Wq) @ (z @ Wk).T / np.sqrt(D)
    s = np.exp(s - s.max(1, keepdims=True))
    return s / s.sum(1, keepdims=True)


img1, img2 = rng.standard_normal((2, N, D))
print(f"attention: max |A(img1) - A(img2)| = {np.abs(attention_matrix(img1) - attention_matrix(img2)).max():.2f}")
print("token MLP: the matrix that mixes the tokens of img1 and of img2 is fc1.weight both times: difference 0")

# %% [markdown]
# (The GELU makes the token MLP's overall effect depend on the input, as in any MLP, but the
# routing weights do not.)
#
# ## No position embeddings: the token MLP knows the order
# Attention without position embeddings is permutation-equivariant: shuffle the patches and the
# outputs shuffle with them, so a ViT needs position embeddings to know where a patch was. Mixer's
# token MLP gives each position its own weight, so it is *order-sensitive* and needs none. The
# check: shuffle the patches of an image, and the model's predictions change; shuffle the
# token-MLP weights the same way in every block (fc1's columns, fc2's rows and bias) and the
# logits return, to float64 rounding. Mean pooling at the end does not care about order.

# %%
small = mm.get_config("mixer_s32_224", embed_dim=32, num_blocks=2, num_classes=10)
net = {k: v + 0.05 * rng.standard_normal(v.shape) for k, v in mm.init_params(small, seed=1, dtype="float64").items()}
img = rng.standard_normal((2, 3, 224, 224))
perm = rng.permutation(small.num_patches)


def permute_patches(images, order):
    patches = layers.patchify(images, small.patch_size)  # (B, N, C·P·P)
    return layers.unpatchify(patches[:, order], images.shape, small.patch_size)


def permute_token_mlps(prm, order):
    out = dict(prm)
    for i in range(small.num_blocks):
        out[f"blocks.{i}.mlp_tokens.fc1.weight"] = prm[f"blocks.{i}.mlp_tokens.fc1.weight"][:, order]  # (DS, N)
        out[f"blocks.{i}.mlp_tokens.fc2.weight"] = prm[f"blocks.{i}.mlp_tokens.fc2.weight"][order]  # (N, DS)
        out[f"blocks.{i}.mlp_tokens.fc2.bias"] = prm[f"blocks.{i}.mlp_tokens.fc2.bias"][order]  # (N,)
    return out


logits = mm.mixer_forward(net, img, small)[0]
shuffled = mm.mixer_forward(net, permute_patches(img, perm), small)[0]
both = mm.mixer_forward(permute_token_mlps(net, perm), permute_patches(img, perm), small)[0]
print(f"patches shuffled, weights not:   max |Δ logits| = {np.abs(shuffled - logits).max():.2e}")
print(f"patches and token MLPs shuffled: max |Δ logits| = {np.abs(both - logits).max():.1e}")
assert np.abs(both - logits).max() < 1e-12 < 1e-3 < np.abs(shuffled - logits).max()

# %% [markdown]
# The same fact explains the paper's permuted-pixels experiment (§3.4, and notebook 5): a Mixer
# trained on images whose patches are all shuffled by one fixed permutation is just the same Mixer
# with its token weights shuffled. (The paper also shuffles the pixels inside each patch by one
# fixed permutation; the stem, a linear map of the flattened patch, absorbs that by permuting its
# columns.) So the Mixer learns as well as on natural images; the paper's ResNet does not.
#
# ## Cost: linear in the number of tokens
# Per image and per block, the token MLP does 2·N·DS·D multiply-accumulates (fc1 and fc2), linear
# in N for a fixed DS. Self-attention's two N×N products (QKᵀ and A·V) cost 2·N²·D, quadratic
# (plus 4·N·D² for its Q, K, V and output projections, like the channel MLP's 2·N·D·DC, linear).
# For B/16 (D = 768, DS = 384, DC = 3072):

# %%
def mixing_macs(px, P=16, D=768, DS=384, DC=3072):
    N = (px // P) ** 2
    return N, 2 * N * DS * D, N * N * D, 2 * N * N * D, 2 * N * D * DC


print(f"{'px':>4} {'N':>4} {'token MLP':>11} {'QKᵀ (N²D)':>11} {'QKᵀ+AV':>11} {'channel MLP':>12}   (MMACs per block)")
for px in (224, 384, 448):
    N_, tok_macs, qk, attn, ch = mixing_macs(px)
    print(f"{px:4d} {N_:4d} {tok_macs / 1e6:11.1f} {qk / 1e6:11.1f} {attn / 1e6:11.1f} {ch / 1e6:12.1f}")

# %% [markdown]
# Going from 224 to 448 px multiplies N by 4: the token MLP's cost by 4 (×2.9 from 224 to 384),
# attention's N² terms by 16. At 224 px attention's mixing is the cheaper of the two; the curves
# cross where 2·N·DS·D = 2·N²·D, at N = DS = 384 tokens; attention costs more from N = 385 on, a
# side of about 314 px for P = 16 (exercise 3.2). In practice the channel MLP dominates both.
#
# ## Higher resolution: the token MLP is tied to N
# Since `fc1.weight` is (DS, N), a new resolution needs a new token MLP. The paper's Appendix C
# builds it from the pretrained one, block-diagonally over K×K *spatial* parts of the patch grid
# (tokens are row-major over the whole grid, so a part is not a contiguous run of the sequence).
# Notebook 8 (`08_fine_tuning_at_another_resolution.py`) builds it, draws it on the patch grid,
# checks the identity it implies and fine-tunes with it.

# %% [markdown]
# ## Exercises
# Write the code where the cell says so; the `assert` judges it. The graded versions (token and
# channel mixing forward/backward, the block) are assignment A2: `python -m minimixer.coursework check`.
#
# **Exercise 3.1.** *Untie* the token MLP: give every channel its own fc1 and fc2 (a depthwise
# convolution without the sharing). Write `token_mlp_params(cfg, tied)`: the token-mixing parameters
# of one block, shared (`tied=True`) or untied. Then compare the two for Mixer-B/16.

# %%
with course.exercise("3.1"):
    def token_mlp_params(cfg, tied=True):
        ### BEGIN SOLUTION
        N, DS = cfg.num_patches, cfg.token_hidden
        shared = DS * N + DS + N * DS + N  # fc1 weight, fc1 bias, fc2 weight, fc2 bias
        return shared if tied else cfg.embed_dim * shared
        ### END SOLUTION

    for name in ("mixer_s32_224", "mixer_b16_224", "mixer_l16_224"):
        c = mm.get_config(name)
        shapes = mm.param_shapes(c)
        assert token_mlp_params(c) == sum(int(np.prod(shapes[f"blocks.0.mlp_tokens.{k}"]))
                                          for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")), name
        assert token_mlp_params(c, tied=False) == c.embed_dim * token_mlp_params(c), name
    b16 = mm.get_config("mixer_b16_224")
    print(f"B/16 token MLP per block: shared {token_mlp_params(b16):,}, untied {token_mlp_params(b16, False):,}")

# %% [markdown]
# **Exercise 3.2.** At what number of tokens, and what image side, does attention's token mixing
# (2·N²·D) start to cost more than the token MLP's (2·N·DS·D) for B/16? Write
# `first_costlier(D, DS)`, the smallest N where attention costs more, by counting MACs (not by algebra).

# %%
with course.exercise("3.2"):
    def first_costlier(D, DS):
        ### BEGIN SOLUTION
        N = np.arange(1, 100 * DS)
        return int(N[2 * N ** 2 * D > 2 * N * DS * D][0])
        ### END SOLUTION

    for D_, DS_ in ((768, 384), (512, 256), (1024, 512), (10, 3)):
        n = first_costlier(D_, DS_)
        assert 2 * n * n * D_ > 2 * n * DS_ * D_ and 2 * (n - 1) ** 2 * D_ <= 2 * (n - 1) * DS_ * D_, (D_, DS_)
    n = first_costlier(768, 384)
    print(f"B/16: attention costs more from N = {n} tokens, a side of about {np.sqrt(n) * 16:.0f} px")

# %% [markdown]
# **Exercise 3.3.** Repeat the permutation test with a *different* permutation for the patches
# and for the weights. Predict first: do the logits come back?
#
# <!-- BEGIN ANSWER -->
# *Answer:* no: they change by about as much as with no weight permutation at all, because each
# token now meets another token's weights.
# <!-- END ANSWER -->

# %%
with course.exercise("3.3"):
    ### BEGIN SOLUTION
    other_perm = rng.permutation(small.num_patches)
    wrong = mm.mixer_forward(permute_token_mlps(net, other_perm), permute_patches(img, perm), small)[0]
    ### END SOLUTION
    print(f"mismatched permutations: max |Δ logits| = {np.abs(wrong - logits).max():.2e}")
    assert not np.array_equal(other_perm, perm) and np.abs(wrong - logits).max() > 1e-3

# %% [markdown]
# # 1. Patches and the stem
#
# **Needs:** assignment A1's `linear_forward` (the stem is a linear layer). In the student edition,
# the first cell that reaches a function you have not written stops with one line that names it.
#
# MLP-Mixer first cuts an image into non-overlapping P×P patches and projects each patch, one
# linear layer shared by all of them, to a D-dimensional token. timm writes this "stem" as a
# `Conv2d(3, D, kernel_size=P, stride=P)`. minimixer writes it the way the paper says it:
# extract the patches, then a matrix multiply.
#
# We use Mixer-S/16 here: 224×224 images, P = 16 and D = 512, a 14×14 grid, so **N = 196 tokens** of
# 512 channels. (With B/16 a flattened patch has 3·16·16 = 768 values and D is also 768, so patches
# and tokens would print the same shape and hide which axis is which. S/16 keeps them apart.)
#
# **Notation.** The paper and the code name the same things differently, and one letter collides:
#
# | paper | code | meaning | S/16 | B/16 |
# |---|---|---|---|---|
# | S | `N` (`cfg.num_patches`) | number of patches = tokens | 196 | 196 |
# | C | `D` (`cfg.embed_dim`) | hidden channels per token | 512 | 768 |
# | D_S | `DS` (`cfg.token_hidden`) | token-mixing MLP width | 256 | 384 |
# | D_C | `DC` (`cfg.channel_hidden`) | channel-mixing MLP width | 2048 | 3072 |
# | P | `P` (`cfg.patch_size`) | patch side in pixels | 16 | 16 |
# | (3) | `C` (`cfg.in_chans`) | input colour channels | 3 | 3 |
#
# In the code, `C` is the image's colour channels; the paper's C is our `D`.

# %%
import course

course.setup()
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import minimixer as mm
from minimixer import layers
from minimixer.data import eval_transform, open_image

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
cfg = mm.get_config("mixer_s16_224")
print(f"image {cfg.image_hw}, patch {cfg.patch_size}, grid {cfg.grid_size}, N = {cfg.num_patches}, D = {cfg.embed_dim}, "
      f"DS = {cfg.token_hidden}, DC = {cfg.channel_hidden}")

# %% [markdown]
# A real photo, prepared exactly as timm prepares ImageNet validation images. The shorter side is
# resized to 256, the center 224×224 is kept, and the values are mapped to [-1, 1]
# (mean = std = 0.5). Then we draw the patch grid the model sees.

# %%
photo = open_image(ROOT / "tests" / "images" / "china.jpg")
x = eval_transform(224)(photo)  # (3, 224, 224), normalized
print("input", x.shape, x.dtype, f"range [{x.min():.2f}, {x.max():.2f}]")

fig, ax = plt.subplots(figsize=(5, 5))
ax.imshow((x.transpose(1, 2, 0) + 1) / 2)
for k in range(0, 225, cfg.patch_size):
    ax.axhline(k - 0.5, color="w", lw=0.6)
    ax.axvline(k - 0.5, color="w", lw=0.6)
ax.set_title("14 × 14 patches of 16 × 16 pixels = 196 tokens")
ax.axis("off")
plt.show()

# %% [markdown]
# `patchify` turns the image into one row per patch. The patches run in row-major (h, w) order,
# and each one is flattened in (channel, row, column) order. That is the layout of the conv
# weight `(D, C, P, P)`, so `W.reshape(D, -1)` is the projection matrix.

# %%
patches = layers.patchify(x[None], cfg.patch_size)  # (1, 196, 768)
print("patches", patches.shape, "= (B, N, C·P·P) with C·P·P = 3·16·16 = 768")

fig, axes = plt.subplots(2, 7, figsize=(9, 3))
for k, ax in enumerate(axes.flat):  # the first two rows of the grid: patches 0..6 and 14..20
    idx = k if k < 7 else 14 + k - 7
    ax.imshow((patches[0, idx].reshape(3, 16, 16).transpose(1, 2, 0) + 1) / 2)
    ax.set_title(f"token {idx}", fontsize=8)
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# The stem as a matrix multiply gives the same result as the stride-16 convolution. Here the
# convolution is written out as a loop over the grid, and we print the largest difference:

# %%
rng = np.random.default_rng(0)
w = rng.standard_normal((cfg.embed_dim, 3, 16, 16)).astype(np.float32) * 0.02
b = rng.standard_normal(cfg.embed_dim).astype(np.float32) * 0.1
tokens, cache = layers.patch_embed_forward(x[None], w, b, cfg.patch_size)  # (1, 196, 512)

conv = np.empty((14, 14, cfg.embed_dim), np.float32)
for i in range(14):
    for j in range(14):
        window = x[:, 16 * i:16 * (i + 1), 16 * j:16 * (j + 1)]  # (3, 16, 16)
        conv[i, j] = np.einsum("chw,dchw->d", window, w) + b
print("tokens", tokens.shape, "= (B, N, D)   max |matmul - conv| =", float(np.abs(tokens[0] - conv.reshape(196, -1)).max()))

# %% [markdown]
# Its backward pass folds the patch gradients back into image positions (`unpatchify`). Cutting an
# image into patches and folding them back returns the same image:

# %%
print("unpatchify(patchify(x)) == x:", np.array_equal(layers.unpatchify(patches, (1, 3, 224, 224), 16), x[None]))

# %% [markdown]
# ## Exercises
# Write the code where the cell says so; the `assert` at the end of the cell judges it. (In the full
# package the answers are filled in; the student edition leaves them to you.) The graded layers are
# the coursework: `python -m minimixer.coursework check`.
#
# **Exercise 1.1.** Write `patchify` with two loops over the patch grid (no reshapes across
# patches). It must equal `layers.patchify` exactly, because it only moves numbers.

# %%
with course.exercise("1.1"):
    def patchify_loop(images, P):
        ### BEGIN SOLUTION
        B, C, H, W = images.shape
        rows = []
        for i in range(H // P):  # grid row
            for j in range(W // P):  # grid column: row-major (h, w) token order
                rows.append(images[:, :, P * i:P * (i + 1), P * j:P * (j + 1)].reshape(B, -1))  # (B, C·P·P)
        return np.stack(rows, axis=1)  # (B, N, C·P·P)
        ### END SOLUTION

    assert np.array_equal(patchify_loop(x[None], 16), patches)
    small = np.random.default_rng(1).standard_normal((2, 3, 12, 8))
    assert np.array_equal(patchify_loop(small, 4), layers.patchify(small, 4))
    print("patchify_loop == layers.patchify: exact")

# %% [markdown]
# **Exercise 1.2.** Without running the model, from the config's image size, patch size and width
# alone: write `stem_numbers(cfg)` returning the number of tokens, the length of a flattened patch,
# and the stem's parameter count (weight and bias). The cell checks it on four variants.

# %%
with course.exercise("1.2"):
    def stem_numbers(cfg):
        ### BEGIN SOLUTION
        (H, W), P, C, D = cfg.image_hw, cfg.patch_size, cfg.in_chans, cfg.embed_dim
        return (H // P) * (W // P), C * P * P, D * C * P * P + D
        ### END SOLUTION

    for name in ("mixer_s32_224", "mixer_s16_224", "mixer_b16_224", "mixer_l16_224"):
        c = mm.get_config(name)
        shapes = mm.param_shapes(c)
        assert stem_numbers(c) == (c.num_patches, c.in_chans * c.patch_size ** 2,
                                   int(np.prod(shapes["stem.proj.weight"])) + shapes["stem.proj.bias"][0]), name
        print(f"{name}: N, C·P·P, stem parameters = {stem_numbers(c)}")

# %% [markdown]
# # 1. Patches and the stem
#
# MLP-Mixer first cuts an image into non-overlapping P×P patches and projects each patch, one
# linear layer shared by all of them, to a D-dimensional token. timm writes this "stem" as a
# `Conv2d(3, D, kernel_size=P, stride=P)`. minimixer writes it the way the paper says it:
# extract the patches, then a matrix multiply.
#
# Mixer-B/16 takes 224×224 images, P = 16 and D = 768: a 14×14 grid, so **N = 196 tokens** of 768 channels.

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import minimixer as mm
from minimixer import layers
from minimixer.data import eval_transform, open_image

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
cfg = mm.get_config("mixer_b16_224")
print(f"image {cfg.image_hw}, patch {cfg.patch_size}, grid {cfg.grid_size}, N = {cfg.num_patches}, D = {cfg.embed_dim}")

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
print("patches", patches.shape, "= (B, N, C·P·P)")

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
tokens, cache = layers.patch_embed_forward(x[None], w, b, cfg.patch_size)  # (1, 196, 768)

conv = np.empty((14, 14, cfg.embed_dim), np.float32)
for i in range(14):
    for j in range(14):
        window = x[:, 16 * i:16 * (i + 1), 16 * j:16 * (j + 1)]  # (3, 16, 16)
        conv[i, j] = np.einsum("chw,dchw->d", window, w) + b
print("tokens", tokens.shape, " max |matmul - conv| =", float(np.abs(tokens[0] - conv.reshape(196, -1)).max()))

# %% [markdown]
# Its backward pass folds the patch gradients back into image positions (`unpatchify`). Cutting an
# image into patches and folding them back returns the same image:

# %%
print("unpatchify(patchify(x)) == x:", np.array_equal(layers.unpatchify(patches, (1, 3, 224, 224), 16), x[None]))

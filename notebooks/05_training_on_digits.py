# %% [markdown]
# # 5. Training a Mixer on the digits
#
# The hand-written backward passes exist so that we can train. This notebook trains a small Mixer on
# the 8×8 handwritten digits bundled with minimixer, with AdamW, warmup and cosine decay, and
# gradient clipping. The trainer is the same code that `python -m minimixer.train` runs. The model
# takes 8×8 one-channel images in 2×2 patches, so N = 16 tokens, and has D = 64 and 4 blocks.
#
# Then we look inside it. As in the paper's Figure 5, each token-mixing hidden unit's weights over
# the 4×4 patch grid are drawn as a small image.

# %%
import tempfile
import time

import matplotlib.pyplot as plt
import numpy as np

import minimixer as mm
from minimixer.checkpoints.registry import BUNDLED_DIGITS
from minimixer.data import ArrayLoader, digits_split
from minimixer.train_loop import TrainSettings, evaluate, fit

x_train, y_train, x_test, y_test = digits_split()
print(f"train {x_train.shape}, test {x_test.shape}")
fig, axes = plt.subplots(1, 10, figsize=(10, 1.3))
for d, ax in enumerate(axes):
    ax.imshow(x_train[np.flatnonzero(y_train == d)[0], 0], cmap="gray_r")
    ax.set_title(str(d))
    ax.axis("off")
plt.show()

# %%
cfg = mm.get_config("mixer_digits")
settings = TrainSettings(epochs=12, batch_size=64, lr=2e-3, warmup=1.0, weight_decay=0.05, clip_grad=1.0, seed=0)
params = mm.init_params(cfg, seed=0)
out = tempfile.mkdtemp()
t0 = time.perf_counter()
metrics = fit(params, cfg, settings, ArrayLoader(x_train, y_train, 64, shuffle=True, seed=0),
              ArrayLoader(x_test, y_test, 256), out, progress=False, log=lambda s: None)
print(f"{settings.epochs} epochs in {time.perf_counter() - t0:.1f} s; final test top-1 {metrics[-1]['test_top1']:.2f}%")

# %%
epochs = [m["epoch"] for m in metrics]
fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
a1.plot(epochs, [m["train_loss"] for m in metrics], label="train")
a1.plot(epochs, [m["test_loss"] for m in metrics], label="test")
a1.set_xlabel("epoch")
a1.set_ylabel("cross-entropy")
a1.set_yscale("log")
a1.legend()
a2.plot(epochs, [m["test_top1"] for m in metrics], marker="o")
a2.set_xlabel("epoch")
a2.set_ylabel("test top-1 (%)")
plt.tight_layout()
plt.show()

# %% [markdown]
# **Token-mixing weights** (the paper's Figure 5). `blocks.0.mlp_tokens.fc1.weight` has shape
# (DS = 32, N = 16). Each row is one hidden unit's weights over the 16 patch positions, and it
# reshapes to the 4×4 grid. We draw them for the bundled model, which trained for 30 epochs.
# A 4×4 grid is much coarser than the paper's 14×14, so expect rough patterns: units that weight
# one region of the digit against another, or single positions. The last row is the random
# initialization, for comparison.

# %%
shipped = mm.load_weights(BUNDLED_DIGITS, cfg)  # minimixer/assets/mixer_digits.safetensors
print("bundled model:", evaluate(shipped, cfg, ArrayLoader(x_test, y_test, 256)))
initial = mm.init_params(cfg, seed=0)
rows = [("block 0, trained", shipped["blocks.0.mlp_tokens.fc1.weight"]),
        ("block 3, trained", shipped["blocks.3.mlp_tokens.fc1.weight"]),
        ("block 0, at init", initial["blocks.0.mlp_tokens.fc1.weight"])]
fig, axes = plt.subplots(len(rows), 16, figsize=(12, 2.6))
for (title, w), row in zip(rows, axes):
    for unit, ax in enumerate(row):  # the first 16 of the 32 hidden units
        ax.imshow(w[unit].reshape(cfg.grid_size), cmap="RdBu_r", vmin=-np.abs(w).max(), vmax=np.abs(w).max())
        ax.axis("off")
    row[0].set_title(title, fontsize=8, loc="left")
fig.suptitle("token-mixing fc1: one 4×4 patch grid per hidden unit", y=1.02)
plt.show()

# %% [markdown]
# # 5. Training a Mixer on the digits
#
# **Needs:** assignments A1, A2 and A3 (training runs your backward passes and your AdamW).
#
# The hand-written backward passes exist so that we can train. This notebook trains a small Mixer on
# the 8×8 handwritten digits bundled with minimixer, with AdamW, warmup and cosine decay, and
# gradient clipping. The trainer is the same code that `python -m minimixer.train` runs. The model
# takes 8×8 one-channel images in 2×2 patches, so N = 16 tokens, and has D = 64 and 4 blocks.
#
# Then we look inside a Mixer, as the paper's Figure 5 does: each token-mixing hidden unit's
# weights over the patch grid, drawn as a small image. That needs a finer grid than 4×4, so the
# second half loads two models trained for the purpose (patch size 1, an 8×8 grid) by
# `notebooks/fig5_digits.py`, and compares them honestly with their initialization.

# %%
import course

course.setup()
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from threadpoolctl import threadpool_limits

import minimixer as mm
from minimixer import fast
from minimixer.checkpoints.registry import BUNDLED_DIGITS
from minimixer.data import ArrayLoader, digits_split
from minimixer.training.loop import fit
from minimixer.training.metrics import evaluate
from minimixer.training.settings import TrainSettings

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
sys.path.insert(0, str(ROOT / "notebooks"))
import fig5_digits as fig5  # noqa: E402  the Fig. 5 models' training script and measures
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
# the student edition runs the clear path (model.py), about 6 times slower than the full package's fast path
epochs = 3 if getattr(fast, "STUDENT_EDITION", False) else 8
settings = TrainSettings(epochs=epochs, batch_size=64, lr=2e-3, warmup=1.0, weight_decay=0.05, clip_grad=1.0, seed=0)
params = mm.init_params(cfg, seed=0)
out = tempfile.mkdtemp()
t0 = time.perf_counter()
with threadpool_limits(1):  # matrices this small run fastest on one BLAS thread
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
# ## Inside the bundled model: a 4×4 grid shows its initialization
# The bundled `mixer_digits` model (2×2 patches, so a 4×4 grid of N = 16 tokens) trained for 30
# epochs. Its token-mixing weights barely left their random start: the correlation between
# trained and initial weights is printed below. Drawing them as "learned" units would show the
# random initialization. We need a finer grid, augmentation, and a look at W − W₀.

# %%
bundled = mm.load_weights(BUNDLED_DIGITS, cfg)
print("bundled model:", {k: round(v, 2) for k, v in evaluate(bundled, cfg, ArrayLoader(x_test, y_test, 256)).items()})
initial = mm.init_params(cfg, seed=0)
for i in range(cfg.num_blocks):
    k = f"blocks.{i}.mlp_tokens.fc1.weight"
    print(f"  {k}: correlation with its initialization {fig5.correlation(bundled[k], initial[k]):.2f}")

# %% [markdown]
# ## Figure 5, with learned structure
# `notebooks/fig5_digits.py` trains a Mixer with **patch size 1**: every pixel is a token, so the
# token-mixing weights live on the full 8×8 grid (N = 64, D = 32, DS = 32, DC = 128, 2 blocks).
# It trains 100 epochs with AdamW (lr 1e-2, weight decay 0.2) and **translation augmentation**,
# random shifts of up to 2 pixels, which the paper's §3.5 reports strongly shapes the units. The
# trained weights ship in `notebooks/assets/` (about 105 KB each); retraining both models takes
# about four minutes (`python notebooks/fig5_digits.py`). Both start from `init_params(seed=0)`,
# so we can compare with the exact initial weights W₀.
#
# Two numbers judge the figure honestly:
# - the **correlation with the initialization**, corr(W, W₀): near 1 means the picture is mostly
#   the random start (the bundled model above);
# - the **neighbour correlation**: the correlation between the weights of adjacent grid positions,
#   pooled over all units. Random initial weights give about 0; smooth, spatially structured
#   units give a clearly positive value.

# %%
natural, meta = fig5.load("natural")
W0 = {b: fig5.init_weights(b) for b in range(fig5.CFG.num_blocks)}
acc = evaluate(natural, fig5.CFG, ArrayLoader(x_test, y_test, 256))["top1"]
print(f"patch-1 model: test top-1 {acc:.2f}% (trained: {meta['test_top1']}%)")
stats = {}
for b in range(fig5.CFG.num_blocks):
    W = natural[f"blocks.{b}.mlp_tokens.fc1.weight"]
    stats[b] = (fig5.correlation(W, W0[b]), fig5.neighbour_correlation(W), fig5.neighbour_correlation(W0[b]))
    print(f"  block {b} token fc1: corr(W, W₀) = {stats[b][0]:.2f};  neighbour correlation {stats[b][1]:.2f} "
          f"(at init {stats[b][2]:.2f}; of W − W₀: {fig5.neighbour_correlation(W - W0[b]):.2f})")
assert stats[0][0] < 0.5 and stats[0][1] > stats[0][2] + 0.2


# %% [markdown]
# Why is W − W₀ so much less smooth than W? Weight decay (0.2, with lr 1e-2) shrank the initial
# weights: by least squares W ≈ β·W₀ + R with β ≈ 0.23, so W − W₀ = R − (1 − β)·W₀ still contains
# most of the *removed* initialization, which is noise. The part training added, R = W − β·W₀,
# is as smooth as W itself:

# %%
W = natural["blocks.0.mlp_tokens.fc1.weight"]
beta = float((W * W0[0]).sum() / (W0[0] * W0[0]).sum())
R = W - beta * W0[0]
print(f"block 0: β = {beta:.2f}, |β·W₀| = {np.linalg.norm(beta * W0[0]):.1f}, |R| = {np.linalg.norm(R):.1f}, "
      f"neighbour correlation of R {fig5.neighbour_correlation(R):.2f}")

# %% [markdown]
# The paper's presentation: units sorted by the centroid of their spatial spectrum (smooth units
# first, checkerboard-like last), each shown with its most anti-correlated partner. Below, each
# pair is a unit above its partner (16 pairs, in rows of 8), and every tile shares **one symmetric colour scale**:
# blue negative, white zero, red positive. The three panels show the same 32 units of block 0: the
# trained weights W, the change W − W₀, and R = W − β·W₀, what training added.
#
# **What to see.** In W and R the units on the left are smooth blobs and stripes over the 8×8
# grid, and they get finer towards the right. Partners lean opposite (red where the other is blue),
# though far from exact negatives: the printed mean correlation within the pairs says how far.
# W − W₀ is speckled: it still holds the initialization that weight decay removed.

# %%
def draw_units(subfig, W, grid, pairs, title, lim, cols=8):
    """Pairs in rows of `cols`: each pair a unit (top) over its most anti-correlated partner (bottom)."""
    rows = -(-len(pairs) // cols)
    ratios = [1, 1, 0.3] * rows  # a thin empty row between the rows of pairs
    axes = subfig.subplots(3 * rows, cols, gridspec_kw=dict(height_ratios=ratios[:-1] + [0.01], wspace=0.08, hspace=0.08))
    for ax in axes.flat:
        ax.axis("off")
    for k, (u, v, _) in enumerate(pairs):
        r, c = divmod(k, cols)
        for ax, unit in ((axes[3 * r, c], u), (axes[3 * r + 1, c], v)):
            im = ax.imshow(W[unit].reshape(grid), cmap="RdBu_r", vmin=-lim, vmax=lim)
    subfig.suptitle(title, fontsize=12)
    return im


def fig5_figure(panels, grid, pairs, cols=8):
    """panels: [(W, title)], drawn on one shared symmetric scale with one colour bar."""
    lim = max(float(np.percentile(np.abs(W[[u for p_ in pairs for u in p_[:2]]]), 99)) for W, _ in panels)
    rows = -(-len(pairs) // cols)
    fig = plt.figure(figsize=(8.5, (2.3 * rows + 0.5) * len(panels)), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[30, 1])
    for sub, (W, title) in zip(np.atleast_1d(left.subfigures(len(panels), 1, hspace=0.06)), panels):
        im = draw_units(sub, W, grid, pairs, title, lim, cols)
    right.colorbar(im, cax=right.add_axes([0.05, 0.1, 0.4, 0.8]), label="weight (one scale for every tile)")
    plt.show()


pairs = fig5.paired_order(W)
print("mean correlation within the pairs:", round(float(np.mean([c for _, _, c in pairs])), 2))
fig5_figure([(W, "block 0, trained weights W (pairs sorted by spectral centroid: smooth on the left)"),
             (W - W0[0], "block 0, W − W₀: the change from the initialization (same units)"),
             (R, "block 0, R = W − β·W₀: what training added (same units)")], (8, 8), pairs)

# %% [markdown]
# Block 1 is much less smooth (neighbour correlation 0.10 against 0.44), as the paper's §3.5
# notes for deeper blocks: there the tokens are no longer pixels but features already mixed once.

# %%
W1 = natural["blocks.1.mlp_tokens.fc1.weight"]
fig5_figure([(W1, "block 1, trained weights W")], (8, 8), fig5.paired_order(W1))

# %% [markdown]
# ## The paper's control: pixels shuffled by one fixed permutation
# The second shipped model trained the same way on images whose 64 pixels were all shuffled by
# one fixed permutation (after the shift). Notebook 3 showed why Mixer cannot tell the difference:
# permuting the tokens and the token-MLP weights alike changes nothing. So its accuracy should
# match, its raw weights (in the shuffled order) should look like noise, and un-shuffling their
# columns back to image order should show the same kind of structure as above.

# %%
permuted, pmeta = fig5.load("permuted")
perm = np.array(pmeta["permutation"])
acc_p = evaluate(permuted, fig5.CFG, ArrayLoader(fig5.permute_pixels(x_test, perm), y_test, 256))["top1"]
Wp = permuted["blocks.0.mlp_tokens.fc1.weight"]  # column j acts on pixel perm[j]
Wp_image = Wp[:, np.argsort(perm)]  # back to image order
print(f"test top-1: natural {acc:.2f}%, permuted {acc_p:.2f}%")
print(f"block 0 neighbour correlation: raw (shuffled order) {fig5.neighbour_correlation(Wp):.2f}, "
      f"un-shuffled {fig5.neighbour_correlation(Wp_image):.2f}  (natural model {stats[0][1]:.2f}); "
      f"corr(W, W₀) = {fig5.correlation(Wp, W0[0]):.2f}")
pairs_p = fig5.paired_order(Wp_image)
fig5_figure([(Wp, "permuted-pixels model, block 0, as trained (pixels in shuffled order): noise"),
             (Wp_image, "the same units, columns put back in image order: smooth again")], (8, 8), pairs_p)

# %% [markdown]
# ## The real Mixer-B/16, when its weights are here
# With `weights/mixer_b16_224.goog_in21k_ft_in1k.safetensors` in place (240 MB; see weights/README.md),
# the same drawing of its first block's 14×14 units. The paper's Fig. 5 shows a JFT-300M model;
# this one was trained on ImageNet-21k and fine-tuned on ImageNet-1k.

# %%
real = [f for f in (ROOT / "weights" / "mixer_b16_224.goog_in21k_ft_in1k.safetensors",
                    ROOT / "weights" / "mixer_b16_224.safetensors") if f.exists()]
if real:
    b16 = mm.get_config("mixer_b16_224")
    Wb = mm.load_weights(real[0], b16)["blocks.0.mlp_tokens.fc1.weight"]  # (384, 196)
    print(f"B/16 block 0: neighbour correlation {fig5.neighbour_correlation(Wb, (14, 14)):.2f}")
    pb = fig5.paired_order(Wb, (14, 14))
    fig5_figure([(Wb, "Mixer-B/16, block 0: the 16 smoothest pairs")], (14, 14), pb[:16])
else:
    print("no B/16 weights in weights/: skipping its units (this is fine offline)")

# %% [markdown]
# ## Exercises
# Write the code where the cell says so; the `assert` judges it. The training step's pieces (the loss
# and AdamW) are graded in assignment A3 of the coursework.
#
# **Exercise 5.1.** Predict `spectral_centroid` for two 8×8 units before running it: a cosine with
# one cycle across the grid horizontally, and a checkerboard. Write your two numbers as `predicted`.

# %%
col = np.arange(8)
cosine = np.tile(np.cos(2 * np.pi * col / 8), (8, 1))
checker = (-1.0) ** (col[:, None] + col[None, :])
with course.exercise("5.1"):
    ### BEGIN SOLUTION
    predicted = (1.0, 4 * np.sqrt(2))  # one cycle: frequency 1; the checkerboard: (4, 4), |(4, 4)| = 4√2
    ### END SOLUTION
    cent = fig5.spectral_centroid(np.stack([cosine.ravel(), checker.ravel()]))
    print("spectral centroids:", np.round(cent, 3))
    assert np.allclose(cent, predicted)

# %% [markdown]
# **Exercise 5.2.** The permuted-pixels model reaches the natural model's accuracy. Measure what it
# scores on the *un*-permuted test images (`acc_wrong`, in %), and explain the number.
#
# <!-- BEGIN ANSWER -->
# *Answer:* far lower (below 50%): its token weights are tied to the shuffled positions, so on natural
# images every token meets another position's weights.
# <!-- END ANSWER -->

# %%
with course.exercise("5.2"):
    ### BEGIN SOLUTION
    acc_wrong = evaluate(permuted, fig5.CFG, ArrayLoader(x_test, y_test, 256))["top1"]
    ### END SOLUTION
    print(f"permuted model on natural images: {acc_wrong:.1f}%")
    assert abs(acc_wrong - evaluate(permuted, fig5.CFG, ArrayLoader(x_test, y_test, 256))["top1"]) < 1e-9

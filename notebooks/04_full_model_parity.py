# %% [markdown]
# # 4. The whole model: block, head, loss, optimizer, and exact parity with timm
#
# **Needs:** assignments A1, A2 and A3 (the loss and AdamW).
#
# Notebooks 2 and 3 built the layers. This one assembles them, in two parts.
#
# **Part A** (no torch needed) walks through `model.py` on a tiny config in float64: the block
# with its pre-norm and residuals, the final LayerNorm and mean pool, the zero-initialized head,
# the cross-entropy loss and AdamW, and a central-difference check of `mixer_forward` /
# `mixer_backward` on every parameter.
#
# **Part B** compares minimixer with timm's `MlpMixer` itself: live if timm is installed, otherwise
# against the reference outputs and gradients timm wrote into `tests/fixtures/`.

# %%
import course

course.setup()
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import minimixer as mm
from minimixer import layers
from minimixer.checkpoints.registry import class_names
from minimixer.data import eval_transform, open_image
from minimixer.optim import AdamW, bias_and_norm

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
rng = np.random.default_rng(0)
tiny = mm.MixerConfig(num_classes=5, img_size=(6, 8), in_chans=2, patch_size=2, num_blocks=2, embed_dim=6)
N, D, DS, DC = tiny.num_patches, tiny.embed_dim, tiny.token_hidden, tiny.channel_hidden
print(f"tiny config: N = {N}, D = {D}, DS = {DS}, DC = {DC}, {tiny.num_blocks} blocks, "
      f"{mm.param_count(tiny)} parameters")

# %% [markdown]
# ## The block: pre-norm and two residuals
# `layers.mixer_block_forward` is the paper's equations (1) and (2):
#
# ```
# u   = x + TokenMixing(LayerNorm₁(x))        # x + (MLP₁(LN(x)ᵀ))ᵀ
# out = u + ChannelMixing(LayerNorm₂(u))      # u + MLP₂(LN(u))
# ```
#
# The LayerNorm sits *inside* each branch (pre-norm), so the residual stream x → u → out is never
# normalized: it carries the input straight through every block. Backward reverses the two lines,
# and each residual becomes one `+=`, because a value that feeds two places receives the sum of
# both gradients:
#
# ```
# du  = ChannelMixing_backward(dout)  ;  du += dout     # out = u + C(u): two paths from u
# dx  = TokenMixing_backward(du)      ;  dx += du       # u   = x + T(x): two paths from x
# ```
#
# A quick way to see the residuals: with the two fc2 layers set to zero, each branch outputs
# exactly zero, so the block is the identity and its backward passes `dout` through unchanged.

# %%
p = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in mm.model.block_params(mm.init_params(tiny, dtype="float64"), 0).items()}
x = rng.standard_normal((3, N, D))
dout = rng.standard_normal(x.shape)
silent = dict(p, **{k: np.zeros_like(p[k]) for k in ("mlp_tokens.fc2.weight", "mlp_tokens.fc2.bias",
                                                     "mlp_channels.fc2.weight", "mlp_channels.fc2.bias")})
out, cache = layers.mixer_block_forward(x, silent)
dx, _ = layers.mixer_block_backward(dout, cache)
print("fc2 = 0: block(x) == x:", np.array_equal(out, x), "  dx == dout:", np.array_equal(dx, dout))

out, cache = layers.mixer_block_forward(x, p)
dx, grads = layers.mixer_block_backward(dout, cache)
h = 1e-6
worst = 0.0
for i in [(0, 0, 0), (1, 5, 3), (2, 11, 5)]:
    xp_, xm_ = x.copy(), x.copy()
    xp_[i] += h
    xm_[i] -= h
    numeric = ((layers.mixer_block_forward(xp_, p)[0] - layers.mixer_block_forward(xm_, p)[0]) * dout).sum() / (2 * h)
    worst = max(worst, abs(numeric - dx[i]) / abs(dx[i]))
print(f"block dx at three entries vs central differences: worst relative error {worst:.1e}")

# %% [markdown]
# ## The head: final LayerNorm, mean over tokens, a zero-initialized linear layer
# After the last block, `model.mixer_forward` applies one more LayerNorm (`norm.*`), averages the
# N tokens (global average pooling) and applies `head`. There is **no class token**: ViT prepends
# a learned token and reads the class from it; Mixer simply averages. The average's backward gives
# every token an equal 1/N share of the gradient:

# %%
pooled, pcache = layers.mean_pool_forward(x)  # (3, D)
dpooled = rng.standard_normal(pooled.shape)
dtokens = layers.mean_pool_backward(dpooled, pcache)  # (3, N, D)
print("mean_pool_backward == dpooled / N on every token:", np.allclose(dtokens, dpooled[:, None, :] / N, rtol=0, atol=1e-15))

# %% [markdown]
# timm initializes `head.weight` and `head.bias` to **zero** (so does `mm.init_params`). A fresh
# model therefore outputs all-zero logits, a uniform prediction, and its loss is exactly ln K.
# And at that first step every gradient below the head is exactly zero too: the gradient reaching
# the pooled features is `dlogits @ head.weight = 0`. Only the head learns in step one; the rest
# starts moving from step two.

# %%
fresh = mm.init_params(tiny, seed=0, dtype="float64")
images = rng.standard_normal((4, tiny.in_chans, *tiny.image_hw))
labels = np.array([0, 3, 1, 4])
logits, cache = mm.mixer_forward(fresh, images, tiny)
loss, dlogits = mm.softmax_cross_entropy(logits, labels)
_, g = mm.mixer_backward(dlogits, cache)
print(f"fresh model: logits all zero: {not logits.any()}, loss {loss:.6f} = ln 5 = {np.log(5):.6f}")
print("nonzero gradients at step one:", sorted(k for k, v in g.items() if np.abs(v).max() > 0))

# %% [markdown]
# ## Cross-entropy and its gradient
# For logits z (one row) and a one-hot target t, softmax pᵢ = e^{zᵢ}/Σⱼe^{zⱼ} and
# L = −Σᵢ tᵢ log pᵢ = −z_y + log Σⱼ e^{zⱼ}. Differentiating, ∂L/∂zᵢ = pᵢ − tᵢ: the prediction
# minus the target. Averaged over a batch of B rows, `dlogits = (softmax(z) − t)/B`, which is what
# `softmax_cross_entropy` returns next to the loss (it subtracts max z first, so exp never overflows).

# %%
z = rng.standard_normal((4, 5)) * 3
loss, dz = mm.softmax_cross_entropy(z, labels)
probs = np.exp(z - z.max(1, keepdims=True))
probs /= probs.sum(1, keepdims=True)
print("dlogits == (softmax - onehot)/B:", np.allclose(dz, (probs - np.eye(5)[labels]) / 4, rtol=0, atol=1e-15))

# %% [markdown]
# ## AdamW
# `optim.AdamW.update` is torch.optim.AdamW, one line per equation: decay the weight
# (p ← p·(1 − lr·wd), *decoupled* from the gradient, which is the W), then the running means
# m ← β₁m + (1 − β₁)g and v ← β₂v + (1 − β₂)g², then p ← p − lr·m̂/(√v̂ + ε) with the bias
# corrections m̂ = m/(1 − β₁ᵗ), v̂ = v/(1 − β₂ᵗ). The trainer exempts biases and LayerNorm weights
# from decay (`optim.bias_and_norm`). On the first step m̂ = g and √v̂ = |g|, so every parameter
# with a nonzero gradient moves by almost exactly lr·sign(g):

# %%
q = {"fc.weight": rng.standard_normal(5), "fc.bias": rng.standard_normal(5)}
q0 = {k: v.copy() for k, v in q.items()}
gq = {"fc.weight": rng.standard_normal(5) * 1e-3, "fc.bias": rng.standard_normal(5) * 1e3}
AdamW(q, lr=0.01, weight_decay=0.1, no_decay=bias_and_norm).step(gq)
step_b = (q["fc.bias"] - q0["fc.bias"]) / 0.01
step_w = (q["fc.weight"] - q0["fc.weight"]) / 0.01
print("gradient signs:              ", np.sign(gq["fc.bias"]), np.sign(gq["fc.weight"]))
print("fc.bias   (no decay):  Δ/lr =", np.round(step_b, 6), " (−sign(g), whatever g's scale)")
print("fc.weight (decay 0.1): Δ/lr =", np.round(step_w, 6), " (−sign(g) − wd·w)")
assert np.allclose(step_b, -np.sign(gq["fc.bias"]), atol=1e-6)
assert np.allclose(step_w, -np.sign(gq["fc.weight"]) - 0.1 * q0["fc.weight"], atol=1e-3)  # up to ε/|g|

# %% [markdown]
# ## `model.py`, checked end to end without torch
# Finally the whole pipeline, forward and backward, against central differences on **every**
# parameter and the input, in float64, with the real loss. Non-trivial parameters (not the zero
# head) so that every path carries signal. `blocks.*.mlp_tokens.fc2.bias` has a zero gradient in
# exact arithmetic (notebook 2, exercise 2.2: every reader of the residual stream is a LayerNorm,
# which removes a per-token constant), so we measure each error against the largest gradient.

# %%
net = {k: v + 0.2 * rng.standard_normal(v.shape) for k, v in mm.init_params(tiny, seed=1, dtype="float64").items()}


def loss_of(prm, imgs):
    return mm.softmax_cross_entropy(mm.mixer_forward(prm, imgs, tiny)[0], labels)[0]


logits, cache = mm.mixer_forward(net, images, tiny)
_, dlogits = mm.softmax_cross_entropy(logits, labels)
dimages, grads = mm.mixer_backward(dlogits, cache)
t0 = time.perf_counter()
h = 1e-6
numeric = {}
for name, value in list(net.items()) + [("input", images)]:
    num = np.zeros_like(value)
    for i in np.ndindex(value.shape):
        old = value[i]
        value[i] = old + h
        fp = loss_of(net, images)
        value[i] = old - h
        fm = loss_of(net, images)
        value[i] = old
        num[i] = (fp - fm) / (2 * h)
    numeric[name] = num
scale = max(np.abs(g).max() for g in grads.values())
errors = {k: np.abs(grads[k] - numeric[k]).max() / scale for k in grads}
worst = max(errors, key=errors.get)
print(f"{len(grads)} parameter tensors, {sum(v.size for v in net.values())} entries, checked in {time.perf_counter() - t0:.1f} s")
print(f"worst |analytic - numeric| / max|grad| = {errors[worst]:.1e} ({worst})")
print(f"input: {np.abs(dimages - numeric['input']).max() / np.abs(dimages).max():.1e}")
print(f"mlp_tokens.fc2.bias gradients: max |grad| = {max(np.abs(grads[f'blocks.{i}.mlp_tokens.fc2.bias']).max() for i in range(2)):.0e} (zero up to rounding)")
assert errors[worst] < 1e-7

# %% [markdown]
# ## Exercises
# Write the code where the cell says so; the `assert` judges it. The graded versions (softmax
# cross-entropy with hard and soft labels and label smoothing, `AdamW.update`) are assignment A3.
#
# **Exercise 4.1.** `blocks.*.mlp_tokens.fc2.bias` has a zero gradient in exact arithmetic; in
# float32 its gradient is rounding noise, about 1e-9 against ~1e-2 for the others. Yet under AdamW
# (no weight decay on biases) it moves by a sizeable fraction of the learning rate at every step.
# Why? The cell below measures the step of that bias and of `head.bias` after one AdamW step on a
# float32 model; explain what it shows.
#
# <!-- BEGIN ANSWER -->
# *Answer:* Adam divides the gradient by its own running RMS, √v̂. A noise-level gradient of size
# 1e-9 divided by an RMS of about 1e-9 is an O(1) step, damped only where ε = 1e-8 dominates √v̂.
# So the bias wanders by up to lr per step in a random direction, while changing nothing: the
# LayerNorm after it removes it. SGD would leave it where it is.
# <!-- END ANSWER -->

# %%
net32 = {k: v.astype(np.float32) for k, v in net.items()}
before = {k: v.copy() for k, v in net32.items()}
logits, cache = mm.mixer_forward(net32, images.astype(np.float32), tiny)
_, dlogits = mm.softmax_cross_entropy(logits, labels)
_, g32 = mm.mixer_backward(dlogits, cache)
lr = 1e-3
AdamW(net32, lr=lr, weight_decay=0.05, no_decay=bias_and_norm).step(g32)
for k in ("blocks.0.mlp_tokens.fc2.bias", "head.bias"):
    print(f"{k:30s} max|grad| {np.abs(g32[k]).max():.1e}   max|step|/lr {np.abs(net32[k] - before[k]).max() / lr:.2f}")
noise_step = np.abs(net32["blocks.0.mlp_tokens.fc2.bias"] - before["blocks.0.mlp_tokens.fc2.bias"]).max() / lr
assert np.abs(g32["blocks.0.mlp_tokens.fc2.bias"]).max() < 1e-5 * np.abs(g32["head.bias"]).max() and noise_step > 0.01

# %% [markdown]
# **Exercise 4.2.** A fresh model's loss does not depend on the images. Write `fresh_loss(K)`, the loss
# of a freshly initialized model with K classes, from first principles (no model); the cell compares it
# with real fresh models. Then: what is it for Mixer-B/16 on ImageNet-1k, and with the in21k head
# (21,843 classes)?

# %%
with course.exercise("4.2"):
    def fresh_loss(K):
        ### BEGIN SOLUTION
        return float(np.log(K))  # zero head: all logits 0, a uniform prediction
        ### END SOLUTION

    for K in (2, 5, 37):
        c = mm.MixerConfig(num_classes=K, img_size=(6, 8), in_chans=2, patch_size=2, num_blocks=1, embed_dim=6)
        lg = mm.mixer_forward(mm.init_params(c, seed=K, dtype="float64"), rng.standard_normal((3, 2, 6, 8)), c)[0]
        assert abs(mm.softmax_cross_entropy(lg, np.arange(3) % K)[0] - fresh_loss(K)) < 1e-12, K
    print(f"B/16 on ImageNet-1k: {fresh_loss(1000):.4f}; with the in21k head: {fresh_loss(21843):.4f}")

# # Part B: exact parity with timm
# `mixer_forward` is the paper's pipeline: the stem, the blocks (12 for B/16), the final
# LayerNorm, the mean over tokens, and the head. Below, timm's `MlpMixer` and minimixer load the
# same safetensors file and run the same input, and we compare:
# - float32 logits of the full-size Mixer-B/16 (S/32 in the student edition, whose clear path is
#   slower), on deterministic, non-trivial weights. timm
#   initializes the head, the stem bias and the LayerNorm biases to zero, the LayerNorm weights to
#   one, and the block MLP biases to N(0, 1e-6²) noise (as `params.py` does): paths that barely
#   carry signal at init, so the weights are perturbed first;
# - float64 gradients of every parameter against PyTorch autograd.
#
# Without timm, the same comparisons run against `tests/fixtures/`, which timm wrote (logits,
# the input gradient, and every parameter gradient), through `model.py`'s forward and backward
# and through the fast inference path `mm.predict`.

# %%
try:
    import timm
    import torch
    from safetensors.torch import save_file
    HAVE_TIMM = True
    print("timm", timm.__version__, "torch", torch.__version__)
except ImportError:
    HAVE_TIMM = False
    print("timm is not installed: the parity below uses the committed fixtures in tests/fixtures instead")

# %%
def perturbed_timm(name_or_model, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model(name_or_model, pretrained=False) if isinstance(name_or_model, str) else name_or_model
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif name == "head.weight":
                p.copy_(noise / model.embed_dim ** 0.5)
    return model.eval()


if HAVE_TIMM:
    variant = "mixer_s32_224" if getattr(mm.fast, "STUDENT_EDITION", False) else "mixer_b16_224"
    cfg = mm.get_config(variant)
    model = perturbed_timm(variant)
    path = Path(tempfile.mkdtemp()) / f"{variant}.safetensors"
    save_file(model.state_dict(), str(path))
    params = mm.load_weights(path, cfg)  # a flat dict keyed by timm's own names
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    t0 = time.perf_counter()
    ours = mm.predict(params, x, cfg)  # the fast inference path
    t1 = time.perf_counter()
    clear = mm.model.predict(params, x, cfg)  # model.py's forward, written like the paper
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    t2 = time.perf_counter()
    print(f"{variant} logits: max|Δ| / max|logit| = {np.abs(ours - ref).max() / np.abs(ref).max():.2e}")
    print(f"model.py forward: max|Δ| / max|logit| = {np.abs(clear - ref).max() / np.abs(ref).max():.2e}")
    print("top-5 identical:", np.array_equal(np.argsort(-ours)[:, :5], np.argsort(-ref)[:, :5]))
    print(f"time for 2 images: minimixer {t1 - t0:.2f} s, timm {t2 - t1:.2f} s")
else:
    for name in ("tiny_erf_f64", "tiny_tanh_f64", "small_erf_f32"):
        ref = np.load(ROOT / "tests" / "fixtures" / f"{name}.npz")
        cfg = mm.MixerConfig.from_dict(json.loads(str(ref["config"])))
        params = mm.load_weights(ROOT / "tests" / "fixtures" / f"{name}.safetensors", cfg, dtype=ref["x"].dtype)
        logits, cache = mm.mixer_forward(params, ref["x"], cfg)  # model.py, the clear path
        fast = mm.predict(params, ref["x"], cfg)  # the fast inference path
        rel = lambda a, b: np.abs(a - b).max() / np.abs(b).max()  # noqa: E731
        line = f"{name}: logits vs timm {rel(logits, ref['logits']):.1e} (fast path {rel(fast, ref['logits']):.1e})"
        if "dlogits" in ref.files:
            dx, grads = mm.mixer_backward(ref["dlogits"], cache)
            scale = max(np.abs(ref[f"grad/{k}"]).max() for k in grads)
            worst = max(np.abs(grads[k] - ref[f"grad/{k}"]).max() for k in grads) / scale
            line += f"; dx {rel(dx, ref['dx']):.1e}; {len(grads)} parameter gradients, worst {worst:.1e} of the largest"
        print(line)

# %% [markdown]
# **Gradients, live.** In float64, minimixer's hand-written backward matches autograd to rounding
# error. As in Part A, `mlp_tokens.fc2.bias` has a zero gradient and both sides show only rounding
# noise there, so each error is measured against the largest gradient overall.

# %%
if HAVE_TIMM:
    from functools import partial

    from timm.models.mlp_mixer import MlpMixer
    small = mm.MixerConfig(num_classes=7, img_size=(9, 15), in_chans=2, patch_size=3, num_blocks=2, embed_dim=6)
    tm = perturbed_timm(MlpMixer(num_classes=7, img_size=(9, 15), in_chans=2, patch_size=3, num_blocks=2,
                                 embed_dim=6, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))).double()
    p64 = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 9, 15))
    dlogits = rng.standard_normal((3, 7))
    xt = torch.from_numpy(x).requires_grad_(True)
    (tm(xt) * torch.from_numpy(dlogits)).sum().backward()
    logits, cache = mm.mixer_forward(p64, x, small)
    dx, grads = mm.mixer_backward(dlogits, cache)
    scale = max(np.abs(p.grad.numpy()).max() for p in tm.parameters())
    worst = max(np.abs(grads[k] - p.grad.numpy()).max() for k, p in tm.named_parameters()) / scale
    print(f"{len(grads)} parameter gradients, worst |Δ| relative to the largest gradient: {worst:.1e}")
    print(f"dx: {np.abs(dx - xt.grad.numpy()).max() / np.abs(xt.grad.numpy()).max():.1e}")

# %% [markdown]
# **The real B/16**, if its weights are in `weights/`. Download them once with
# `python -m minimixer.weights download mixer_b16_224 --to weights` (240 MB):

# %%
real = ROOT / "weights" / "mixer_b16_224.safetensors"
if not real.exists():
    real = ROOT / "weights" / "mixer_b16_224.goog_in21k_ft_in1k.safetensors"
if real.exists():
    cfg = mm.get_config("mixer_b16_224")
    params = mm.load_weights(real, cfg)
    img = eval_transform(224)(open_image(ROOT / "tests" / "images" / "china.jpg"))[None]
    logits = mm.predict(params, img, cfg)[0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    names = class_names("mixer_b16_224", 1000)
    for i in np.argsort(-probs)[:5]:
        print(f"{probs[i]:6.1%}  {names[i]}")
else:
    print(f"{real.name} is not in weights/: skipping the real checkpoint (this is fine offline)")

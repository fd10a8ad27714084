# %% [markdown]
# # 4. The full model, and its exact parity with timm
#
# `mixer_forward` is the paper's pipeline: stem, N blocks, LayerNorm, the mean over tokens, and
# the head. `mixer_backward` runs the same steps in reverse. Below, timm's `MlpMixer` and minimixer
# load the same safetensors file and run the same input, and we compare:
# - float32 logits of the full-size Mixer-B/16, on deterministic, non-trivial weights. timm
#   initializes the head and all biases to zero, so the weights are perturbed first, or those
#   paths would go untested;
# - float64 gradients of every parameter against PyTorch autograd;
# - if `weights/mixer_b16_224.safetensors` exists (see weights/README.md), the real checkpoint on
#   a photo.

# %%
import tempfile
import time
from pathlib import Path

import numpy as np

import minimixer as mm
from minimixer.data import eval_transform, open_image
from minimixer.checkpoints.registry import class_names

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
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
    cfg = mm.get_config("mixer_b16_224")
    model = perturbed_timm("mixer_b16_224")
    path = Path(tempfile.mkdtemp()) / "b16.safetensors"
    save_file(model.state_dict(), str(path))
    params = mm.load_weights(path, cfg)  # a flat dict keyed by timm's own names
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    t0 = time.perf_counter()
    ours = mm.predict(params, x, cfg)
    t1 = time.perf_counter()
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    t2 = time.perf_counter()
    print(f"B/16 logits: max|Δ| / max|logit| = {np.abs(ours - ref).max() / np.abs(ref).max():.2e}")
    print("top-5 identical:", np.array_equal(np.argsort(-ours)[:, :5], np.argsort(-ref)[:, :5]))
    print(f"time for 2 images: minimixer {t1 - t0:.2f} s, timm {t2 - t1:.2f} s")
else:
    for name in ("tiny_erf_f64", "small_erf_f32"):
        ref = np.load(ROOT / "tests" / "fixtures" / f"{name}.npz")
        import json
        cfg = mm.MixerConfig.from_dict(json.loads(str(ref["config"])))
        params = mm.load_weights(ROOT / "tests" / "fixtures" / f"{name}.safetensors", cfg, dtype=ref["x"].dtype)
        logits = mm.predict(params, ref["x"], cfg)
        print(f"{name}: max|Δ| / max|logit| vs timm = {np.abs(logits - ref['logits']).max() / np.abs(ref['logits']).max():.2e}")

# %% [markdown]
# **Gradients.** In float64, minimixer's hand-written backward matches autograd to rounding
# error. One curiosity: `mlp_tokens.fc2.bias` adds the same constant to every channel of a token,
# and every consumer of the residual stream is a LayerNorm over channels, which removes exactly
# that constant. So its gradient is zero, and both sides show only rounding noise. We therefore
# measure each error against the largest gradient overall.

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

# %% [markdown]
# # 6. Running on the GPU with CuPy
#
# The same functions run on CuPy arrays, because each layer takes its array module from its
# inputs (`xp = get_xp(x)`). Moving parameters or inputs to the GPU is one call,
# `mm.to_backend(obj, "cupy")`. On a machine with no usable GPU, asking for CuPy raises a clear
# `BackendError`. On a GPU, the fast path fuses GELU (with CUDA's exact `erff`) into one kernel.

# %%
import time

import numpy as np

import minimixer as mm

cfg = mm.get_config("mixer_b16_224")
rng = np.random.default_rng(0)
params = {k: (v + 0.02 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in mm.init_params(cfg).items()}
x = rng.standard_normal((8, 3, 224, 224)).astype(np.float32)

if mm.cupy_available():
    import cupy
    gpu_params, gpu_x = mm.to_backend(params, "cupy"), mm.to_backend(x, "cupy")
    cpu = mm.predict(params, x[:2], cfg)
    gpu = mm.to_numpy(mm.predict(gpu_params, gpu_x[:2], cfg))
    print(f"GPU vs CPU logits: max|Δ| / max|logit| = {np.abs(gpu - cpu).max() / np.abs(cpu).max():.2e}")
    for batch in (8, 64, 256):
        xb = cupy.asarray(rng.standard_normal((batch, 3, 224, 224)).astype(np.float32))
        mm.predict(gpu_params, xb, cfg)
        cupy.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            mm.predict(gpu_params, xb, cfg)
        cupy.cuda.Device().synchronize()
        print(f"batch {batch:4d}: {3 * batch / (time.perf_counter() - t0):8.1f} img/s")
    print("Compare with timm on the same GPU: python -m minimixer.bench infer --backend cupy --batch-size 256 --compare timm")
else:
    try:
        mm.to_backend(params, "cupy")
    except mm.BackendError as e:
        print("No usable GPU here, so this notebook runs on the CPU only.")
        print("What asking for CuPy says:", e)
    t0 = time.perf_counter()
    mm.predict(params, x, cfg)
    print(f"For reference, the CPU (NumPy) path: {len(x) / (time.perf_counter() - t0):.2f} img/s for B/16 at batch {len(x)}")

# %% [markdown]
# ## Exercises
# The answer cells ship with one solution so the notebook runs in CI; cover them and write your own.
# The graded exercises (layers, mixing, loss and AdamW) are the coursework: minimixer/coursework/README.md.
#
# **Exercise 6.1.** How many bytes does `mm.to_backend(params, "cupy")` copy to the GPU for
# Mixer-B/16 in float32, and how does that compare with the 240 MB checkpoint file? Expected:
# 239,521,888 bytes (59,880,472 parameters × 4 bytes): the file is the parameters and little else.

# %%
nbytes = sum(v.nbytes for v in params.values())
print(f"B/16 parameters: {mm.param_count(cfg):,} -> {nbytes:,} bytes in float32")
assert nbytes == mm.param_count(cfg) * 4 == 239_521_888

# %% [markdown]
# **Exercise 6.2.** The channel MLP of one block does 2·N·D·DC multiply-accumulates per image
# (notebook 3's cost table). At batch 256, how many TFLOP (2 per MAC) do the 12 blocks' channel
# MLPs need per forward pass? Expected: 5.68 TFLOP, a few milliseconds on a modern GPU and tens of
# seconds on this CPU.

# %%
macs = 12 * 2 * cfg.num_patches * cfg.embed_dim * cfg.channel_hidden * 256
print(f"channel MLPs, batch 256: {2 * macs / 1e12:.2f} TFLOP")
assert round(2 * macs / 1e12, 2) == 5.68

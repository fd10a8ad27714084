# %% [markdown]
# # 6. Running on the GPU with CuPy
#
# **Needs:** assignments A1 and A2 (the forward pass). Without a GPU it runs on the CPU.
#
# The same functions run on CuPy arrays, because each layer takes its array module from its
# inputs (`xp = get_xp(x)`). Moving parameters or inputs to the GPU is one call,
# `mm.to_backend(obj, "cupy")`. On a machine with no usable GPU, asking for CuPy raises a clear
# `BackendError`. On a GPU, the fast path fuses GELU (with CUDA's exact `erff`) into one kernel.

# %%
import course

course.setup()
import time

import numpy as np

import minimixer as mm

cfg = mm.get_config("mixer_b16_224")
rng = np.random.default_rng(0)
params = {k: (v + 0.02 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in mm.init_params(cfg).items()}
x = rng.standard_normal((2 if getattr(mm.fast, "STUDENT_EDITION", False) else 8, 3, 224, 224)).astype(np.float32)

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
# Write the code where the cell says so; the `assert` judges it.
#
# **Exercise 6.1.** How many bytes does `mm.to_backend(params, "cupy")` copy to the GPU? Write
# `param_bytes(cfg, itemsize)` from the config alone (no arrays), then compare B/16 in float32 with
# its 240 MB checkpoint file.

# %%
with course.exercise("6.1"):
    def param_bytes(cfg, itemsize=4):
        ### BEGIN SOLUTION
        return mm.param_count(cfg) * itemsize
        ### END SOLUTION

    assert param_bytes(cfg, 4) == sum(v.nbytes for v in params.values())
    print(f"B/16 in float32: {param_bytes(cfg, 4):,} bytes; in float64: {param_bytes(cfg, 8):,}")

# %% [markdown]
# **Exercise 6.2.** The channel MLP of one block does 2·N·D·DC multiply-accumulates per image
# (notebook 3's cost table). Write `channel_mlp_tflop(cfg, batch)`: the TFLOP (2 per MAC) that all
# blocks' channel MLPs need for one forward pass. How long would B/16 at batch 256 take on a GPU
# that sustains 100 TFLOP/s, and on this CPU?

# %%
with course.exercise("6.2"):
    def channel_mlp_tflop(cfg, batch):
        ### BEGIN SOLUTION
        return cfg.num_blocks * 2 * cfg.num_patches * cfg.embed_dim * cfg.channel_hidden * batch * 2 / 1e12
        ### END SOLUTION

    shapes = mm.param_shapes(cfg)
    macs_per_token = sum(int(np.prod(v)) for k, v in shapes.items() if "mlp_channels" in k and k.endswith("weight"))
    assert abs(channel_mlp_tflop(cfg, 256) - 2 * 256 * cfg.num_patches * macs_per_token / 1e12) < 1e-9
    print(f"B/16 channel MLPs at batch 256: {channel_mlp_tflop(cfg, 256):.2f} TFLOP")

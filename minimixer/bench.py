"""python -m minimixer.bench: throughput and memory of minimixer, optionally against timm.

    python -m minimixer.bench infer --compare timm                # Mixer-B/16, batch 16, fp32
    python -m minimixer.bench train --compare timm                # Mixer-S/32, batch 32, AdamW step
    python -m minimixer.bench infer --compare timm --memory --json bench.json
    python -m minimixer.bench infer --backend cupy --batch-size 256 --compare timm   # on a GPU

With --compare timm, timm runs alternately with minimixer in the same process, on the
same weights and inputs and with the same thread count, and the ratio of the median
throughputs is printed (> 1 means minimixer is faster). --memory measures each side's
peak working memory in a fresh process: on the CPU, peak RSS minus the RSS before the
measured call; on a GPU, device memory: the peak of CuPy's memory pool (bytes in use) against
torch.cuda.max_memory_allocated, each beyond what was allocated before the call.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from . import cli
from .backend import to_backend, to_numpy, xp_for
from .config import param_count
from .checkpoints.safetensors_io import atomic_write_bytes

DEFAULTS = {"infer": ("mixer_b16_224", 16), "train": ("mixer_s32_224", 32)}


def parse_args(argv):
    p = cli.ArgumentParser(prog="python -m minimixer.bench", description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["infer", "train"])
    cli.add_model_args(p, default_model=None)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    p.add_argument("--dtype", choices=["float32", "float16", "float64"], default="float32",
                   help="float16 is for the GPU (cupy) inference path")
    p.add_argument("--path", choices=["fast", "reference"], default="fast",
                   help="minimixer's fast path (minimixer.predict, the trainer) or the clear one (model.py)")
    p.add_argument("--compare", choices=["timm"], help="also time timm, alternating with minimixer")
    p.add_argument("--tf32", action="store_true",
                   help="GPU: allow TF32 matmuls on both sides (default: off on both, whatever CUPY_TF32 says)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory", action="store_true", help="also measure peak working memory (Linux)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--probe", choices=["minimixer", "timm"], help=argparse.SUPPRESS)  # internal: --memory's child
    args = p.parse_args(argv)
    model, batch = DEFAULTS[args.mode]
    args.model = args.model or model
    args.batch_size = args.batch_size or batch
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch-size and --repeats must be >= 1, --warmup >= 0")
    if args.dtype == "float16" and (args.backend != "cupy" or args.mode != "infer"):
        p.error("--dtype float16 is for GPU inference (--backend cupy, infer)")
    return args


# --- the two sides ----------------------------------------------------------------------------------

def make_params(cfg, dtype, seed=0):
    """Deterministic, non-trivial weights (timm's init zeroes the head and biases)."""
    from .params import init_params
    rng = np.random.default_rng(seed)
    return {k: (v + 0.02 * rng.standard_normal(v.shape)).astype(dtype)
            for k, v in init_params(cfg, seed=seed, dtype="float64").items()}


def minimixer_side(args, cfg, params_np, x_np, y_np):
    """A zero-argument callable that runs one batch, and a function returning its logits."""
    from . import fast, model, optim
    from .layers import softmax_cross_entropy
    backend = args.backend
    params = to_backend(params_np, backend)
    x, y = to_backend(x_np, backend), to_backend(y_np, backend)
    xp = xp_for(backend)
    if backend == "cupy":
        set_cupy_tf32(xp, args.tf32)
    sync = (lambda: xp.cuda.Device().synchronize()) if backend == "cupy" else (lambda: None)
    if args.mode == "infer":
        run_predict = fast.predict if args.path == "fast" else model.predict

        def step():
            out = run_predict(params, x, cfg)
            sync()
            return out
        return step
    opt = optim.AdamW(params, lr=1e-4, weight_decay=0.05)

    def step():
        if args.path == "fast":
            logits, cache = fast.forward(params, x, cfg)
            _, dlogits = softmax_cross_entropy(logits, y)
            grads, _ = fast.backward(dlogits, cache)
        else:
            logits, cache = model.mixer_forward(params, x, cfg)
            _, dlogits = softmax_cross_entropy(logits, y)
            _, grads = model.mixer_backward(dlogits, cache)
        opt.step(grads)
        sync()
        return logits
    return step


def set_cupy_tf32(cp, on):
    """CuPy's float32 matmul compute type, set explicitly: CuPy reads CUPY_TF32 only lazily, at its
    first float32 matmul, so an exported CUPY_TF32=1 would otherwise turn TF32 on unasked."""
    linalg = cp._core._routines_linalg
    cp._core.set_compute_type(cp.float32, linalg.COMPUTE_TYPE_TF32 if on else linalg.COMPUTE_TYPE_DEFAULT)


def tf32_in_use(args):
    """What each side really uses, read back (a GPU older than Ampere refuses TF32). CuPy consults its
    compute type only in 2-D matmuls (cupy.dot's path); its batched (3-D) matmuls run in float32."""
    out = {"requested": args.tf32}
    cp = xp_for("cupy")
    linalg = cp._core._routines_linalg
    out["minimixer"] = cp._core.get_compute_type(cp.float32) == linalg.COMPUTE_TYPE_TF32
    out["minimixer_scope"] = "2-D matmuls only; batched matmuls float32"
    if args.compare:
        import torch
        out["timm"] = bool(torch.backends.cuda.matmul.allow_tf32)
        out["timm_cudnn"] = bool(torch.backends.cudnn.allow_tf32)
    return out


def timm_model(cfg):
    """timm's MlpMixer for a MixerConfig (timm's own init), for comparisons. Imports timm."""
    from functools import partial

    from timm.models.mlp_mixer import MlpMixer
    from torch import nn
    act = partial(nn.GELU, approximate="tanh") if cfg.gelu == "tanh" else nn.GELU
    return MlpMixer(num_classes=cfg.num_classes, img_size=cfg.img_size, in_chans=cfg.in_chans,
                    patch_size=cfg.patch_size, num_blocks=cfg.num_blocks, embed_dim=cfg.embed_dim,
                    mlp_ratio=cfg.mlp_ratio, norm_layer=partial(nn.LayerNorm, eps=cfg.ln_eps), act_layer=act)


def timm_side(args, cfg, params_np, x_np, y_np):
    import torch
    device = "cuda" if args.backend == "cupy" else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    model = timm_model(cfg)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params_np.items()}, strict=True)
    dtype = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}[args.dtype]
    model = model.to(device=device, dtype=dtype)
    x = torch.from_numpy(x_np).to(device=device, dtype=dtype)
    y = torch.from_numpy(y_np).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if args.mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode():
                out = model(x)
            sync()
            return out.float().cpu().numpy()
        return step
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        torch.nn.functional.cross_entropy(logits, y).backward()
        opt.step()
        sync()
        return logits.detach().float().cpu().numpy()
    return step


# --- measurements -------------------------------------------------------------------------------------

def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def device_memory(args, step):
    """Peak device memory of one step() beyond what was allocated before it. CuPy: every allocation
    goes through its memory pool; a wrapped allocator records the pool's bytes in use after each one
    (the peak is reached at an allocation). torch: its caching allocator's max_memory_allocated."""
    if args.probe == "timm":
        import torch
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        peak, what = torch.cuda.max_memory_allocated(), "device: torch.cuda.max_memory_allocated"
    else:
        cp = xp_for("cupy")
        pool = cp.get_default_memory_pool()
        before = peak = pool.used_bytes()

        def malloc(size):
            nonlocal peak
            mem = pool.malloc(size)
            peak = max(peak, pool.used_bytes())
            return mem
        cp.cuda.Device().synchronize()
        cp.cuda.set_allocator(malloc)
        try:
            step()
        finally:
            cp.cuda.set_allocator(pool.malloc)
        what = "device: CuPy memory pool, peak bytes in use"
    return {"peak_working_mb": (peak - before) / 2**20, "before_mb": before / 2**20, "measured": what}


def probe_memory(args, cfg):
    """In this (fresh) process: one warm-up call, reset the peak RSS, one measured call."""
    params, x, y = inputs(args, cfg)
    side = minimixer_side if args.probe == "minimixer" else timm_side
    step = side(args, cfg, params, x, y)
    del params
    step()
    if args.backend == "cupy":  # RSS cannot see GPU allocations
        print(json.dumps(device_memory(args, step)))
        return
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak RSS, to the current RSS
    before = rss_kb("VmRSS")
    step()
    peak = rss_kb("VmHWM")
    print(json.dumps({"peak_working_mb": (peak - before) / 1024, "before_mb": before / 1024,
                      "measured": "host: peak RSS"}))


def measure_memory(args, argv):
    """Run probe_memory for both sides in fresh processes. glibc is told to return every large
    block to the OS (a fixed mmap threshold), so RSS follows what is really in use."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    sides = ["minimixer"] + (["timm"] if args.compare else [])
    out = {}
    for side in sides:
        r = subprocess.run([sys.executable, "-m", "minimixer.bench", *argv, "--probe", side],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            out[side] = {"error": (r.stderr.strip().splitlines() or ["probe failed"])[-1]}
        else:
            out[side] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def inputs(args, cfg):
    params = make_params(cfg, np.float32 if args.dtype == "float16" else args.dtype)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((args.batch_size, cfg.in_chans, *cfg.image_hw)).astype(
        np.float32 if args.dtype == "float16" else args.dtype)
    y = rng.integers(0, cfg.num_classes, args.batch_size)
    return params, x, y


def machine_info(args):
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__}
    try:
        from threadpoolctl import threadpool_info
        info["blas"] = [{k: i.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                        for i in threadpool_info()]
    except ImportError:
        pass
    if args.compare:
        import timm
        import torch
        info.update(torch=torch.__version__, timm=timm.__version__, torch_threads=torch.get_num_threads())
    if args.backend == "cupy":
        cp = xp_for("cupy")
        props = cp.cuda.runtime.getDeviceProperties(0)
        info.update(gpu=props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
                    cupy=cp.__version__, tf32=tf32_in_use(args))
    return info


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = cli.config_from_args(args)
    xp_for(args.backend)
    if args.probe:
        probe_memory(args, cfg)
        return 0
    if args.compare:
        try:
            import timm  # noqa: F401
        except ImportError:
            raise cli.UserError("--compare timm needs timm installed (pip install timm)") from None
    params, x, y = inputs(args, cfg)
    if args.dtype == "float16":
        params = {k: v.astype(np.float16) for k, v in params.items()}
        x = x.astype(np.float16)
    sides = {"minimixer": minimixer_side(args, cfg, params, x, y)}
    if args.compare:
        sides["timm"] = timm_side(args, cfg, params, x, y)
    what = "inference" if args.mode == "infer" else "train step (forward + backward + AdamW)"
    print(f"{args.model} {what}, batch {args.batch_size}, {args.dtype}, backend {args.backend}, "
          f"minimixer path {args.path}, {param_count(cfg) / 1e6:.1f}M params")
    if args.backend == "cupy":
        tf32 = tf32_in_use(args)
        print("TF32 matmuls: minimixer " + ("on (2-D matmuls)" if tf32["minimixer"] else "off")
              + ("" if "timm" not in tf32 else ", timm " + ("on" if tf32["timm"] else "off")))
    outputs = {}
    for name, step in sides.items():  # warm-up: first-touch allocations, BLAS buffers, GPU kernels
        for _ in range(args.warmup):
            outputs[name] = to_numpy(step())
    times = {name: [] for name in sides}
    for r in range(args.repeats):  # alternate, so both see the same machine conditions
        for name, step in sides.items():
            seconds, out = timed(step)
            times[name].append(seconds)
        print("  round {}: ".format(r + 1) + "  ".join(
            f"{n} {args.batch_size / times[n][-1]:.2f} img/s" for n in sides), flush=True)
    result = {"model": args.model, "mode": args.mode, "batch_size": args.batch_size, "dtype": args.dtype,
              "backend": args.backend, "path": args.path, "repeats": args.repeats, "machine": machine_info(args)}
    for name in sides:
        med = statistics.median(times[name])
        result[name] = {"img_per_s": args.batch_size / med, "seconds_median": med,
                        "seconds": times[name]}
        print(f"{name:10s} {args.batch_size / med:8.2f} img/s  (median of {args.repeats})")
    if args.compare:
        ratio = result["timm"]["seconds_median"] / result["minimixer"]["seconds_median"]
        per_round = [t / m for m, t in zip(times["minimixer"], times["timm"])]
        ours, theirs = outputs["minimixer"].astype(np.float64), outputs["timm"].astype(np.float64)
        rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
        result.update(ratio=ratio, ratio_per_round=per_round, logits_max_rel_diff=rel)
        print(f"ratio minimixer/timm throughput: {ratio:.3f}  (per round {min(per_round):.3f}..{max(per_round):.3f})")
        label = "logits" if args.mode == "infer" else "logits of the first step"
        print(f"{label}: max|Δ|/max|logit| = {rel:.2e}")
    if args.memory:
        mem = measure_memory(args, argv)
        result["memory"] = mem
        for name, m in mem.items():
            if "error" in m:
                print(f"memory {name}: {m['error']}")
            else:
                print(f"memory {name:10s} peak working {m['peak_working_mb']:8.1f} MB "
                      f"(beyond {m['before_mb']:.0f} MB of weights, inputs and runtime; {m['measured']})")
        if args.compare and all("error" not in m for m in mem.values()):
            result["memory_ratio"] = mem["minimixer"]["peak_working_mb"] / mem["timm"]["peak_working_mb"]
            print(f"memory minimixer/timm: {result['memory_ratio']:.3f}")
    if args.json:
        atomic_write_bytes(args.json, json.dumps(result, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="python -m minimixer.bench"))

"""python -m minimixer.bench: throughput and memory of minimixer, against other engines.

    python -m minimixer.bench infer --compare onnxruntime,openvino,timm --batch-size 1,4,16,64 --plot speed.png
    python -m minimixer.bench infer --compare timm                # Mixer-B/16, batch 16, fp32
    python -m minimixer.bench train --compare timm                # Mixer-S/32, batch 32, AdamW step
    python -m minimixer.bench infer --backend cupy --batch-size 256 --compare timm   # on a GPU

Every engine runs in this one process, on the same weights and inputs and with the same
thread count, in alternating rounds; the table shows medians. The peers are optional extras
(pip install 'minimixer[bench]'): timm eager, and timm's model exported here to ONNX and run
by ONNX Runtime and by OpenVINO (fp32, as the others). For inference the run also times the
GEMM ceiling: the model's matmuls alone, with its own weights and no elementwise work, the
better of BLAS's own threads on the whole batch and one single-threaded share per core.
Peak working memory is the growth of the process's peak RSS during an engine's first call
(engine built, inputs ready): activations, scratch, arenas and, for training, gradients and
optimizer state; glibc then gives freed blocks back at once, so RSS follows what is in use. The
timed calls run with glibc keeping freed blocks, as minimixer's commands set it (minimixer.runtime.allocator).
On a GPU (--backend cupy --memory), device memory in fresh processes: the peak
of CuPy's memory pool (bytes in use) against torch.cuda.max_memory_allocated, each beyond what
was allocated before the call.
"""
import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

from . import cli
from ..runtime.allocator import keep_freed_memory, return_freed_memory
from ..backend import BACKENDS, to_backend, to_numpy, xp_for
from ..config import param_count
from ..checkpoints.safetensors_io import atomic_write_bytes

PROG = "python -m minimixer.bench"

DEFAULTS = {"infer": ("mixer_b16_224", 16), "train": ("mixer_s32_224", 32)}
PEERS = {  # engine -> the modules it needs (all in the 'bench' extra)
    "timm": ("torch", "timm"),
    "onnxruntime": ("torch", "timm", "onnx", "onnxscript", "onnxruntime"),
    "openvino": ("torch", "timm", "onnx", "onnxscript", "openvino"),
}
EXTRA = "pip install 'minimixer[bench]'"
CEILING = "GEMM ceiling"


def int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return values


def engine_list(text):
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown engine {', '.join(unknown) or repr(text)}; known: {', '.join(PEERS)}")
    return list(dict.fromkeys(names))


def parse_args(argv, prog=PROG):
    p = cli.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["infer", "train"])
    cli.add_model_args(p, default_model=None)
    p.add_argument("--batch-size", type=int_list, help="one or more, comma-separated (e.g. 1,4,16,64)")
    p.add_argument("--backend", choices=BACKENDS, default="numpy")
    p.add_argument("--dtype", choices=["float32", "float16", "float64"], default="float32",
                   help="float16 is for the GPU (cupy) inference path")
    p.add_argument("--path", choices=["fast", "reference"], default="fast",
                   help="minimixer's fast path (mm.predict, the trainer) or the clear one (model.py)")
    p.add_argument("--compare", type=engine_list, default=[],
                   help=f"peers to time alternately with minimixer, comma-separated: {', '.join(PEERS)}")
    p.add_argument("--no-ceiling", action="store_true", help="infer: skip timing the GEMM ceiling")
    p.add_argument("--plot", metavar="FILE.png", help="draw throughput against batch size (needs matplotlib)")
    p.add_argument("--tf32", action="store_true",
                   help="GPU: allow TF32 matmuls on both sides (default: off on both, whatever CUPY_TF32 says)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--settle", type=float, default=0.3, metavar="SECONDS",
                   help="CPU: idle time before each timed call, so that no engine's spinning threads "
                        "(OpenBLAS, OpenMP, ONNX Runtime) take cores from the next (default 0.3)")
    p.add_argument("--memory", action="store_true",
                   help="GPU: also measure peak working memory in fresh processes (on the CPU it is always measured)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--probe", choices=["minimixer", "timm"], help=argparse.SUPPRESS)  # internal: --memory's child
    args = p.parse_args(argv)
    model, batch = DEFAULTS[args.mode]
    args.model = args.model or model
    args.batch_size = args.batch_size or [batch]
    if args.repeats < 1 or args.warmup < 1:
        p.error("--repeats and --warmup must be >= 1 (the first call measures memory)")
    if not 0 <= args.settle <= 60:
        p.error(f"--settle must be between 0 and 60 seconds, got {args.settle}")
    if args.dtype == "float16" and (args.backend != "cupy" or args.mode != "infer"):
        p.error("--dtype float16 is for GPU inference (--backend cupy, infer)")
    onnx_peers = [e for e in args.compare if e != "timm"]
    if onnx_peers and (args.mode != "infer" or args.backend != "numpy" or args.dtype != "float32"):
        p.error(f"--compare {','.join(onnx_peers)} is for CPU float32 inference (infer, --backend numpy)")
    if args.backend == "cupy" and len(args.batch_size) > 1:
        p.error("--backend cupy takes one --batch-size")
    if args.plot and not args.plot.lower().endswith(".png"):
        p.error("--plot needs a .png file name")
    return args


def check_peers(engines, plot):
    """One line naming the extra when a peer's (or the plot's) modules are missing."""
    import importlib.util
    for engine in engines:
        missing = [m for m in PEERS[engine] if importlib.util.find_spec(m) is None]
        if missing:
            raise cli.UserError(f"--compare {engine} needs {', '.join(missing)}: {EXTRA}")
    if plot and importlib.util.find_spec("matplotlib") is None:
        raise cli.UserError(f"--plot needs matplotlib: {EXTRA}")


# --- the two sides ----------------------------------------------------------------------------------

def make_params(cfg, dtype, seed=0):
    """Deterministic, non-trivial weights (timm's init zeroes the head and biases)."""
    from ..params import init_params
    rng = np.random.default_rng(seed)
    return {k: (v + 0.02 * rng.standard_normal(v.shape)).astype(dtype)
            for k, v in init_params(cfg, seed=seed, dtype="float64").items()}


def minimixer_side(args, cfg, params_np, x_np, y_np):
    """A zero-argument callable that runs one batch, and a function returning its logits."""
    from .. import fast, model, optim
    from ..layers import softmax_cross_entropy
    backend = args.backend
    params = to_backend(params_np, backend)
    x, y = to_backend(x_np, backend), to_backend(y_np, backend)
    xp = xp_for(backend)
    if backend == "cupy":
        set_cupy_tf32(xp, args.tf32)
    sync = (lambda: xp.cuda.Device().synchronize()) if backend == "cupy" else (lambda: None)
    if backend == "numpy" and args.path == "fast":
        fast.load_kernels(params["head.weight"].dtype)  # set-up, as the peers' sessions are (not first-call memory)
    if args.mode == "infer":
        run_predict = fast.predict if args.path == "fast" else model.predict

        def step():
            out = run_predict(params, x, cfg)
            sync()
            return out
        return step
    params = {k: v.copy() for k, v in params.items()}  # the steps update them in place
    opt = (fast.AdamW if args.path == "fast" else optim.AdamW)(params, lr=1e-4, weight_decay=0.05)

    def step():
        if args.path == "fast":
            logits, cache = fast.forward(params, x, cfg)
            _, dlogits = softmax_cross_entropy(logits, y)
            _, grads = fast.backward(dlogits, cache)
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
    if device == "cpu":
        torch.set_num_threads(threads())
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


def threads():
    from ..fast import num_threads
    return num_threads()


def export_onnx(cfg, params_np, folder):
    """timm's model with these weights, exported to ONNX (torch.export) with a dynamic batch axis."""
    import torch
    model = timm_model(cfg)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params_np.items()}, strict=True)
    model.eval()
    path = os.path.join(folder, "mixer.onnx")
    example = torch.zeros((2, cfg.in_chans, *cfg.image_hw))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), path, input_names=["x"], output_names=["logits"], dynamo=True,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1 << 16)}})
    return path


def onnxruntime_side(onnx_path, x_np):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads(), 1
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x_np})[0]


def openvino_side(onnx_path, x_np):
    """OpenVINO's CPU plugin, reshaped to this batch, in fp32 (it defaults to bf16 where the CPU has it)."""
    import openvino as ov
    core = ov.Core()
    model = core.read_model(onnx_path)
    model.reshape(list(x_np.shape))
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                                 "INFERENCE_NUM_THREADS": threads()})
    request = compiled.create_infer_request()
    return lambda: np.array(request.infer([x_np])[0], copy=True)


def gemm_ceiling_sides(params, cfg, B):
    """The model's matmuls alone, in order, with its own weights and no elementwise work: what
    no NumPy code can beat. Two schedules: the whole batch with BLAS's own threads, and one
    share of the batch per core with single-threaded BLAS (as minimixer.fast splits it)."""
    from .. import fast
    N, D, dtype = cfg.num_patches, cfg.embed_dim, params["head.weight"].dtype
    patch = params["stem.proj.weight"].reshape(D, -1)  # (D, C·P·P)
    blocks = [[params[f"blocks.{i}.{n}.weight"] for n in
               ("mlp_tokens.fc1", "mlp_tokens.fc2", "mlp_channels.fc1", "mlp_channels.fc2")]
              for i in range(cfg.num_blocks)]
    rng = np.random.default_rng(2)

    def buffers(b):  # fixed random inputs: the matmuls read them and overwrite their outputs
        M = b * N
        return dict(patches=rng.standard_normal((M, patch.shape[1])).astype(dtype),
                    y=rng.standard_normal((b, N, D)).astype(dtype),  # (b, N, D)
                    token_hid=rng.standard_normal((b, cfg.token_hidden, D)).astype(dtype),  # (b, DS, D)
                    channel_hid=rng.standard_normal((M, cfg.channel_hidden)).astype(dtype),  # (M, DC)
                    out=np.empty((b, N, D), dtype), pooled=rng.standard_normal((b, D)).astype(dtype))

    def gemms(buf):
        b = buf["y"].shape[0]
        y2, out2 = buf["y"].reshape(b * N, D), buf["out"].reshape(b * N, D)
        np.matmul(buf["patches"], patch.T, out=out2)
        for w1, w2, w3, w4 in blocks:
            np.matmul(w1, buf["y"], out=buf["token_hid"])  # (b, DS, D)
            np.matmul(w2, buf["token_hid"], out=buf["out"])  # (b, N, D)
            np.matmul(y2, w3.T, out=buf["channel_hid"])  # (M, DC)
            np.matmul(buf["channel_hid"], w4.T, out=out2)  # (M, D)
        return np.matmul(buf["pooled"], params["head.weight"].T)  # (b, K)

    whole = buffers(B)
    spans = fast.split_batch(B)
    shares = {a: buffers(b - a) for a, b in spans}
    return {"gemm, BLAS threads": lambda: gemms(whole),
            "gemm, share per core": lambda: fast.run_shares(lambda a, b: gemms(shares[a]), spans)}


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
    sides = ["minimixer"] + (["timm"] if "timm" in args.compare else [])
    out = {}
    for side in sides:
        r = subprocess.run([sys.executable, "-m", "minimixer.bench", *argv, "--probe", side],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            out[side] = {"error": (r.stderr.strip().splitlines() or ["probe failed"])[-1]}
        else:
            out[side] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def inputs(args, cfg, batch_size=None):
    params = make_params(cfg, np.float32 if args.dtype == "float16" else args.dtype)
    return (params, *batch_inputs(args, cfg, batch_size or args.batch_size[0]))


def batch_inputs(args, cfg, batch_size):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch_size, cfg.in_chans, *cfg.image_hw)).astype(
        np.float32 if args.dtype == "float16" else args.dtype)
    y = rng.integers(0, cfg.num_classes, batch_size)
    return x, y


def first_call(step):
    """(output, peak working MB) of a first call: how far the peak RSS rises above the RSS
    before it. None for the memory where /proc cannot tell (not Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak RSS, to the current RSS
        before = rss_kb("VmRSS")
    except OSError:
        return step(), None
    out = step()
    return out, (rss_kb("VmHWM") - before) / 1024


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_info(args):
    info = {"platform": platform.platform(), "processor": cpu_name(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__}
    try:
        from threadpoolctl import threadpool_info
        info["blas"] = [{k: i.get(k) for k in ("internal_api", "version", "num_threads", "architecture", "filepath")}
                        for i in threadpool_info() if i.get("user_api") == "blas"]
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


def build_sides(args, cfg, params, x, y, onnx_path):
    """name -> zero-argument callable running one batch, built one after another."""
    sides = {"minimixer": lambda: minimixer_side(args, cfg, params, x, y)}
    makers = {"timm": lambda: timm_side(args, cfg, params, x, y),
              "onnxruntime": lambda: onnxruntime_side(onnx_path, x),
              "openvino": lambda: openvino_side(onnx_path, x)}
    for engine in args.compare:
        sides[engine] = makers[engine]
    return sides


def run_batch(args, cfg, params, batch_size, onnx_path):
    """Time every engine (and the ceiling) at one batch size, in alternating rounds."""
    x, y = batch_inputs(args, cfg, batch_size)
    if args.dtype == "float16":
        x = x.astype(np.float16)
    on_cpu = args.backend == "numpy"
    steps, memory, outputs = {}, {}, {}
    for name, make in build_sides(args, cfg, params, x, y, onnx_path).items():
        steps[name] = make()  # all built before any runs: a training step updates its weights
    if on_cpu:
        return_freed_memory()  # the first calls measure memory: RSS must follow what is in use
    for name in list(steps):
        out, mb = first_call(steps[name]) if on_cpu else (steps[name](), None)
        outputs[name], memory[name] = to_numpy(out), mb
    if on_cpu:
        keep_freed_memory()  # the timed calls run as minimixer's commands do (minimixer.runtime.allocator)
    if args.mode == "infer" and on_cpu and not args.no_ceiling:
        steps.update(gemm_ceiling_sides(params, cfg, batch_size))
    for name, step in steps.items():  # the rest of the warm-up: BLAS buffers, arenas, GPU kernels
        for _ in range(args.warmup - (name in outputs)):
            step()
    times, cpu = {name: [] for name in steps}, {name: [] for name in steps}
    for r in range(args.repeats):  # alternate, so every engine sees the same machine conditions
        for name, step in steps.items():
            if on_cpu and args.settle > 0:
                time.sleep(args.settle)
            start = time.process_time()  # CPU time of all this process's threads: robust to a busy machine
            times[name].append(timed(step)[0])
            cpu[name].append(time.process_time() - start)
        print(f"  batch {batch_size} round {r + 1}: " + "  ".join(
            f"{n} {batch_size / times[n][-1]:.2f}" for n in steps) + " img/s", flush=True)
    row = {"batch_size": batch_size, "img_per_s": {}, "seconds": times, "cpu_seconds": cpu,
           "cpu_ms_per_img": {}, "peak_working_mb": memory, "logits_max_rel_diff": {}}
    for name in steps:
        row["img_per_s"][name] = batch_size / statistics.median(times[name])
        row["cpu_ms_per_img"][name] = 1000 * statistics.median(cpu[name]) / batch_size
    ceilings = [v for n, v in row["img_per_s"].items() if n.startswith("gemm")]
    if ceilings:
        row["img_per_s"][CEILING] = max(ceilings)
        row["ceiling_fraction"] = row["img_per_s"]["minimixer"] / row["img_per_s"][CEILING]
        row["cpu_ms_per_img"][CEILING] = min(v for n, v in row["cpu_ms_per_img"].items() if n.startswith("gemm"))
    row["ratio"] = {peer: row["img_per_s"]["minimixer"] / row["img_per_s"][peer] for peer in args.compare}
    ref = outputs["minimixer"].astype(np.float64)
    for peer in args.compare:  # the same logits (or, for training, the logits of the first step)
        theirs = outputs[peer].astype(np.float64)
        row["logits_max_rel_diff"][peer] = float(np.abs(ref - theirs).max() / np.abs(theirs).max())
    return row


def table(args, rows):
    """One markdown table: throughput, ratios, fraction of the ceiling, peak working memory."""
    engines = ["minimixer", *args.compare]
    has_ceiling = "ceiling_fraction" in rows[0]
    head = ["batch", *(f"{e} img/s" for e in engines)] + ([CEILING] if has_ceiling else [])
    head += [f"minimixer / {p}" for p in args.compare] + (["of ceiling"] if has_ceiling else [])
    head += ["peak MB (" + " / ".join(engines) + ")"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row["batch_size"])] + [f"{row['img_per_s'][e]:.2f}" for e in engines]
        cells += [f"{row['img_per_s'][CEILING]:.2f}"] if has_ceiling else []
        cells += [f"{row['ratio'][p]:.2f}" for p in args.compare]
        cells += [f"{row['ceiling_fraction']:.2f}"] if has_ceiling else []
        mem = [row["peak_working_mb"][e] for e in engines]
        cells += [" / ".join("?" if m is None else f"{m:.0f}" for m in mem)]
        lines.append("| " + " | ".join(cells) + " |")
    names = engines + ([CEILING] if has_ceiling else [])
    lines += ["", "CPU time per image, all threads (ms; waiting threads that spin count too):",
              "| batch | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for row in rows:
        lines.append(f"| {row['batch_size']} | " + " | ".join(f"{row['cpu_ms_per_img'][n]:.3g}" for n in names) + " |")
    return "\n".join(lines)


def plot(path, args, rows):
    """Throughput against batch size for every engine and the ceiling."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batches = [r["batch_size"] for r in rows]
    names = ["minimixer", *args.compare] + ([CEILING] if CEILING in rows[0]["img_per_s"] else [])
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name in names:
        style = dict(color="0.3", linestyle="--") if name == CEILING else dict(marker="o")
        ax.plot(batches, [r["img_per_s"][name] for r in rows], label=name, **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.set_title(f"{args.model} {'inference' if args.mode == 'infer' else 'train step'}, "
                 f"{args.dtype}, {threads()} threads", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None, prog=PROG):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, prog)
    cfg = cli.config_from_args(args)
    xp_for(args.backend)
    if args.probe:
        probe_memory(args, cfg)
        return 0
    check_peers(args.compare, args.plot)
    if args.backend == "cupy":  # set before anything reads it, so the machine info records the truth
        set_cupy_tf32(xp_for("cupy"), args.tf32)
    params = make_params(cfg, np.float32 if args.dtype == "float16" else args.dtype)
    if args.dtype == "float16":
        params = {k: v.astype(np.float16) for k, v in params.items()}
    what = "inference" if args.mode == "infer" else "train step (forward + backward + AdamW)"
    print(f"{args.model} {what}, {args.dtype}, backend {args.backend}, minimixer path {args.path}, "
          f"{param_count(cfg) / 1e6:.1f}M params, {threads()} threads, medians of {args.repeats} alternating rounds"
          + (f", {args.settle:g} s idle before each call" if args.backend == "numpy" and args.settle else ""))
    info = machine_info(args)
    print("BLAS: " + ", ".join(f"{b['internal_api']} {b['version']} ({b['architecture']} kernels)"
                               for b in info.get("blas", [])) + f"; CPU: {info['processor']}")
    if args.backend == "cupy":
        tf32 = tf32_in_use(args)
        print("TF32 matmuls: minimixer " + ("on (2-D matmuls)" if tf32["minimixer"] else "off")
              + ("" if "timm" not in tf32 else ", timm " + ("on" if tf32["timm"] else "off")))
    result = {"model": args.model, "mode": args.mode, "dtype": args.dtype, "backend": args.backend,
              "path": args.path, "repeats": args.repeats, "settle_s": args.settle,
              "engines": ["minimixer", *args.compare], "machine": info, "batches": []}
    with tempfile.TemporaryDirectory(prefix="minimixer-bench-") as folder:
        onnx_path = None
        if any(e != "timm" for e in args.compare):
            start = time.perf_counter()
            onnx_path = export_onnx(cfg, params, folder)
            print(f"exported timm's model to ONNX in {time.perf_counter() - start:.1f} s")
        for batch_size in args.batch_size:
            result["batches"].append(run_batch(args, cfg, params, batch_size, onnx_path))
    print(table(args, result["batches"]))
    for row in result["batches"]:
        for peer, d in row["logits_max_rel_diff"].items():
            label = "logits" if args.mode == "infer" else "first step's logits"
            print(f"batch {row['batch_size']} {peer}: {label} max|Δ|/max|logit| = {d:.2e}")
    if args.memory and args.backend == "cupy":
        mem = result["memory"] = measure_memory(args, argv)
        for name, m in mem.items():
            if "error" in m:
                print(f"memory {name}: {m['error']}")
            else:
                print(f"memory {name:10s} peak working {m['peak_working_mb']:8.1f} MB "
                      f"(beyond {m['before_mb']:.0f} MB of weights, inputs and runtime; {m['measured']})")
        if "timm" in mem and all("error" not in m for m in mem.values()):
            result["memory_ratio"] = mem["minimixer"]["peak_working_mb"] / mem["timm"]["peak_working_mb"]
            print(f"memory minimixer/timm: {result['memory_ratio']:.3f}")
    if args.plot:
        plot(args.plot, args, result["batches"])
        print(f"wrote {args.plot}")
    if args.json:
        atomic_write_bytes(args.json, json.dumps(result, indent=2).encode())
    return 0


def command(argv=None, prog=PROG):
    """Run the command as its shell would: exit status, errors as one line."""
    return cli.run(lambda a: main(a, prog), argv, prog=prog)

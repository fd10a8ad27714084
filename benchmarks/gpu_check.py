"""The GPU check: everything a GPU machine can prove that CI cannot, in one run, one table.

    pip install -e ".[test,timm,cuda12]"        # or cuda13: the CuPy that matches the driver
    python benchmarks/gpu_check.py               # about 3-6 minutes, never more than --budget (480 s)
    python benchmarks/gpu_check.py --json gpu_check.json

Steps, each in a child process with its own share of the budget:
  gpu     CuPy sees a device (name, memory, CUDA runtime); without one: one line, exit 3
  tests   pytest's CuPy cases: tests/test_cupy.py and every test run on the `cupy` backend
          (a test skipped for "no usable GPU" counts as a failure here)
  bench   python -m minimixer.bench infer --backend cupy against timm on the same GPU, B/16 at
          batch 256: images/s of both, and the largest logit difference
  eval    python -m minimixer.eval on a generated ImageFolder (colored images, noise, three
          classes) with a model whose accuracy is known (100%), on cupy and on numpy: equal rows
Exit status: 0 every step passed, 1 a step failed or ran out of time, 2 bad arguments, 3 no GPU.
`--backend numpy` runs the same steps on the CPU with small sizes (how tests/test_gpu_check.py
checks the plumbing without a GPU). docs/gpu-check.md says how to read the table.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("tests", "bench", "eval")
EXIT_NO_GPU = 3
# test_cupy.py's real-CuPy half and every test run on conftest's `cupy` backend, timm's live ones too
GPU_TESTS = ["-k", "cupy and not fake_cupy", "-m", "not mpi and not mmpretrain and not jax and not bench and not nvrtc",
             "tests/test_cupy.py", "tests/test_backend.py", "tests/test_eval.py", "tests/test_train.py",
             "tests/test_fixtures.py", "tests/test_timm_live.py", "tests/test_coursework.py"]
# the largest relative logit difference to timm that passes: float32 on both sides, TF32 off
LOGIT_TOL = 1e-4
COLORS = {"blue": (20, 30, 220), "green": (30, 200, 40), "red": (210, 25, 35)}
PROBE = """
import json, cupy
n = cupy.cuda.runtime.getDeviceCount()
p = cupy.cuda.runtime.getDeviceProperties(0)
free, total = cupy.cuda.Device(0).mem_info
name = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
print(json.dumps({"devices": n, "name": name, "memory_gb": round(total / 2**30, 1),
                  "cupy": cupy.__version__, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion()}))
"""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump, as minimixer's commands do
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv):
    p = ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=480.0, metavar="SECONDS",
                   help="the whole run's limit (default 480: under 8 minutes with start-up)")
    p.add_argument("--backend", choices=["cupy", "numpy"], default="cupy",
                   help="numpy: the same steps on the CPU with small sizes (a dry run of the plumbing)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {','.join(STEPS)}")
    p.add_argument("--model", help="bench model (default mixer_b16_224; numpy: mixer_s32_224)")
    p.add_argument("--batch-size", type=int, help="bench batch (default 256; numpy: 2)")
    p.add_argument("--images", type=int, help="eval images per class (default 400; numpy: 4)")
    p.add_argument("--compare", default="timm", help="bench peers (default timm; '' for none)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    args.steps = [s for s in args.steps.split(",") if s]
    if not args.steps or any(s not in STEPS for s in args.steps):
        p.error(f"--steps takes a comma-separated list of {', '.join(STEPS)}")
    if not 0 < args.budget < float("inf"):
        p.error("--budget must be a positive number of seconds")
    small = args.backend == "numpy"
    args.model = args.model or ("mixer_s32_224" if small else "mixer_b16_224")
    args.batch_size = args.batch_size if args.batch_size is not None else (2 if small else 256)
    args.images = args.images if args.images is not None else (4 if small else 400)
    if args.batch_size < 1 or args.images < 1:
        p.error("--batch-size and --images must be positive")
    return args


class Budget:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return max(0.0, self.end - time.monotonic())


def run(cmd, budget, limit, env=None):
    """(returncode or None if it timed out, stdout + stderr, seconds) of a child process."""
    timeout = min(limit, budget.left())
    start = time.monotonic()
    if timeout < 1:
        return None, "no time left in the budget", 0.0
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                                **(env or {})})
        return r.returncode, r.stdout + r.stderr, time.monotonic() - start
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out + f"\n(timed out after {timeout:.0f} s)", time.monotonic() - start


def last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def probe_gpu(budget):
    """A row for the device, or None with the reason there is none."""
    code, out, secs = run([sys.executable, "-c", PROBE], budget, 90)
    if code != 0:
        reason = last_line(out) or "the probe timed out"
        if "No module named 'cupy'" in out:
            reason = "CuPy is not installed (pip install -e '.[cuda12]' or '.[cuda13]')"
        return None, reason
    info = json.loads(last_line(out))
    detail = f"{info['name']}, {info['memory_gb']} GiB, CuPy {info['cupy']}, CUDA runtime {info['cuda_runtime']}"
    return {"step": "gpu", "ok": True, "detail": detail, "seconds": secs, "info": info}, None


# --- tests -------------------------------------------------------------------------------------

def pytest_counts(text):
    """{'passed': n, 'failed': n, 'skipped': n, ...} from pytest's summary line."""
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped|deselected)", line)]
    counts = {}
    for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", summary[-1]
                              if summary else ""):
        counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    return counts


def step_tests(args, budget):
    # the CuPy file, and every test that runs on the `cupy` backend (conftest's backend fixture)
    if args.backend == "cupy":
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *GPU_TESTS]
    else:  # the plumbing only: the NumPy-backed stand-in's cases of one small test
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
               "tests/test_cupy.py", "-k", "fake_cupy and gelu"]
    code, out, secs = run(cmd, budget, 300)
    counts = pytest_counts(out)
    no_gpu = len(re.findall(r"no usable GPU", out)) if args.backend == "cupy" else 0
    detail = ", ".join(f"{v} {k}" for k, v in counts.items()) or last_line(out)
    ok = code == 0 and counts.get("passed", 0) > 0 and not no_gpu
    if no_gpu:
        detail += f"; {no_gpu} skipped for want of a GPU"
    if code is None:
        detail = last_line(out)
    elif not ok:
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
        detail += ("; " + ", ".join(failed[:3])) if failed else ""
    return {"step": "tests", "ok": ok, "detail": detail, "seconds": secs, "counts": counts}


# --- bench -------------------------------------------------------------------------------------

def step_bench(args, budget, folder):
    out_json = os.path.join(folder, "bench.json")
    cmd = [sys.executable, "-m", "minimixer.bench", "infer", "--backend", args.backend, "--model", args.model,
           "--batch-size", str(args.batch_size), "--warmup", "2", "--repeats", "5", "--json", out_json]
    if args.backend == "numpy":
        cmd += ["--no-ceiling", "--warmup", "1", "--repeats", "2", "--settle", "0"]
    if args.compare:
        cmd += ["--compare", args.compare]
    code, out, secs = run(cmd, budget, 240)
    if code != 0 or not os.path.exists(out_json):
        return {"step": "bench", "ok": False, "seconds": secs,
                "detail": last_line(out) if code is not None else f"timed out ({last_line(out)})"}
    return bench_row(json.load(open(out_json)), secs)


def bench_row(result, secs):
    """The bench's JSON (one batch size) as a table row: images/s of each engine, the ratio,
    and the logit difference to each peer, which must stay under LOGIT_TOL."""
    row = result["batches"][0]
    rates = row["img_per_s"]
    parts = [f"{result['model']} batch {row['batch_size']}: minimixer {rates['minimixer']:.0f} img/s"]
    diffs = row.get("logits_max_rel_diff", {})
    for peer in result["engines"][1:]:
        parts.append(f"{peer} {rates[peer]:.0f} img/s ({rates['minimixer'] / rates[peer]:.2f}x), "
                     f"logits max rel diff {diffs[peer]:.1e}")
    ok = all(d < LOGIT_TOL for d in diffs.values())
    return {"step": "bench", "ok": ok, "detail": "; ".join(parts), "seconds": secs,
            "img_per_s": {k: rates[k] for k in result["engines"]}, "logits_max_rel_diff": diffs}


# --- eval --------------------------------------------------------------------------------------

def make_folder(root, per_class, seed=0):
    """An ImageFolder of noisy single-color images: class 0 blue, 1 green, 2 red (sorted names)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for name, color in COLORS.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(32, 96, size=2)
            pixels = np.clip(np.array(color) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, name, f"{i:05d}.png"))


def color_model(path):
    """A Mixer whose accuracy on make_folder's images is 100%: the stem averages each color
    channel into a channel of its own, the block's branches are zero, the head reads them out."""
    import numpy as np
    sys.path.insert(0, ROOT)
    import minimixer as mm
    cfg = mm.get_config("mixer_s32_224", img_size=32, embed_dim=4, num_blocks=1, num_classes=3)
    p = {k: np.zeros_like(v) for k, v in mm.init_params(cfg).items()}
    for channel, rgb in enumerate((2, 1, 0)):  # blue, green, red
        p["stem.proj.weight"][channel, rgb] = 1.0 / (32 * 32)
        p["head.weight"][channel, channel] = 1.0
    p["norm.weight"][:] = 1.0
    mm.save_weights(p, path)


EVAL_ARGS = ["--model", "mixer_s32_224", "--img-size", "32", "--embed-dim", "4", "--num-blocks", "1",
             "--num-classes", "3", "--no-progress", "-b", "256"]


def step_eval(args, budget, folder):
    start = time.monotonic()
    data, weights = os.path.join(folder, "val"), os.path.join(folder, "color.safetensors")
    make_folder(data, args.images)
    color_model(weights)
    rows = {}
    for backend in dict.fromkeys([args.backend, "numpy"]):
        results = os.path.join(folder, f"eval_{backend}.json")
        code, out, _ = run([sys.executable, "-m", "minimixer.eval", data, "--weights", weights, *EVAL_ARGS,
                            "--backend", backend, "--results-file", results], budget, 120)
        if code != 0:
            return {"step": "eval", "ok": False, "seconds": time.monotonic() - start,
                    "detail": f"{backend}: " + (last_line(out) if code is not None else "timed out")}
        rows[backend] = json.load(open(results))
    return eval_row(rows, 3 * args.images, time.monotonic() - start)


def eval_row(rows, expected_count, secs):
    """Every backend's row must count every image and score 100% (the model is exact on these)."""
    same = {k: v for k, v in rows.items()}
    ok = all(r["count"] == expected_count and r["top1"] == 100.0 and r["top5"] == 100.0 and r["skipped"] == 0
             for r in same.values())
    detail = "; ".join(f"{b}: {r['count']} images, Acc@1 {r['top1']:.3f} Acc@5 {r['top5']:.3f}, "
                       f"{r['img_per_sec']:.0f} img/s" for b, r in same.items())
    return {"step": "eval", "ok": ok, "detail": detail + ("" if ok else f" (expected {expected_count} at 100%)"),
            "seconds": secs, "rows": rows}


# --- the table ---------------------------------------------------------------------------------

def table(rows, total_seconds):
    """One Markdown table: a row per step, then the verdict."""
    lines = ["| step | result | detail | seconds |", "|---|---|---|---|"]
    for r in rows:
        detail = r["detail"].replace("|", "/")
        lines.append(f"| {r['step']} | {'PASS' if r['ok'] else 'FAIL'} | {detail} | {r['seconds']:.0f} |")
    verdict = "PASS" if rows and all(r["ok"] for r in rows) else "FAIL"
    lines.append(f"| all | {verdict} | {sum(r['ok'] for r in rows)} of {len(rows)} steps passed | "
                 f"{total_seconds:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    start, budget = time.monotonic(), Budget(args.budget)
    rows = []
    if args.backend == "cupy":
        gpu, reason = probe_gpu(budget)
        if gpu is None:
            print(f"gpu_check: no usable GPU here ({reason}); nothing was run", file=sys.stderr)
            return EXIT_NO_GPU
        rows.append(gpu)
    with tempfile.TemporaryDirectory(prefix="minimixer-gpu-check-") as folder:
        for step in args.steps:
            if budget.left() < 5:
                rows.append({"step": step, "ok": False, "detail": "not run: the budget is spent", "seconds": 0})
                continue
            print(f"gpu_check: {step} ...", file=sys.stderr, flush=True)
            row = {"tests": lambda: step_tests(args, budget), "bench": lambda: step_bench(args, budget, folder),
                   "eval": lambda: step_eval(args, budget, folder)}[step]()
            rows.append(row)
    total = time.monotonic() - start
    print(table(rows, total))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": args.backend, "seconds": total, "rows": rows}, f, indent=2)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

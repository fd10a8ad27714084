"""Scaling of data parallelism on one machine: 1 rank × 2 threads against 2 ranks × 1 thread.

    pip install -e ".[mpi]"
    python benchmarks/mpi_scaling.py                     # S/32 train step (batch 32), B/16 inference (batch 16)
    python benchmarks/mpi_scaling.py --rounds 5 --json scaling.json

Three layouts of the same global batch, run in alternating rounds (the machine may be shared,
so compare ratios within a round, not absolute numbers across runs):
  1x2  one process, both cores (fast.py splits the batch over two threads)
  2x1  `mpiexec -n 2 -bind-to core`: two ranks, one core each, gradients allreduced
  1x1  one process pinned to one core (taskset): the baseline for the scaling efficiency
Each worker prints one JSON line: seconds per global batch (median), images/s, each rank's RSS
before the timed steps (params, inputs, optimizer state after the warm-up step) and its working
memory (peak RSS during the timed steps minus that), and for 2x1 training the time of the
gradient allreduce alone.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TASKS = {"train": ("mixer_s32_224", 32), "infer": ("mixer_b16_224", 16)}


def rss_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak_rss():
    """Reset VmHWM (the peak RSS) to the current RSS; returns the current RSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mb("VmRSS")


def worker(task, repeats):
    """One measurement in this process (one rank of the job, or the only process)."""
    from minimixer import fast
    from minimixer.runtime import distributed
    from minimixer.commands.bench import make_params
    from minimixer.config import get_config
    from minimixer.training.loop import make_optimizer, train_step
    from minimixer.training.settings import TrainSettings

    model, batch = TASKS[task]
    cfg = get_config(model)
    params = make_params(cfg, np.float32)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)  # the global batch
    y = rng.integers(0, cfg.num_classes, batch)
    if task == "train":
        opt = make_optimizer(params, TrainSettings())

        def step():  # train_step takes this rank's rows itself
            train_step(params, opt, x, y, cfg, lr=1e-4, clip_grad=1.0)
    else:
        mine = distributed.shard(x)

        def step():
            fast.predict(params, mine, cfg)

    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        if i == 1:
            before = reset_peak_rss()  # what the steps use beyond params, inputs (and optimizer state)
        distributed.barrier()
        start = time.perf_counter()
        step()
        distributed.barrier()  # a global batch is done when its slowest rank is
        times.append(time.perf_counter() - start)
    allreduce = None
    if task == "train" and distributed.size() > 1:
        grads = {k: np.ones_like(v) for k, v in params.items()}
        spans = []
        for _ in range(3):
            distributed.barrier()
            start = time.perf_counter()
            distributed.allreduce_sum_(grads)
            spans.append(time.perf_counter() - start)
        allreduce = min(spans)
    working = rss_mb("VmHWM") - before
    rss = distributed.gather_lists([(round(before, 1), round(working, 1))])
    if distributed.is_root():
        seconds = statistics.median(times[1:])
        print(json.dumps({"task": task, "model": model, "batch": batch, "ranks": distributed.size(),
                          "threads": fast.num_threads(), "seconds": seconds, "img_per_s": batch / seconds,
                          "rss_before_and_working_mb_per_rank": rss, "allreduce_s": allreduce,
                          "params": int(sum(v.size for v in params.values()))}))


def run_layout(layout, task, repeats):
    me = [sys.executable, os.path.abspath(__file__), "--worker", task, "--repeats", str(repeats)]
    if layout == "1x2":
        cmd = me
    elif layout == "1x1":
        cmd = ["taskset", "-c", "0"] + me
    else:
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        cmd = [mpiexec if os.path.exists(mpiexec) else shutil.which("mpiexec"), "-n", "2", "-bind-to", "core"] + me
    # glibc returns large blocks to the OS at once, so the RSS follows what is really in use (as bench.py)
    env = dict(os.environ, PYTHONPATH=ROOT, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.pop(v, None)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        sys.exit(f"{layout} {task} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=list(TASKS), help=argparse.SUPPRESS)
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timed global batches per run (after one warm-up)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.repeats)
    results = []
    for task in args.tasks:
        for rnd in range(args.rounds):
            row = {}
            for layout in ("1x2", "2x1", "1x1"):
                row[layout] = run_layout(layout, task, args.repeats)
                m = row[layout]
                print(f"round {rnd + 1} {task:5s} {layout}: {m['img_per_s']:6.2f} img/s  "
                      f"RSS before, working, per rank {m['rss_before_and_working_mb_per_rank']} MB"
                      + (f"  allreduce {m['allreduce_s'] * 1e3:.0f} ms" if m["allreduce_s"] else ""), flush=True)
            results.append({"task": task, "round": rnd + 1, **row})
    print("\nmedians over rounds (ratios are taken within each round)")
    for task in args.tasks:
        rows = [r for r in results if r["task"] == task]
        vs_threads = statistics.median(r["2x1"]["img_per_s"] / r["1x2"]["img_per_s"] for r in rows)
        efficiency = statistics.median(r["2x1"]["img_per_s"] / (2 * r["1x1"]["img_per_s"]) for r in rows)
        thread_eff = statistics.median(r["1x2"]["img_per_s"] / (2 * r["1x1"]["img_per_s"]) for r in rows)
        print(f"{task}: 2 ranks x 1 thread / 1 rank x 2 threads = {vs_threads:.3f}; scaling efficiency "
              f"2 ranks vs 1 rank (1 core each) {efficiency:.1%}; 2 threads vs 1 thread {thread_eff:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

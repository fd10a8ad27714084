# %% [markdown]
# # 7. Data parallelism: many processes, one big batch
#
# **Needs:** assignments A1, A2 and A3 (a training step).
#
# One process can only go as fast as its cores. To train or evaluate faster, run N copies of the
# program (MPI calls them *ranks*), on one machine or many, and give each a share of the work:
#
# ```bash
# mpiexec -n 4 python -m minimixer.train --model mixer_s32_224 --data DIR --batch-size 256
# mpiexec -n 4 python -m minimixer.eval --model mixer_b16_224 --weights auto --data /data/imagenet/val
# ```
#
# For evaluation the idea is plain: each rank takes a quarter of the files, and the counts of
# correct answers are added up at the end. For training it is less obvious that nothing changes.
# This notebook shows why it doesn't, with `minimixer/runtime/distributed.py`, the one module that talks
# to MPI. It runs here without MPI: we *simulate* the ranks in one process, calling the same
# helpers that each real rank calls with its own rank number.

# %%
import course

course.setup()
import numpy as np
from threadpoolctl import threadpool_limits

import minimixer as mm
from minimixer import fast
from minimixer.runtime import distributed
from minimixer.data import digits_split
from minimixer.layers import softmax_cross_entropy
from minimixer.optim import AdamW, clip_grad_norm

threadpool_limits(1)  # the digits model's matrices are small: one BLAS thread runs them fastest
cfg = mm.get_config("mixer_digits")
rng = np.random.default_rng(0)  # timm's init zeroes the head, and with it every other gradient: perturb
params0 = {k: v + 0.02 * rng.standard_normal(v.shape) for k, v in mm.init_params(cfg, seed=0, dtype="float64").items()}
x_train, y_train, _, _ = digits_split()
x_train = x_train.astype(np.float64)
print(f"world size here: {distributed.size()} (no mpiexec, so one process, and mpi4py is not imported)")

# %% [markdown]
# ## The averaged gradient is the big-batch gradient
#
# The loss of a batch of B samples is the mean of the per-sample losses, so its gradient is the
# mean of the per-sample gradients: $g = \frac1B\sum_i \nabla\ell_i$. Split the batch into shares
# $S_r$ of $b_r$ rows. Rank r computes the mean over its share, $g_r = \frac1{b_r}\sum_{i\in S_r}\nabla\ell_i$,
# and
#
# $$\sum_r \frac{b_r}{B}\, g_r = \frac1B \sum_r \sum_{i\in S_r} \nabla\ell_i = g .$$
#
# One *allreduce* (every rank sends its $\frac{b_r}{B}g_r$ and receives the sum) gives every rank
# the big-batch gradient. Every rank then takes the same optimizer step from the same parameters,
# so the parameters stay identical on all ranks without ever being sent.
#
# Two details decide whether this is exact:
# - **the weights $b_r/B$**. With 30 rows over 4 ranks the shares are 7, 8, 7, 8 rows; a plain
#   average of the four share means would weigh a sample of a 7-row share more than one of an
#   8-row share.
# - **the random masks**. Dropout and drop_path draw one random number per sample. If each rank
#   drew its own masks, the run would depend on the number of ranks. `batch_share` hands each
#   rank an rng that draws the masks of the whole batch and keeps its rows.

# %%
B, ranks = 30, 4
x, y = x_train[:B], y_train[:B]
regularized = dict(drop_path_rate=0.2, drop_rate=0.1)


def loss_and_grads(params, x, y, rng):
    logits, cache = fast.forward(params, x, cfg, rng=rng, **regularized)
    loss, dlogits = softmax_cross_entropy(logits, y, label_smoothing=0.1)
    return loss, fast.backward(dlogits, cache)[1]


def rel(a, b):
    """The largest difference between two dicts of tensors, relative to b's largest value."""
    return max(np.abs(a[k] - b[k]).max() for k in b) / max(np.abs(v).max() for v in b.values())


big_loss, big = loss_and_grads(params0, x, y, np.random.default_rng(7))
weighted = {k: np.zeros_like(v) for k, v in params0.items()}
plain = {k: np.zeros_like(v) for k, v in params0.items()}
own_masks = {k: np.zeros_like(v) for k, v in params0.items()}
for r in range(ranks):
    rows, rng = distributed.batch_share(B, np.random.default_rng(7), ranks, r)  # what rank r calls
    _, g = loss_and_grads(params0, x[rows], y[rows], rng)
    _, g_own = loss_and_grads(params0, x[rows], y[rows], np.random.default_rng([7, r]))  # per-rank masks
    b = rows.stop - rows.start
    print(f"rank {r}: rows {rows.start:2d}..{rows.stop - 1:2d} ({b} of {B})")
    for k in weighted:
        weighted[k] += b / B * g[k]
        plain[k] += g[k] / ranks
        own_masks[k] += b / B * g_own[k]
print(f"weighted sum of share gradients vs big batch: {rel(weighted, big):.1e}  (float64 rounding)")
print(f"plain average of share means:                 {rel(plain, big):.1e}  (uneven shares: wrong)")
print(f"each rank drawing its own masks:              {rel(own_masks, big):.1e}  (depends on N: wrong)")

# %%
assert rel(weighted, big) < 1e-12 and rel(plain, big) > 1e-3 and rel(own_masks, big) > 1e-3

# %% [markdown]
# **Exercise 7.1.** Gradient clipping must come *after* the allreduce. Clip each share's gradients
# before they are added up (as a rank would if it clipped its own), and compare with the big-batch
# gradient clipped once, at a max norm of half the big batch's norm. Write the sum of the clipped
# shares (`early`) and the clipped sum (`late`). Predict first: which of the two agrees with the big
# batch, and why does the other not?
#
# <!-- BEGIN ANSWER -->
# *Answer:* clipping after the allreduce agrees. A share's gradient is noisier than the batch's, so its
# norm is larger and it is scaled down by a different factor on each rank; clipping is not linear,
# so it does not commute with the sum.
# <!-- END ANSWER -->

# %%
def clipped(grads, max_norm):
    out = {k: v.copy() for k, v in grads.items()}
    clip_grad_norm(out, max_norm)
    return out


max_norm = 0.5 * clip_grad_norm({k: v.copy() for k, v in big.items()}, np.inf)  # returns the norm
reference = clipped(big, max_norm)
with course.exercise("7.1"):
    ### BEGIN SOLUTION
    early = {k: np.zeros_like(v) for k, v in params0.items()}
    for r in range(ranks):
        rows, rng = distributed.batch_share(B, np.random.default_rng(7), ranks, r)
        g = clipped(loss_and_grads(params0, x[rows], y[rows], rng)[1], max_norm)  # each rank clips its own
        for k in early:
            early[k] += (rows.stop - rows.start) / B * g[k]
    late = clipped(weighted, max_norm)  # allreduce first, then clip: what train_step does
    ### END SOLUTION
    print(f"clip after the allreduce:  {rel(late, reference):.1e}")
    print(f"clip before the allreduce: {rel(early, reference):.1e}")
    assert rel(late, reference) < 1e-12 and rel(early, reference) > 1e-3

# %% [markdown]
# ## Ten training steps: 1 rank against 3
#
# A real rank runs `training.loop.train_step`, which does exactly this: take its rows with
# `batch_share`, forward and backward on them, then `allreduce_mean` (scale by $b_r/B$, allreduce,
# done). Gradient clipping comes after the allreduce, so it sees the global norm. Here the
# allreduce is a sum over the simulated ranks.

# %%
def train(ranks, steps=10, batch=32):
    params = {k: v.copy() for k, v in params0.items()}
    opt = AdamW(params, lr=3e-3, weight_decay=0.05)
    losses = []
    for step in range(steps):
        xb, yb = x_train[step * batch:(step + 1) * batch], y_train[step * batch:(step + 1) * batch]
        total, loss = {k: np.zeros_like(v) for k, v in params.items()}, 0.0
        for r in range(ranks):  # in an MPI job, these run at the same time, one per rank
            rows, rng = distributed.batch_share(batch, np.random.default_rng([0, step]), ranks, r)
            share_loss, g = loss_and_grads(params, xb[rows], yb[rows], rng)
            weight = (rows.stop - rows.start) / batch
            loss += weight * share_loss
            for k in total:
                total[k] += weight * g[k]  # the allreduce
        clip_grad_norm(total, 1.0)
        opt.step(total)
        losses.append(loss)
    return params, losses


one, losses1 = train(1)
three, losses3 = train(3)
print("losses, 1 rank: ", np.round(losses1, 4))
noise = [k for k in one if "mlp_tokens.fc2.bias" in k]
top = max(np.abs(v).max() for v in one.values())
diff = {k: np.abs(three[k] - one[k]).max() / top for k in one}
print(f"3 ranks vs 1: the losses differ by {np.abs(np.subtract(losses3, losses1)).max():.1e}, the parameters by "
      f"{max(d for k, d in diff.items() if k not in noise):.1e} of the largest one "
      f"(the mlp_tokens.fc2.bias by {max(diff[k] for k in noise):.1e})")

# %% [markdown]
# The token-mixing fc2 biases are the one exception, and a harmless one: their gradient is zero in
# exact arithmetic (only LayerNorms read the residual stream, and a per-token constant does not
# change a LayerNorm's output), so the computed one is rounding noise, which AdamW divides by its
# eps (1e-8). They wander by rounding noise alone, and the sum over 3 shares rounds differently
# from the sum over one batch. Every other tensor agrees to rounding.
#
# With a real `mpiexec -n 2`, `tests/test_mpi.py` checks the same thing: ten float64 steps with
# AdamW, clipping, drop_path, dropout and label smoothing match one process to about 1e-13
# relative (and bit for bit when each rank is bound to one core with `-bind-to core`, because then
# the two ranks do exactly the float operations that one process does on its two threads).
#
# ## What it costs
#
# Per step, each rank sends its gradients once: **4 bytes × params** in float32. A ring allreduce
# passes them around in 2(N−1) chunks of 1/N, so each rank sends and receives
# 2(N−1)/N × 4 × params bytes: the time barely grows with N. The time on a 10 GB/s network:

# %%
bandwidth = 10e9  # bytes/s
print(f"{'model':14s} {'params':>12s} {'bytes/step':>11s} {'N=2':>8s} {'N=8':>8s} {'N=64':>8s}")
for name in ("mixer_s32_224", "mixer_b16_224", "mixer_l16_224"):
    n = mm.param_count(mm.get_config(name))
    times = [2 * (N - 1) / N * 4 * n / bandwidth for N in (2, 8, 64)]
    print(f"{name:14s} {n:12,d} {4 * n / 1e6:8.1f} MB " + " ".join(f"{t * 1e3:5.0f} ms" for t in times))

# %% [markdown]
# On CPUs a step takes seconds (an S/32 step on 16 images takes a few seconds per rank on two
# cores), so 15 ms of allreduce is about 1%. On GPUs a step can take tens of
# milliseconds and the allreduce is no longer negligible: large jobs overlap it with the backward
# pass (start sending a block's gradients as soon as they are ready), which minimixer does not do.
#
# On one machine, two ranks of one thread each can beat one rank of two threads: one process's
# threads meet in Python between NumPy calls (the GIL) and wait for each other; two processes never
# do. The price is memory: each rank holds its own parameters and AdamW state, while the activations
# are split. `benchmarks/mpi_scaling.py` measures it on your machine (docs/walkthrough.md has our runs).
#
# ## Running it
#
# - **Install**: `pip install -e ".[mpi]"` brings mpi4py and the MPICH wheel, so `mpiexec` is in
#   the environment's `bin/` with no system packages. On a cluster, prefer the site's MPI:
#   `pip install mpi4py` builds against the `mpicc` on the PATH (skip the mpich wheel).
# - **One machine**: `mpiexec -n 2 -bind-to core python -m minimixer.train ...` (one core per rank;
#   minimixer splits each rank's share over the cores it may use).
# - **Several machines**: `mpiexec -n 16 -ppn 4 -hostfile hosts python -m minimixer.train ...`
#   (MPICH; Open MPI: `mpirun -np 16 --hostfile hosts`), or under Slurm
#   `srun -N 4 --ntasks-per-node=4 --mpi=pmi2 python -m minimixer.train ...`. Every rank must see
#   the data and the output folder at the same path (a shared filesystem); rank 0 alone writes.
# - **GPUs**: one rank per GPU, `--backend cupy`. The allreduce passes CuPy buffers straight to
#   MPI when it is CUDA-aware (set `MINIMIXER_CUDA_AWARE_MPI=1`), and copies them through host
#   memory otherwise. NCCL (`cupy.cuda.nccl`) is the GPU-native alternative: the same
#   `allreduce_sum_` with an NCCL communicator would replace the MPI call.
# - **A failure**: if one rank raises, it prints its error and ends the whole job (MPI_Abort), so
#   no rank waits forever. If a rank is killed, `mpiexec` ends the others. Checkpoints are written
#   atomically, so the last one is intact, and `--resume` continues with any number of ranks.

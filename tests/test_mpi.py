"""Data parallelism under a real `mpiexec -n 2` (marker mpi: pip install -e '.[test,mpi]').

Each test runs commands under mpiexec and compares with the same command in one process.
This file is also the script the ranks run: `python tests/test_mpi.py steps OUT BATCH`.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")  # the mpich wheel's, in the venv
    return here if os.path.exists(here) else shutil.which("mpiexec")


def run(args, ranks=None, timeout=300, **kw):
    """python ARGS, in one process (ranks None) or under mpiexec -n ranks."""
    options = [a for a in args if a in ("-bind-to", "core")]  # mpiexec's, not python's
    cmd = [sys.executable] + [a for a in args if a not in options]
    if ranks is not None:
        cmd = [mpiexec(), "-n", str(ranks)] + options + cmd
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, **kw)


# --- the script each rank runs: 10 float64 training steps ----------------------------------------

def steps_script(out, batch):
    """10 train_steps on the digits in float64 (AdamW, clipping, drop_path, dropout, label
    smoothing), global batch `batch`; every rank writes its params and losses."""
    from minimixer import distributed
    from minimixer.config import get_config
    from minimixer.data import ArrayLoader, digits_split
    from minimixer.params import init_params
    from minimixer.train_loop import TrainSettings, make_optimizer, train_step

    cfg = get_config("mixer_digits")
    s = TrainSettings(lr=1e-2, weight_decay=0.05, clip_grad=0.5, drop_path=0.25, dropout=0.2,
                      label_smoothing=0.1, seed=3)
    params = init_params(cfg, seed=1, dtype="float64")
    opt = make_optimizer(params, s)
    x, y, _, _ = digits_split()
    loader = ArrayLoader(x.astype(np.float64), y, batch, shuffle=True, seed=s.seed)
    losses = []
    for step, (xb, yb) in zip(range(10), loader.batches(0)):
        losses.append(train_step(params, opt, xb, yb, cfg, lr=s.lr, label_smoothing=s.label_smoothing,
                                 clip_grad=s.clip_grad, drop_path=s.drop_path, dropout=s.dropout,
                                 rng=np.random.default_rng([s.seed, step])))
    np.savez(os.path.join(out, f"rank{distributed.rank()}of{distributed.size()}.npz"),
             losses=np.array(losses), **{f"p/{k}": v for k, v in params.items()})


def load(path):
    z = np.load(path)
    return z["losses"], {k[2:]: z[k] for k in z.files if k.startswith("p/")}


NOISE = "mlp_tokens.fc2.bias"  # zero gradient in exact arithmetic: see compare()


def compare(got, ref):
    """(largest |got - ref| relative to each tensor's scale, largest |got - ref| of the NOISE
    biases relative to the scale of all parameters). The gradient of every mlp_tokens.fc2.bias
    is zero in exact arithmetic (every reader of the residual stream is a LayerNorm), so its
    computed gradient is rounding noise (~1e-17), which AdamW divides by its eps (1e-8): those
    biases move by lr·1e-9 per step in directions set by rounding alone. They are compared
    absolutely, against the other parameters' scale."""
    overall = max(np.abs(v).max() for v in ref.values())
    rel = max(float(np.abs(got[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref if NOISE not in k)
    noise = max(float(np.abs(got[k] - ref[k]).max() / overall) for k in ref if NOISE in k)
    return rel, noise


# --- tests ---------------------------------------------------------------------------------

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module", autouse=True)
def needs_mpi():
    pytest.importorskip("mpi4py")
    if mpiexec() is None:
        pytest.skip("no mpiexec (pip install -e '.[mpi]')")


@pytest.mark.parametrize("batch, bind", [(32, False), (31, False), (32, True)])  # 16 + 16 rows, an uneven 15 + 16
def test_two_ranks_train_like_one_process(tmp_path, batch, bind):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    r = run([__file__, "steps", str(one), str(batch)])
    assert r.returncode == 0, r.stderr
    r = run(["-bind-to", "core"] * bind + [__file__, "steps", str(two), str(batch)], ranks=2)
    assert r.returncode == 0, r.stderr
    loss1, p1 = load(one / "rank0of1.npz")
    loss_a, pa = load(two / "rank0of2.npz")
    loss_b, pb = load(two / "rank1of2.npz")
    assert all(np.array_equal(pa[k], pb[k]) for k in pa), "the ranks' parameters drifted apart"
    assert np.array_equal(loss_a, loss_b)
    params_rel, noise = compare(pa, p1)
    loss_rel = float(np.abs(loss_a - loss1).max() / np.abs(loss1).max())
    print(f"batch {batch}{' bound to cores' * bind}: params max rel diff {params_rel:.2e} (noise biases "
          f"{noise:.2e}), losses {loss_rel:.2e}; losses {np.round(loss1, 4).tolist()}")
    assert params_rel <= 1e-12 and loss_rel <= 1e-12 and noise <= 1e-9
    assert loss1[-3:].mean() < loss1[:3].mean() - 0.05  # it did train
    if bind and len(os.sched_getaffinity(0)) == 2:
        # one process splits the batch 16 + 16 over its two cores, exactly as the two ranks do,
        # and 16/32 scales exactly: the same float operations, so the same bits
        assert params_rel == 0.0 and noise == 0.0


if __name__ == "__main__":
    if sys.argv[1] == "steps":
        steps_script(sys.argv[2], int(sys.argv[3]))

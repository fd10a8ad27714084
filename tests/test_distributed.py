"""minimixer.runtime.distributed in one process, without mpi4py: world size 1, no-op communication, and
the math of data parallelism checked by simulating ranks (tests/test_mpi.py runs real ranks)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from support.helpers import assert_all_close
from minimixer import fast
from minimixer.commands import cli
from minimixer.runtime import distributed
from minimixer.config import get_config
from minimixer.layers import softmax_cross_entropy
from minimixer.params import init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER_VARIABLES = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


@pytest.fixture
def fresh(monkeypatch):
    """distributed with its communicator forgotten, outside any launcher."""
    for v in LAUNCHER_VARIABLES:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(distributed, "_comm", None)
    return distributed


def test_one_process_is_a_world_of_one_without_importing_mpi4py():
    code = ("import sys; from minimixer.runtime import distributed as d; import numpy as np\n"
            "g = {'w': np.ones(3)}\n"
            "assert (d.size(), d.rank(), d.is_root(), d.comm()) == (1, 0, True, None)\n"
            "assert d.allreduce_mean(g, 2.5, 3, 3) == 2.5 and (g['w'] == 1).all()\n"
            "assert d.sum_counts(3, 4) == (3, 4) and d.gather_lists([1, 2]) == [1, 2] and d.shard('abc') == 'abc'\n"
            "assert d.any_rank(True) and not d.any_rank(False)\n"
            "d.barrier(); d.abort(2)  # no-ops\n"
            "print('mpi4py' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_launched_without_mpi4py_says_what_to_install(fresh, monkeypatch, capsys):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    assert cli.run(lambda argv: distributed.size(), prog="python -m minimixer.train") == 2
    err = capsys.readouterr().err
    assert err == ("python -m minimixer.train: error: started by an MPI launcher, but mpi4py is not "
                   "installed: pip install 'minimixer[mpi]'\n")


def test_a_launcher_with_one_rank_needs_no_mpi4py(fresh, monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "1")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    assert distributed.size() == 1


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 1000), ranks=st.integers(1, 70))
def test_shares_cover_everything_once_in_order(n, ranks):
    bounds = [distributed.share_bounds(n, ranks, r) for r in range(ranks)]
    items = list(range(n))
    assert [i for a, b in bounds for i in items[a:b]] == items
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_masks_do_not_depend_on_the_number_of_ranks():
    """Each simulated rank draws with batch_share's rng and gets exactly its rows of the
    masks one process draws for the whole batch."""
    B = 7
    for ranks in (2, 3, 7, 9):
        for r in range(ranks):
            rows, rng = distributed.batch_share(B, np.random.default_rng(5), ranks, r)
            whole = np.random.default_rng(5)
            for shape in ((B, 1, 1), (B, 4)):
                got = rng.random((rows.stop - rows.start,) + shape[1:])
                assert np.array_equal(got, whole.random(shape)[rows])
    rows, rng = distributed.batch_share(7, np.random.default_rng(0), 2, 1)
    with pytest.raises(ValueError, match="not per sample"):
        rng.random((7, 3))  # a draw that is not one row per sample of the share


@pytest.mark.parametrize("ranks", [2, 3, 8])
def test_weighted_sum_of_share_gradients_is_the_big_batch_gradient(ranks):
    """Why data parallelism is exact: Σ_r (b_r/B)·(mean gradient over share r) is the mean
    gradient over the batch, with drop_path, dropout and label smoothing on (float64)."""
    cfg = get_config("mixer_digits", num_blocks=2, embed_dim=16)
    params = init_params(cfg, seed=0, dtype="float64")
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((8, 1, 8, 8)), rng.integers(0, 10, 8)
    kw = dict(drop_path_rate=0.3, drop_rate=0.2)

    def loss_and_grads(x, y, rng):
        logits, cache = fast.forward(params, x, cfg, rng=rng, **kw)
        loss, dlogits = softmax_cross_entropy(logits, y, label_smoothing=0.1)
        return loss, fast.backward(dlogits, cache)[1]

    loss, grads = loss_and_grads(x, y, np.random.default_rng(9))
    total_loss, total = 0.0, {k: np.zeros_like(v) for k, v in params.items()}
    for r in range(ranks):
        rows, share_rng = distributed.batch_share(8, np.random.default_rng(9), ranks, r)
        share_loss, share_grads = loss_and_grads(x[rows], y[rows], share_rng)
        weight = (rows.stop - rows.start) / 8
        total_loss += weight * share_loss
        for k in total:
            total[k] += weight * share_grads[k]
    assert abs(total_loss - loss) <= 1e-13 * loss
    # mlp_tokens.fc2.bias: zero gradient in exact arithmetic; compared against the largest gradient
    biggest = max(np.abs(g).max() for g in grads.values())
    assert_all_close([(k, total[k], grads[k]) for k in grads if "mlp_tokens.fc2.bias" not in k], 1e-12)
    assert max(np.abs(total[k] - grads[k]).max() for k in grads if "mlp_tokens.fc2.bias" in k) <= 1e-13 * biggest

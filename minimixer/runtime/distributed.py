"""Data parallelism over MPI: N processes (ranks) share the work of one training or evaluation run.

    mpiexec -n 4 python -m minimixer.train ...      # each rank takes a quarter of every batch
    mpiexec -n 4 python -m minimixer.eval ...       # each rank takes a quarter of the files

Training. Every rank holds the same parameters and sees the same global batch of B rows. Rank r
keeps its rows S_r (b_r of them), runs forward and backward on them alone, and gets the mean
gradient of its share, g_r = (1/b_r)·Σ_{i∈S_r} ∇ℓ_i. The loss of the whole batch is the mean
of the per-sample losses, so its gradient is

    (1/B)·Σ_i ∇ℓ_i = Σ_r (b_r/B)·g_r

which is what `allreduce_mean` computes: each rank scales its gradients by b_r/B, and one
allreduce adds them up on every rank. Every rank then holds the big-batch gradient (up to
float rounding), applies the same optimizer step, and its parameters stay equal to the others'
without ever being sent. Nothing else in the math changes: clipping sees the summed gradient,
so it uses the global norm; dropout and drop_path masks are drawn for the whole batch and
sliced (`batch_share`), so each sample gets the mask it would get in one process.

Cost. One allreduce of the gradients per step: 4 bytes × params in float32. A ring allreduce
sends (and receives) 2·(N-1)/N times that per rank, so the time per step is about
2·(N-1)/N · 4·params / bandwidth, nearly independent of N.

Without mpi4py, or when not started by mpiexec/srun, this is one process of a world of size 1:
every function below is then a cheap no-op, and mpi4py is never imported.
"""
import os
import sys

import numpy as np

from ..backend import BackendError, get_xp

_comm = None


def _launched_with_ranks():
    """True when an MPI launcher (mpiexec, srun) started this process as one of several ranks."""
    declared = os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE")  # MPICH/Slurm, Open MPI
    if declared:
        return declared != "1"
    return "PMIX_RANK" in os.environ  # PMIx launchers: ask MPI itself


class DistributedError(BackendError):
    """Started by an MPI launcher, but mpi4py is missing."""


def comm():
    """MPI.COMM_WORLD when started by an MPI launcher with more than one rank, else None."""
    global _comm
    if _comm is None:
        _comm = False
        if _launched_with_ranks():
            try:
                from mpi4py import MPI
            except ImportError:
                raise DistributedError("started by an MPI launcher, but mpi4py is not installed: "
                                       "pip install 'minimixer[mpi]'") from None
            if MPI.COMM_WORLD.Get_size() > 1:
                _comm = MPI.COMM_WORLD
                _abort_on_uncaught_exceptions()
    return _comm or None


def _mpi():
    from mpi4py import MPI  # only reached after comm() found more than one rank
    return MPI


def size():
    c = comm()
    return 1 if c is None else c.Get_size()


def rank():
    c = comm()
    return 0 if c is None else c.Get_rank()


def is_root():
    """Rank 0 alone prints results and writes files."""
    return rank() == 0


# --- splitting the work ----------------------------------------------------------------------

def share_bounds(n, ranks=None, r=None):
    """[start, stop) of rank r's contiguous share of n items: sizes differ by at most one."""
    ranks = size() if ranks is None else ranks
    r = rank() if r is None else r
    return n * r // ranks, n * (r + 1) // ranks


def shard(items):
    """This rank's contiguous share of a list or an array (all of it on one process). Contiguous
    shares, gathered in rank order, give back the original order."""
    start, stop = share_bounds(len(items))
    return items[start:stop]


class SliceOfBatchRng:
    """Stands in for a step's numpy Generator on one rank: every draw is made for the whole
    global batch, shape (B, ...), and the rank keeps its rows. So each sample's dropout and
    drop_path mask is the one it gets in a single process, whatever the number of ranks.
    (layers.keep_mask draws all masks with rng.random((B, ...)).)"""

    def __init__(self, rng, rows, batch):
        self.rng, self.rows, self.batch = rng, rows, batch

    def random(self, shape):
        shape = tuple(shape)
        if shape[0] != self.rows.stop - self.rows.start:
            raise ValueError(f"a draw of shape {shape} is not per sample of this rank's {self.rows}")
        return self.rng.random((self.batch,) + shape[1:])[self.rows]


def batch_share(batch, rng=None, ranks=None, r=None):
    """(rows, rng) for this rank's share of a global batch of `batch` rows: rows is a slice;
    rng (if given) is wrapped so that the masks drawn with it are the whole batch's, sliced."""
    rows = slice(*share_bounds(batch, ranks, r))
    if rng is not None and (ranks or size()) > 1:
        rng = SliceOfBatchRng(rng, rows, batch)
    return rows, rng


# --- communication -------------------------------------------------------------------------

def allreduce_sum_(arrays):
    """Replace each array of the dict by its sum over all ranks, in place. One message: the
    arrays are packed into one flat buffer (sorted by name, so every rank packs alike)."""
    c = comm()
    if c is None or not arrays:
        return arrays
    names = sorted(arrays)
    xp = get_xp(*arrays.values())
    flat = xp.concatenate([arrays[k].ravel() for k in names])  # (total params,)
    flat = _allreduce_buffer(c, flat)
    offset = 0
    for k in names:
        a = arrays[k]
        a[...] = flat[offset:offset + a.size].reshape(a.shape)
        offset += a.size
    return arrays


def _allreduce_buffer(c, flat):
    """In-place Allreduce(SUM) of a contiguous 1-d array. NumPy buffers go to MPI directly;
    CuPy buffers too when MPI is CUDA-aware (MINIMIXER_CUDA_AWARE_MPI=1), else through a
    host copy. (The CuPy paths are written for, not tested on, a GPU cluster.)"""
    MPI = _mpi()
    xp = get_xp(flat)
    if xp is np:
        c.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        return flat
    if os.environ.get("MINIMIXER_CUDA_AWARE_MPI") == "1":
        xp.cuda.get_current_stream().synchronize()  # MPI reads the buffer outside CuPy's stream
        c.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        return flat
    host = xp.asnumpy(flat)
    c.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
    return xp.asarray(host)


def allreduce_mean(grads, loss, count, total):
    """Turn this rank's mean gradients and mean loss over `count` of the `total` rows of the
    global batch into the global-batch means, on every rank. grads change in place; returns
    the global mean loss. One process: returns loss, grads untouched."""
    c = comm()
    if c is None:
        return loss
    weight = count / total
    for g in grads.values():
        g *= weight  # exact when count and total are powers of two
    allreduce_sum_(grads)
    return float(c.allreduce(loss * weight))


def sum_counts(*values):
    """The sums over all ranks of a few integers, on every rank (a tuple)."""
    c = comm()
    if c is None:
        return values
    buf = np.array(values, dtype=np.int64)
    c.Allreduce(_mpi().IN_PLACE, buf, op=_mpi().SUM)
    return tuple(int(v) for v in buf)


def any_rank(flag):
    """True on every rank if it is true on any (e.g. a Ctrl-C that one rank saw a step earlier)."""
    c = comm()
    return bool(flag) if c is None else bool(c.allreduce(bool(flag), op=_mpi().LOR))


def gather_lists(items):
    """Rank 0 gets every rank's list, concatenated in rank order; the others get []."""
    c = comm()
    if c is None:
        return list(items)
    parts = c.gather(list(items), root=0)
    return [x for part in parts for x in part] if parts is not None else []


def barrier():
    c = comm()
    if c is not None:
        c.Barrier()


def abort(status):
    """End every rank of the job (one failing rank would leave the others waiting forever in
    their next collective). A no-op on one process."""
    c = comm()
    if c is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        c.Abort(status)


def _abort_on_uncaught_exceptions():
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        print(f"minimixer: rank {rank()} of {size()} failed: ending the whole job", file=sys.stderr)
        abort(1)

    sys.excepthook = hook

"""Splitting work across the cores: row chunks for elementwise kernels, batch shares for the model.

OpenBLAS's worker threads spin for a while after each GEMM, so elementwise threads that run
between GEMMs fight them for the cores. Splitting the batch instead, one share per core, each
with single-threaded BLAS (run_shares), keeps GEMMs at full speed and makes all elementwise work
parallel for free. Inside a share, `serial()` stops run_rows from handing work on again.
"""
import math

import numpy as np

from ..runtime import threads
from ..runtime.threads import is_serial, num_threads, serial

CHUNK_ELEMENTS = 1 << 16  # 256 KB of float32 per array: a chunk and its scratch fit in L2; smaller
# chunks mean more ufunc calls, and each one hands the GIL between the shares' threads
_local = threads.local  # per-thread scratch buffers


def scratch(i, shape, dtype):
    """Per-thread scratch buffers, reused across calls (fresh allocations page-fault)."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    key = (i, dtype)
    size = math.prod(shape)
    buf = bufs.get(key)
    if buf is None or buf.size < size:
        buf = bufs[key] = np.empty(max(size, CHUNK_ELEMENTS), dtype)
    return buf[:size].reshape(shape)


def zeros(shape, dtype):
    """A per-thread zeroed scratch buffer (filled once per buffer)."""
    z = scratch(3, shape, dtype)
    if getattr(_local, "zeroed", None) is not z.base:
        z.base[...] = 0
        _local.zeroed = z.base
    return z


def run_rows(kernel, *arrays, chunk=...):
    """Call kernel(*slices) over row chunks of about `chunk` elements (default CHUNK_ELEMENTS; None:
    no chunks, one call per thread, for a one-pass kernel). Each thread takes one contiguous share of the rows and
    walks it chunk by chunk (the calling thread takes the first share), so there is one hand-off
    per thread, not per chunk. 2-d arrays (all with the same number of rows) are sliced by rows;
    1-d arrays (a bias along columns) and None are passed whole."""
    rows = arrays[0].shape[0]
    width = max(1, math.prod(arrays[0].shape[1:]))
    chunk = CHUNK_ELEMENTS if chunk is ... else chunk  # read now: tests shrink it to make remainders
    step = rows if chunk is None else max(1, chunk // width)

    def walk(start, stop):
        for r in range(start, stop, step):
            e = min(r + step, stop)
            kernel(*[a[r:e] if a is not None and a.ndim >= 2 else a for a in arrays])

    if is_serial() or rows == 0:
        shares = 1
    elif chunk is None:  # one share per thread, but not for a few rows: a hand-off costs ~20 µs
        shares = min(num_threads(), max(1, rows * width // CHUNK_ELEMENTS))
    else:
        shares = min(num_threads(), -(-rows // step))
    if shares <= 1:
        walk(0, rows)
        return
    bounds = [rows * k // shares for k in range(shares + 1)]
    futures = [threads.executor().submit(walk, bounds[k], bounds[k + 1]) for k in range(1, shares)]
    walk(bounds[0], bounds[1])
    for f in futures:
        f.result()


def sums_over_threads(kernel, sizes, *arrays):
    """run_rows(kernel, *arrays, *accumulators) for a Numba kernel that adds column sums into
    accumulators of the given sizes: each thread gets its own zeroed ones (shared ones would race),
    and their totals are returned."""
    partials = []

    def call(*rows):
        acc = [np.zeros(n, arrays[0].dtype) for n in sizes]
        kernel(*rows, *acc)
        partials.append(acc)
    run_rows(call, *arrays, chunk=None)
    return [sum(p[i] for p in partials) for i in range(len(sizes))]


# --- batch shares: one per core ----------------------------------------------------------------

def _blas_single_thread():
    """A context that limits BLAS to one thread (threadpoolctl), or None if unavailable."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(1, user_api="blas")


def split_batch(B):
    """Row ranges, one per core, for a batch of B (a single range when B or the cores are 1)."""
    shares = max(1, min(num_threads(), B))
    bounds = [B * k // shares for k in range(shares + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(shares)]


def run_shares(fn, spans):
    """fn(start, stop) for each span, one per thread, BLAS single-threaded; returns the results."""
    if len(spans) == 1:
        return [fn(*spans[0])]
    limit = _blas_single_thread()
    if limit is None:  # no threadpoolctl: one share, BLAS threads as they are
        return [fn(spans[0][0], spans[-1][1])]

    def share(span):
        with serial():
            return fn(*span)

    with limit:
        futures = [threads.executor().submit(share, span) for span in spans[1:]]
        first = share(spans[0])
        return [first] + [f.result() for f in futures]

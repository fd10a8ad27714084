"""The worker threads the CPU fast paths share (fast/rows.py's row chunks and batch shares, optim's
per-parameter updates). NumPy's ufuncs, BLAS and Numba's kernels release the GIL, so Python
threads give real parallelism here."""
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

_pool = None
_pool_lock = threading.Lock()
local = threading.local()  # per thread: scratch buffers (fast/rows.py), and whether serial() is on


@contextmanager
def serial():
    """Run this thread's work in this thread, with no hand-offs to the pool: it already is one
    share of a larger job (the fast path's batch shares), and the other cores are busy with the rest."""
    before = getattr(local, "serial", False)
    local.serial = True
    try:
        yield
    finally:
        local.serial = before


def is_serial():
    return getattr(local, "serial", False)


def num_threads():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def executor():
    """The process's one pool, one worker per core, made on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(num_threads(), thread_name_prefix="minimixer")
        return _pool


def parallel_map(fn, items):
    """fn over items on the pool, for independent ufunc-heavy jobs (in order)."""
    items = list(items)
    if num_threads() == 1 or len(items) < 2 or is_serial():
        return [fn(i) for i in items]
    return list(executor().map(fn, items))


def pool_for(params):
    """The optimizers' `run` for these params: the pool on the CPU; None (in order) on a GPU, whose
    kernels queue on one stream anyway."""
    import numpy as np
    return parallel_map if all(type(v) is np.ndarray for v in params.values()) else None

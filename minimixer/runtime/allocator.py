"""How glibc's malloc treats the large blocks that NumPy frees: a setting for whole processes (the
commands and the bench), not part of the model. Without glibc (macOS, Windows, musl) both
functions change nothing and return False.

Why it matters: a forward pass allocates its activations afresh (for training, the ones it keeps for
backward) and frees them when the step ends. By default glibc gives large freed blocks back to the
system, from each worker thread's own arena, and the next step takes them back one 4 KB page fault
at a time (docs/speed-notes.md, "Keeping freed memory", has the counts).
"""
import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h


def _glibc():
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's own symbol: musl has mallopt but none of these options
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return None


def keep_freed_memory():
    """Keep freed blocks in the process for the next step: one arena for all threads, blocks up to
    32 MB from the heap, and no trimming below 1 GB. RSS then stays near its peak until the process
    ends. minimixer's commands (eval, train) call this at start; the bench times under it."""
    libc = _glibc()
    return libc is not None and all(libc.mallopt(option, value) == 1 for option, value in
                                    ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30)))


def return_freed_memory():
    """Give every freed block over 128 KB back to the system, now and from here on, so that RSS
    follows what is really in use: how the bench measures peak working memory."""
    libc = _glibc()
    if libc is None:
        return False
    ok = all(libc.mallopt(option, 128 << 10) == 1 for option in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD))
    libc.malloc_trim(0)  # what keep_freed_memory kept, in every arena
    return ok

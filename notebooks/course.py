"""What the walkthrough notebooks share: one line instead of a traceback for code you have not
written yet, the frame of an exercise cell, and `cmp`, the check of notebook 2b's backward lines.

Every notebook starts with `course.setup()`. The notebooks' exercise cells hold the answers in the
full package; in the student edition (`python -m minimixer.coursework release`) they say
`raise Todo()` where your code goes, and `with exercise("1.1"):` turns that into one line.
"""
import sys
from contextlib import contextmanager

import numpy as np


class Todo(Exception):
    """An exercise cell that is yours to write."""


def setup():
    """In Jupyter, a layer you have not written (NotImplementedError) stops the run with its one-line
    message: which function, which assignment, and the command that checks it."""
    try:
        shell = get_ipython()  # noqa: F821  (defined inside IPython only)
    except NameError:
        return

    def one_line(shell, etype, value, tb, tb_offset=None):
        print(value, file=sys.stderr)

    shell.set_custom_exc((NotImplementedError,), one_line)


@contextmanager
def exercise(name):
    """Runs an exercise cell; if its answer is still `raise Todo()`, says so in one line and goes on."""
    try:
        yield
    except Todo:
        print(f"Exercise {name}: not answered yet. Replace `raise Todo()` with your code and run the cell again.")


def cmp(name, mine, f, wrt, h=1e-6, tol=1e-6):
    """Checks `mine`, your gradient of the loss f() with respect to the array `wrt`, against central
    differences of f itself, and returns the gradient the next line should build on: yours when it is
    right; the numerical one when it is wrong or missing (`...`), so that one wrong line fails one check.
    f must read `wrt` (it is changed in place and restored)."""
    numeric = np.zeros_like(wrt)
    for i in np.ndindex(wrt.shape):
        old = wrt[i]
        wrt[i] = old + h
        up = f()
        wrt[i] = old - h
        down = f()
        wrt[i] = old
        numeric[i] = (up - down) / (2 * h)
    if mine is ...:
        print(f"{name:12s} not written yet (the next lines get the numerical gradient)")
        return numeric
    mine = np.asarray(mine)
    if mine.shape != wrt.shape:
        print(f"{name:12s} WRONG shape {mine.shape}, expected {wrt.shape}")
        return numeric
    err = float(np.abs(mine - numeric).max() / max(np.abs(numeric).max(), 1e-12))
    ok = err < tol
    print(f"{name:12s} {'ok   ' if ok else 'WRONG'} max relative difference {err:.1e}")
    return mine if ok else numeric

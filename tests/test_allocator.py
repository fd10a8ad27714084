"""minimixer.runtime.allocator: glibc keeps freed blocks (no page faults on reuse) or gives them back.

Each case runs in a fresh process, since malloc's settings hold for the whole process. The
worker thread allocates and frees 24 arrays of 1.6 MB, 12 times, and counts its page faults over
the last 6 rounds: every fresh 1.6 MB block costs about 400 faults of 4 KB.
"""
import subprocess
import sys

import pytest

from minimixer.runtime import allocator

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="malloc here is not glibc's")

CODE = """
import resource, sys, threading
import numpy as np
from minimixer.runtime import allocator
assert getattr(allocator, sys.argv[1])()
faults = []
def work():
    for round in range(12):
        if round == 6:
            start = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        arrays = [np.ones((400, 1024), np.float32) for _ in range(24)]
        del arrays
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - start)
t = threading.Thread(target=work)
t.start()
t.join()
print(faults[0])
"""
FRESH = 6 * 24 * 400  # page faults if every block came fresh from the system


def faults_under(setting):
    r = subprocess.run([sys.executable, "-c", CODE, setting], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def test_kept_blocks_are_reused_without_page_faults():
    kept, returned = faults_under("keep_freed_memory"), faults_under("return_freed_memory")
    print(f"page faults over 6 rounds: kept {kept}, returned {returned}, every block fresh {FRESH}")
    assert returned >= 0.9 * FRESH
    assert kept <= 0.01 * FRESH


def test_without_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.keep_freed_memory() is False
    assert allocator.return_freed_memory() is False

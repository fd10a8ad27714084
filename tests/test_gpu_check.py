"""benchmarks/gpu_check.py without a GPU: it says so in one line and exits 3; its table, its
parsers of pytest's and the bench's output, and a dry run of every step on NumPy."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

import minimixer as mm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def script(*args, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


@pytest.mark.skipif(mm.cupy_available(), reason="a GPU is usable here")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_3():
    start = time.monotonic()
    r = script()
    assert r.returncode == gpu_check.EXIT_NO_GPU == 3, r.stderr
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("gpu_check: no usable GPU here (") and "nothing was run" in r.stderr
    assert time.monotonic() - start < 60


def test_help_and_bad_arguments():
    r = script("--help")
    assert r.returncode == 0 and "--budget" in r.stdout and "--backend" in r.stdout
    for bad in (["--steps", "tests,lint"], ["--budget", "0"], ["--budget", "nan"], ["--images", "0"]):
        r = script(*bad)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr, (bad, r.stderr)


def test_table_has_a_row_per_step_and_a_verdict():
    rows = [{"step": "gpu", "ok": True, "detail": "NVIDIA H100 | 80 GiB", "seconds": 1.2},
            {"step": "bench", "ok": False, "detail": "logits max rel diff 3.0e-03", "seconds": 41.6}]
    text = gpu_check.table(rows, 50.4)
    lines = text.splitlines()
    assert lines[0] == "| step | result | detail | seconds |" and len(lines) == 5
    assert lines[2] == "| gpu | PASS | NVIDIA H100 / 80 GiB | 1 |"  # a | in a detail cannot break the table
    assert lines[3] == "| bench | FAIL | logits max rel diff 3.0e-03 | 42 |"
    assert lines[4] == "| all | FAIL | 1 of 2 steps passed | 50 |"
    assert gpu_check.table(rows[:1], 1).splitlines()[-1].startswith("| all | PASS |")


def test_pytest_summary_is_parsed():
    out = "....s\nSKIPPED [1] tests/x.py:3: no usable GPU\n= 40 passed, 1 skipped, 2 deselected in 9.1s ="
    assert gpu_check.pytest_counts(out) == {"passed": 40, "skipped": 1, "deselected": 2}
    assert gpu_check.pytest_counts("1 failed, 3 passed, 2 errors in 1s") == {"failed": 1, "passed": 3, "error": 2}
    assert gpu_check.pytest_counts("collected nothing") == {}


def test_bench_row_passes_only_under_the_logit_tolerance():
    result = {"model": "mixer_b16_224", "engines": ["minimixer", "timm"],
              "batches": [{"batch_size": 256, "img_per_s": {"minimixer": 3000.0, "timm": 2500.0},
                           "logits_max_rel_diff": {"timm": 4e-7}}]}
    row = gpu_check.bench_row(result, 12.0)
    assert row["ok"] and "minimixer 3000 img/s; timm 2500 img/s (1.20x), logits max rel diff 4.0e-07" in \
        row["detail"]
    result["batches"][0]["logits_max_rel_diff"]["timm"] = 2 * gpu_check.LOGIT_TOL
    assert not gpu_check.bench_row(result, 12.0)["ok"]


def test_eval_row_needs_every_image_at_100_percent():
    good = {"count": 300, "top1": 100.0, "top5": 100.0, "skipped": 0, "img_per_sec": 900.0}
    assert gpu_check.eval_row({"cupy": good, "numpy": good}, 300, 5.0)["ok"]
    assert not gpu_check.eval_row({"cupy": {**good, "top1": 99.667}, "numpy": good}, 300, 5.0)["ok"]
    assert not gpu_check.eval_row({"cupy": {**good, "count": 299}, "numpy": good}, 300, 5.0)["ok"]


def test_dry_run_on_numpy_runs_every_step(tmp_path):
    """The same steps on the CPU, small: the plumbing (children, budget, JSON, table) works."""
    out = tmp_path / "check.json"
    r = script("--backend", "numpy", "--compare", "", "--json", str(out))
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stderr
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert [line.split("|")[1].strip() for line in table[2:]] == ["tests", "bench", "eval", "all"]
    assert all("| PASS |" in line for line in table[2:])
    rows = json.loads(out.read_text())["rows"]
    assert rows[2]["rows"]["numpy"]["count"] == 12 and rows[2]["rows"]["numpy"]["top1"] == 100.0


def test_a_step_that_runs_out_of_budget_fails_in_time():
    r = script("--backend", "numpy", "--steps", "bench", "--compare", "", "--model", "mixer_b16_224",
               "--batch-size", "64", "--budget", "8", timeout=60)
    assert r.returncode == 1 and "| bench | FAIL | timed out" in r.stdout, r.stdout + r.stderr


FAKE_CUDA = '''
class runtime:
    getDeviceCount = staticmethod(lambda: 1)
    getDeviceProperties = staticmethod(lambda i: {"name": b"Fake GPU"})
    runtimeGetVersion = staticmethod(lambda: 12080)


class Device:
    def __init__(self, i):
        self.mem_info = (2**30, 80 * 2**30)
'''


def test_the_probe_reads_a_device_and_reports_a_broken_one(tmp_path, monkeypatch):
    """The probe runs in a child: here a stand-in `cupy` package on its path answers it."""
    (tmp_path / "cupy" / "cuda").mkdir(parents=True)
    (tmp_path / "cupy" / "__init__.py").write_text("__version__ = '13.6.0'\nfrom . import cuda\n")
    (tmp_path / "cupy" / "cuda" / "__init__.py").write_text(FAKE_CUDA)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    row, reason = gpu_check.probe_gpu(gpu_check.Budget(60))
    assert reason is None and row["ok"] and row["detail"] == "Fake GPU, 80.0 GiB, CuPy 13.6.0, CUDA runtime 12080"
    (tmp_path / "cupy" / "cuda" / "__init__.py").write_text(
        "class runtime:\n    def getDeviceCount():\n"
        "        raise RuntimeError('cudaErrorNoDevice: no CUDA-capable device')\n")
    row, reason = gpu_check.probe_gpu(gpu_check.Budget(60))
    assert row is None and reason == "RuntimeError: cudaErrorNoDevice: no CUDA-capable device"

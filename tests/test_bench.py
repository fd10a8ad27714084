"""The benchmark command runs end to end (on a tiny model: tests check correctness, not speed)."""
import json
import subprocess
import sys

import pytest


def bench(*args):
    return subprocess.run([sys.executable, "-m", "minimixer.bench", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_bench_writes_json(tmp_path, mode):
    out = tmp_path / "b.json"
    r = bench(mode, "--model", "mixer_digits", "--batch-size", "8", "--repeats", "2", "--warmup", "1",
              "--memory", "--json", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["mode"] == mode and result["minimixer"]["img_per_s"] > 0 and len(result["minimixer"]["seconds"]) == 2
    assert result["memory"]["minimixer"]["peak_working_mb"] >= 0
    assert "img/s" in r.stdout


@pytest.mark.timm
def test_bench_compare_timm(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "b.json"
    r = bench("infer", "--model", "mixer_s32_224", "--img-size", "64", "--num-blocks", "2", "--batch-size", "4",
              "--repeats", "1", "--warmup", "1", "--compare", "timm", "--json", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["ratio"] > 0 and result["timm"]["img_per_s"] > 0
    assert result["logits_max_rel_diff"] <= 1e-5  # same weights, same inputs
    assert "ratio minimixer/timm throughput" in r.stdout


def test_bench_bad_arguments():
    r = bench("infer", "--dtype", "float16")
    assert r.returncode == 2 and "float16 is for GPU inference" in r.stderr and "Traceback" not in r.stderr

"""The benchmark command runs end to end (on a tiny model: tests check correctness, not speed)."""
import json
import subprocess
import sys

import pytest

from minimixer import fast

from minimixer.commands import bench

from minimixer.commands import cli

TINY = ["--model", "mixer_s32_224", "--img-size", "64", "--num-blocks", "2"]


def run_bench(*args):
    return subprocess.run([sys.executable, "-m", "minimixer.bench", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_bench_writes_json(tmp_path, mode):
    out = tmp_path / "b.json"
    r = run_bench(mode, "--model", "mixer_digits", "--batch-size", "8", "--repeats", "2", "--warmup", "1",
                  "--settle", "0.05", "--json", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["settle_s"] == 0.05 and "0.05 s idle before each call" in r.stdout
    [row] = result["batches"]
    assert result["mode"] == mode and row["batch_size"] == 8 and len(row["seconds"]["minimixer"]) == 2
    assert row["img_per_s"]["minimixer"] > 0 and row["peak_working_mb"]["minimixer"] >= 0
    assert ("ceiling_fraction" in row) == (mode == "infer")  # the GEMM ceiling is timed for inference
    assert "| batch | minimixer img/s" in r.stdout


def test_bench_batch_list_ceiling_and_plot(tmp_path):
    out, png = tmp_path / "b.json", tmp_path / "speed.png"
    r = run_bench("infer", *TINY, "--batch-size", "1,3", "--repeats", "1", "--warmup", "1",
                  "--json", str(out), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["batches"]
    assert [row["batch_size"] for row in rows] == [1, 3]
    for row in rows:
        ceiling = max(v for k, v in row["img_per_s"].items() if k.startswith("gemm, "))
        assert row["img_per_s"][bench.CEILING] == ceiling
        assert row["ceiling_fraction"] == pytest.approx(row["img_per_s"]["minimixer"] / ceiling)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 300_000


def test_gemm_ceiling_runs_the_models_matmuls(monkeypatch):
    """Both ceiling schedules run exactly the model's multiply-adds: stem, four per block, head."""
    import numpy as np
    cfg = cli.config_from_args(bench.parse_args(["infer", *TINY, "--batch-size", "3"]))
    N, D, DS, DC, K = cfg.num_patches, cfg.embed_dim, cfg.token_hidden, cfg.channel_hidden, cfg.num_classes
    per_image = N * cfg.in_chans * cfg.patch_size ** 2 * D + cfg.num_blocks * (2 * DS * N * D + 2 * N * D * DC) + D * K
    monkeypatch.setattr(fast.rows, "num_threads", lambda: 2)
    params = bench.make_params(cfg, np.float32)
    macs, matmul = [], np.matmul

    def counting(a, b, **kw):
        out = matmul(a, b, **kw)
        macs.append(out.size * a.shape[-1])  # each output element is a dot product of length k
        return out
    monkeypatch.setattr(np, "matmul", counting)
    for B in (3, 1):  # one share per core, and one image
        sides = bench.gemm_ceiling_sides(params, cfg, B)
        assert len(sides) == 2
        for name, side in sides.items():
            macs.clear()
            side()
            assert sum(macs) == B * per_image, (B, name)


def test_bench_bad_arguments():
    for args, message in [(["infer", "--dtype", "float16"], "float16 is for GPU inference"),
                          (["infer", "--batch-size", "4,0"], "batch sizes must be >= 1"),
                          (["infer", "--batch-size", "4,x"], "comma-separated integers"),
                          (["infer", "--compare", "tensorrt"], "unknown engine tensorrt"),
                          (["train", "--compare", "onnxruntime"], "is for CPU float32 inference"),
                          (["infer", "--plot", "out.svg"], "needs a .png"),
                          (["infer", "--settle", "-1"], "--settle must be between 0 and 60"),
                          (["infer", "--settle", "nan"], "--settle must be between 0 and 60")]:
        r = run_bench(*args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino", "timm"])
def test_missing_peer_names_the_extra(monkeypatch, capsys, engine):
    monkeypatch.setitem(sys.modules, "openvino" if engine == "openvino" else "torch", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert cli.run(bench.main, ["infer", "--model", "mixer_digits", "--compare", engine], prog="bench") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--compare {engine} needs" in err and "minimixer[bench]" in err


@pytest.mark.timm
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_bench_compare_timm(tmp_path, mode):
    """Same weights and inputs on both sides (for training: the first step's logits, before any update)."""
    pytest.importorskip("timm")
    out = tmp_path / "b.json"
    r = run_bench(mode, *TINY, "--batch-size", "4", "--repeats", "1", "--warmup", "1", "--compare", "timm",
                  "--json", str(out))
    assert r.returncode == 0, r.stderr
    [row] = json.loads(out.read_text())["batches"]
    assert row["ratio"]["timm"] > 0 and row["img_per_s"]["timm"] > 0
    assert row["logits_max_rel_diff"]["timm"] <= 1e-5  # same weights, same inputs
    assert "minimixer / timm" in r.stdout


@pytest.mark.bench
@pytest.mark.timm  # also deselected by the default run's addopts until 'bench' is listed there
def test_bench_compare_exported_peers(tmp_path):
    """timm's model exported to ONNX here, run by ONNX Runtime and OpenVINO: same logits, one table."""
    for module in ("onnxruntime", "openvino", "onnxscript", "timm", "matplotlib"):
        pytest.importorskip(module)
    out, png = tmp_path / "b.json", tmp_path / "peers.png"
    r = run_bench("infer", *TINY, "--batch-size", "1,3", "--repeats", "1", "--warmup", "1",
                  "--compare", "onnxruntime,openvino,timm", "--json", str(out), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["batches"]
    for row in rows:
        print(row["batch_size"], row["logits_max_rel_diff"])
        assert set(row["ratio"]) == {"onnxruntime", "openvino", "timm"}
        assert all(d <= 5e-6 for d in row["logits_max_rel_diff"].values())  # fp32 everywhere (OpenVINO too)
        assert all(row["peak_working_mb"][e] is not None for e in ["minimixer", "onnxruntime", "openvino", "timm"])
    assert "minimixer / onnxruntime" in r.stdout and png.stat().st_size > 0

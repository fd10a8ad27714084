"""The CuPy code paths of the commands, run on tests/support/fake_cupy.py (a NumPy-backed stand-in, NOT a GPU).

What this proves: no host/device mix anywhere (the stand-in's arrays refuse implicit host
conversion), a fixed, small number of device-to-host syncs per training step whatever the
number of parameter tensors, one GELU launch per block per batch, the same numbers as the NumPy
backend, and bench's TF32 and device-memory bookkeeping. What it cannot prove: that the CUDA
kernels compile (tests/test_nvrtc.py) or run correctly and fast (a GPU run: tests/test_cupy.py).
"""
import importlib
import json
import os

import numpy as np
import pytest

from support import fake_cupy
import minimixer as mm
import test_fixtures
from support.helpers import assert_all_close
from minimixer import fast, optim
from minimixer.commands import bench
from minimixer.commands import eval as eval_cmd
from minimixer.commands import train as train_cmd
from minimixer.checkpoints.training_state import load_training_state
from minimixer.training.loop import fit, make_optimizer, train_step
from minimixer.training.settings import TrainSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = [os.path.join(ROOT, "tests", "images", f) for f in ("china.jpg", "flower.jpg")]


@pytest.fixture
def fake(monkeypatch):
    return fake_cupy.install(monkeypatch)


# --- the stand-in is strict ---------------------------------------------------------------------

def test_standin_refuses_implicit_host_conversion_and_counts_transfers(fake):
    a = mm.to_backend(np.arange(6.0).reshape(2, 3), "cupy")
    assert mm.get_xp(a) is fake and mm.cupy_available()
    for bad in (lambda: np.asarray(a), lambda: np.exp(a), lambda: a + np.ones(3), lambda: np.ones(3) * a,
                lambda: np.concatenate([a, a]), lambda: a.__setitem__(0, np.zeros(3))):
        with pytest.raises(TypeError):
            bad()
    with pytest.raises(TypeError, match="different backends"):
        mm.get_xp(a, np.zeros(2))
    fake.stats.reset()
    float(a.sum()), a.max().tolist(), mm.to_numpy(a)
    assert fake.stats.d2h == 3
    with pytest.raises(NotImplementedError, match="no NumPy emulation"):
        fake.ElementwiseKernel("T x", "T y", "y = x", "unknown_kernel")


# --- the fixtures' parity with timm, on the stand-in --------------------------------------------

@pytest.mark.parametrize("name", test_fixtures.CASES)
def test_fixture_parity_on_standin(fake, name):
    """tests/test_fixtures.py on the 'cupy' backend: fast predict vs forward ≤ 1e-12 in float64."""
    test_fixtures.test_predict_matches_forward(name, "cupy")
    test_fixtures.test_logits_and_grads_match_timm(name, "cupy")


# --- syncs and launches -----------------------------------------------------------------------------

def tiny(num_blocks, dtype="float32"):
    cfg = mm.get_config("mixer_digits", embed_dim=16, num_blocks=num_blocks)
    params = mm.init_params(cfg, seed=1, dtype=dtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, cfg.in_chans, *cfg.image_hw)).astype(dtype)
    y = rng.integers(0, cfg.num_classes, 8)
    return cfg, params, x, y


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_syncs_per_training_step_are_few_and_independent_of_parameter_count(fake, optimizer):
    """The loss (with the label check) and the gradient norm: two device-to-host transfers per step,
    for 1 block (14 tensors) as for 4 blocks (50 tensors)."""
    counts = {}
    for num_blocks in (1, 4):
        cfg, params, x, y = tiny(num_blocks)
        params = mm.to_backend(params, "cupy")
        opt = make_optimizer(params, TrainSettings(optimizer=optimizer, weight_decay=0.05))
        gx, gy = mm.to_backend(x, "cupy"), mm.to_backend(y, "cupy")
        for step in range(2):  # the first step creates the optimizer state
            fake.stats.reset()
            loss = train_step(params, opt, gx, gy, cfg, lr=1e-3, clip_grad=1.0, drop_path=0.1, dropout=0.1,
                              rng=np.random.default_rng(step))
            assert np.isfinite(loss)
        counts[num_blocks] = (len(params), fake.stats.d2h)
    print("parameter tensors, device-to-host transfers per step:", counts)
    assert counts[1][1] == counts[4][1] == 2, counts


def test_clip_grad_norm_on_device_one_sync_no_thread_pool(fake, monkeypatch):
    rng = np.random.default_rng(0)
    grads = {f"g{i}": rng.standard_normal((3, i + 1)) for i in range(30)}
    expected = float(np.sqrt(sum((g * g).sum() for g in grads.values())))
    dev = mm.to_backend(grads, "cupy")
    fake.stats.reset()
    total = optim.clip_grad_norm(dev, 0.5, run=lambda *a: pytest.fail("clip_grad_norm used the host thread pool"))
    assert fake.stats.d2h == 1
    assert abs(total - expected) <= 1e-12 * expected
    clipped = np.sqrt(sum((g * g).sum() for g in mm.to_numpy(dev).values()))
    assert abs(clipped - 0.5) < 1e-6


def test_loss_is_one_transfer_and_still_rejects_bad_labels(fake):
    logits = mm.to_backend(np.random.default_rng(0).standard_normal((4, 5)), "cupy")
    ref = mm.softmax_cross_entropy(mm.to_numpy(logits), np.array([0, 4, 2, 1]))
    fake.stats.reset()
    loss, dlogits = mm.softmax_cross_entropy(logits, mm.to_backend(np.array([0, 4, 2, 1]), "cupy"))
    assert fake.stats.d2h == 1
    assert_all_close([("loss", loss, ref[0]), ("dlogits", mm.to_numpy(dlogits), ref[1])], 1e-15)
    for bad, shown in (([0, 5, 2, 1], r"\[0, 5\]"), ([0, -1, 2, 1], r"\[-1, 2\]")):  # CuPy indexing would wrap
        with pytest.raises(ValueError, match=r"class indices in \[0, 5\), got values in " + shown):
            mm.softmax_cross_entropy(logits, mm.to_backend(np.array(bad), "cupy"))


@pytest.mark.parametrize("B", [1, 5])
def test_inference_launches_gelu_once_per_block_per_batch(fake, B):
    cfg, params, x, _ = tiny(3)
    fake.stats.reset()
    fast.predict(mm.to_backend(params, "cupy"), mm.to_backend(x[:B], "cupy"), cfg)
    assert fake.stats.launches == {"minimixer_bias_gelu": 2 * cfg.num_blocks}
    assert fake.stats.d2h == 0


def test_state_dict_copies_to_host_not_on_device(fake):
    cfg, params, x, y = tiny(1)
    params = mm.to_backend(params, "cupy")
    opt = make_optimizer(params, TrainSettings())
    train_step(params, opt, mm.to_backend(x, "cupy"), mm.to_backend(y, "cupy"), cfg, lr=1e-3)
    arrays = sum(len(s) for s in opt.state.values())
    pool = fake.get_default_memory_pool()
    before = pool.used_bytes()
    fake.stats.reset()
    state = opt.state_dict()
    assert pool.used_bytes() == before  # nothing allocated on the device
    assert fake.stats.d2h == arrays
    assert all(type(a) is np.ndarray for s in state["state"].values() for a in s.values())
    host = next(iter(state["state"].values()))["exp_avg"]
    host += 1.0  # a copy: the optimizer's state is untouched
    assert not np.array_equal(mm.to_numpy(next(iter(opt.state.values()))["exp_avg"]), host)


# --- the commands -----------------------------------------------------------------------------------

def test_predict_command_on_standin_equals_numpy(fake, capsys, monkeypatch):
    monkeypatch.setattr(mm, "predict", mm.predict)  # restored after: the import may rebind it (issue 14, item 9)
    predict_cmd = importlib.import_module("minimixer.commands.predict")
    assert predict_cmd.main([*IMAGES, "--json", "--backend", "numpy"]) == 0
    on_numpy = json.loads(capsys.readouterr().out)
    fake.stats.reset()
    assert predict_cmd.main([*IMAGES, "--json", "--backend", "cupy", "--batch-size", "1"]) == 0
    on_device = json.loads(capsys.readouterr().out)
    assert fake.stats.d2h == 2  # one logits transfer per batch
    assert [r["file"] for r in on_device] == [r["file"] for r in on_numpy]
    for a, b in zip(on_device, on_numpy):
        assert [t["index"] for t in a["topk"]] == [t["index"] for t in b["topk"]]
        assert_all_close([("probs", [t["prob"] for t in a["topk"]], [t["prob"] for t in b["topk"]])], 1e-5)


def test_eval_command_on_standin_equals_numpy(fake, capsys):
    results = {}
    for backend in ("numpy", "cupy"):
        assert eval_cmd.main(["--backend", backend, "--no-progress", "--limit", "64"]) == 0
        results[backend] = capsys.readouterr().out.splitlines()[0]
    assert results["cupy"] == results["numpy"] and "Acc@1" in results["cupy"], results
    assert fake.stats.launches["minimixer_bias_gelu"] == 2 * mm.get_config("mixer_digits").num_blocks * 2  # 2 batches


def small_digits(batch_size):
    from test_train import small_digits as make
    return make(batch_size)


def test_train_and_resume_on_standin_equal_numpy(fake, tmp_path):
    """fit() on the 'cupy' backend: interrupted and resumed equals uninterrupted, and both follow
    the NumPy run's losses."""
    cfg = mm.get_config("mixer_digits", embed_dim=16, num_blocks=2)
    settings = TrainSettings(epochs=1, batch_size=64, lr=3e-3, warmup=0.5, drop_path=0.1, dropout=0.1, seed=3)
    train, test = small_digits(batch_size=64)  # 4 steps
    quiet = dict(progress=False, log=lambda s: None)
    ref = fit(mm.init_params(cfg, seed=3), cfg, settings, train, test, str(tmp_path / "n"), **quiet)
    straight = mm.to_backend(mm.init_params(cfg, seed=3), "cupy")
    metrics = fit(straight, cfg, settings, train, test, str(tmp_path / "a"), backend="cupy", **quiet)
    stopped = mm.to_backend(mm.init_params(cfg, seed=3), "cupy")
    fit(stopped, cfg, settings, train, test, str(tmp_path / "b"), backend="cupy", stop_after=2, **quiet)
    state = load_training_state(str(tmp_path / "b" / "checkpoint.safetensors"))
    resumed = mm.to_backend(state["params"], "cupy")
    resumed_metrics = fit(resumed, cfg, settings, train, test, str(tmp_path / "b"), backend="cupy", resume=state,
                          **quiet)
    assert all(np.array_equal(mm.to_numpy(resumed[k]), mm.to_numpy(straight[k])) for k in straight)
    assert [r["train_loss"] for r in resumed_metrics] == [r["train_loss"] for r in metrics]
    assert_all_close([("train loss", [r["train_loss"] for r in metrics], [r["train_loss"] for r in ref]),
                      ("test loss", [r["test_loss"] for r in metrics], [r["test_loss"] for r in ref])], 1e-5)


def test_train_command_on_standin(fake, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["--embed-dim", "16", "--num-blocks", "1", "--out", out, "--no-progress", "--backend", "cupy"]
    assert train_cmd.main([*args, "--stop-after", "2"]) == 0
    assert train_cmd.main([*args, "--resume", "auto", "--stop-after", "4"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert load_training_state(os.path.join(out, "checkpoint.safetensors"))["step"] == 4


# --- bench ----------------------------------------------------------------------------------------------

def run_bench(tmp_path, *args):
    out = tmp_path / "b.json"
    assert bench.main([*args, "--model", "mixer_digits", "--batch-size", "4", "--repeats", "1", "--warmup", "1",
                       "--backend", "cupy", "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("path", ["reference"])
def test_bench_on_standin(fake, tmp_path, mode, path):
    result = run_bench(tmp_path, mode, "--path", path)
    assert result["batches"][0]["img_per_s"]["minimixer"] > 0 and result["machine"]["gpu"].startswith("fake_cupy")
    assert fake.stats.syncs >= 2  # each timed call waits for the device


def test_bench_tf32_is_set_and_recorded_whatever_cupy_tf32_says(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("CUPY_TF32", "1")  # CuPy would read it lazily, at its first float32 matmul
    linalg = fake._core._routines_linalg
    off = run_bench(tmp_path, "infer")["machine"]["tf32"]
    assert off["requested"] is False and off["minimixer"] is False
    assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_DEFAULT
    on = run_bench(tmp_path, "infer", "--tf32")["machine"]["tf32"]
    assert on["requested"] is True and on["minimixer"] is True
    assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_TF32


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_bench_memory_probe_measures_device_memory(fake, capsys, mode):
    """--memory's child process, run here: on CuPy it reads the memory pool, not the host's RSS."""
    assert bench.main([mode, "--model", "mixer_digits", "--batch-size", "8", "--backend", "cupy",
                       "--probe", "minimixer"]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["measured"].startswith("device: CuPy memory pool")
    cfg = mm.get_config("mixer_digits")
    hidden = 8 * cfg.num_patches * cfg.channel_hidden * 4 / 2**20  # one channel-MLP hidden, float32
    assert hidden <= m["peak_working_mb"] < 200 * hidden, m
    assert fake.cuda.get_allocator() == fake.get_default_memory_pool().malloc  # the pool's own allocator again

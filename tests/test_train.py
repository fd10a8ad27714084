"""Training: loss, regularizers, optimizers, schedules, checkpoints/resume and the train CLI."""
import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import minimixer as mm
from support.helpers import assert_all_close, gradcheck, numerical_gradient
from minimixer import layers as L
from minimixer import model, optim
from minimixer.data import ArrayLoader, digits_split
from minimixer.checkpoints.training_state import load_training_state
from minimixer.training.loop import fit
from minimixer.training.settings import TrainSettings

TINY = dict(num_classes=7, img_size=(9, 15), in_chans=2, patch_size=3, num_blocks=2, embed_dim=6)


# --- loss ---------------------------------------------------------------------------------

@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_loss_gradcheck(kind, smoothing):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 5)) * 3
    labels = rng.integers(0, 5, 4) if kind == "hard" else rng.dirichlet(np.ones(5), 4)
    loss, dlogits = L.softmax_cross_entropy(logits, labels, label_smoothing=smoothing)
    numeric = numerical_gradient(lambda: L.softmax_cross_entropy(logits, labels, label_smoothing=smoothing)[0], logits)
    assert_all_close([("dlogits", dlogits, numeric)], 1e-7)


def test_loss_values_and_stability():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]])
    loss, d = L.softmax_cross_entropy(logits, np.array([0, 2]))
    assert np.isfinite(loss) and abs(loss - np.log(3) / 2) < 1e-12  # row 1: 0, row 2: log 3
    assert np.isfinite(d).all()


@pytest.mark.parametrize("labels, message", [
    (np.array([0, 5]), r"class indices in \[0, 5\), got values in \[0, 5\]"),
    (np.array([0, 1, 2]), "got 3 labels for 2 logits rows"),
    (np.zeros((2, 4)), r"labels must have shape \(2,\) or \(2, 5\)"),
])
def test_loss_bad_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        L.softmax_cross_entropy(np.zeros((2, 5)), labels)


# --- regularizers ---------------------------------------------------------------------------

@pytest.mark.parametrize("forward, backward", [(L.drop_path_forward, L.drop_path_backward),
                                               (L.dropout_forward, L.dropout_backward)])
def test_regularizer_gradcheck_with_fixed_mask(forward, backward):
    x = np.random.default_rng(1).standard_normal((16, 3, 4))
    out, cache = forward(x, 0.3, np.random.default_rng(7))
    assert 0 < (cache[0] == 0).mean() < 1  # some dropped, some kept
    assert np.allclose(np.unique(cache[0]), [0.0, 1 / 0.7])  # kept values are scaled by 1/keep
    dout = np.random.default_rng(2).standard_normal(out.shape)
    dx = backward(dout, cache)
    gradcheck(lambda x: forward(x, 0.3, np.random.default_rng(7))[0], dict(x=x), dout, dict(x=dx))


def test_drop_path_drops_whole_samples_and_is_identity_at_eval():
    x = np.random.default_rng(1).standard_normal((2000, 3, 4))
    out, (mask,) = L.drop_path_forward(x, 0.25, np.random.default_rng(0))
    assert mask.shape == (2000, 1, 1)
    assert abs((mask == 0).mean() - 0.25) < 0.03
    assert L.drop_path_forward(x, 0.25, None)[0] is x  # no rng: eval
    assert L.dropout_forward(x, 0.25, None)[0] is x
    cfg = mm.MixerConfig(**TINY)
    params = mm.init_params(cfg, dtype="float64")
    xi = np.random.default_rng(3).standard_normal((2, 2, 9, 15))
    eval_logits, _ = mm.mixer_forward(params, xi, cfg, drop_path_rate=0.5, drop_rate=0.5)
    assert_all_close([("eval forward ignores rates", eval_logits, model.predict(params, xi, cfg))], 0.0)


def test_model_gradcheck_with_regularizers():
    cfg = mm.MixerConfig(**TINY)
    rng = np.random.default_rng(4)
    params = {k: v + 0.2 * rng.standard_normal(v.shape) for k, v in mm.init_params(cfg, dtype="float64").items()}
    x = rng.standard_normal((6, 2, 9, 15))

    def forward(**p):
        return mm.mixer_forward(p, x, cfg, drop_path_rate=0.4, drop_rate=0.3, rng=np.random.default_rng(9))

    logits, cache = forward(**params)
    dlogits = rng.standard_normal(logits.shape)
    _, grads = mm.mixer_backward(dlogits, cache)
    check = {k: params[k] for k in ("stem.proj.weight", "blocks.0.mlp_channels.fc1.weight", "head.weight")}
    gradcheck(lambda **p: forward(**{**params, **p})[0], check, dlogits, grads)


# --- optimizers and schedules ------------------------------------------------------------------

def test_schedule_shape():
    lrs = [optim.lr_at(s, base_lr=1.0, total_steps=10, warmup_steps=2) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == 1.0  # warmup, then cosine from the top
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert optim.lr_at(10, base_lr=1.0, total_steps=10, warmup_steps=2, min_lr=0.1) == pytest.approx(0.1)
    lin = [optim.lr_at(s, base_lr=1.0, total_steps=6, warmup_steps=2, decay="linear") for s in range(2, 6)]
    assert lin == pytest.approx([1.0, 0.75, 0.5, 0.25])
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        optim.lr_at(0, base_lr=1.0, total_steps=5, decay="step")


def test_clip_grad_norm():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert optim.clip_grad_norm(grads, 1.0) == pytest.approx(5.0)
    assert np.sqrt(sum((g**2).sum() for g in grads.values())) == pytest.approx(1.0, rel=1e-6)
    small = {"a": np.array([0.3])}
    optim.clip_grad_norm(small, 1.0)
    assert small["a"][0] == 0.3  # under the limit: untouched


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_grad_norm_does_not_depend_on_blas_threads(dtype):
    """The norm is bit-identical whatever BLAS's thread count: one process (BLAS on both cores)
    and MPI ranks bound to one core each must clip alike (BLAS's dot rounds by thread count)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    rng = np.random.default_rng(0)
    grads = {"w": rng.standard_normal((1024, 1025)).astype(dtype), "b": rng.standard_normal(70001).astype(dtype)}
    totals = set()
    for threads in (1, 2, 4):
        with threadpoolctl.threadpool_limits(threads, user_api="blas"):
            totals.add(optim.clip_grad_norm({k: g.copy() for k, g in grads.items()}, 1.0))
    assert len(totals) == 1, f"norms by BLAS thread count: {sorted(totals)}"


def test_weight_decay_exemptions_and_state_dict_roundtrip():
    params = {"blocks.0.norm1.weight": np.ones(3), "blocks.0.mlp_tokens.fc1.weight": np.ones(3),
              "head.bias": np.ones(3), "norm.weight": np.ones(3)}
    zero = {k: np.zeros(3) for k in params}
    opt = optim.AdamW(params, lr=0.1, weight_decay=0.5, no_decay=optim.bias_and_norm)
    opt.step(zero)
    decayed = {k for k, v in params.items() if v[0] != 1.0}
    assert decayed == {"blocks.0.mlp_tokens.fc1.weight"}
    assert params["blocks.0.mlp_tokens.fc1.weight"][0] == pytest.approx(1 - 0.1 * 0.5)
    all_decay = {k: np.ones(3) for k in params}
    optim.AdamW(all_decay, lr=0.1, weight_decay=0.5).step(zero)  # by default, as in torch: everything
    assert all(v[0] < 1 for v in all_decay.values())

    # state_dict/load_state_dict: two optimizers continue identically
    g = {k: np.full(3, 0.3) for k in params}
    opt.step(g)
    clone_params = {k: v.copy() for k, v in params.items()}
    clone = optim.AdamW(clone_params, lr=0.1, weight_decay=0.5, no_decay=optim.bias_and_norm)
    clone.load_state_dict(opt.state_dict())
    opt.lr = clone.lr = 0.05  # lr can be set between steps
    opt.step(g)
    clone.step(g)
    assert all(np.array_equal(params[k], clone_params[k]) for k in params)


# --- the loop: resume, Ctrl-C, CLI ----------------------------------------------------------------

def small_digits(batch_size=32):
    x_train, y_train, x_test, y_test = digits_split()
    return (ArrayLoader(x_train[:256], y_train[:256], batch_size, shuffle=True, seed=3),
            ArrayLoader(x_test[:64], y_test[:64], 64))


def test_resume_is_identical_to_an_uninterrupted_run(tmp_path):
    cfg = mm.get_config("mixer_digits", embed_dim=16, num_blocks=2)
    settings = TrainSettings(epochs=2, batch_size=32, lr=3e-3, warmup=0.5, drop_path=0.1, dropout=0.1, seed=3)
    train, test = small_digits()
    straight = mm.init_params(cfg, seed=3)
    fit(straight, cfg, settings, train, test, str(tmp_path / "a"), progress=False, log=lambda s: None)

    stopped = mm.init_params(cfg, seed=3)
    fit(stopped, cfg, settings, train, test, str(tmp_path / "b"), stop_after=11, progress=False,
        log=lambda s: None)  # mid-epoch: 8 steps per epoch
    state = load_training_state(str(tmp_path / "b" / "checkpoint.safetensors"))
    assert state["step"] == 11
    resumed = state["params"]
    metrics = fit(resumed, cfg, settings, train, test, str(tmp_path / "b"), resume=state, progress=False,
                  log=lambda s: None)
    assert len(metrics) == 2
    diffs = {k: float(np.abs(resumed[k] - straight[k]).max()) for k in straight}
    assert all(np.array_equal(resumed[k], straight[k]) for k in straight), diffs
    a = json.load(open(tmp_path / "a" / "metrics.json"))
    b = json.load(open(tmp_path / "b" / "metrics.json"))
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "minimixer.train", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_short_digits_run_reaches_90_percent(tmp_path):
    out = tmp_path / "run"
    r = run_cli("--epochs", "3", "--out", str(out), "--no-progress")
    print(r.stdout)
    assert r.returncode == 0, r.stderr
    metrics = json.load(open(out / "metrics.json"))
    assert len(metrics) == 3 and metrics[-1]["test_top1"] >= 90.0
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("epoch,step,lr,train_loss")
    params = mm.load_weights(out / "model.safetensors", mm.get_config("mixer_digits"))
    assert "test top-1" in r.stdout and len(params) == len(mm.param_shapes(mm.get_config("mixer_digits")))


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["--lr", "-1"], "argument --lr: must be a finite number >= 0, got -1.0"),
    (["--lr", "nan"], "argument --lr: must be a finite number >= 0, got nan"),
    (["--drop-path", "1.5"], r"argument --drop-path: must be in \[0, 1\)"),
    (["--smoothing", "1"], r"argument --label-smoothing/--smoothing: must be in \[0, 1\)"),
    (["-b", "x"], r"argument -b/--batch-size: expected an integer, got 'x'"),
    (["--seed", "-1"], r"argument --seed: must be >= 0"),
    (["--opt", "sgd", "--momentum", "0"], r"momentum must be > 0 for sgd"),
    (["--model", "mixer_z9"], "unknown model 'mixer_z9'"),
    (["--data", "/nonexistent/dir"], "no such directory: /nonexistent/dir"),
    (["--model", "mixer_s32_224"], "the digits are 1x8x8 images"),
    (["--resume", "/nonexistent/ckpt.safetensors"], "no checkpoint at /nonexistent/ckpt.safetensors"),
    (["--init-from", "/nonexistent/w.safetensors"], "No such file"),
    (["--optimizer", "lion"], "invalid choice: 'lion'"),
    (["--img-size", "9"], "not divisible by patch_size 2"),
])
def test_bad_arguments_one_line_exit_2(tmp_path, args, message):
    r = run_cli(*args, "--out", str(tmp_path), "--no-progress")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search(message, r.stderr), r.stderr


@pytest.mark.skipif(mm.cupy_available(), reason="a GPU is usable here")
def test_cupy_backend_without_gpu_is_one_line():
    r = run_cli("--backend", "cupy", "--no-progress")
    assert r.returncode == 2 and "backend 'cupy' needs" in r.stderr and "Traceback" not in r.stderr


def test_ctrl_c_writes_checkpoint_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "minimixer.train", "--epochs", "200", "--out", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "metrics.json").exists() and time.time() < deadline:
        time.sleep(0.2)  # wait for the first epoch, so training is under way
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert re.fullmatch(r"python -m minimixer.train: interrupted after step \d+: checkpoint written to \S+ "
                        r"\(resume with --resume\)\n", stderr), stderr
    step = load_training_state(str(out / "checkpoint.safetensors"))["step"]
    assert step > 0
    r = run_cli("--out", str(out), "--resume", "--stop-after", str(step + 3), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"resuming from {out / 'checkpoint.safetensors'} at step {step}" in r.stdout
    assert load_training_state(str(out / "checkpoint.safetensors"))["step"] == step + 3


def test_fine_tune_replaces_head(tmp_path):
    cfg = mm.get_config("mixer_digits", num_classes=4)
    src = tmp_path / "four.safetensors"
    mm.save_weights(mm.init_params(cfg, seed=1), src)
    r = run_cli("--init-from", str(src), "--epochs", "1", "--out", str(tmp_path / "ft"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "replaced the 4-class head with a new 10-class head" in r.stdout
    tuned = mm.load_weights(tmp_path / "ft" / "model.safetensors", mm.get_config("mixer_digits"))
    assert tuned["head.weight"].shape == (10, 64)
    bad = tmp_path / "bad.safetensors"
    mm.save_weights(mm.init_params(mm.get_config("mixer_digits", embed_dim=32), seed=1), bad)
    r = run_cli("--init-from", str(bad), "--epochs", "1", "--out", str(tmp_path / "x"), "--no-progress")
    assert r.returncode == 2 and "does not fit this model config" in r.stderr


def test_checkpoint_is_not_model_weights(tmp_path):
    with pytest.raises(ValueError, match="not a minimixer training checkpoint"):
        src = tmp_path / "w.safetensors"
        mm.save_weights(mm.init_params(mm.get_config("mixer_digits")), src)
        load_training_state(str(src))


def test_shipped_digits_model_accuracy():
    """minimixer/assets/mixer_digits.safetensors: ≥ 97% top-1 on the held-out digits split."""
    from minimixer.checkpoints.registry import BUNDLED_DIGITS
    from minimixer.training.metrics import evaluate
    cfg = mm.get_config("mixer_digits")
    params = mm.load_weights(BUNDLED_DIGITS, cfg)
    _, _, x_test, y_test = digits_split()
    result = evaluate(params, cfg, ArrayLoader(x_test, y_test, 128))
    print(f"shipped digits model: top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% on {result['count']}")
    assert result["count"] == 355 and result["top1"] >= 97.0


def test_train_on_image_folder(tmp_path):
    """DIR/train and DIR/val class folders: decoded by the thread pool, classes counted from folders."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3)):
        for c, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
            (tmp_path / "data" / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                noisy = np.clip(np.array(color) + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(noisy).save(tmp_path / "data" / split / f"class{c}" / f"{i}.jpg")
    out = tmp_path / "run"
    r = run_cli("--model", "mixer_s32_224", "--img-size", "32", "--embed-dim", "8", "--num-blocks", "1",
                "--data", str(tmp_path / "data"), "--epochs", "2", "--batch-size", "4", "--workers", "2",
                "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    metrics = json.load(open(out / "metrics.json"))
    assert len(metrics) == 2 and metrics[0]["step"] == 6  # 24 images, batch 4, drop_last
    params = mm.load_weights(out / "model.safetensors",
                             mm.get_config("mixer_s32_224", img_size=32, embed_dim=8, num_blocks=1, num_classes=3))
    assert params["head.weight"].shape == (3, 8)

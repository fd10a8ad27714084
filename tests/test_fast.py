"""The fast path (minimixer/fast/) computes what the clear path (model.py) computes."""
import importlib.util
import sys
import threading

import numpy as np
import pytest

import minimixer as mm
from support.helpers import assert_all_close, assert_grads_close
from minimixer import fast, layers, optim
from minimixer.model import mixer_backward, mixer_forward
from minimixer.model import predict as reference_predict



@pytest.fixture(autouse=True, params=["numpy", pytest.param("numba", marks=pytest.mark.numba)])
def kernels(request, monkeypatch):
    """Every test here runs on the NumPy kernels, and (`pytest -m numba`, with the `fast` extra) on
    Numba's fused kernels."""
    if request.param == "numba":
        import numba  # noqa: F401  (-m numba without Numba is an error, not a skip)
        assert fast.numba_kernels(np.zeros(1, np.float32)) is not None
    else:
        monkeypatch.setattr(fast.kernels, "USE_NUMBA", False)
    return request.param


CONFIGS = {
    "tiny-odd": dict(num_classes=7, img_size=(9, 15), in_chans=2, patch_size=3, num_blocks=2, embed_dim=6),
    "small": dict(num_classes=11, img_size=(32, 48), in_chans=3, patch_size=8, num_blocks=3, embed_dim=20,
                  mlp_ratio=(1.5, 3.0)),
    "small-tanh": dict(num_classes=5, img_size=16, in_chans=3, patch_size=4, num_blocks=2, embed_dim=12,
                       gelu="tanh", ln_eps=1e-5),
}


def setup(name, dtype, B, seed=0):
    cfg = mm.MixerConfig(**CONFIGS[name])
    rng = np.random.default_rng(seed)
    params = {k: (v + 0.3 * rng.standard_normal(v.shape)).astype(dtype)
              for k, v in mm.init_params(cfg, dtype="float64").items()}
    x = rng.standard_normal((B, cfg.in_chans, *cfg.image_hw)).astype(dtype)
    return cfg, params, x


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("B", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_predict_equals_reference(monkeypatch, threads, B, dtype, tol):
    monkeypatch.setattr(fast.rows, "num_threads", lambda: threads)
    # tiny chunks, so the chunk loops, the token groups and the thread shares all have remainders
    monkeypatch.setattr(fast.rows, "CHUNK_ELEMENTS", 37)
    monkeypatch.setattr(fast.mixer, "CHANNEL_CHUNK_BYTES", 7 * 60 * np.dtype(dtype).itemsize)
    monkeypatch.setattr(fast.mixer, "TOKEN_GROUP", 3)
    for name in ("small", "small-tanh"):
        cfg, params, x = setup(name, dtype, B)
        got, ref = fast.predict(params, x, cfg), reference_predict(params, x, cfg)
        assert got.dtype == dtype
        assert_all_close([(f"fast predict {name}", got, ref)], tol)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_predict_equals_reference_batch_64(monkeypatch, threads):
    """A large batch (default chunk sizes, so the chunk loops are the real ones), on a tiny model."""
    monkeypatch.setattr(fast.rows, "num_threads", lambda: threads)
    for dtype, tol in [(np.float64, 1e-12), (np.float32, 2e-6)]:
        cfg, params, x = setup("tiny-odd", dtype, 64, seed=threads)
        assert_all_close([(f"fast predict {dtype.__name__}", fast.predict(params, x, cfg),
                           reference_predict(params, x, cfg))], tol)


def test_public_predict_is_the_fast_path():
    assert mm.predict is fast.predict


@pytest.mark.parametrize("regularize", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_train_forward_backward_equal_reference(monkeypatch, name, regularize):
    monkeypatch.setattr(fast.rows, "num_threads", lambda: 2)
    cfg, params, x = setup(name, np.float64, 5, seed=1)
    kw = dict(drop_path_rate=0.3, drop_rate=0.2) if regularize else {}
    logits, cache = fast.forward(params, x, cfg, rng=np.random.default_rng(4) if regularize else None, **kw)
    ref_logits, ref_cache = mixer_forward(params, x, cfg, rng=np.random.default_rng(4) if regularize else None, **kw)
    dlogits = np.random.default_rng(2).standard_normal(logits.shape)
    dx, grads = fast.backward(dlogits, cache, need_dx=True)
    ref_dx, ref_grads = mixer_backward(dlogits, ref_cache)
    assert set(grads) == set(params)
    assert_all_close([("logits", logits, ref_logits)], 1e-12)
    pairs = [("dx", dx, ref_dx)] + [(k, grads[k], ref_grads[k]) for k in params]
    assert_grads_close(pairs, 1e-10, zero_tol=1e-13)


@pytest.mark.parametrize("B", [1, 2, 3, 64])
def test_train_equals_reference_across_batch_sizes(monkeypatch, B):
    """One share (B = 1), one image per share, uneven shares and a large batch, on a tiny model."""
    monkeypatch.setattr(fast.rows, "num_threads", lambda: 2)
    cfg, params, x = setup("tiny-odd", np.float64, B, seed=B)
    logits, cache = fast.forward(params, x, cfg, drop_path_rate=0.2, rng=np.random.default_rng(4))
    ref_logits, ref_cache = mixer_forward(params, x, cfg, drop_path_rate=0.2, rng=np.random.default_rng(4))
    dlogits = np.random.default_rng(2).standard_normal(logits.shape)
    dx, grads = fast.backward(dlogits, cache, need_dx=True)
    ref_dx, ref_grads = mixer_backward(dlogits, ref_cache)
    assert_all_close([("logits", logits, ref_logits)], 1e-12)
    assert_grads_close([("dx", dx, ref_dx)] + [(k, grads[k], ref_grads[k]) for k in params], 1e-10, zero_tol=1e-13)


def test_train_float32_close_to_reference():
    cfg, params, x = setup("small", np.float32, 4, seed=3)
    logits, cache = fast.forward(params, x, cfg)
    ref_logits, ref_cache = mixer_forward(params, x, cfg)
    dlogits = np.random.default_rng(5).standard_normal(logits.shape).astype(np.float32)
    _, grads = fast.backward(dlogits, cache)
    _, ref_grads = mixer_backward(dlogits, ref_cache)
    assert_all_close([("logits", logits, ref_logits)], 2e-6)
    assert_grads_close([(k, grads[k], ref_grads[k]) for k in params], 2e-5, zero_tol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_kernels(dtype):
    x = np.concatenate([np.linspace(-9, 9, 20000), np.random.default_rng(0).standard_normal(4000) * 3])
    x = x.reshape(-1, 100).astype(dtype)
    bias = np.linspace(-1, 1, 100).astype(dtype)
    ref, cache = layers.gelu_forward((x + bias).astype(np.float64))
    ref_d = layers.gelu_backward(np.ones_like(ref), cache)
    got = fast.bias_gelu_(x.copy(), bias)
    got2, d = fast.bias_gelu_grad_(x.copy(), bias, np.empty_like(x))
    tol = 1e-14 if dtype == np.float64 else 3e-6  # absolute: GELU values reach 9
    assert np.abs(got - ref).max() <= tol and np.abs(got2 - ref).max() <= tol
    assert np.abs(d - ref_d).max() <= tol
    rowbias = np.linspace(-1, 1, x.shape[0]).astype(dtype)[:, None]  # token mixing: bias per row
    ref_rows, _ = layers.gelu_forward((x + rowbias).astype(np.float64))
    assert np.abs(fast.bias_gelu_(x.copy(), rowbias) - ref_rows).max() <= tol


@pytest.mark.parametrize("threads", [1, 3])
def test_layernorm_kernels(monkeypatch, threads):
    """Forward, and backward with its weight/bias gradients, with the rows split over threads."""
    monkeypatch.setattr(fast.rows, "num_threads", lambda: threads)
    monkeypatch.setattr(fast.rows, "CHUNK_ELEMENTS", 500)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((301, 24)) * 3 + 1
    w, b = 1 + 0.3 * rng.standard_normal(24), rng.standard_normal(24)
    ref, cache = layers.layernorm_forward(x, w, b, 1e-6)
    out, norm, rstd = np.empty_like(x), np.empty_like(x), np.empty((301, 1))
    fast.layernorm_(x, out, w, b, 1e-6, norm=norm, rstd=rstd)
    assert_all_close([("layernorm", out, ref), ("rstd", rstd, cache[3])], 1e-13)
    dout = rng.standard_normal(x.shape)
    ref_dx, ref_dw, ref_db = layers.layernorm_backward(dout, cache)
    dh = rng.standard_normal(x.shape)  # the residual stream's gradient, which the LayerNorm's adds to
    ref_dh = dh + ref_dx
    dw, db = fast.layernorm_backward_add_(dout.copy(), norm, rstd, w, dh)
    assert_all_close([("layernorm dh + dx", dh, ref_dh), ("layernorm dw", dw, ref_dw), ("layernorm db", db, ref_db)],
                     1e-12)


@pytest.mark.parametrize("threads", [1, 3])
def test_multiply_and_sum(monkeypatch, threads):
    """a·b in place and the bias gradient's sums, with the rows split over threads (apart sums)."""
    monkeypatch.setattr(fast.rows, "num_threads", lambda: threads)
    monkeypatch.setattr(fast.rows, "CHUNK_ELEMENTS", 50)
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 37, 23)), rng.standard_normal((2, 37, 23))
    got_a, sums = a.copy(), fast.multiply_and_sum_(a[0].copy(), b[0], 0)
    assert_all_close([("column sums", sums, (a[0] * b[0]).sum(axis=0))], 1e-13)
    sums3 = fast.multiply_and_sum_(got_a, b, (0, 2))
    assert_all_close([("a·b", got_a, a * b), ("row sums over images", sums3, (a * b).sum(axis=(0, 2)))], 1e-13)


def test_layernorm_and_gelu_keep_nan():
    """A NaN in (weights allowed with --allow-nonfinite) is a NaN out, in both kernel sets."""
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    x[2, 3] = np.nan
    out = fast.layernorm_(x, np.empty_like(x), np.ones(16, np.float32), np.zeros(16, np.float32))
    assert np.isnan(out[2]).all() and np.isfinite(np.delete(out, 2, axis=0)).all()
    g = fast.bias_gelu_(x.copy(), np.zeros(16, np.float32))
    assert np.isnan(g[2, 3]) and np.isfinite(g).sum() == g.size - 1
    g, d = fast.bias_gelu_grad_(x.copy(), np.zeros(16, np.float32), np.empty_like(x))
    assert np.isnan(g[2, 3]) and np.isnan(d[2, 3])


@pytest.mark.parametrize("grad", [False, True])
def test_float32_gelu_never_makes_denormals(grad):
    """A denormal activation slows the next matmul several-fold on x86: the float32 kernels cut the
    tail below 1e-34 instead (an absolute error that small is far below float32's resolution)."""
    x = np.linspace(-60, 60, 240001, dtype=np.float32).reshape(-1, 1)
    if grad:
        g, d = fast.bias_gelu_grad_(x.copy(), None, np.empty_like(x))
    else:
        g, d = fast.bias_gelu_(x.copy(), None), np.ones_like(x)
    tiny = np.finfo(np.float32).tiny
    for name, a in [("gelu", g), ("gelu'", d)]:
        denormal = (a != 0) & (np.abs(a) < tiny)
        assert not denormal.any(), f"{name}: {denormal.sum()} denormals, first at x = {x[denormal.ravel()][0]}"


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-14), (np.float32, 2e-6)])
def test_adamw_equals_the_clear_optimizer(dtype, tol):
    """fast.AdamW (one fused pass per parameter with Numba) takes the clear optim.AdamW's steps:
    weight decay on, and off for biases; a non-contiguous gradient takes the clear update."""
    rng = np.random.default_rng(0)
    shapes = {"blocks.0.mlp.fc1.weight": (37, 11), "blocks.0.mlp.fc1.bias": (37,), "head.weight": (5, 3)}
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    ours, ref = ({k: v.copy() for k, v in params.items()} for _ in range(2))
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, no_decay=optim.bias_and_norm)
    opt, ref_opt = fast.AdamW(ours, **kw), optim.AdamW(ref, **kw)
    for step in range(6):
        grads = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
        if step == 3:
            grads["head.weight"] = np.asfortranarray(grads["head.weight"])
        opt.step({k: g.copy() for k, g in grads.items()})
        ref_opt.step(grads)
    assert_all_close([(f"AdamW {k}", ours[k], ref[k]) for k in params] +
                     [(f"exp_avg_sq {k}", opt.state[k]["exp_avg_sq"], ref_opt.state[k]["exp_avg_sq"]) for k in params],
                     tol)


def test_numba_that_cannot_run_falls_back_in_one_line(monkeypatch, capsys):
    """Numba installed but unusable (say, built for another NumPy): one line on stderr, then the
    NumPy kernels, whose results are the same."""
    monkeypatch.setattr(fast.kernels, "_numba_module", [])
    monkeypatch.setattr(fast.kernels, "USE_NUMBA", True)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "numba" else find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "minimixer.fast.kernels_numba", None)  # its import fails
    monkeypatch.delattr(mm.fast, "kernels_numba", raising=False)  # (already imported: not found on the package either)
    x = np.linspace(-3, 3, 12).reshape(3, 4)
    assert fast.numba_kernels(x) is None
    assert_all_close([("gelu", fast.bias_gelu_(x.copy(), np.zeros(4)), layers.gelu_forward(x)[0])], 1e-14)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Numba is installed but cannot run" in err and "NumPy kernels" in err, err


def test_first_call_from_many_threads_imports_once(monkeypatch, capsys):
    """The batch shares' threads all reach the kernels' first import together: one import, one
    answer for all of them, and nothing on stderr (CI once caught a thread seeing the other's
    half-done import)."""
    monkeypatch.setattr(fast.kernels, "_numba_module", [])
    monkeypatch.setattr(fast.kernels, "USE_NUMBA", True)
    monkeypatch.delitem(sys.modules, "minimixer.fast.kernels_numba", raising=False)
    monkeypatch.delattr(mm.fast, "kernels_numba", raising=False)
    start, got = threading.Barrier(8), []

    def first_call():
        start.wait()
        got.append(fast.numba_kernels(np.zeros(1, np.float32)))
    workers = [threading.Thread(target=first_call) for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(got) == 8 and all(g is got[0] for g in got) and len(fast.kernels._numba_module) == 1
    assert capsys.readouterr().err == ""

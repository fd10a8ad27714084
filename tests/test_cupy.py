"""CuPy against NumPy, layer by layer, for the whole model, and for the fast path (minimixer/fast/).

Each test runs twice: on a GPU with real CuPy (skipped without a usable one), and on
tests/support/fake_cupy.py, a NumPy-backed stand-in that refuses implicit host conversion, so the
default run checks the CuPy code paths too (not the CUDA kernels: tests/test_nvrtc.py compiles
those; only a GPU runs them). The NumPy passes are gradient-checked in test_layers.py; here
every forward output and every gradient computed on the device must equal NumPy's.
"""
import numpy as np
import pytest

from support import fake_cupy
import minimixer as mm
from conftest import CUPY_OK
from support.helpers import assert_all_close, assert_grads_close
from minimixer import fast
from minimixer import layers as L
from minimixer.erf import erf
from minimixer.model import mixer_backward, mixer_forward
from minimixer.model import predict as reference_predict
from test_fast import CONFIGS, setup


@pytest.fixture(autouse=True, params=["cupy", "fake_cupy"])
def device(request, monkeypatch):
    """Real CuPy on a GPU, or the stand-in (always)."""
    if request.param == "cupy":
        if not CUPY_OK:
            pytest.skip("CuPy backend: no usable GPU here")
    else:
        fake_cupy.install(monkeypatch)
    return request.param


rng = np.random.default_rng(0)
N, D, DS, DC = 5, 4, 3, 8


def r(*shape):
    return rng.standard_normal(shape)


LAYERS = {
    "linear": (L.linear_forward, L.linear_backward, lambda: (r(2, 3, 5), r(4, 5), r(4)), ()),
    "patch_embed": (L.patch_embed_forward, L.patch_embed_backward, lambda: (r(2, 2, 6, 9), r(5, 2, 3, 3), r(5)), (3,)),
    "layernorm": (L.layernorm_forward, L.layernorm_backward, lambda: (r(2, 3, 7), 1 + r(7), r(7)), (1e-6,)),
    "gelu_erf": (L.gelu_forward, L.gelu_backward, lambda: (3 * r(4, 9),), ("erf",)),
    "gelu_tanh": (L.gelu_forward, L.gelu_backward, lambda: (3 * r(4, 9),), ("tanh",)),
    "mlp": (L.mlp_forward, L.mlp_backward, lambda: (r(2, 3, 4), r(6, 4), r(6), r(4, 6), r(4)), ("erf",)),
    "token_mixing": (L.token_mixing_forward, L.token_mixing_backward,
                     lambda: (r(2, N, D), 1 + r(D), r(D), r(DS, N), r(DS), r(N, DS), r(N)), (1e-6, "erf")),
    "channel_mixing": (L.channel_mixing_forward, L.channel_mixing_backward,
                       lambda: (r(2, N, D), 1 + r(D), r(D), r(DC, D), r(DC), r(D, DC), r(D)), (1e-6, "erf")),
    "mean_pool": (L.mean_pool_forward, L.mean_pool_backward, lambda: (r(2, N, D),), ()),
}


def as_tuple(g):
    return g if isinstance(g, tuple) else (g,)


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_cupy_equals_numpy(name):
    forward, backward, make_inputs, extra = LAYERS[name]
    inputs = make_inputs()
    out, cache = forward(*inputs, *extra)
    dout = r(*out.shape)
    grads = as_tuple(backward(dout, cache))
    gpu_out, gpu_cache = forward(*[mm.to_backend(a, "cupy") for a in inputs], *extra)
    gpu_grads = as_tuple(backward(mm.to_backend(dout, "cupy"), gpu_cache))
    assert mm.get_xp(gpu_out) is not np
    pairs = [("out", mm.to_numpy(gpu_out), out)]
    pairs += [(f"grad{i}", mm.to_numpy(g), c) for i, (g, c) in enumerate(zip(gpu_grads, grads))]
    assert_all_close(pairs, 1e-12)


def test_erf_cupy_equals_numpy():
    x = np.linspace(-8, 8, 100_001)
    for dtype, tol in ((np.float64, 1e-15), (np.float32, 1e-6)):
        got = mm.to_numpy(erf(mm.to_backend(x.astype(dtype), "cupy")))
        assert_all_close([(f"erf {dtype.__name__}", got, erf(x.astype(dtype)))], tol)


def test_model_cupy_equals_numpy():
    cfg = mm.MixerConfig(num_classes=7, img_size=(9, 15), in_chans=2, patch_size=3, num_blocks=2, embed_dim=6)
    params = {k: v + 0.2 * r(*v.shape) for k, v in mm.init_params(cfg, dtype="float64").items()}
    x, dlogits = r(2, 2, 9, 15), r(2, 7)
    logits, cache = mm.mixer_forward(params, x, cfg)
    dx, grads = mm.mixer_backward(dlogits, cache)
    gp = mm.to_backend(params, "cupy")
    glogits, gcache = mm.mixer_forward(gp, mm.to_backend(x, "cupy"), cfg)
    gdx, ggrads = mm.mixer_backward(mm.to_backend(dlogits, "cupy"), gcache)
    pairs = [("logits", mm.to_numpy(glogits), logits), ("dx", mm.to_numpy(gdx), dx)]
    pairs += [(k, mm.to_numpy(ggrads[k]), grads[k]) for k in grads if not k.endswith("mlp_tokens.fc2.bias")]
    assert_all_close(pairs, 1e-12)


def test_mixed_backends_are_rejected():
    cfg = mm.MixerConfig(num_classes=3, img_size=16, patch_size=8, num_blocks=1, embed_dim=8)
    params = mm.init_params(cfg, backend="cupy")
    with pytest.raises(TypeError, match="different backends"):
        mm.predict(params, np.zeros((1, 3, 16, 16), np.float32), cfg)


def gpu(a):
    return mm.to_backend(a, "cupy")


@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_fast_predict_equals_reference(B, dtype, tol):
    for name in ("small", "small-tanh"):
        cfg, params, x = setup(name, dtype, B)
        got = fast.predict(gpu(params), gpu(x), cfg)
        assert got.dtype == dtype and mm.get_xp(got).__name__ != "numpy"
        assert_all_close([(f"fast predict {name}", mm.to_numpy(got), reference_predict(params, x, cfg))], tol)


def test_fast_predict_float16_close_to_float64():
    """GPU inference in float16: GELU and LayerNorm statistics in float32, matmuls in float16."""
    for name in ("small", "small-tanh"):
        cfg, params, x = setup(name, np.float64, 4)
        got = fast.predict(mm.to_backend(params, "cupy", dtype="float16"), mm.to_backend(x, "cupy", dtype="float16"),
                           cfg)
        assert got.dtype == np.float16
        assert_all_close([(f"fast predict {name} float16", mm.to_numpy(got), reference_predict(params, x, cfg))], 3e-3)


@pytest.mark.parametrize("regularize", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_train_forward_backward_equal_reference(name, regularize):
    cfg, params, x = setup(name, np.float64, 5, seed=1)
    kw = dict(drop_path_rate=0.3, drop_rate=0.2) if regularize else {}
    logits, cache = fast.forward(gpu(params), gpu(x), cfg, rng=np.random.default_rng(4) if regularize else None, **kw)
    ref_logits, ref_cache = mixer_forward(params, x, cfg, rng=np.random.default_rng(4) if regularize else None, **kw)
    dlogits = np.random.default_rng(2).standard_normal(logits.shape)
    dx, grads = fast.backward(gpu(dlogits), cache, need_dx=True)
    ref_dx, ref_grads = mixer_backward(dlogits, ref_cache)
    assert set(grads) == set(params)
    assert_all_close([("logits", mm.to_numpy(logits), ref_logits)], 1e-12)
    pairs = [("dx", mm.to_numpy(dx), ref_dx)] + [(k, mm.to_numpy(grads[k]), ref_grads[k]) for k in params]
    assert_grads_close(pairs, 1e-10, zero_tol=1e-13)


def test_fast_train_float32_close_to_reference():
    cfg, params, x = setup("small", np.float32, 4, seed=3)
    logits, cache = fast.forward(gpu(params), gpu(x), cfg)
    ref_logits, ref_cache = mixer_forward(params, x, cfg)
    dlogits = np.random.default_rng(5).standard_normal(logits.shape).astype(np.float32)
    _, grads = fast.backward(gpu(dlogits), cache)
    _, ref_grads = mixer_backward(dlogits, ref_cache)
    assert_all_close([("logits", mm.to_numpy(logits), ref_logits)], 2e-6)
    assert_grads_close([(k, mm.to_numpy(grads[k]), ref_grads[k]) for k in params], 2e-5, zero_tol=1e-5)


@pytest.mark.parametrize("form", ["erf", "tanh"])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-13), (np.float32, 2e-6)])
def test_fused_gelu_kernels_compute_in_the_arrays_type(form, dtype, tol):
    """float64 kernels compute in double (erf, exp, tanh in double), float32 ones in float."""
    x = np.linspace(-7, 7, 6000).reshape(60, 100)
    bias = np.random.default_rng(0).standard_normal(100)
    out, cache = L.gelu_forward(x + bias, form)
    grad = L.gelu_backward(np.ones_like(x), cache)
    gx, gd = gpu(x.astype(dtype)), mm.to_backend(np.empty_like(x), "cupy", dtype=dtype)
    fast.bias_gelu_grad_(gx, gpu(bias.astype(dtype)), gd, form)
    hx = gpu(x.astype(dtype))
    fast.bias_gelu_(hx, gpu(bias.astype(dtype)), form)
    assert_all_close([(f"gelu {form}", mm.to_numpy(gx), out), (f"gelu' {form}", mm.to_numpy(gd), grad),
                      (f"gelu {form}, forward kernel", mm.to_numpy(hx), out)], tol)


@pytest.mark.parametrize("on_device", [False, True])
def test_float16_layernorm_does_not_overflow(on_device, device):
    """|x - mean| up to ~2000: float16 squares would overflow (var = inf, a zeroed row); the
    statistics are computed in float32, on NumPy as on the device, by the clear and the fast path."""
    rng = np.random.default_rng(0)
    x, w, b = 600 * rng.standard_normal((6, 32)), 1 + 0.1 * rng.standard_normal(32), rng.standard_normal(32)
    ref, _ = L.layernorm_forward(x, w, b)  # float64
    move = gpu if on_device else (lambda a: a)
    x16, w16, b16 = (move(a.astype(np.float16)) for a in (x, w, b))
    clear, _ = L.layernorm_forward(x16, w16, b16)
    fast_out = fast.layernorm_(x16, mm.get_xp(x16).empty_like(x16), w16, b16)
    assert clear.dtype == fast_out.dtype == np.float16
    assert_all_close([("clear float16", mm.to_numpy(clear), ref), ("fast float16", mm.to_numpy(fast_out), ref)], 2e-3)

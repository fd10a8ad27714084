"""CuPy against NumPy, layer by layer and for the whole model (skipped without a usable GPU).

The NumPy passes are gradient-checked in test_layers.py; here every forward output
and every gradient computed on the GPU must equal NumPy's. Fixture parity with timm
on the cupy backend runs in test_fixtures.py through the `backend` fixture.
"""
import numpy as np
import pytest

import minimixer as mm
from conftest import CUPY_OK
from helpers import assert_all_close
from minimixer import layers as L
from minimixer.erf import erf

pytestmark = pytest.mark.skipif(not CUPY_OK, reason="CuPy backend: no usable GPU here")

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
    assert mm.get_xp(gpu_out).__name__ == "cupy"
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

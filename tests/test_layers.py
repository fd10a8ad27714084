"""Every layer pair: float64 central differences, random upstream gradient, non-trivial params.

Each test builds the layer's inputs, runs forward then backward with a random
dout, and compares every analytic gradient with d/dθ sum(forward(θ)·dout)
computed by central differences. Relative error ≤ 1e-7.
"""
import numpy as np
import pytest

from support.helpers import assert_all_close, gradcheck
from minimixer import layers as L

TOL = 1e-7


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def randn(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


def norm_params(rng, D):
    """LayerNorm weight/bias away from the trivial 1/0."""
    return 1.0 + 0.5 * randn(rng, D), 0.3 * randn(rng, D)


def test_linear(rng):
    x, w, b = randn(rng, 2, 3, 5), randn(rng, 4, 5), randn(rng, 4)
    out, cache = L.linear_forward(x, w, b)
    dout = randn(rng, *out.shape)
    dx, dw, db = L.linear_backward(dout, cache)
    gradcheck(lambda x, w, b: L.linear_forward(x, w, b)[0], dict(x=x, w=w, b=b), dout,
              dict(x=dx, w=dw, b=db), TOL)


def test_patchify_matches_conv_layout(rng):
    """Patch extraction + matmul equals a direct stride-P convolution (timm's stem)."""
    B, C, H, W, P, D = 2, 3, 6, 9, 3, 4
    x, w, b = randn(rng, B, C, H, W), randn(rng, D, C, P, P), randn(rng, D)
    tokens, _ = L.patch_embed_forward(x, w, b, P)
    conv = np.empty((B, D, H // P, W // P))
    for i in range(H // P):
        for j in range(W // P):
            window = x[:, :, i * P:(i + 1) * P, j * P:(j + 1) * P]  # (B, C, P, P)
            conv[:, :, i, j] = np.einsum("bckl,dckl->bd", window, w) + b
    expected = conv.reshape(B, D, -1).transpose(0, 2, 1)  # tokens in row-major (h, w) order
    assert_all_close([("tokens vs conv", tokens, expected)], 1e-13)
    assert_all_close([("unpatchify(patchify(x))", L.unpatchify(L.patchify(x, P), x.shape, P), x)], 0.0)


def test_patch_embed(rng):
    x, w, b = randn(rng, 2, 2, 6, 9), randn(rng, 5, 2, 3, 3), randn(rng, 5)
    out, cache = L.patch_embed_forward(x, w, b, 3)
    dout = randn(rng, *out.shape)
    dx, dw, db = L.patch_embed_backward(dout, cache)
    gradcheck(lambda x, w, b: L.patch_embed_forward(x, w, b, 3)[0], dict(x=x, w=w, b=b), dout,
              dict(x=dx, w=dw, b=db), TOL)


def test_patch_embed_rejects_indivisible_image(rng):
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
        L.patch_embed_forward(randn(rng, 1, 3, 10, 8), randn(rng, 2, 3, 4, 4), randn(rng, 2), 4)


def test_layernorm(rng):
    x = randn(rng, 2, 3, 7, scale=2.0) + 0.7
    w, b = norm_params(rng, 7)
    out, cache = L.layernorm_forward(x, w, b, eps=1e-6)
    dout = randn(rng, *out.shape)
    dx, dw, db = L.layernorm_backward(dout, cache)
    gradcheck(lambda x, w, b: L.layernorm_forward(x, w, b, eps=1e-6)[0], dict(x=x, w=w, b=b), dout,
              dict(x=dx, w=dw, b=db), TOL)


def test_layernorm_cache_keeps_statistics_not_copies(rng):
    x = randn(rng, 2, 3, 7)
    w, b = norm_params(rng, 7)
    _, (cx, cw, mean, rstd) = L.layernorm_forward(x, w, b)
    assert cx is x and cw is w
    assert mean.shape == rstd.shape == (2, 3, 1)
    # eps is 1e-6 by default (timm's Mixer), and the variance is biased
    expected_rstd = 1.0 / np.sqrt(x.var(axis=-1, keepdims=True) + 1e-6)
    assert_all_close([("mean", mean, x.mean(-1, keepdims=True)), ("rstd", rstd, expected_rstd)], 1e-15)


@pytest.mark.parametrize("form", ["erf", "tanh"])
def test_gelu(rng, form):
    # spread wide enough to reach both branches of the float64 erf (|x|/√2 beyond 2.5)
    x = np.concatenate([randn(rng, 40, scale=2.5), np.linspace(-6, 6, 25)]).reshape(5, 13)
    out, cache = L.gelu_forward(x, form)
    dout = randn(rng, *out.shape)
    dx = L.gelu_backward(dout, cache)
    gradcheck(lambda x: L.gelu_forward(x, form)[0], dict(x=x), dout, dict(x=dx), TOL)


def test_gelu_values():
    """Known values: exact GELU and its tanh form differ by up to ~4.7e-4."""
    x = np.array([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    from math import erf, sqrt, tanh, pi
    exact = np.array([0.5 * v * (1 + erf(v / sqrt(2))) for v in x])
    approx = np.array([0.5 * v * (1 + tanh(sqrt(2 / pi) * (v + 0.044715 * v**3))) for v in x])
    assert_all_close([("gelu erf", L.gelu_forward(x, "erf")[0], exact),
                      ("gelu tanh", L.gelu_forward(x, "tanh")[0], approx)], 1e-15)
    assert np.abs(exact - approx).max() > 1e-4  # the two forms really are different
    with pytest.raises(ValueError, match="unknown GELU form 'relu'"):
        L.gelu_forward(x, "relu")


@pytest.mark.parametrize("form", ["erf", "tanh"])
def test_mlp(rng, form):
    x = randn(rng, 2, 3, 4)
    w1, b1, w2, b2 = randn(rng, 6, 4), randn(rng, 6), randn(rng, 4, 6, scale=0.5), randn(rng, 4)
    out, cache = L.mlp_forward(x, w1, b1, w2, b2, form)
    dout = randn(rng, *out.shape)
    dx, dw1, db1, dw2, db2 = L.mlp_backward(dout, cache)
    gradcheck(lambda x, w1, b1, w2, b2: L.mlp_forward(x, w1, b1, w2, b2, form)[0],
              dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2), dout, dict(x=dx, w1=dw1, b1=db1, w2=dw2, b2=db2), TOL)


def mixing_inputs(rng, N, D, hidden, across):
    """x and the six parameters of a token (across='tokens') or channel mixing layer."""
    width = N if across == "tokens" else D
    nw, nb = norm_params(rng, D)
    return dict(x=randn(rng, 2, N, D), nw=nw, nb=nb,
                w1=randn(rng, hidden, width), b1=randn(rng, hidden),
                w2=randn(rng, width, hidden, scale=0.5), b2=randn(rng, width))


@pytest.mark.parametrize("across", ["tokens", "channels"])
def test_mixing(rng, across):
    forward, backward = {
        "tokens": (L.token_mixing_forward, L.token_mixing_backward),
        "channels": (L.channel_mixing_forward, L.channel_mixing_backward),
    }[across]
    inputs = mixing_inputs(rng, N=5, D=4, hidden=3, across=across)
    out, cache = forward(*inputs.values(), 1e-6, "erf")
    dout = randn(rng, *out.shape)
    analytic = dict(zip(inputs, backward(dout, cache)))
    gradcheck(lambda **kw: forward(*kw.values(), 1e-6, "erf")[0], inputs, dout, analytic, TOL)


def test_token_mixing_mixes_tokens_only(rng):
    """Token mixing's MLP acts along N: permuting channels permutes its output the same way
    (LayerNorm aside, which is per-token and also channel-equivariant)."""
    inputs = mixing_inputs(rng, N=5, D=4, hidden=3, across="tokens")
    inputs["nw"][:], inputs["nb"][:] = 1.0, 0.0  # a plain LayerNorm commutes with channel permutations
    perm = np.array([2, 0, 3, 1])
    out, _ = L.token_mixing_forward(*inputs.values())
    inputs["x"] = inputs["x"][:, :, perm]
    out_perm, _ = L.token_mixing_forward(*inputs.values())
    assert_all_close([("permuted channels", out_perm, out[:, :, perm])], 1e-14)


def block_params(rng, N, D, DS, DC):
    p = {}
    p["norm1.weight"], p["norm1.bias"] = norm_params(rng, D)
    p["mlp_tokens.fc1.weight"], p["mlp_tokens.fc1.bias"] = randn(rng, DS, N), randn(rng, DS)
    p["mlp_tokens.fc2.weight"], p["mlp_tokens.fc2.bias"] = randn(rng, N, DS, scale=0.5), randn(rng, N)
    p["norm2.weight"], p["norm2.bias"] = norm_params(rng, D)
    p["mlp_channels.fc1.weight"], p["mlp_channels.fc1.bias"] = randn(rng, DC, D), randn(rng, DC)
    p["mlp_channels.fc2.weight"], p["mlp_channels.fc2.bias"] = randn(rng, D, DC, scale=0.5), randn(rng, D)
    return p


@pytest.mark.parametrize("form", ["erf", "tanh"])
def test_mixer_block(rng, form):
    p = block_params(rng, N=5, D=4, DS=2, DC=16)
    x = randn(rng, 2, 5, 4)
    out, cache = L.mixer_block_forward(x, p, 1e-6, form)
    dout = randn(rng, *out.shape)
    dx, grads = L.mixer_block_backward(dout, cache)
    assert set(grads) == set(L.BLOCK_KEYS)
    inputs = {"x": x, **p}
    gradcheck(lambda x, **p: L.mixer_block_forward(x, p, 1e-6, form)[0], inputs, dout,
              {"x": dx, **grads}, TOL)


def test_mixer_block_matches_paper_equations(rng):
    """U = X + (W2 σ(W1 LN(X)ᵀ))ᵀ, Y = U + W4 σ(W3 LN(U)) written out with einsum."""
    p = block_params(rng, N=5, D=4, DS=2, DC=16)
    x = randn(rng, 2, 5, 4)

    def ln(v, w, b):
        return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-6) * w + b

    def gelu(v):
        return L.gelu_forward(v)[0]

    y = ln(x, p["norm1.weight"], p["norm1.bias"])
    h = gelu(np.einsum("sn,bnd->bsd", p["mlp_tokens.fc1.weight"], y) + p["mlp_tokens.fc1.bias"][:, None])
    u = x + np.einsum("ns,bsd->bnd", p["mlp_tokens.fc2.weight"], h) + p["mlp_tokens.fc2.bias"][:, None]
    z = ln(u, p["norm2.weight"], p["norm2.bias"])
    h = gelu(z @ p["mlp_channels.fc1.weight"].T + p["mlp_channels.fc1.bias"])
    expected = u + h @ p["mlp_channels.fc2.weight"].T + p["mlp_channels.fc2.bias"]
    assert_all_close([("block vs equations", L.mixer_block_forward(x, p)[0], expected)], 1e-13)


def test_mean_pool(rng):
    x = randn(rng, 2, 5, 3)
    out, cache = L.mean_pool_forward(x)
    dout = randn(rng, *out.shape)
    dx = L.mean_pool_backward(dout, cache)
    gradcheck(lambda x: L.mean_pool_forward(x)[0], dict(x=x), dout, dict(x=dx), TOL)

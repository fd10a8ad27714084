"""The feature API (model.forward_features, forward_head, forward_intermediates):
backward checked by float64 central differences with a random upstream gradient on a
tiny odd-shaped Mixer, and (marker timm) the values against timm's own methods."""
import numpy as np
import pytest

import minimixer as mm
from support.helpers import assert_all_close, assert_grads_close, numerical_gradient
from minimixer.model import take_indices

TINY = mm.MixerConfig(num_classes=5, img_size=(6, 9), in_chans=2, patch_size=3, num_blocks=3, embed_dim=4)


def nontrivial_params(cfg, seed, dtype="float64"):
    """init_params moved away from its zeros and ones, so no path hides behind them."""
    rng = np.random.default_rng(seed)
    return {k: (v + 0.3 * rng.standard_normal(v.shape)).astype(dtype)
            for k, v in mm.init_params(cfg, seed=seed, dtype="float64").items()}


def check_backward(forward, analytic, params, x, douts, zero_grad_names=()):
    """Central differences of loss = Σ forward(params, x)·dout for x and every parameter that
    `analytic` has; parameters absent from `analytic` must not move the loss at all."""
    def loss():
        outs = forward(params, x)
        return float(sum(np.sum(o * d) for o, d in zip(outs, douts) if d is not None))

    dx, grads = analytic
    pairs = [("dx", dx, numerical_gradient(loss, x))]
    pairs += [(k, grads[k], numerical_gradient(loss, params[k])) for k in grads]
    for k in sorted(set(params) - set(grads)):  # not in the graph: exactly no effect
        assert np.abs(numerical_gradient(loss, params[k])).max() == 0.0, f"{k} moves the loss but has no grad"
    if zero_grad_names:
        assert_grads_close(pairs, 1e-7, zero_tol=1e-8)
    else:
        assert_all_close(pairs, 1e-7)


@pytest.fixture
def tiny():
    rng = np.random.default_rng(11)
    return nontrivial_params(TINY, 11), rng.standard_normal((2, TINY.in_chans, *TINY.image_hw)), rng


def test_features_and_head_compose_to_the_model(tiny):
    params, x, _ = tiny
    feats, _ = mm.forward_features(params, x, TINY)
    logits, _ = mm.forward_head(params, feats, TINY)
    pooled, _ = mm.forward_head(params, feats, TINY, pre_logits=True)
    assert feats.shape == (2, TINY.num_patches, TINY.embed_dim) and pooled.shape == (2, TINY.embed_dim)
    assert_all_close([("logits", logits, mm.mixer_forward(params, x, TINY)[0]),
                      ("pooled @ head", pooled @ params["head.weight"].T + params["head.bias"], logits)], 1e-14)


def test_forward_features_backward(tiny):
    params, x, rng = tiny
    dfeats = rng.standard_normal((2, TINY.num_patches, TINY.embed_dim))
    feats, cache = mm.forward_features(params, x, TINY)
    check_backward(lambda p, x: [mm.forward_features(p, x, TINY)[0]], mm.backward_features(dfeats, cache),
                   params, x, [dfeats], zero_grad_names=True)


@pytest.mark.parametrize("pre_logits", [True, False])
def test_forward_head_backward(tiny, pre_logits):
    params, x, rng = tiny
    feats = rng.standard_normal((2, TINY.num_patches, TINY.embed_dim))
    out, cache = mm.forward_head(params, feats, TINY, pre_logits=pre_logits)
    dout = rng.standard_normal(out.shape)
    dfeats, grads = mm.backward_head(dout, cache)
    assert set(grads) == (set() if pre_logits else {"head.weight", "head.bias"})
    head = {k: params[k] for k in ("head.weight", "head.bias")}
    check_backward(lambda p, f: [mm.forward_head(p, f, TINY, pre_logits=pre_logits)[0]], (dfeats, grads),
                   head, feats, [dout])


INTERMEDIATE_CASES = {
    "all-nchw": dict(),
    "last-two-nlc": dict(indices=2, output_fmt="NLC"),
    "listed-norm": dict(indices=[0, -1], norm=True),
    "only-stop-early": dict(indices=[1], intermediates_only=True, stop_early=True),
    "only-norm": dict(indices=[2, 0], intermediates_only=True, norm=True),
}


@pytest.mark.parametrize("case", list(INTERMEDIATE_CASES))
def test_forward_intermediates_backward(tiny, case):
    params, x, rng = tiny
    kw = INTERMEDIATE_CASES[case]
    out, cache = mm.forward_intermediates(params, x, TINY, **kw)
    feats, inter = (None, out) if kw.get("intermediates_only") else out
    gh, gw = TINY.grid_size
    want = (2, TINY.num_patches, TINY.embed_dim) if kw.get("output_fmt") == "NLC" else (2, TINY.embed_dim, gh, gw)
    assert [y.shape for y in inter] == [want] * len(take_indices(TINY.num_blocks, kw.get("indices")))
    dinter = [rng.standard_normal(y.shape) for y in inter]
    dinter[0] = None if len(dinter) > 1 else dinter[0]  # an intermediate that feeds no loss
    dfeats = None if feats is None else rng.standard_normal(feats.shape)

    def forward(p, x):
        out = mm.forward_intermediates(p, x, TINY, **kw)[0]
        return list(out) if kw.get("intermediates_only") else [out[0], *out[1]]

    douts = dinter if feats is None else [dfeats, *dinter]
    check_backward(forward, mm.backward_intermediates(dfeats, dinter, cache), params, x, douts,
                   zero_grad_names=kw.get("norm", False))


def test_intermediates_are_the_block_outputs(tiny):
    params, x, _ = tiny
    (feats, inter), _ = mm.forward_intermediates(params, x, TINY, output_fmt="NLC")
    h = mm.layers.patch_embed_forward(x, params["stem.proj.weight"], params["stem.proj.bias"], 3)[0]
    for i in range(TINY.num_blocks):
        h = mm.layers.mixer_block_forward(h, mm.model.block_params(params, i))[0]
        assert np.array_equal(inter[i], h)
    assert np.array_equal(feats, mm.forward_features(params, x, TINY)[0])


def test_take_indices_follows_timm():
    assert take_indices(4, None) == [0, 1, 2, 3]
    assert take_indices(4, 1) == [3]
    assert take_indices(4, [0, -1]) == [0, 3]
    for bad in (0, 5, [4], [-5], []):
        with pytest.raises(ValueError, match="out of range|last n|empty"):
            take_indices(4, bad)
    with pytest.raises(ValueError, match="output_fmt"):
        mm.forward_intermediates(mm.init_params(TINY), np.zeros((1, 2, 6, 9), np.float32), TINY, output_fmt="NHWC")


# --- live: the same numbers as timm's methods ----------------------------------------------

LIVE = mm.MixerConfig(num_classes=7, img_size=(48, 64), in_chans=3, patch_size=16, num_blocks=4, embed_dim=32)
LIVE_CASES = [dict(), dict(indices=2), dict(indices=[0, -1], norm=True), dict(indices=[1], stop_early=True),
              dict(indices=[3, 1], output_fmt="NLC"), dict(indices=[2], intermediates_only=True)]


@pytest.mark.timm
def test_features_match_timm(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    from safetensors.torch import save_file
    from support.timm_reference import timm_mixer

    model = timm_mixer(LIVE, seed=4)
    path = tmp_path / "m.safetensors"
    save_file(model.state_dict(), str(path))
    params = mm.load_weights(path, LIVE)
    x = np.random.default_rng(4).standard_normal((3, 3, 48, 64)).astype(np.float32)
    xt = torch.from_numpy(x)
    pairs = []
    with torch.inference_mode():
        ref_feats = model.forward_features(xt)
        feats = mm.forward_features(params, x, LIVE)[0]
        pairs += [("forward_features", feats, ref_feats.numpy()),
                  ("forward_head(pre_logits)", mm.forward_head(params, feats, LIVE, pre_logits=True)[0],
                   model.forward_head(ref_feats, pre_logits=True).numpy()),
                  ("forward_head", mm.forward_head(params, feats, LIVE)[0], model.forward_head(ref_feats).numpy())]
        for kw in LIVE_CASES:
            ref = model.forward_intermediates(xt, **kw)
            ours = mm.forward_intermediates(params, x, LIVE, **kw)[0]
            name = "forward_intermediates(" + ", ".join(f"{k}={v}" for k, v in kw.items()) + ")"
            if not kw.get("intermediates_only"):
                pairs.append((name + " final", ours[0], ref[0].numpy()))
                ref, ours = ref[1], ours[1]
            assert len(ours) == len(ref), name
            pairs += [(f"{name}[{j}]", o, r.numpy()) for j, (o, r) in enumerate(zip(ours, ref))]
    assert_all_close(pairs, 2e-5)

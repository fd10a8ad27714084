"""The whole model: gradient check, configs, init, predict and input checks."""
import math

import numpy as np
import pytest

import minimixer as mm
from minimixer import model
from support.helpers import assert_all_close, assert_grads_close, numerical_gradient

TINY = dict(num_classes=7, img_size=(9, 15), in_chans=2, patch_size=3, num_blocks=2, embed_dim=6)


def nontrivial_params(cfg, seed=0):
    """init_params, then every tensor perturbed (timm's init zeroes the head and biases)."""
    rng = np.random.default_rng(seed)
    params = mm.init_params(cfg, seed=seed, dtype="float64")
    return {k: v + 0.2 * rng.standard_normal(v.shape) for k, v in params.items()}


@pytest.mark.parametrize("gelu", ["erf", "tanh"])
def test_model_gradcheck_all_params_and_input(gelu):
    cfg = mm.MixerConfig(**TINY, gelu=gelu)
    params = nontrivial_params(cfg)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, cfg.in_chans, *cfg.image_hw))
    logits, cache = mm.mixer_forward(params, x, cfg)
    dlogits = rng.standard_normal(logits.shape)
    dx, grads = mm.mixer_backward(dlogits, cache)
    assert set(grads) == set(params) and all(grads[k].shape == params[k].shape for k in params)

    def loss():
        return float(np.sum(model.predict(params, x, cfg) * dlogits))

    pairs = [("dx", dx, numerical_gradient(loss, x))]
    pairs += [(k, grads[k], numerical_gradient(loss, params[k])) for k in params]
    # finite differences carry ~1e-11 of noise, which is all a vanishing gradient shows
    assert_grads_close(pairs, 1e-7, zero_tol=1e-9)


def test_predict_keeps_nothing_and_matches_forward():
    cfg = mm.MixerConfig(**TINY)
    params = nontrivial_params(cfg)
    x = np.random.default_rng(2).standard_normal((3, cfg.in_chans, *cfg.image_hw))
    logits, _ = mm.mixer_forward(params, x, cfg)
    assert_all_close([("model.predict", model.predict(params, x, cfg), logits)], 0.0)


def test_input_is_cast_to_param_dtype():
    cfg = mm.MixerConfig(**TINY)
    params = mm.init_params(cfg, dtype="float32")
    x = np.random.default_rng(3).integers(0, 255, (2, cfg.in_chans, *cfg.image_hw), dtype=np.uint8)
    out = mm.predict(params, x, cfg)
    assert out.dtype == np.float32 and out.shape == (2, cfg.num_classes)


@pytest.mark.parametrize("shape", [(2, 3, 9, 15), (2, 2, 9, 14), (2, 9, 15), (2, 2, 15, 9)])
def test_wrong_input_shape_is_named(shape):
    cfg = mm.MixerConfig(**TINY)
    params = mm.init_params(cfg)
    with pytest.raises(ValueError, match=r"input must have shape \(B, 2, 9, 15\).*got " + re_tuple(shape)):
        mm.predict(params, np.zeros(shape, np.float32), cfg)


def re_tuple(t):
    return r"\(" + r", ".join(map(str, t)) + r"\)"


# --- configs -----------------------------------------------------------------

@pytest.mark.parametrize("name, D, blocks, P, DS, DC", [
    ("mixer_s32_224", 512, 8, 32, 256, 2048), ("mixer_s16_224", 512, 8, 16, 256, 2048),
    ("mixer_b32_224", 768, 12, 32, 384, 3072), ("mixer_b16_224", 768, 12, 16, 384, 3072),
    ("mixer_l32_224", 1024, 24, 32, 512, 4096), ("mixer_l16_224", 1024, 24, 16, 512, 4096),
    ("mixer_h14_224", 1280, 32, 14, 640, 5120),
])
def test_presets_match_paper_table_1(name, D, blocks, P, DS, DC):
    cfg = mm.get_config(name)
    assert (cfg.embed_dim, cfg.num_blocks, cfg.patch_size) == (D, blocks, P)
    assert (cfg.token_hidden, cfg.channel_hidden) == (DS, DC)
    assert cfg.num_patches == (224 // P) ** 2 and cfg.ln_eps == 1e-6 and cfg.gelu == "erf"


def test_param_counts():
    # pinned by google-research/vision_transformer's tests, and equal to timm's
    assert mm.param_count(mm.get_config("mixer_b16_224")) == 59_880_472
    assert mm.param_count(mm.get_config("mixer_l16_224")) == 208_196_168


def test_overrides_and_hidden_sizes_use_int_truncation():
    cfg = mm.get_config("mixer_b16_224", num_classes=10, img_size=(192, 256), mlp_ratio=(0.3, 1.7))
    assert cfg.num_classes == 10 and cfg.num_patches == 12 * 16
    assert (cfg.token_hidden, cfg.channel_hidden) == (int(0.3 * 768), int(1.7 * 768)) == (230, 1305)
    assert mm.get_config("mixer_s32_224", mlp_ratio=2.0).token_hidden == 1024


@pytest.mark.parametrize("overrides, message", [
    (dict(img_size=225), "not divisible by patch_size 16"),
    (dict(img_size=(224, 100)), "224x100 is not divisible"),
    (dict(patch_size=0), "patch_size must be a positive integer"),
    (dict(embed_dim=-8), "embed_dim must be a positive integer"),
    (dict(num_blocks=2.5), "num_blocks must be a positive integer"),
    (dict(img_size=0), "img_size must be a positive"),
    (dict(mlp_ratio=(0.5, -1)), "mlp_ratio must be a finite positive"),
    (dict(embed_dim=1, mlp_ratio=0.5), "empty hidden layer"),
    (dict(ln_eps=0), "ln_eps must be a positive"),
    (dict(gelu="relu"), "gelu must be one of"),
])
def test_impossible_config_says_why(overrides, message):
    with pytest.raises(ValueError, match=message):
        mm.get_config("mixer_b16_224", **overrides)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown model 'mixer_x16_224'"):
        mm.get_config("mixer_x16_224")
    with pytest.raises(ValueError, match=r"unknown MixerConfig field\(s\) \['depth'\]"):
        mm.get_config("mixer_b16_224", depth=3)


# --- init --------------------------------------------------------------------

def test_init_params_follow_timm_init():
    cfg = mm.get_config("mixer_s32_224", num_classes=10)
    p = mm.init_params(cfg, seed=0)
    assert all(v.dtype == np.float32 for v in p.values())
    assert set(p) == set(mm.param_shapes(cfg))
    stem = p["stem.proj.weight"]
    fan_in = 3 * 32 * 32
    assert np.abs(stem).max() <= 2 * math.sqrt(1 / fan_in) / 0.87962566103423978 + 1e-7  # truncated at 2σ
    assert abs(stem.std() / math.sqrt(1 / fan_in) - 1) < 0.02  # LeCun: std √(1/fan_in)
    w = p["blocks.0.mlp_channels.fc1.weight"]  # Xavier uniform: ±√(6/(fan_in+fan_out))
    bound = math.sqrt(6 / (512 + 2048))
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert 0 < np.abs(p["blocks.0.mlp_tokens.fc1.bias"]).max() < 1e-5  # N(0, 1e-6²)
    assert not p["head.weight"].any() and not p["head.bias"].any() and not p["stem.proj.bias"].any()
    assert (p["norm.weight"] == 1).all() and not p["blocks.3.norm2.bias"].any()
    # seeded: same seed, same numbers; another seed, others
    assert np.array_equal(mm.init_params(cfg, seed=0)["blocks.0.norm1.weight"], p["blocks.0.norm1.weight"])
    assert not np.array_equal(mm.init_params(cfg, seed=1)["stem.proj.weight"], stem)


def test_init_params_rejects_bad_dtype_and_backend():
    cfg = mm.MixerConfig(**TINY)
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        mm.init_params(cfg, dtype="int8")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        mm.init_params(cfg, backend="tpu")
    assert mm.init_params(cfg, dtype="float64")["head.weight"].dtype == np.float64

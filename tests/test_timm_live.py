"""Live parity with timm (runs wherever timm is importable; CI installs it).

- full-size mixer_b16_224 and mixer_l16_224 in float32: timm saves deterministic,
  non-trivial weights as safetensors, minimixer loads that file, and the logits
  must agree to max|Δ|/max|logit| ≤ 1e-5 with identical top-5;
- float64 gradients against torch autograd, ≤ 1e-9 relative;
- files minimixer saves load into timm with strict=True;
- presets and init match timm's registry and init.
"""
import numpy as np
import pytest

pytestmark = pytest.mark.timm

timm = pytest.importorskip("timm")
torch = pytest.importorskip("torch")

import minimixer as mm  # noqa: E402
from support.helpers import assert_all_close, assert_grads_close, rel_error  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from support.timm_reference import state_dict_numpy, timm_forward_backward, timm_mixer, timm_registered  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixer_b16_224", "mixer_l16_224"])
def test_full_size_logits_match_timm(tmp_path, name, backend):
    model = timm_registered(name, seed=7)
    path = tmp_path / f"{name}.safetensors"
    save_file(model.state_dict(), str(path))
    x = np.random.default_rng(7).standard_normal((4, 3, 224, 224)).astype(np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    del model

    cfg = mm.get_config(name)
    params = mm.load_weights(path, cfg, backend=backend)
    logits = mm.to_numpy(mm.predict(params, mm.to_backend(x, backend), cfg))
    err = np.abs(logits - ref).max() / np.abs(ref).max()
    print(f"{name} on {backend}: max|Δ|/max|logit| = {err:.3e} (max|logit| {np.abs(ref).max():.2f})")
    assert err <= 1e-5
    top5, ref_top5 = np.argsort(-logits, axis=1)[:, :5], np.argsort(-ref, axis=1)[:, :5]
    assert np.array_equal(top5, ref_top5), f"top-5 differ:\n{top5}\nvs timm\n{ref_top5}"


GRAD_CASES = {
    "tiny-odd-erf": dict(num_classes=7, img_size=(9, 15), in_chans=2, patch_size=3, num_blocks=2, embed_dim=6),
    "tiny-odd-tanh": dict(num_classes=7, img_size=(9, 15), in_chans=2, patch_size=3, num_blocks=2, embed_dim=6,
                          gelu="tanh", ln_eps=1e-5),
    "small-erf": dict(num_classes=11, img_size=(48, 64), in_chans=3, patch_size=16, num_blocks=3, embed_dim=64),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_float64_gradients_match_autograd(tmp_path, case):
    cfg = mm.MixerConfig(**GRAD_CASES[case])
    model = timm_mixer(cfg, seed=3, dtype=torch.float64)
    path = tmp_path / "m.safetensors"
    save_file(model.state_dict(), str(path))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, cfg.in_chans, *cfg.image_hw))
    dlogits = rng.standard_normal((3, cfg.num_classes))
    ref_logits, ref_dx, ref_grads = timm_forward_backward(model, x, dlogits)

    params = mm.load_weights(path, cfg, dtype="float64")
    logits, cache = mm.mixer_forward(params, x, cfg)
    dx, grads = mm.mixer_backward(dlogits, cache)
    assert_all_close([("logits", logits, ref_logits)], 1e-12)
    worst = max(rel_error(grads[k], ref_grads[k]) for k in params if not k.endswith("mlp_tokens.fc2.bias"))
    print(f"{case}: worst float64 gradient rel error {max(worst, rel_error(dx, ref_dx)):.3e}")
    assert_grads_close([("dx", dx, ref_dx)] + [(k, grads[k], ref_grads[k]) for k in params], 1e-9, zero_tol=1e-13)


def test_saved_weights_load_into_timm_strict(tmp_path):
    cfg = mm.MixerConfig(**GRAD_CASES["small-erf"])
    rng = np.random.default_rng(5)
    params = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
              for k, v in mm.init_params(cfg, seed=5).items()}
    path = tmp_path / "ours.safetensors"
    mm.save_weights(params, path)
    model = timm_mixer(cfg)
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(path)), strict=True)  # raises on any mismatch
    x = rng.standard_normal((2, 3, *cfg.image_hw)).astype(np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    assert_all_close([("timm(our weights)", mm.predict(params, x, cfg), ref)], 1e-5)


def test_bf16_and_fp16_files_from_torch(tmp_path):
    cfg = mm.MixerConfig(**GRAD_CASES["small-erf"])
    model = timm_mixer(cfg)
    sd = state_dict_numpy(model)
    for dtype, bits in ((torch.bfloat16, 8), (torch.float16, 11)):
        path = tmp_path / "half.safetensors"
        save_file({k: v.to(dtype) for k, v in model.state_dict().items()}, str(path))
        params = mm.load_weights(path, cfg)
        for k, v in sd.items():
            expected = torch.from_numpy(v).to(dtype).float().numpy()  # torch's own rounding
            assert np.array_equal(params[k], expected), (dtype, k)
            assert rel_error(params[k], v) <= 2.0**-bits


@pytest.mark.parametrize("name", ["mixer_s32_224", "mixer_s16_224", "mixer_b32_224",
                                  "mixer_b16_224", "mixer_l32_224", "mixer_l16_224"])
def test_preset_shapes_match_timm_registry(name):
    model = timm.create_model(name, pretrained=False, device="meta")
    timm_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(timm_shapes.items()) == list(mm.param_shapes(mm.get_config(name)).items())


def test_init_matches_timm_statistics():
    torch.manual_seed(0)
    model = timm.create_model("mixer_s32_224", pretrained=False, num_classes=10)
    theirs = state_dict_numpy(model)
    ours = mm.init_params(mm.get_config("mixer_s32_224", num_classes=10), seed=0)
    lines = []
    for k, t in theirs.items():
        o = ours[k]
        assert o.shape == t.shape
        if t.std() == 0:  # constants: zeros and ones
            assert np.array_equal(o, t), k
        else:
            ratio = o.std() / t.std()
            lines.append(f"{k:40s} std ours/timm {ratio:.4f}")
            assert abs(ratio - 1) < max(0.02, 5 / np.sqrt(t.size)), k  # ~5 standard errors
            assert abs(np.abs(o).max() / np.abs(t).max() - 1) < 0.3, k  # same support
    print("\n".join(lines[:8]))


"""Resizing a Mixer to another image size (checkpoints/resize.py, `weights resize`, `train
--init-from --img-size`): the paper's Appendix C checked by the identity it implies, on
Mixer-S/32's real shapes (random weights, no download), and the resampling alternative by
its documented property. Live (marker timm): timm at the new size loads the file strictly."""
import json
import subprocess
import sys

import numpy as np
import pytest
import safetensors
from hypothesis import given, settings
from hypothesis import strategies as st

import minimixer as mm
from support.helpers import assert_all_close
from minimixer import layers
from minimixer.checkpoints.resize import appendix_c, bilinear_matrix, grid_resampler, resize, resample

S32 = mm.get_config("mixer_s32_224")


def nontrivial(cfg, seed, dtype="float64"):
    """Random weights at init's scale, biases and norms moved off zero and one."""
    rng = np.random.default_rng(seed)
    params = mm.init_params(cfg, seed=seed, dtype="float64")
    out = {}
    for k, v in params.items():
        if k.endswith("bias"):
            v = 0.1 * rng.standard_normal(v.shape)
        elif "norm" in k:
            v = 1.0 + 0.2 * rng.standard_normal(v.shape)
        else:
            v = v + 0.02 * rng.standard_normal(v.shape)
        out[k] = v.astype(dtype)
    return out


def parts_of(x, cfg, factors):
    """The K×K crops the size of cfg's image, row-major, as one batch: (parts·B, C, H, W)."""
    (h, w), (kh, kw) = cfg.image_hw, factors
    return np.concatenate([x[:, :, r * h:(r + 1) * h, c * w:(c + 1) * w] for r in range(kh) for c in range(kw)])


def features_and_blocks(params, x, cfg):
    """logits and every block's output (B, D, gh, gw), from one forward pass."""
    (feats, blocks), _ = mm.forward_intermediates(params, x, cfg)
    return mm.forward_head(params, feats, cfg)[0], blocks


def crops_of_map(y, grid, factors):
    """A (B, D, kh·gh, kw·gw) map cut into its parts, as one batch in parts_of's order."""
    (gh, gw), (kh, kw) = grid, factors
    return np.concatenate([y[:, :, r * gh:(r + 1) * gh, c * gw:(c + 1) * gw] for r in range(kh) for c in range(kw)])


def check_appendix_c(params, cfg, big, big_cfg, x, factors, tol):
    """The resized model's logits are the mean of the old logits on the parts, and every block's
    output on each part is the old block's output on that crop."""
    B, parts = x.shape[0], factors[0] * factors[1]
    logits, blocks = features_and_blocks(big, x, big_cfg)
    part_logits, part_blocks = features_and_blocks(params, parts_of(x, cfg, factors), cfg)
    pairs = [("logits vs mean over parts", logits, part_logits.reshape(parts, B, -1).mean(axis=0))]
    for i, (y, ref) in enumerate(zip(blocks, part_blocks)):
        pairs.append((f"block {i} output per part", crops_of_map(y, cfg.grid_size, factors), ref))
    assert_all_close(pairs, tol)


def test_s32_224_to_448_is_the_mean_over_quadrants():
    params = nontrivial(S32, 0)
    big, big_cfg = resize(params, S32, 448)
    assert (big_cfg.img_size, big_cfg.token_hidden, big_cfg.num_patches) == (448, 4 * 256, 196)
    assert tuple(big_cfg.mlp_ratio) == (2.0, 4.0)
    assert set(big) == set(mm.param_shapes(big_cfg))
    assert all(big[k].shape == s for k, s in mm.param_shapes(big_cfg).items())
    x = np.random.default_rng(1).standard_normal((1, 3, 448, 448))
    check_appendix_c(params, S32, big, big_cfg, x, (2, 2), 1e-12)


def test_the_identity_catches_a_wrong_layout():
    """Two near misses: the notebook-03 construction (copies on contiguous chunks of the sequence)
    breaks the logits; the right fc1/fc2 with fc2's bias tiled contiguously keeps the logits (the
    LayerNorms remove a per-token constant) but not the block outputs."""
    cfg = mm.MixerConfig(num_classes=5, img_size=12, in_chans=2, patch_size=3, num_blocks=2, embed_dim=8)
    params = nontrivial(cfg, 3)
    big, big_cfg = appendix_c(params, cfg, (2, 2))
    x = np.random.default_rng(3).standard_normal((2, 2, 24, 24))
    check_appendix_c(params, cfg, big, big_cfg, x, (2, 2), 1e-12)

    contiguous, wrong_bias = dict(big), dict(big)
    for i in range(cfg.num_blocks):
        W1, W2, b2 = (params[f"blocks.{i}.mlp_tokens.{k}"] for k in ("fc1.weight", "fc2.weight", "fc2.bias"))
        contiguous.update({f"blocks.{i}.mlp_tokens.fc1.weight": np.kron(np.eye(4), W1),
                           f"blocks.{i}.mlp_tokens.fc2.weight": np.kron(np.eye(4), W2),
                           f"blocks.{i}.mlp_tokens.fc2.bias": np.tile(b2, 4)})
        wrong_bias[f"blocks.{i}.mlp_tokens.fc2.bias"] = np.tile(b2, 4)
    for wrong, what in ((contiguous, "logits"), (wrong_bias, "block 0 output")):
        with pytest.raises(AssertionError, match=what):
            check_appendix_c(params, cfg, wrong, big_cfg, x, (2, 2), 1e-6)
    crops = parts_of(x, cfg, (2, 2))
    mean_logits = mm.mixer_forward(params, crops, cfg)[0].reshape(4, 2, -1).mean(axis=0)
    assert np.abs(mm.mixer_forward(wrong_bias, x, big_cfg)[0] - mean_logits).max() < 1e-12  # invisible here


def test_unequal_whole_factors_and_a_non_square_grid():
    cfg = mm.MixerConfig(num_classes=3, img_size=(6, 9), in_chans=1, patch_size=3, num_blocks=2, embed_dim=4)
    params = nontrivial(cfg, 5)
    big, big_cfg = resize(params, cfg, (12, 27))  # grid 2x3 -> 4x9: parts 2x3
    assert big_cfg.image_hw == (12, 27) and big_cfg.token_hidden == 6 * cfg.token_hidden
    x = np.random.default_rng(5).standard_normal((2, 1, 12, 27))
    check_appendix_c(params, cfg, big, big_cfg, x, (2, 3), 1e-12)


def token_mlp(params, i, table):
    """Block i's token MLP on a (B, D, N) table (the transposed token-mixing input)."""
    p = [params[f"blocks.{i}.mlp_tokens.{k}"] for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]
    return layers.mlp_forward(table, *p)[0]


@pytest.mark.parametrize("old, new", [((4, 4), (7, 6)), ((7, 7), (14, 14)), ((6, 5), (4, 3))])
def test_resample_is_the_token_mlp_seen_through_the_resampling(old, new):
    """resample's documented property: mlp'(x') = U·mlp(U⁺·x'); growing, mlp'(U·x) = U·mlp(x)."""
    cfg = mm.MixerConfig(num_classes=3, img_size=(3 * old[0], 3 * old[1]), in_chans=1, patch_size=3,
                         num_blocks=2, embed_dim=8)
    params = nontrivial(cfg, 7)
    small, small_cfg = resample(params, cfg, new)
    assert small_cfg.grid_size == new and small_cfg.token_hidden == cfg.token_hidden
    U, U_pinv = grid_resampler(old, new)
    rng = np.random.default_rng(7)
    pairs = []
    for i in range(cfg.num_blocks):
        x_new = rng.standard_normal((2, 8, new[0] * new[1]))
        pairs.append((f"block {i}: mlp'(x') vs U mlp(U+ x')", token_mlp(small, i, x_new),
                      token_mlp(params, i, x_new @ U_pinv.T) @ U.T))
        if new[0] * new[1] >= old[0] * old[1]:
            x = rng.standard_normal((2, 8, old[0] * old[1]))
            pairs.append((f"block {i}: mlp'(U x) vs U mlp(x)", token_mlp(small, i, x @ U.T),
                          token_mlp(params, i, x) @ U.T))
    assert_all_close(pairs, 1e-12)


def test_resample_identity_and_method_choice():
    cfg = mm.MixerConfig(num_classes=3, img_size=12, in_chans=1, patch_size=3, num_blocks=1, embed_dim=4)
    params = nontrivial(cfg, 2)
    same, _ = resample(params, cfg, cfg.grid_size)  # U = I: nothing moves
    assert_all_close([(k, same[k], params[k]) for k in params], 1e-13)
    assert resize(params, cfg, 24)[1].token_hidden == 4 * cfg.token_hidden  # whole factor: appendix_c
    assert resize(params, cfg, 21)[1].token_hidden == cfg.token_hidden  # 4x4 -> 7x7: resample
    with pytest.raises(ValueError, match="whole factors"):
        resize(params, cfg, 21, "appendix_c")
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        resize(params, cfg, 22)


@settings(max_examples=40, deadline=None, database=None)
@given(gh=st.integers(1, 4), gw=st.integers(1, 4), kh=st.integers(1, 3), kw=st.integers(1, 3),
       nh=st.integers(1, 6), nw=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_token_mlps_for_any_grid(gh, gw, kh, kw, nh, nw, seed):
    """Any grid and whole factors: each part of the Appendix C token MLP's output is the old MLP
    on that part's tokens. Any new grid: resample's property holds."""
    cfg = mm.MixerConfig(num_classes=2, img_size=(gh, gw), in_chans=1, patch_size=1, num_blocks=1, embed_dim=3)
    params = nontrivial(cfg, seed)
    rng = np.random.default_rng(seed)
    big, _ = appendix_c(params, cfg, (kh, kw))
    grid = rng.standard_normal((2, 3, kh * gh, kw * gw))  # (B, D, new grid)
    out = token_mlp(big, 0, grid.reshape(2, 3, -1)).reshape(grid.shape)
    pairs = []
    for r in range(kh):
        for c in range(kw):
            crop = grid[:, :, r * gh:(r + 1) * gh, c * gw:(c + 1) * gw]
            pairs.append((f"part {r},{c}", out[:, :, r * gh:(r + 1) * gh, c * gw:(c + 1) * gw],
                          token_mlp(params, 0, crop.reshape(2, 3, -1)).reshape(crop.shape)))
    small, _ = resample(params, cfg, (nh, nw))
    U, U_pinv = grid_resampler((gh, gw), (nh, nw))
    x_new = rng.standard_normal((2, 3, nh * nw))
    pairs.append(("resample", token_mlp(small, 0, x_new), token_mlp(params, 0, x_new @ U_pinv.T) @ U.T))
    assert_all_close(pairs, 1e-10)


@pytest.mark.timm
def test_bilinear_matrix_is_torch_interpolate():
    torch = pytest.importorskip("torch")
    for n_out, n_in in ((14, 7), (10, 4), (3, 7), (5, 5)):
        m = np.random.default_rng(0).standard_normal((2, n_in))
        ref = torch.nn.functional.interpolate(torch.from_numpy(m)[None], size=n_out, mode="linear",
                                              align_corners=False)[0].numpy()
        assert_all_close([(f"{n_in}->{n_out}", m @ bilinear_matrix(n_out, n_in).T, ref)], 1e-14)


# --- the command and train --init-from ------------------------------------------------------

SMALL = mm.MixerConfig(num_classes=4, img_size=64, in_chans=3, patch_size=32, num_blocks=2, embed_dim=16)


def weights_cli(*args):
    return subprocess.run([sys.executable, "-m", "minimixer.weights", *args], capture_output=True, text=True,
                          timeout=120)


def test_weights_resize_command_writes_a_file_load_checkpoint_reads(tmp_path):
    params = nontrivial(SMALL, 4, "float32")
    src, out = tmp_path / "small.safetensors", tmp_path / "big.safetensors"
    mm.save_weights(params, src)
    r = weights_cli("resize", str(src), "--img-size", "128", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "by appendix_c from 64x64" in r.stdout and "token hidden 32" in r.stdout
    loaded, cfg = mm.load_checkpoint(out)
    assert (cfg.img_size, cfg.token_hidden, tuple(cfg.mlp_ratio)) == (128, 32, (2.0, 4.0))
    ref, _ = resize(params, SMALL, 128)
    assert all(np.array_equal(loaded[k], ref[k]) for k in ref)
    with safetensors.safe_open(str(out), framework="np") as f:
        meta = f.metadata()
    assert json.loads(meta["img_size"]) == 128 and meta["resized"].startswith("appendix_c from")

    r = weights_cli("resize", str(src), "--img-size", "96", "--out", str(tmp_path / "r.safetensors"))
    assert r.returncode == 0 and "by resample" in r.stdout, r.stderr
    assert mm.load_checkpoint(tmp_path / "r.safetensors")[1].token_hidden == SMALL.token_hidden


@pytest.mark.parametrize("args, message", [
    (["--img-size", "100"], "not divisible by patch_size 32"),
    (["--img-size", "96", "--method", "appendix_c"], "whole factors"),
    (["--img-size", "64"], "already made for 64 px"),
    (["--img-size", "128", "--model", "mixer_b16_224"], "not mixer_b16_224"),
])
def test_weights_resize_errors_are_one_line(tmp_path, args, message):
    src = tmp_path / "small.safetensors"
    mm.save_weights(mm.init_params(SMALL), src)
    r = weights_cli("resize", str(src), "--out", str(tmp_path / "o.safetensors"), *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_train_init_from_resizes_to_img_size(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in range(2):
            (tmp_path / "data" / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (70, 70, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / f"c{c}" / f"{i}.png")
    cfg = SMALL.replace(num_classes=2)
    src = tmp_path / "small.safetensors"
    mm.save_weights(nontrivial(cfg, 1, "float32"), src)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "minimixer.train", "--model", "mixer_s32_224", "--img-size", "128",
                        "--embed-dim", "16", "--num-blocks", "2", "--data", str(tmp_path / "data"),
                        "--init-from", str(src), "--epochs", "1", "--batch-size", "4", "--workers", "1",
                        "--lr", "0", "--weight-decay", "0", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"resized {src} from 64x64 to 128x128 px by appendix_c (token hidden 8 -> 32" in r.stdout
    tuned, tuned_cfg = mm.load_checkpoint(out / "model.safetensors")
    assert (tuned_cfg.img_size, tuned_cfg.token_hidden) == (128, 32)
    ref, _ = resize(mm.load_weights(src, cfg), cfg, 128)
    assert_all_close([(k, tuned[k], ref[k]) for k in ref if "token" in k], 1e-7)  # lr 0: the init itself


# --- live: timm at the new size ---------------------------------------------------------------

@pytest.mark.timm
def test_timm_at_448_loads_the_resized_s32_strictly(tmp_path):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file
    from support.timm_reference import timm_registered

    model = timm_registered("mixer_s32_224", seed=2)
    src, out = tmp_path / "s32.safetensors", tmp_path / "s32_448.safetensors"
    save_file(model.state_dict(), str(src))
    r = weights_cli("resize", str(src), "--img-size", "448", "--model", "mixer_s32_224", "--out", str(out))
    assert r.returncode == 0, r.stderr
    big = timm.create_model("mixer_s32_224", pretrained=False, img_size=448, mlp_ratio=(2.0, 4.0)).eval()
    from safetensors.torch import load_file
    big.load_state_dict(load_file(str(out)), strict=True)
    params, cfg = mm.load_checkpoint(out)
    x = np.random.default_rng(2).standard_normal((2, 3, 448, 448)).astype(np.float32)
    with torch.inference_mode():
        ref = big(torch.from_numpy(x)).numpy()
        quadrants = model(torch.from_numpy(parts_of(x, S32, (2, 2)))).numpy().reshape(4, 2, -1).mean(axis=0)
    assert_all_close([("minimixer at 448 vs timm at 448", mm.predict(params, x, cfg), ref),
                      ("timm at 448 vs timm at 224 on the quadrants", ref, quadrants)], 2e-5)

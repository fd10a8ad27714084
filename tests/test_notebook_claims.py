"""The claims the notebooks make, checked directly and fast (without running the notebooks)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import minimixer as mm
from minimixer import layers
from minimixer.data import ArrayLoader, digits_split
from minimixer.training.metrics import evaluate
from minimixer.training.settings import TrainSettings

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


def _fig5():
    spec = importlib.util.spec_from_file_location("fig5_digits", NOTEBOOKS / "fig5_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fig5 = _fig5()


def _mixing_setup():
    """Notebook 3's block: S/32 geometry (N = 49) with D = 32, perturbed, float64."""
    cfg = mm.get_config("mixer_s32_224", embed_dim=32, num_blocks=1)
    rng = np.random.default_rng(0)
    p = {k: v + 0.1 * rng.standard_normal(v.shape)
         for k, v in mm.model.block_params(mm.init_params(cfg, seed=0, dtype="float64"), 0).items()}
    x = rng.standard_normal((1, cfg.num_patches, cfg.embed_dim))
    return cfg, p, x, rng


def test_who_influences_whom_shows_a_real_effect():
    # notebook 3: a random change to one token moves every token through token mixing, exactly one
    # through channel mixing; a constant change is removed by the LayerNorm (rounding only)
    cfg, p, x, rng = _mixing_setup()
    tok_fn = lambda v: layers.token_mixing_forward(v, *(p[k] for k in layers.TOKEN_MIXING_KEYS))[0]  # noqa: E731
    chan_fn = lambda v: layers.channel_mixing_forward(v, *(p[k] for k in layers.CHANNEL_MIXING_KEYS))[0]  # noqa: E731

    def influence(fn, delta, token=20):
        bumped = x.copy()
        bumped[0, token] += delta
        return np.abs(fn(bumped) - fn(x))[0].max(axis=1)  # (N,) per output token

    delta = rng.standard_normal(cfg.embed_dim)
    tok, chan = influence(tok_fn, delta), influence(chan_fn, delta)
    constant = influence(tok_fn, 1.0)
    print(f"token mixing max {tok.max():.3f} ({(tok > 1e-9).sum()} tokens), channel mixing max {chan.max():.3f} "
          f"({(chan > 1e-9).sum()} token), constant bump {constant.max():.1e}")
    assert tok.max() > 1e-3 and chan.max() > 1e-3
    assert (chan > 1e-9).sum() == 1 and chan.argmax() == 20
    assert (tok > 1e-9).sum() == cfg.num_patches
    assert constant.max() < 1e-12


def test_token_mlp_jacobian_is_block_diagonal_with_identical_blocks():
    # notebook 3: fc1 over tokens = a depthwise conv with a full receptive field and shared weights
    cfg, p, _, rng = _mixing_setup()
    N, D, DS = cfg.num_patches, cfg.embed_dim, cfg.token_hidden
    W1 = p["mlp_tokens.fc1.weight"]
    J = np.einsum("kn,de->dken", W1, np.eye(D)).reshape(D * DS, D * N)  # via the layer below
    y = rng.standard_normal((1, N, D))
    out = layers.linear_forward(y.transpose(0, 2, 1), W1, np.zeros(DS))[0]  # (1, D, DS)
    assert np.allclose(out.reshape(-1), J @ y[0].T.reshape(-1), rtol=0, atol=1e-13)
    assert np.array_equal(J, np.kron(np.eye(D), W1))


def test_permutation_of_tokens_and_token_weights_leaves_logits_unchanged():
    # notebook 3: no position embeddings needed; the token MLP is order-sensitive
    cfg = mm.get_config("mixer_s32_224", embed_dim=32, num_blocks=2, num_classes=10)
    rng = np.random.default_rng(3)
    net = {k: v + 0.05 * rng.standard_normal(v.shape) for k, v in mm.init_params(cfg, seed=1, dtype="float64").items()}
    img = rng.standard_normal((2, 3, 224, 224))
    perm = rng.permutation(cfg.num_patches)
    shuffled_img = layers.unpatchify(layers.patchify(img, 32)[:, perm], img.shape, 32)
    moved = dict(net)
    for i in range(cfg.num_blocks):
        moved[f"blocks.{i}.mlp_tokens.fc1.weight"] = net[f"blocks.{i}.mlp_tokens.fc1.weight"][:, perm]
        moved[f"blocks.{i}.mlp_tokens.fc2.weight"] = net[f"blocks.{i}.mlp_tokens.fc2.weight"][perm]
        moved[f"blocks.{i}.mlp_tokens.fc2.bias"] = net[f"blocks.{i}.mlp_tokens.fc2.bias"][perm]
    base = mm.mixer_forward(net, img, cfg)[0]
    both = mm.mixer_forward(moved, shuffled_img, cfg)[0]
    only_image = mm.mixer_forward(net, shuffled_img, cfg)[0]
    print(f"both permuted {np.abs(both - base).max():.1e}, image only {np.abs(only_image - base).max():.1e}")
    assert np.abs(both - base).max() < 1e-12
    assert np.abs(only_image - base).max() > 1e-3


def test_fig5_measures():
    col = np.arange(8)
    cosine = np.tile(np.cos(2 * np.pi * col / 8), (8, 1)).ravel()
    checker = ((-1.0) ** (col[:, None] + col[None, :])).ravel()
    assert np.allclose(fig5.spectral_centroid(np.stack([cosine, checker])), [1.0, 4 * np.sqrt(2)])
    smooth = np.stack([np.add.outer(col, col).ravel() * 1.0, np.outer(col, col).ravel() * 1.0])
    assert fig5.neighbour_correlation(smooth) > 0.5
    assert abs(fig5.neighbour_correlation(np.random.default_rng(0).standard_normal((64, 64)))) < 0.05
    W = np.stack([cosine, -cosine, checker, -checker + 0.01 * col.repeat(8)])
    pairs = fig5.paired_order(W)
    assert [{u, v} for u, v, _ in pairs] == [{0, 1}, {2, 3}] and all(c < -0.99 for *_, c in pairs)  # low frequency first


def test_fig5_shipped_model_learned_structure():
    # notebook 5's "done when": block 0's token weights moved far from their initialization and are
    # measurably smoother than it; both files are small
    for path in fig5.PATHS.values():
        assert Path(path).stat().st_size < 1_000_000
    params, meta = fig5.load("natural")
    for b in range(fig5.CFG.num_blocks):
        W, W0 = params[f"blocks.{b}.mlp_tokens.fc1.weight"], fig5.init_weights(b)
        corr, nb, nb0 = fig5.correlation(W, W0), fig5.neighbour_correlation(W), fig5.neighbour_correlation(W0)
        print(f"block {b}: corr with init {corr:.3f}, neighbour correlation {nb:.3f} (init {nb0:.3f})")
        if b == 0:
            assert corr < 0.5
            assert nb > nb0 + 0.2
    _, _, x_test, y_test = digits_split()
    acc = evaluate(params, fig5.CFG, ArrayLoader(x_test, y_test, 512))["top1"]
    assert acc == pytest.approx(meta["test_top1"], abs=0.01) and acc > 90


def test_fig5_permuted_control():
    # the paper's control: same accuracy on shuffled pixels; un-shuffled weights show the structure
    natural, meta = fig5.load("natural")
    permuted, pmeta = fig5.load("permuted")
    perm = np.array(pmeta["permutation"])
    assert np.array_equal(perm, fig5.pixel_permutation())
    _, _, x_test, y_test = digits_split()
    acc_p = evaluate(permuted, fig5.CFG, ArrayLoader(fig5.permute_pixels(x_test, perm), y_test, 512))["top1"]
    Wp = permuted["blocks.0.mlp_tokens.fc1.weight"]
    raw, unshuffled = fig5.neighbour_correlation(Wp), fig5.neighbour_correlation(Wp[:, np.argsort(perm)])
    print(f"accuracy natural {meta['test_top1']} permuted {acc_p:.2f}; neighbour corr raw {raw:.3f} unshuffled {unshuffled:.3f}")
    assert abs(acc_p - meta["test_top1"]) < 3
    assert unshuffled > raw + 0.2 and abs(raw) < 0.15


def test_fig5_training_is_deterministic():
    short = TrainSettings(epochs=1, batch_size=256, lr=1e-2, weight_decay=0.2, warmup=0.0, clip_grad=1.0, seed=0)
    a, acc_a = fig5.train(False, short, log=lambda s: None)
    b, acc_b = fig5.train(False, short, log=lambda s: None)
    assert acc_a == acc_b and all(np.array_equal(a[k], b[k]) for k in a)


def test_shift_augmentation_moves_digits():
    rng = np.random.default_rng(0)
    img = np.full((1, 1, 8, 8), -1.0, np.float32)
    img[0, 0, 3, 4] = 1.0
    shifted = [np.argwhere(fig5.random_shift(img, rng)[0, 0] == 1.0)[0] for _ in range(200)]
    offsets = np.array(shifted) - [3, 4]
    assert offsets.min() == -2 and offsets.max() == 2 and np.abs(offsets).sum() > 0

"""Live checks against the original JAX/Flax MLP-Mixer (google-research/vision_transformer).

Run with `pytest -m jax` once jax, flax and einops are installed (pip install -e '.[test,jax]').
The model below is vit_jax/models_mixer.py's architecture written out here (its package is
not on PyPI): Flax's nn.gelu (the tanh form), nn.LayerNorm (eps 1e-6), a stem nn.Conv
with HWIO kernels, Dense kernels (in, out). Random non-zero parameters are saved as the
released .npz files are (the tree flattened with '/'); minimixer must give the same logits.
"""
import numpy as np
import pytest

pytestmark = pytest.mark.jax
jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
from flax import traverse_util  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import minimixer as mm  # noqa: E402
from minimixer.checkpoints.convert import config_for_file, load_checkpoint  # noqa: E402
from minimixer.commands.weights import main as weights_main  # noqa: E402
from support.helpers import rel_error  # noqa: E402


class MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        hidden = nn.gelu(nn.Dense(self.mlp_dim)(x))  # flax.linen.gelu: approximate=True
        return nn.Dense(x.shape[-1])(hidden)


class MixerBlock(nn.Module):
    tokens_mlp_dim: int
    channels_mlp_dim: int

    @nn.compact
    def __call__(self, x):  # x (B, N, D)
        y = jnp.swapaxes(nn.LayerNorm()(x), 1, 2)  # (B, D, N)
        x = x + jnp.swapaxes(MlpBlock(self.tokens_mlp_dim, name="token_mixing")(y), 1, 2)
        return x + MlpBlock(self.channels_mlp_dim, name="channel_mixing")(nn.LayerNorm()(x))


class MlpMixer(nn.Module):
    patch: int
    num_classes: int
    num_blocks: int
    hidden_dim: int
    tokens_mlp_dim: int
    channels_mlp_dim: int

    @nn.compact
    def __call__(self, x):  # x (B, H, W, C)
        x = nn.Conv(self.hidden_dim, (self.patch, self.patch), strides=(self.patch, self.patch), name="stem")(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, H/P·W/P, D), row-major patches
        for _ in range(self.num_blocks):
            x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim)(x)
        x = nn.LayerNorm(name="pre_head_layer_norm")(x)
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(jnp.mean(x, axis=1))


def random_flax_mixer(seed, num_blocks=12, hidden=768, classes=1000, patch=16, size=224):
    """The model and its parameters as a flat {'a/b/c': array} tree, every entry random and
    non-zero (the head's kernel is zero-initialized, the LayerNorms unit, the biases zero)."""
    model = MlpMixer(patch, classes, num_blocks, hidden, hidden // 2, hidden * 4)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3)))["params"]
    rng = np.random.default_rng(seed)
    flat = {}
    for key, value in traverse_util.flatten_dict(params, sep="/").items():
        v = np.asarray(value, np.float32)
        if key.endswith("scale"):
            v = rng.normal(1.0, 0.2, v.shape)
        elif key.endswith("bias"):
            v = rng.normal(0.0, 0.1, v.shape)
        elif key == "head/kernel":
            v = rng.normal(0.0, 0.05, v.shape)
        flat[key] = v.astype(np.float32)
    return model, flat


def flax_logits(model, flat, x_nchw):
    tree = traverse_util.unflatten_dict(flat, sep="/")
    return np.asarray(model.apply({"params": tree}, jnp.asarray(x_nchw.transpose(0, 2, 3, 1))))


@pytest.mark.parametrize("blocks", [12, 3], ids=["b16_full", "b16_widths_3_blocks"])
def test_logits_equal_flax(tmp_path, blocks):
    model, flat = random_flax_mixer(seed=blocks, num_blocks=blocks)
    path = tmp_path / "Mixer-B_16.npz"
    np.savez(path, **flat)
    x = np.random.default_rng(1).uniform(-1, 1, (3, 3, 224, 224)).astype(np.float32)
    ref = flax_logits(model, flat, x)

    params, cfg = load_checkpoint(path)
    assert (cfg.num_blocks, cfg.embed_dim, cfg.ln_eps, cfg.gelu) == (blocks, 768, 1e-6, "tanh")
    got = mm.to_numpy(mm.predict(params, x, cfg))
    converted = tmp_path / "converted.safetensors"
    assert weights_main(["convert", str(path), "--out", str(converted)]) == 0
    cfg2 = config_for_file(str(converted), mm.get_config("mixer_b16_224", num_blocks=blocks))  # what --weights does
    assert (cfg2.ln_eps, cfg2.gelu) == (1e-6, "tanh")
    got2 = mm.to_numpy(mm.predict(mm.load_weights(converted, cfg2), x, cfg2))
    erf = mm.to_numpy(mm.predict(params, x, cfg.replace(gelu="erf")))

    err, err2, err_erf = rel_error(got, ref), rel_error(got2, ref), rel_error(erf, ref)
    print(f"blocks {blocks}: logits rel {err:.2e} (converted {err2:.2e}); with the exact GELU {err_erf:.2e}; "
          f"|logits| max {np.abs(ref).max():.2f}")
    assert err <= 2e-6 and err2 <= 2e-6
    assert err_erf > 2e-6  # the test can tell Flax's tanh GELU from timm's exact one
    for a, b in zip(np.argsort(-got, axis=1)[:, :5], np.argsort(-ref, axis=1)[:, :5]):
        assert list(a) == list(b)


def test_wrong_variant_is_one_line(tmp_path):
    _, flat = random_flax_mixer(seed=0, num_blocks=2, hidden=64, classes=10, patch=16)
    path = tmp_path / "Mixer-tiny.npz"
    np.savez(path, **flat)
    with pytest.raises(ValueError) as e:
        mm.load_weights(path, mm.get_config("mixer_b16_224"))
    msg = str(e.value)
    print(msg)
    assert "\n" not in msg and str(path) in msg and "2 blocks, width 64" in msg and "mixer_b16_224" in msg

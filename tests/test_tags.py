"""Every pretrained tag is reachable and labelled: the .mmpretrain and .jax_* tags download from
their original files (no "no pretrained weights are published"), the ImageNet-21k tags print
ImageNet-21k class names, the old jax_in21k_ft_in1k names still resolve."""
import os

import pytest

from minimixer.checkpoints import registry
from minimixer.checkpoints.download import DownloadError
from minimixer.commands import cli
from minimixer.commands import weights as mweights

ASSET = os.path.join(os.path.dirname(registry.BUNDLED_DIGITS), "imagenet21k_classes.tsv.gz")


def test_imagenet21k_names_are_shipped_in_class_order():
    classes = registry.imagenet21k_classes()
    wnids = [w for w, _ in classes]
    assert len(classes) == 21843 and len(set(wnids)) == 21843
    assert wnids == sorted(wnids)  # Google's order is the sorted wnids, as in timm's synset file
    assert classes[0] == ("n00004475", "organism, being") and classes[-1][0] == "n15102894"
    # every ImageNet-1k class is one of them, with the same lemmas except 2 (see imagenet_info.py)
    names = dict(classes)
    one_k = registry.imagenet_classes()
    assert sum(names.get(w) == n for w, n in one_k) >= 998
    assert os.path.getsize(ASSET) < 1_000_000  # package data: well under the 5 MB limit


@pytest.mark.parametrize("tag", ["mixer_b16_224.goog_in21k", "mixer_l16_224.goog_in21k",
                                 "mixer_b16_224.jax_in21k", "mixer_l16_224.jax_in21k"])
def test_in21k_tags_print_imagenet21k_names(tag):
    names = registry.class_names(tag, 21843)
    assert len(names) == 21843 and names[1] == "benthos"
    assert names == [n for _, n in registry.imagenet21k_classes()] and "class 1" not in names


def test_other_heads_keep_their_names():
    assert registry.class_names("mixer_b16_224.jax_in1k", 1000)[1].startswith("goldfish")
    assert registry.class_names("mixer_b32_224.jax_sam_in1k", 1000)[1].startswith("goldfish")
    assert registry.class_names("mixer_s16_224", 7) == [f"class {i}" for i in range(7)]


def test_old_jax_names_resolve_to_the_files_that_exist():
    for v in ("b16", "l16"):
        old, new = f"mixer_{v}_224.jax_in21k_ft_in1k", f"mixer_{v}_224.jax_in1k"
        assert registry.resolve(old)[2] is registry.CHECKPOINTS[new]
        assert registry.CHECKPOINTS[new].url.endswith(f"/imagenet1k/Mixer-{v[0].upper()}_16.npz")
        assert registry.local_name(old) == f"{new}.safetensors"


@pytest.mark.parametrize("tag", [t for t in registry.CHECKPOINTS if t != "mixer_digits"])
def test_weights_auto_downloads_every_tag(tag, monkeypatch, tmp_path):
    """--weights auto asks the tag's source for every tag (the fetch itself is tests/test_downloads.py)."""
    asked = []

    def fetch(url, path, *, kind, sha256_prefix=None, timeout=None):
        asked.append((url, kind, sha256_prefix))
        raise DownloadError("offline here")

    monkeypatch.setattr(registry, "fetch", fetch)
    monkeypatch.setenv("MINIMIXER_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./weights/ file
    with pytest.raises(registry.WeightsNotFound) as e:
        registry.find_weights(tag, "auto")
    msg = str(e.value)
    assert "no pretrained weights" not in msg and "offline here" in msg and "--weights PATH" in msg
    ck = registry.CHECKPOINTS[tag]
    url, kind, prefix = asked[0]
    assert url == (ck.url or f"https://huggingface.co/{ck.repo_id}/resolve/main/model.safetensors")
    if ck.source == "mmpretrain":
        assert kind == "pth" and len(prefix) == 8 and url.endswith(f"-{prefix}.pth")
    elif ck.source == "jax":
        assert kind == "npz" and url.startswith("https://storage.googleapis.com/mixer_models/")


def test_download_of_the_digits_tag_is_the_bundled_file(capsys):
    assert cli.run(mweights.main, ["download", "mixer_digits"]) == 0
    assert capsys.readouterr().out.strip() == registry.BUNDLED_DIGITS


@pytest.mark.timm
def test_imagenet21k_names_match_timm():
    from timm.data import ImageNetInfo
    info = ImageNetInfo("imagenet21k")
    ours = registry.imagenet21k_classes()
    assert [w for w, _ in ours] == list(info.label_names())
    assert [n for _, n in ours] == [info.index_to_description(i) for i in range(21843)]


# --- end to end: a Google tag through predict --weights auto, from a loopback server -----------

from test_downloads import server  # noqa: E402,F401,F811 - the loopback server fixture

FLAX = {"norm1.weight": "LayerNorm_0/scale", "norm1.bias": "LayerNorm_0/bias",
        "norm2.weight": "LayerNorm_1/scale", "norm2.bias": "LayerNorm_1/bias",
        "mlp_tokens.fc1.weight": "token_mixing/Dense_0/kernel", "mlp_tokens.fc1.bias": "token_mixing/Dense_0/bias",
        "mlp_tokens.fc2.weight": "token_mixing/Dense_1/kernel", "mlp_tokens.fc2.bias": "token_mixing/Dense_1/bias",
        "mlp_channels.fc1.weight": "channel_mixing/Dense_0/kernel",
        "mlp_channels.fc1.bias": "channel_mixing/Dense_0/bias",
        "mlp_channels.fc2.weight": "channel_mixing/Dense_1/kernel",
        "mlp_channels.fc2.bias": "channel_mixing/Dense_1/bias"}
FLAX_TOP = {"stem.proj.weight": "stem/kernel", "stem.proj.bias": "stem/bias",
            "norm.weight": "pre_head_layer_norm/scale", "norm.bias": "pre_head_layer_norm/bias",
            "head.weight": "head/kernel", "head.bias": "head/bias"}


def google_npz(params):
    """params (timm's names and layouts) as Google's .npz: Flax names, HWIO and (in, out) kernels."""
    import io

    import numpy as np
    out = {}
    for name, a in params.items():
        if name in FLAX_TOP:
            key = FLAX_TOP[name]
        else:
            _, i, rest = name.split(".", 2)
            key = f"MixerBlock_{i}/{FLAX[rest]}"
        out[key] = a.transpose(2, 3, 1, 0) if key == "stem/kernel" else (a.T if key.endswith("/kernel") else a)
    buf = io.BytesIO()
    np.savez(buf, **out)
    return buf.getvalue()


def test_a_jax_tag_predicts_through_weights_auto(server, tmp_path, monkeypatch, capsys):
    import dataclasses
    import json

    import numpy as np

    import minimixer as mm
    from minimixer.commands import predict as mpredict
    tag = "mixer_s32_224.jax_gsam_in1k"
    cfg, _, ck = registry.resolve(tag)
    rng = np.random.default_rng(0)
    ones = ("norm.weight", "norm1.weight", "norm2.weight")  # LayerNorm scales near 1, the rest near 0
    params = {k: (rng.standard_normal(v.shape) * 0.02 + k.endswith(ones)).astype(np.float32)
              for k, v in mm.init_params(cfg).items()}
    server.scenario, server.body = "body", google_npz(params)
    url = f"{server.url}/gsam/Mixer-S_32.npz"
    monkeypatch.setitem(registry.CHECKPOINTS, tag, dataclasses.replace(ck, url=url))
    monkeypatch.setenv("MINIMIXER_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    img = os.path.join(os.path.dirname(__file__), "images", "china.jpg")
    assert cli.run(mpredict.main, [img, "--model", tag, "--json"]) == 0, capsys.readouterr().err
    top = json.loads(capsys.readouterr().out)[0]["topk"]
    names = registry.class_names(tag, 1000)
    assert all(t["label"] == names[t["index"]] for t in top)  # ImageNet-1k names
    # the cached file holds the weights that were served, in timm's layout after loading
    loaded = mm.load_weights(tmp_path / "cache" / f"{tag}.npz", cfg)
    assert all(np.array_equal(loaded[k], params[k]) for k in params)
    assert sorted(os.listdir(tmp_path / "cache")) == [f"{tag}.npz", f"{tag}.npz.sha256"]

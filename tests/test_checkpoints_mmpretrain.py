"""Live checks against MMPretrain 1.2.0 itself: its model's logits and its test pipeline's pixels.

Run with `pytest -m mmpretrain` once MMPretrain is installed (see .ci/run for the install).
MMPretrain's own ImageClassifier (MlpMixer backbone, GlobalAveragePooling neck,
LinearClsHead) gets random, non-trivial weights and is saved the way MMPretrain saves it;
minimixer reads that .pth (without torch) and must give the same logits.
"""
import os
import warnings

import numpy as np
import pytest

pytestmark = pytest.mark.mmpretrain
torch = pytest.importorskip("torch")
pytest.importorskip("mmpretrain")
cv2 = pytest.importorskip("cv2")
warnings.filterwarnings("ignore", module="mmcv")  # mmcv-lite warns that it lacks its CUDA ops

from mmengine.dataset import Compose  # noqa: E402
from mmpretrain.registry import MODELS, TRANSFORMS  # noqa: E402
from mmpretrain.utils import register_all_modules  # noqa: E402
from PIL import Image  # noqa: E402

import minimixer as mm  # noqa: E402
from minimixer.checkpoints import convert as convert_mod  # noqa: E402
from minimixer.checkpoints.mmpretrain import timm_name  # noqa: E402
from minimixer.checkpoints.registry import data_config  # noqa: E402
from minimixer.data import eval_transform  # noqa: E402
from support.helpers import rel_error  # noqa: E402

register_all_modules()
IMAGES = os.path.join(os.path.dirname(__file__), "images")


def mmpretrain_classifier(arch, seed, num_classes=1000):
    """MMPretrain's Mixer, as configs/_base_/models/mlp_mixer_base_patch16.py builds it, with
    every weight random: timm-style zero heads and unit LayerNorms would hide mapping bugs."""
    from mmpretrain.models.backbones.mlp_mixer import MlpMixer
    torch.manual_seed(seed)
    width = (arch if isinstance(arch, dict) else MlpMixer.arch_zoo[arch])["embed_dims"]
    model = MODELS.build(dict(
        type="ImageClassifier",
        backbone=dict(type="MlpMixer", arch=arch, img_size=224, patch_size=16),
        neck=dict(type="GlobalAveragePooling", dim=1),
        head=dict(type="LinearClsHead", num_classes=num_classes, in_channels=width)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif p.ndim == 1:  # LayerNorm weights
                p.normal_(1, 0.2)
        model.head.fc.weight.normal_(0, 0.05)
    return model.eval()


def save_like_mmpretrain(model, path):
    torch.save({"meta": {"mmpretrain_version": "1.2.0", "dataset_meta": {"classes": ("a", "b")}},
                "state_dict": model.state_dict()}, path)


def mmpretrain_pixels(path):
    """MMPretrain's test pipeline (configs/_base_/datasets/imagenet_bs64_mixer_224.py) and data
    preprocessor: (1, 3, 224, 224) float32."""
    pipeline = Compose([TRANSFORMS.build(t) for t in [
        dict(type="LoadImageFromFile"),
        dict(type="ResizeEdge", scale=256, edge="short", interpolation="bicubic"),
        dict(type="CenterCrop", crop_size=224),
        dict(type="PackInputs")]])
    pre = MODELS.build(dict(type="ClsDataPreprocessor", mean=[127.5] * 3, std=[127.5] * 3, to_rgb=True))
    return pre(dict(inputs=[pipeline(dict(img_path=path))["inputs"]]))["inputs"].numpy()


def minimixer_pixels(path):
    d = data_config("mixer_b16_224.mmpretrain")
    transform = eval_transform(224, crop_pct=d.crop_pct, interpolation=d.interpolation, mean=d.mean, std=d.std,
                               pipeline=d.pipeline)
    return transform(transform.decode(path, "RGB"))[None]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The two photos, a portrait crop, odd sizes, gray, RGBA PNG and an EXIF-rotated JPEG."""
    out = tmp_path_factory.mktemp("photos")
    paths = [os.path.join(IMAGES, n) for n in ("china.jpg", "flower.jpg")]
    china = Image.open(paths[0]).convert("RGB")
    variants = {"portrait.jpg": china.crop((100, 0, 341, 427)), "odd.png": china.resize((301, 257)),
                "gray.jpg": china.convert("L"), "rgba.png": china.convert("RGBA"),
                "tiny.png": china.resize((37, 29))}
    for name, img in variants.items():
        img.save(out / name)
        paths.append(str(out / name))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: OpenCV's IMREAD_COLOR applies it, as MMPretrain sees the photo
    china.save(out / "rotated.jpg", exif=exif)
    paths.append(str(out / "rotated.jpg"))
    return paths


def test_pixels_equal_mmpretrain_test_pipeline(photos):
    worst = 0.0
    for path in photos:
        ref, got = mmpretrain_pixels(path), minimixer_pixels(path)
        assert got.shape == ref.shape, (path, got.shape, ref.shape)
        diff = float(np.abs(got - ref).max())
        print(f"{os.path.basename(path):12s} max|Δ| {diff:.3e}")
        worst = max(worst, diff)
    assert worst <= 1e-6


def test_image_loader_uses_the_opencv_pipeline(photos):
    """What eval feeds the model: ImageLoader with the MMPretrain tag's transform decodes with
    OpenCV (its transform.decode), so its batches are MMPretrain's pixels too."""
    from minimixer.data import ImageLoader
    d = data_config("mixer_b16_224.mmpretrain")
    transform = eval_transform(224, crop_pct=d.crop_pct, interpolation=d.interpolation, mean=d.mean, std=d.std,
                               pipeline=d.pipeline)
    loader = ImageLoader([(p, 0) for p in photos], transform, batch_size=len(photos), workers=2, strict=True)
    (x, _), = list(loader)
    ref = np.concatenate([mmpretrain_pixels(p) for p in photos])
    print(f"loader vs MMPretrain: max|Δ| {np.abs(x - ref).max():.3e}")
    assert np.abs(x - ref).max() <= 1e-6
    # and the check can fail: timm's Pillow pipeline gives other pixels for the same photos
    pil = eval_transform(224)
    from minimixer.data import open_image
    assert np.abs(pil(open_image(photos[0])) - ref[0]).max() > 1e-2


def test_inverse_of_mmpretrains_own_converter():
    """mmpretrain's tools/model_converters/mlpmixer_to_mmpretrain.py renames timm's keys;
    timm_name must undo it for every key of L/16."""
    import importlib.util
    import mmpretrain
    tool = os.path.join(os.path.dirname(mmpretrain.__file__), ".mim", "tools", "model_converters",
                        "mlpmixer_to_mmpretrain.py")
    if not os.path.exists(tool):
        pytest.skip("mmpretrain was installed without its tools")
    spec = importlib.util.spec_from_file_location("mlpmixer_to_mmpretrain", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    timm_keys = list(mm.param_shapes(mm.get_config("mixer_l16_224")))
    converted = module.convert_weights({k: k for k in timm_keys})["state_dict"]
    assert len(converted) == len(timm_keys)
    for mm_key, original in converted.items():
        assert timm_name(mm_key) == original, (mm_key, original)


@pytest.mark.parametrize("arch,blocks", [("b", 12), ("b", 3)], ids=["b16_full", "b16_widths_3_blocks"])
def test_logits_equal_mmpretrain(tmp_path, photos, arch, blocks):
    zoo = dict(embed_dims=768, num_layers=blocks, tokens_mlp_dims=384, channels_mlp_dims=3072)
    model = mmpretrain_classifier(zoo, seed=blocks)
    path = tmp_path / "mixer_mmpretrain.pth"
    save_like_mmpretrain(model, path)
    x = np.concatenate([mmpretrain_pixels(p) for p in photos[:2]] + [np.random.default_rng(0).standard_normal(
        (1, 3, 224, 224)).astype(np.float32)])
    with torch.no_grad():
        ref = model(torch.from_numpy(x), mode="tensor").numpy()

    params, cfg = convert_mod.load_checkpoint(path)  # the .pth itself, read without torch
    assert (cfg.num_blocks, cfg.embed_dim, cfg.ln_eps, cfg.gelu) == (blocks, 768, 1e-5, "erf")
    got = mm.to_numpy(mm.predict(params, x, cfg))
    converted = tmp_path / "converted.safetensors"  # and the converted file, through the CLI's reader
    from minimixer.commands.weights import main
    assert main(["convert", str(path), "--out", str(converted)]) == 0
    cfg2 = convert_mod.config_for_file(str(converted), mm.get_config("mixer_b16_224", num_blocks=blocks))
    got2 = mm.to_numpy(mm.predict(mm.load_weights(converted, cfg2), x, cfg2))
    eps6 = mm.to_numpy(mm.predict(params, x, cfg.replace(ln_eps=1e-6)))

    err, err2, err_eps6 = rel_error(got, ref), rel_error(got2, ref), rel_error(eps6, ref)
    print(f"blocks {blocks}: logits rel {err:.2e} (converted {err2:.2e}); with timm's eps 1e-6 {err_eps6:.2e}; "
          f"|logits| max {np.abs(ref).max():.2f}")
    assert err <= 2e-6 and err2 <= 2e-6
    assert err_eps6 > 2e-6  # the test can tell MMPretrain's eps from timm's
    for a, b in zip(np.argsort(-got, axis=1)[:, :5], np.argsort(-ref, axis=1)[:, :5]):
        assert list(a) == list(b)


@pytest.mark.slow
def test_l16_full_size_logits(tmp_path):
    model = mmpretrain_classifier("l", seed=7)
    path = tmp_path / "l16.pth"
    save_like_mmpretrain(model, path)
    x = mmpretrain_pixels(os.path.join(IMAGES, "flower.jpg"))
    with torch.no_grad():
        ref = model(torch.from_numpy(x), mode="tensor").numpy()
    params, cfg = convert_mod.load_checkpoint(path, mm.get_config("mixer_l16_224"))
    got = mm.to_numpy(mm.predict(params, x, cfg))
    err = rel_error(got, ref)
    print(f"L/16 logits rel {err:.2e}")
    assert err <= 2e-6
    assert list(np.argsort(-got[0])[:5]) == list(np.argsort(-ref[0])[:5])

"""Preprocessing against timm's own eval transform, on real photos in many image modes."""
import os

import numpy as np
import pytest

pytestmark = pytest.mark.timm
from PIL import Image

timm = pytest.importorskip("timm")
from timm.data import create_transform  # noqa: E402

from minimixer.data import eval_transform, open_image  # noqa: E402

IMAGES = os.path.join(os.path.dirname(__file__), "images")
MODES = ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "I", "1"]


def timm_open(path):
    with open(path, "rb") as f:  # what timm's ImageDataset does
        return Image.open(f).convert("RGB")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The two photos as JPEG, then re-saved in every mode (PNG keeps the mode, TIFF for CMYK)."""
    out = tmp_path_factory.mktemp("modes")
    paths = []
    for name in ("china.jpg", "flower.jpg"):
        src = os.path.join(IMAGES, name)
        paths.append(src)
        rgb = Image.open(src).convert("RGB")
        gray16 = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257  # the full 16-bit range
        for mode in MODES[1:]:
            if mode == "I;16":
                img = Image.fromarray(gray16)  # uint16 -> I;16
            elif mode == "I":
                img = Image.fromarray(gray16.astype(np.int32))  # int32 -> I
            else:
                img = rgb.convert(mode)
            ext = "tiff" if mode in ("CMYK", "I") else "png"
            path = out / f"{name[:-4]}_{mode.replace(';', '')}.{ext}"
            img.save(path)
            assert Image.open(path).mode == mode or mode == "I;16", (mode, Image.open(path).mode)
            paths.append(str(path))
    return paths


@pytest.mark.parametrize("settings", [
    dict(input_size=224, crop_pct=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3),  # Google
    dict(input_size=224, crop_pct=0.875, interpolation="bilinear", mean=(0.0,) * 3, std=(1.0,) * 3),  # MIIL
    dict(input_size=160, crop_pct=0.95, interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    dict(input_size=384, crop_pct=1.0, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3),  # upscales
])
def test_eval_transform_matches_timm(photos, settings):
    ref_transform = create_transform(is_training=False, **settings)
    ours = eval_transform(settings["input_size"], crop_pct=settings["crop_pct"],
                          interpolation=settings["interpolation"], mean=settings["mean"], std=settings["std"])
    worst = 0.0
    for path in photos:
        ref = ref_transform(timm_open(path)).numpy()
        got = ours(open_image(path))
        assert got.shape == ref.shape and got.dtype == np.float32
        diff = float(np.abs(got - ref).max())
        worst = max(worst, diff)
        assert diff <= 1e-6, f"{os.path.basename(path)}: max|Δ| {diff:.3e}"
    print(f"{settings['interpolation']} {settings['input_size']}: worst max|Δ| over {len(photos)} images {worst:.3e}")

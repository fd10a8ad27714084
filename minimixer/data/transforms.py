"""timm's transforms, in Pillow and NumPy: the eval resize + center crop, the training
random-resized crop and flip, and the normalization to (C, H, W) float32."""
import math

import numpy as np
from PIL import Image

from .folders import check_pixels

INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                  "lanczos": Image.LANCZOS, "box": Image.BOX}


def to_normalized_array(img, mean, std):
    """PIL RGB or L -> (C, H, W) float32: /255, then (x - mean)/std, in float32 as torchvision does."""
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)  # (H, W, C) or (H, W)
    if x.ndim == 2:
        x = x[:, :, None]  # (H, W, 1)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (C, H, W)


def resize_shorter(img, size, interpolation):
    """torchvision Resize(int): shorter side to size, longer side int(size·long/short)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    check_pixels(new_w, new_h, f"resizing {w}x{h} would give")  # a 100000x1 strip: a 25600000x256 image
    return img.resize((new_w, new_h), INTERPOLATIONS[interpolation])


def center_crop(img, size):
    """torchvision CenterCrop: offsets int(round((H - size)/2)) with Python's round."""
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def eval_transform(img_size, *, crop_pct=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3,
                   pipeline="timm"):
    """timm's eval transform (transforms_imagenet_eval, crop_mode 'center'):
    resize the shorter side to floor(img_size / crop_pct), center-crop img_size, normalize.
    pipeline 'mmpretrain': the same steps as MMPretrain does them, with OpenCV; that
    transform reads images with its own transform.decode(path, mode)."""
    if pipeline == "mmpretrain":
        from ..checkpoints.mmpretrain import opencv_eval_transform
        return opencv_eval_transform(img_size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)
    scale = math.floor(img_size / crop_pct)

    def transform(img, rng=None):
        img = center_crop(resize_shorter(img, scale, interpolation), img_size)
        return to_normalized_array(img, mean, std)

    return transform


def train_transform(img_size, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                    interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3):
    """RandomResizedCrop (torchvision's sampling: 10 tries, then a center crop) and a horizontal flip."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def crop_box(w, h, rng):
        area = w * h
        for _ in range(10):
            target = area * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                return left, top, left + cw, top + ch
        in_ratio = w / h  # fallback: the largest center crop within the ratio range
        if in_ratio < ratio[0]:
            cw, ch = w, int(round(w / ratio[0]))
        elif in_ratio > ratio[1]:
            cw, ch = int(round(h * ratio[1])), h
        else:
            cw, ch = w, h
        top, left = (h - ch) // 2, (w - cw) // 2
        return left, top, left + cw, top + ch

    def transform(img, rng):
        img = img.resize((img_size, img_size), INTERPOLATIONS[interpolation], box=crop_box(*img.size, rng))
        if rng.random() < hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_normalized_array(img, mean, std)

    return transform

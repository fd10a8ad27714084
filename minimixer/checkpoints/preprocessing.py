"""How each checkpoint's images are prepared: the eval transform settings, by name.

A converted weights file records one of these names in its metadata (convert.py), and each
pretrained tag has one (registry.py). The transforms themselves are in minimixer/data/
(Pillow, as timm) and checkpoints/mmpretrain.py (OpenCV, as MMPretrain).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class DataConfig:
    """How images are prepared for a model (timm's eval transform settings)."""
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    pipeline: str = "timm"  # 'timm' (Pillow) or 'mmpretrain' (OpenCV decoding and resizing)


GOOGLE = DataConfig()
MIIL = DataConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")
# configs/_base_/datasets/imagenet_bs64_mixer_224.py: cv2 decode, ResizeEdge 256 short bicubic,
# CenterCrop 224, mean = std = 127.5
MMPRETRAIN = DataConfig(pipeline="mmpretrain")
DIGITS = DataConfig(mean=(0.5,), std=(0.5,), crop_pct=1.0, interpolation="box")
PREPROCESSING = {"google": GOOGLE, "miil": MIIL, "mmpretrain": MMPRETRAIN, "digits": DIGITS}

"""How each checkpoint's images are prepared: the eval transform settings, by name.

A converted weights file records one of these names in its metadata (convert.py), and each
pretrained tag has one (registry.py). The transforms themselves are in minimixer/data/
(Pillow, as timm) and checkpoints/mmpretrain.py (OpenCV, as MMPretrain).
"""
import math
from dataclasses import dataclass

INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box")


@dataclass(frozen=True)
class DataConfig:
    """How images are prepared for a model (timm's eval transform settings)."""
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    pipeline: str = "timm"  # 'timm' (Pillow) or 'mmpretrain' (OpenCV decoding and resizing)

    def __post_init__(self):
        # checked as weights are: a NaN mean or a zero std would give NaN inputs, hence a number
        # of no meaning written into the results file
        problems = []
        if not (self.mean and all(_finite(v) for v in self.mean)):
            problems.append(f"mean must be finite numbers, got {self.mean!r}")
        if not (self.std and all(_finite(v) and v > 0 for v in self.std)):
            problems.append(f"std must be finite numbers > 0, got {self.std!r}")
        if not (_finite(self.crop_pct) and 0 < self.crop_pct <= 1):
            problems.append(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if problems:
            raise ValueError("invalid preprocessing: " + "; ".join(problems))


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


GOOGLE = DataConfig()
MIIL = DataConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")
# configs/_base_/datasets/imagenet_bs64_mixer_224.py: cv2 decode, ResizeEdge 256 short bicubic,
# CenterCrop 224, mean = std = 127.5
MMPRETRAIN = DataConfig(pipeline="mmpretrain")
DIGITS = DataConfig(mean=(0.5,), std=(0.5,), crop_pct=1.0, interpolation="box")
PREPROCESSING = {"google": GOOGLE, "miil": MIIL, "mmpretrain": MMPRETRAIN, "digits": DIGITS}

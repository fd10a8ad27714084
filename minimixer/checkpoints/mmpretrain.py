"""MMPretrain's MLP-Mixer checkpoints: their key names, numerics and preprocessing.

MMPretrain (mmpretrain 1.2.0, formerly mmcls) runs the same network as timm with two
differences that move the logits: its LayerNorm eps is 1e-5 (norm_cfg=dict(type='LN'),
PyTorch's default) where timm's is 1e-6, and its test pipeline decodes and resizes with
OpenCV (configs/_base_/datasets/imagenet_bs64_mixer_224.py):

    LoadImageFromFile (cv2.imdecode, BGR)  ResizeEdge(256, edge='short', bicubic, cv2)
    CenterCrop(224)  then in the data preprocessor: BGR -> RGB, (x - 127.5) / 127.5

Its files are torch .pth archives holding {"meta": ..., "state_dict": ...}; the keys are
those that tools/model_converters/mlpmixer_to_mmpretrain.py makes from timm's, undone here.
"""
import math
import re

import numpy as np

LN_EPS = 1e-5
GELU = "erf"  # nn.GELU()

# MMPretrain name -> timm name: the inverse of mlpmixer_to_mmpretrain.py's renaming
_KEYS = [(re.compile(a), b) for a, b in [
    (r"backbone\.patch_embed\.projection\.(weight|bias)", r"stem.proj.\1"),
    (r"backbone\.layers\.(\d+)\.ln1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"backbone\.layers\.(\d+)\.token_mix\.layers\.0\.0\.(weight|bias)", r"blocks.\1.mlp_tokens.fc1.\2"),
    (r"backbone\.layers\.(\d+)\.token_mix\.layers\.1\.(weight|bias)", r"blocks.\1.mlp_tokens.fc2.\2"),
    (r"backbone\.layers\.(\d+)\.ln2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"backbone\.layers\.(\d+)\.channel_mix\.layers\.0\.0\.(weight|bias)", r"blocks.\1.mlp_channels.fc1.\2"),
    (r"backbone\.layers\.(\d+)\.channel_mix\.layers\.1\.(weight|bias)", r"blocks.\1.mlp_channels.fc2.\2"),
    (r"backbone\.ln1\.(weight|bias)", r"norm.\1"),
    (r"head\.fc\.(weight|bias)", r"head.\1"),
]]


def timm_name(key):
    """The timm name of an MMPretrain Mixer key, or None if it is not one."""
    for pattern, template in _KEYS:
        m = pattern.fullmatch(key)
        if m:
            return m.expand(template)
    return None


def is_mmpretrain(state_dict):
    return any(k.startswith("backbone.patch_embed.") for k in state_dict)


def state_dict_of(obj):
    """The state dict inside a loaded MMPretrain/mmengine .pth ({"meta", "state_dict", ...}) or
    a bare one."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    return obj


def to_timm(state_dict, source):
    """{timm name: array} from an MMPretrain Mixer state dict; ValueError naming the keys
    that are not a Mixer's."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        name = timm_name(key) if isinstance(key, str) else None
        if name is None:
            unknown.append(str(key))
        else:
            out[name] = value
    if unknown:
        raise ValueError(f"{source}: not an MMPretrain MLP-Mixer checkpoint: {len(unknown)} unknown key(s), "
                         f"e.g. {', '.join(map(repr, unknown[:3]))}")
    return out


# --- MMPretrain's test pipeline, with OpenCV --------------------------------------------

def _cv2():
    try:
        import cv2
    except ImportError:
        raise ValueError("the MMPretrain preprocessing decodes and resizes with OpenCV: "
                         "pip install 'minimixer[opencv]' (opencv-python-headless)") from None
    return cv2


_CV2_INTERPOLATIONS = {"bicubic": "INTER_CUBIC", "bilinear": "INTER_LINEAR", "nearest": "INTER_NEAREST",
                       "lanczos": "INTER_LANCZOS4", "box": "INTER_AREA"}


def opencv_decode(path, mode="RGB"):
    """The image as MMPretrain's LoadImageFromFile reads it: cv2.imdecode(IMREAD_COLOR), a
    (H, W, 3) uint8 BGR array (EXIF orientation applied, alpha dropped, gray made color)."""
    cv2 = _cv2()
    if mode != "RGB":
        raise ValueError("the OpenCV (MMPretrain) pipeline reads color images only")
    with open(path, "rb") as f:
        data = np.frombuffer(f.read(), np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise ValueError(f"OpenCV cannot decode {path}")
    return img


def opencv_eval_transform(img_size, *, crop_pct=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3):
    """MMPretrain's test pipeline: ResizeEdge(floor(img_size/crop_pct), 'short') with cv2,
    CenterCrop(img_size), BGR -> RGB, then (x - 255·mean) / (255·std) in float32.

    Its input is what `transform.decode(path)` returns (opencv_decode), not a PIL image.
    """
    cv2 = _cv2()
    scale = math.floor(img_size / crop_pct)
    flag = getattr(cv2, _CV2_INTERPOLATIONS[interpolation])
    mean255 = np.asarray(mean, np.float32) * np.float32(255)  # 127.5 exactly for mean 0.5
    std255 = np.asarray(std, np.float32) * np.float32(255)

    def transform(img, rng=None):
        h, w = img.shape[:2]  # ResizeEdge: the shorter edge to scale, int() for the other
        size = (scale, int(scale * h / w)) if w < h else (int(scale * w / h), scale)  # (width, height)
        img = cv2.resize(img, size, interpolation=flag)  # (h', w', 3) uint8 BGR
        h, w = img.shape[:2]  # CenterCrop: mmcv's offsets, int(round(...)) with Python's round
        top, left = max(0, int(round((h - img_size) / 2.0))), max(0, int(round((w - img_size) / 2.0)))
        img = img[top:top + img_size, left:left + img_size, ::-1]  # (S, S, 3) RGB
        x = (img.astype(np.float32) - mean255) / std255  # (S, S, 3)
        return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, S, S)

    transform.decode = opencv_decode
    return transform

"""Pretrained checkpoints: which weights, which preprocessing, which class names.

This is the one place that says how each model's inputs are prepared (mean, std,
crop_pct, interpolation) and where its weights come from. The values are timm's
pretrained_cfg for the same tags (timm/models/mlp_mixer.py default_cfgs).
The command that uses it is `python -m minimixer.weights` (minimixer/weights.py).
"""
import os
import sys
from dataclasses import dataclass, replace
from importlib import resources

from ..config import PRESETS, get_config

HF_FILENAME = "model.safetensors"
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# package data, so that every install (not only an editable one) has it
BUNDLED_DIGITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "assets", "mixer_digits.safetensors")


@dataclass(frozen=True)
class DataConfig:
    """How images are prepared for a model (timm's eval transform settings)."""
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"


@dataclass(frozen=True)
class Pretrained:
    tag: str  # timm's model.tag name
    model: str  # the preset
    num_classes: int
    data: DataConfig
    repo_id: str | None  # Hugging Face hub repository, None for bundled weights
    labels: str  # 'imagenet1k', 'digits' or 'index'


GOOGLE = DataConfig()
CHECKPOINTS = {p.tag: p for p in [
    Pretrained("mixer_b16_224.goog_in21k_ft_in1k", "mixer_b16_224", 1000, GOOGLE,
               "timm/mixer_b16_224.goog_in21k_ft_in1k", "imagenet1k"),
    Pretrained("mixer_l16_224.goog_in21k_ft_in1k", "mixer_l16_224", 1000, GOOGLE,
               "timm/mixer_l16_224.goog_in21k_ft_in1k", "imagenet1k"),
    Pretrained("mixer_b16_224.goog_in21k", "mixer_b16_224", 21843, GOOGLE, "timm/mixer_b16_224.goog_in21k", "index"),
    Pretrained("mixer_l16_224.goog_in21k", "mixer_l16_224", 21843, GOOGLE, "timm/mixer_l16_224.goog_in21k", "index"),
    Pretrained("mixer_b16_224.miil_in21k_ft_in1k", "mixer_b16_224", 1000,
               DataConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear"),
               "timm/mixer_b16_224.miil_in21k_ft_in1k", "imagenet1k"),
    # the bundled 8x8 digits model: one channel, no crop; 'box' averages pixels like the
    # digits' own 4x4-block counting
    Pretrained("mixer_digits", "mixer_digits", 10,
               DataConfig(mean=(0.5,), std=(0.5,), crop_pct=1.0, interpolation="box"), None, "digits"),
]}
DEFAULT_TAG = {"mixer_b16_224": "mixer_b16_224.goog_in21k_ft_in1k",
               "mixer_l16_224": "mixer_l16_224.goog_in21k_ft_in1k"}


def resolve(name):
    """(MixerConfig, DataConfig, Pretrained or None) for a preset or a model.tag name."""
    tag = DEFAULT_TAG.get(name, name)
    if tag in CHECKPOINTS:
        ck = CHECKPOINTS[tag]
        return get_config(ck.model, num_classes=ck.num_classes), ck.data, ck
    if name in PRESETS:
        return get_config(name), GOOGLE, None  # no pretrained weights: Google's preprocessing
    known = sorted(set(PRESETS) | set(CHECKPOINTS))
    raise ValueError(f"unknown model {name!r}; known: {', '.join(known)}")


def data_config(name, **overrides):
    """The DataConfig for a model name, with any field overridden (None values are ignored)."""
    _, data, _ = resolve(name)
    return replace(data, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None})


# --- class names ---------------------------------------------------------------------------

def imagenet_classes():
    """[(wnid, names)] for the 1,000 ImageNet-1k classes, in class-index order."""
    text = resources.files("minimixer").joinpath("assets/imagenet1k_classes.tsv").read_text()
    return [tuple(line.split("\t", 1)) for line in text.splitlines() if line]


def class_names(name, num_classes):
    """Readable labels for a model's outputs."""
    _, _, ck = resolve(name)
    kind = ck.labels if ck else ("imagenet1k" if num_classes == 1000 else "index")
    if kind == "imagenet1k" and num_classes == 1000:
        return [names for _, names in imagenet_classes()]
    if kind == "digits":
        return [str(i) for i in range(10)]
    return [f"class {i}" for i in range(num_classes)]


# --- weights ---------------------------------------------------------------------------------

class WeightsNotFound(Exception):
    """No weights could be found or downloaded; the message says where to put them by hand."""


def local_name(name):
    """The file name that `weights download NAME --to DIR` writes and --weights auto looks for."""
    return f"{DEFAULT_TAG.get(name, name)}.safetensors"


def local_candidates(name):
    tag = DEFAULT_TAG.get(name, name)
    names = [local_name(name)] + ([f"{name}.safetensors"] if name != tag else [])
    folders = [os.path.join(os.getcwd(), "weights"), os.path.join(PACKAGE_ROOT, "weights")]
    return [os.path.join(f, n) for f in dict.fromkeys(folders) for n in names]


def download(name, *, cache_dir=None):
    """Fetch a checkpoint's model.safetensors with huggingface_hub (its cache, resume and
    checksums) and return the local path. Raises WeightsNotFound with manual instructions
    (commands that take --weights add that choice; see find_weights)."""
    _, _, ck = resolve(name)
    if ck is None or ck.repo_id is None:
        raise WeightsNotFound(f"no pretrained weights are published for {name}")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import logging as hf_logging
        hf_logging.set_verbosity_error()  # its retry warnings would bury our one-line error
        print(f"fetching {ck.repo_id}/{HF_FILENAME} (huggingface_hub; cached after the first time)", file=sys.stderr)
        return hf_hub_download(ck.repo_id, HF_FILENAME, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - offline, hub errors, bad responses: all end the same way
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsNotFound(
            f"could not download {ck.repo_id}/{HF_FILENAME} ({reason}). Offline? Fetch "
            f"{endpoint}/{ck.repo_id}/resolve/main/{HF_FILENAME} by hand and save it as "
            f"weights/{local_name(name)}") from None


def find_weights(name, weights="auto", *, cache_dir=None):
    """The weights file to use: an explicit path, or for 'auto' the bundled digits model,
    a file in ./weights/, or a download (cached by huggingface_hub)."""
    if weights != "auto":
        return weights
    if DEFAULT_TAG.get(name, name) == "mixer_digits":
        return BUNDLED_DIGITS
    for path in local_candidates(name):
        if os.path.exists(path):
            return path
    _, _, ck = resolve(name)
    if ck is None or ck.repo_id is None:
        raise WeightsNotFound(f"no pretrained weights are published for {name}: pass --weights PATH, "
                              f"or put the file at weights/{local_name(name)}")
    try:
        return download(name, cache_dir=cache_dir)
    except WeightsNotFound as e:
        raise WeightsNotFound(f"{e}, or pass --weights PATH") from None

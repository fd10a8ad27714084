"""Pretrained checkpoints: which weights, which preprocessing, which class names.

This is the one place that says how each model's inputs are prepared (mean, std,
crop_pct, interpolation, and whose pipeline) and where its weights come from. The timm
tags' values are timm's pretrained_cfg (timm/models/mlp_mixer.py default_cfgs); the
MMPretrain and JAX tags load the original files (checkpoints/mmpretrain.py, jax.py).
The command that uses it is `python -m minimixer.weights` (minimixer/commands/weights.py).
"""
import hashlib
import os
import re
import shutil
import sys
import urllib.request
from dataclasses import dataclass, replace
from importlib import resources

from ..config import PRESETS, get_config
from .convert import SOURCES, read_checkpoint
from .preprocessing import DIGITS, GOOGLE, MIIL, MMPRETRAIN, PREPROCESSING, DataConfig  # noqa: F401
from .safetensors_io import atomic_target

HF_FILENAME = "model.safetensors"
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# package data, so that every install (not only an editable one) has it
BUNDLED_DIGITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "assets", "mixer_digits.safetensors")


@dataclass(frozen=True)
class Pretrained:
    tag: str  # timm's model.tag name
    model: str  # the preset
    num_classes: int
    data: DataConfig
    repo_id: str | None  # Hugging Face hub repository, None for bundled weights
    labels: str  # 'imagenet1k', 'digits' or 'index'
    source: str = "timm"  # whose model and numerics (convert.SOURCES)
    url: str | None = None  # the original file, for sources outside the hub

    @property
    def numerics(self):
        return {k: SOURCES[self.source][k] for k in ("ln_eps", "gelu")}


MMPRETRAIN_URL = "https://download.openmmlab.com/mmclassification/v0/mlp-mixer/"
JAX_URL = "https://storage.googleapis.com/mixer_models/"
CHECKPOINTS = {p.tag: p for p in [
    Pretrained("mixer_b16_224.goog_in21k_ft_in1k", "mixer_b16_224", 1000, GOOGLE,
               "timm/mixer_b16_224.goog_in21k_ft_in1k", "imagenet1k"),
    Pretrained("mixer_l16_224.goog_in21k_ft_in1k", "mixer_l16_224", 1000, GOOGLE,
               "timm/mixer_l16_224.goog_in21k_ft_in1k", "imagenet1k"),
    Pretrained("mixer_b16_224.goog_in21k", "mixer_b16_224", 21843, GOOGLE, "timm/mixer_b16_224.goog_in21k", "index"),
    Pretrained("mixer_l16_224.goog_in21k", "mixer_l16_224", 21843, GOOGLE, "timm/mixer_l16_224.goog_in21k", "index"),
    Pretrained("mixer_b16_224.miil_in21k_ft_in1k", "mixer_b16_224", 1000, MIIL,
               "timm/mixer_b16_224.miil_in21k_ft_in1k", "imagenet1k"),
    # MMPretrain's conversions of timm's weights (its model zoo's table): LayerNorm eps 1e-5
    Pretrained("mixer_b16_224.mmpretrain", "mixer_b16_224", 1000, MMPRETRAIN, None, "imagenet1k", "mmpretrain",
               MMPRETRAIN_URL + "mixer-base-p16_3rdparty_64xb64_in1k_20211124-1377e3e0.pth"),
    Pretrained("mixer_l16_224.mmpretrain", "mixer_l16_224", 1000, MMPRETRAIN, None, "imagenet1k", "mmpretrain",
               MMPRETRAIN_URL + "mixer-large-p16_3rdparty_64xb64_in1k_20211124-5a2519d2.pth"),
    # Google's original files, run as the Flax model ran them (tanh GELU); timm's preprocessing
    Pretrained("mixer_b16_224.jax_in21k_ft_in1k", "mixer_b16_224", 1000, GOOGLE, None, "imagenet1k", "jax",
               JAX_URL + "imagenet21k_imagenet2012/Mixer-B_16.npz"),
    Pretrained("mixer_l16_224.jax_in21k_ft_in1k", "mixer_l16_224", 1000, GOOGLE, None, "imagenet1k", "jax",
               JAX_URL + "imagenet21k_imagenet2012/Mixer-L_16.npz"),
    Pretrained("mixer_b16_224.jax_in21k", "mixer_b16_224", 21843, GOOGLE, None, "index", "jax",
               JAX_URL + "imagenet21k/Mixer-B_16.npz"),
    Pretrained("mixer_l16_224.jax_in21k", "mixer_l16_224", 21843, GOOGLE, None, "index", "jax",
               JAX_URL + "imagenet21k/Mixer-L_16.npz"),
    # the bundled 8x8 digits model: one channel, no crop; 'box' averages pixels like the
    # digits' own 4x4-block counting
    Pretrained("mixer_digits", "mixer_digits", 10, DIGITS, None, "digits"),
]}
DEFAULT_TAG = {"mixer_b16_224": "mixer_b16_224.goog_in21k_ft_in1k",
               "mixer_l16_224": "mixer_l16_224.goog_in21k_ft_in1k"}


def resolve(name):
    """(MixerConfig, DataConfig, Pretrained or None) for a preset or a model.tag name."""
    tag = DEFAULT_TAG.get(name, name)
    if tag in CHECKPOINTS:
        ck = CHECKPOINTS[tag]
        return get_config(ck.model, num_classes=ck.num_classes, **ck.numerics), ck.data, ck
    if name in PRESETS:
        return get_config(name), GOOGLE, None  # no pretrained weights: Google's preprocessing
    known = sorted(set(PRESETS) | set(CHECKPOINTS))
    raise ValueError(f"unknown model {name!r}; known: {', '.join(known)}")


def data_config(name, weights=None, **overrides):
    """The DataConfig for a model name, with any field overridden (None values are ignored).
    A weights file whose metadata names its preprocessing (a converted one) brings its own."""
    _, data, _ = resolve(name)
    if weights not in (None, "auto") and os.path.isfile(weights):
        ck = read_checkpoint(weights, load=False)
        data = ck.data or PREPROCESSING.get(ck.preprocessing, data)  # a trained file's own, or a named one
    return replace(data, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None})


# --- class names ---------------------------------------------------------------------------

def imagenet_classes():
    """[(wnid, names)] for the 1,000 ImageNet-1k classes, in class-index order."""
    text = resources.files("minimixer").joinpath("assets/imagenet1k_classes.tsv").read_text()
    return [tuple(line.split("\t", 1)) for line in text.splitlines() if line]


def class_names(name, num_classes, weights=None):
    """Readable labels for a model's outputs: those a weights file records (train writes them),
    else the model tag's."""
    if weights not in (None, "auto") and os.path.isfile(weights):
        recorded = read_checkpoint(weights, load=False).classes
        if recorded and len(recorded) == num_classes:
            return recorded
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
    if ck is not None and ck.url:
        return download_url(ck, cache_dir=cache_dir)
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


def download_url(ck, *, cache_dir=None):
    """Fetch a tag's original file (MMPretrain .pth, JAX .npz) into the cache folder, once;
    MMPretrain's names end in the first 8 hex digits of the file's SHA-256, which are checked."""
    folder = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "minimixer")
    path = os.path.join(folder, ck.tag + os.path.splitext(ck.url)[1])  # by tag: two JAX files share a name
    if os.path.isfile(path):
        return path
    try:
        os.makedirs(folder, exist_ok=True)
        print(f"fetching {ck.url} (cached in {folder})", file=sys.stderr)
        with urllib.request.urlopen(ck.url, timeout=60) as response, atomic_target(path) as tmp:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
            expected = re.search(r"-([0-9a-f]{8})\.pth$", ck.url)
            if expected and _sha256(tmp)[:8] != expected.group(1):
                raise ValueError(f"SHA-256 does not start with {expected.group(1)}: a damaged download")
    except Exception as e:  # noqa: BLE001 - offline, HTTP errors, bad checksum: all end the same way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsNotFound(
            f"could not download {ck.url} ({reason}). Offline? Fetch it by hand, then run "
            f"python -m minimixer.weights convert FILE --out weights/{ck.tag}.safetensors") from None
    return path


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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

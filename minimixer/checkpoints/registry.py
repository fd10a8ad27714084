"""Pretrained checkpoints: which weights, which preprocessing, which class names.

This is the one place that says how each model's inputs are prepared (mean, std,
crop_pct, interpolation, and whose pipeline) and where its weights come from. The timm
tags' values are timm's pretrained_cfg (timm/models/mlp_mixer.py default_cfgs); the
MMPretrain and JAX tags load the original files (checkpoints/mmpretrain.py, jax.py).
Every tag's file is downloaded from its source, checked before it is cached (download.py).
The command that uses it is `python -m minimixer.weights` (minimixer/commands/weights.py).
"""
import gzip
import os
import re
import sys
from dataclasses import dataclass, replace
from importlib import resources

from ..config import PRESETS, get_config
from .convert import SOURCES, read_checkpoint
from .download import DEFAULT_TIMEOUT, DownloadError, check_file, fetch
from .preprocessing import DIGITS, GOOGLE, MIIL, MMPRETRAIN, PREPROCESSING, DataConfig  # noqa: F401

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
    labels: str  # 'imagenet1k', 'imagenet21k' (Google's 21,843 classes), 'digits' or 'index'
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
    Pretrained("mixer_b16_224.goog_in21k", "mixer_b16_224", 21843, GOOGLE, "timm/mixer_b16_224.goog_in21k",
               "imagenet21k"),
    Pretrained("mixer_l16_224.goog_in21k", "mixer_l16_224", 21843, GOOGLE, "timm/mixer_l16_224.goog_in21k",
               "imagenet21k"),
    Pretrained("mixer_b16_224.miil_in21k_ft_in1k", "mixer_b16_224", 1000, MIIL,
               "timm/mixer_b16_224.miil_in21k_ft_in1k", "imagenet1k"),
    # MMPretrain's conversions of timm's weights (its model zoo's table): LayerNorm eps 1e-5
    Pretrained("mixer_b16_224.mmpretrain", "mixer_b16_224", 1000, MMPRETRAIN, None, "imagenet1k", "mmpretrain",
               MMPRETRAIN_URL + "mixer-base-p16_3rdparty_64xb64_in1k_20211124-1377e3e0.pth"),
    Pretrained("mixer_l16_224.mmpretrain", "mixer_l16_224", 1000, MMPRETRAIN, None, "imagenet1k", "mmpretrain",
               MMPRETRAIN_URL + "mixer-large-p16_3rdparty_64xb64_in1k_20211124-5a2519d2.pth"),
    # Google's original files (gs://mixer_models, listed in vision_transformer's vit_jax.ipynb),
    # run as the Flax model ran them (tanh GELU), with timm's preprocessing. imagenet1k/ holds the
    # models trained on ImageNet-1k alone: the paper's author, in timm PR #651, says the published
    # 1k model is the one trained on ImageNet-1k (76.5%) and that no ImageNet-21k model fine-tuned on
    # ImageNet-1k was published. sam/ and gsam/: ImageNet-1k alone, trained with SAM and GSAM.
    Pretrained("mixer_b16_224.jax_in1k", "mixer_b16_224", 1000, GOOGLE, None, "imagenet1k", "jax",
               JAX_URL + "imagenet1k/Mixer-B_16.npz"),
    Pretrained("mixer_l16_224.jax_in1k", "mixer_l16_224", 1000, GOOGLE, None, "imagenet1k", "jax",
               JAX_URL + "imagenet1k/Mixer-L_16.npz"),
    Pretrained("mixer_b16_224.jax_in21k", "mixer_b16_224", 21843, GOOGLE, None, "imagenet21k", "jax",
               JAX_URL + "imagenet21k/Mixer-B_16.npz"),
    Pretrained("mixer_l16_224.jax_in21k", "mixer_l16_224", 21843, GOOGLE, None, "imagenet21k", "jax",
               JAX_URL + "imagenet21k/Mixer-L_16.npz"),
    Pretrained("mixer_b16_224.jax_sam_in1k", "mixer_b16_224", 1000, GOOGLE, None, "imagenet1k", "jax",
               JAX_URL + "sam/Mixer-B_16.npz"),
    Pretrained("mixer_b32_224.jax_sam_in1k", "mixer_b32_224", 1000, GOOGLE, None, "imagenet1k", "jax",
               JAX_URL + "sam/Mixer-B_32.npz"),
    *(Pretrained(f"mixer_{v}_224.jax_gsam_in1k", f"mixer_{v}_224", 1000, GOOGLE, None, "imagenet1k", "jax",
                 JAX_URL + f"gsam/Mixer-{v[0].upper()}_{v[1:]}.npz") for v in ("s16", "s32", "b16", "b32")),
    # the bundled 8x8 digits model: one channel, no crop; 'box' averages pixels like the
    # digits' own 4x4-block counting
    Pretrained("mixer_digits", "mixer_digits", 10, DIGITS, None, "digits"),
]}
DEFAULT_TAG = {"mixer_b16_224": "mixer_b16_224.goog_in21k_ft_in1k",
               "mixer_l16_224": "mixer_l16_224.goog_in21k_ft_in1k",
               # earlier names of the jax_in1k tags, whose URLs (imagenet21k_imagenet2012/) did not exist
               "mixer_b16_224.jax_in21k_ft_in1k": "mixer_b16_224.jax_in1k",
               "mixer_l16_224.jax_in21k_ft_in1k": "mixer_l16_224.jax_in1k"}


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


def imagenet21k_classes():
    """[(wnid, names)] for Google's 21,843 ImageNet-21k classes, in class-index order (the
    goog_in21k and jax_in21k heads; timm's imagenet21k_goog_synsets.txt with its lemmas)."""
    data = resources.files("minimixer").joinpath("assets/imagenet21k_classes.tsv.gz").read_bytes()
    return [tuple(line.split("\t", 1)) for line in gzip.decompress(data).decode().splitlines() if line]


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
    if kind == "imagenet21k" and num_classes == 21843:
        return [names for _, names in imagenet21k_classes()]
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


def cache_folder(cache_dir=None):
    """Where downloads are kept: --cache-dir, $MINIMIXER_CACHE, or $XDG_CACHE_HOME/minimixer."""
    return cache_dir or os.environ.get("MINIMIXER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "minimixer")


def source_of(ck):
    """(url, kind, sha256 prefix or None) of a tag's file: the hub's model.safetensors (under
    $HF_ENDPOINT, as huggingface_hub reads it), or the original .pth/.npz."""
    if ck.url:
        prefix = re.search(r"-([0-9a-f]{8})\.pth$", ck.url)  # MMPretrain: the SHA-256's first 8 hex digits
        return ck.url, os.path.splitext(ck.url)[1][1:], prefix.group(1) if prefix else None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{ck.repo_id}/resolve/main/{HF_FILENAME}", "safetensors", None


def download_timeout(timeout=None):
    """Seconds allowed for a whole download: the argument, $MINIMIXER_DOWNLOAD_TIMEOUT, or 600."""
    if timeout is None:
        value = os.environ.get("MINIMIXER_DOWNLOAD_TIMEOUT")
        try:
            timeout = float(value) if value else DEFAULT_TIMEOUT
        except ValueError:
            timeout = -1.0
        if not 0 < timeout < float("inf"):
            raise ValueError(f"MINIMIXER_DOWNLOAD_TIMEOUT={value!r} is not a positive number of seconds")
    return timeout


def download(name, *, cache_dir=None, timeout=None, full_check=False):
    """The local path of a tag's weights, downloaded once into the cache folder and checked
    (checkpoints/download.py) before it enters it. A cached file is checked before each use
    (its header or zip directory; full_check also hashes it) and fetched again if it fails.
    Raises WeightsNotFound with manual instructions (commands that take --weights add that choice)."""
    _, _, ck = resolve(name)
    if ck is not None and ck.model == "mixer_digits":
        return BUNDLED_DIGITS
    if ck is None or (ck.repo_id is None and ck.url is None):
        raise WeightsNotFound(f"no pretrained weights are published for {name}")
    url, kind, prefix = source_of(ck)
    if ck.url:  # by tag: two JAX files share a name
        by_hand = f"Offline? Fetch it by hand, then run python -m minimixer.weights convert FILE " \
                  f"--out weights/{ck.tag}.safetensors"
    else:
        by_hand = f"Offline? Fetch {url} by hand and save it as weights/{local_name(name)}"
    folder = cache_folder(cache_dir)
    path = os.path.join(folder, f"{ck.tag}.{kind}")
    if os.path.isfile(path):
        try:
            check_file(path, kind, full=full_check, sha256_prefix=prefix)
            return path
        except DownloadError as e:
            print(f"{path}: {e}; fetching it again", file=sys.stderr)
            for bad in (path, path + ".sha256"):
                try:
                    os.remove(bad)
                except FileNotFoundError:  # never written, or another process removed it first
                    pass
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise WeightsNotFound(f"could not download {url} (offline: HF_HUB_OFFLINE is set). {by_hand}")
    try:
        timeout = download_timeout(timeout)
        os.makedirs(folder, exist_ok=True)
        print(f"fetching {url} (checked, then cached in {folder})", file=sys.stderr)
        fetch(url, path, kind=kind, sha256_prefix=prefix, timeout=timeout)
    except (DownloadError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsNotFound(f"could not download {url} ({reason}). {by_hand}") from None
    return path


def find_weights(name, weights="auto", *, cache_dir=None):
    """The weights file to use: an explicit path, or for 'auto' the bundled digits model,
    a file in ./weights/, or a download (checked, then cached: see download)."""
    if weights != "auto":
        return weights
    if DEFAULT_TAG.get(name, name) == "mixer_digits":
        return BUNDLED_DIGITS
    for path in local_candidates(name):
        if os.path.exists(path):
            return path
    _, _, ck = resolve(name)
    if ck is None or (ck.repo_id is None and ck.url is None):
        raise WeightsNotFound(f"no pretrained weights are published for {name}: pass --weights PATH, "
                              f"or put the file at weights/{local_name(name)}")
    try:
        return download(name, cache_dir=cache_dir)
    except WeightsNotFound as e:
        raise WeightsNotFound(f"{e}, or pass --weights PATH") from None

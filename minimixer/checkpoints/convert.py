"""One way in for every Mixer checkpoint: timm safetensors, MMPretrain .pth, JAX .npz.

    python -m minimixer.weights convert SRC --out DST.safetensors

detects SRC's format, maps its keys to timm's names and layouts, and writes a safetensors
file that timm loads as it is, with what the model needs recorded in its metadata:

    source         'timm', 'mmpretrain' or 'jax': where the weights came from
    ln_eps, gelu   the numerics the source model ran with (1e-5/erf, 1e-6/tanh, ...)
    preprocessing  the registry's name for the source's input pipeline

and a file that `train` wrote also records what it was trained with (trained_metadata):

    img_size       the input size, JSON (224 or [h, w])
    data_config    the eval preprocessing, JSON {mean, std, crop_pct, interpolation, pipeline}
                   (where it has no name in PREPROCESSING)
    classes        the class names, JSON list, in output order
    model          the name it was trained as

load_weights and every --weights flag read that metadata (and the original files too), so
a converted MMPretrain file reproduces MMPretrain's logits with no extra flags.
"""
import json
import math
import os
import struct
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
import safetensors
import safetensors.numpy

from ..backend import float_dtype, to_backend
from ..config import PRESETS, MixerConfig, param_shapes
from ..layers import GELU_FORMS
from . import jax as jax_format
from . import mmpretrain
from .pth import read_pth
from .preprocessing import PREPROCESSING, DataConfig
from .safetensors_io import (atomic_write_bytes, check_finite, check_state_dict, open_regular_file,
                             read_safetensors)

# what each source's own model runs with, and its input pipeline (registry.PREPROCESSING)
SOURCES = {
    "timm": dict(ln_eps=1e-6, gelu="erf", preprocessing=None),  # None: the model tag's own
    "mmpretrain": dict(ln_eps=mmpretrain.LN_EPS, gelu=mmpretrain.GELU, preprocessing="mmpretrain"),
    "jax": dict(ln_eps=jax_format.LN_EPS, gelu=jax_format.GELU, preprocessing="google"),
}


FORMATS = {"safetensors": "a safetensors file", "pth": "a torch .pth", "npz": "a NumPy .npz"}  # for messages


class NumericsWarning(UserWarning):
    """The config's ln_eps/gelu differ from those the weights were made with."""


class CheckpointNote(UserWarning):
    """What was read from a training checkpoint, and what was left (optimizer state, EMA weights)."""


# DataParallel's and torch.compile's wrappers prefix every key (timm's clean_state_dict strips them)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Checkpoint:
    path: str
    format: str  # 'safetensors', 'pth' or 'npz'
    params: dict  # timm name -> array (or, read with load=False, anything with a .shape)
    source: str  # a key of SOURCES
    ln_eps: float | None  # None: not recorded (a plain timm file)
    gelu: str | None
    preprocessing: str | None
    notes: tuple = ()  # what a training checkpoint held besides the weights read (CheckpointNote)
    img_size: int | tuple | None = None  # recorded by train (trained_metadata)
    data: DataConfig | None = None  # the recorded preprocessing, where it has no name
    classes: list | None = None  # the recorded class names

    @property
    def recorded(self):
        """The numerics the file says its model needs, as MixerConfig fields."""
        return {k: v for k, v in (("ln_eps", self.ln_eps), ("gelu", self.gelu)) if v is not None}


def detect_format(path):
    """'safetensors', 'pth' or 'npz' from the file's first bytes (not its name); ValueError otherwise."""
    path = os.fspath(path)
    try:  # regular files only: /dev/zero would never end and a FIFO would block
        f = open_regular_file(path)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    with f:
        head = f.read(9)
    if path.endswith(".safetensors") and head[:4] != b"PK\x03\x04":
        return "safetensors"  # whatever is wrong with it, the safetensors reader says
    if not head:
        raise ValueError(f"{path}: empty file")
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
            raise ValueError(f"{path}: a damaged or truncated zip archive ({e})") from None
        if any(n.endswith("data.pkl") and n.count("/") == 1 for n in names):
            return "pth"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise ValueError(f"{path}: a zip archive that is neither a torch .pth nor a .npz of arrays")
    if len(head) == 9 and head[8:9] == b"{" and 1 < struct.unpack("<Q", head[:8])[0] < os.path.getsize(path):
        return "safetensors"
    if head[:3] == b"\x80\x02\x8a":  # torch < 1.6: a pickled magic number, no zip; read_pth says what to do
        return "pth"
    raise ValueError(f"{path}: unknown format: not safetensors, a torch .pth or a JAX .npz")


def select_state_dict(obj, path, use_ema=False):
    """(state dict, notes) from what a .pth holds, as timm's load_checkpoint picks it: a bare
    state dict, or a training checkpoint's 'state_dict' ('model'), or with use_ema its
    'state_dict_ema' ('model_ema'). Unlike timm, use_ema on a file without EMA weights is an
    error, not a silent fallback."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    names = ("state_dict_ema", "model_ema") if use_ema else ("state_dict", "model")
    key = next((k for k in names if isinstance(obj.get(k), dict)), None)
    if use_ema and key is None:
        raise ValueError(f"{path}: --use-ema: the file holds no EMA weights (no 'state_dict_ema' entry)")
    if key is None:
        return obj, ()
    held = []
    if not use_ema and isinstance(obj.get("state_dict_ema") or obj.get("model_ema"), dict):
        held.append("EMA weights (read them with --use-ema)")
    if "optimizer" in obj:
        held.append("optimizer state (not used)")
    notes = ()
    if held:
        epoch = obj.get("epoch")
        what = f"a training checkpoint (epoch {epoch})" if isinstance(epoch, int) else "a training checkpoint"
        notes = (f"{path}: {what}: read its {key!r}; it also holds {' and '.join(held)}",)
    return obj[key], notes


def strip_wrapper_prefixes(state, path):
    """Keys without DataParallel's 'module.' and torch.compile's '_orig_mod.' (in any nesting);
    ValueError for a key that is not a string or that two keys would both become."""
    out = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(f"{path}: its state dict has the key {key!r} (a {type(key).__name__}), "
                             "not a tensor name: not a model's state dict")
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in out:
            raise ValueError(f"{path}: {key!r} and another key both name {name!r}")
        out[name] = value
    return out


def read_checkpoint(path, *, load=True, use_ema=False):
    """A Checkpoint of any supported format, its params under timm's names and layouts.
    load=False reads names and shapes only. use_ema: a timm training checkpoint's EMA weights.
    ValueError (one line, naming the file) if it is not a Mixer checkpoint of a known format."""
    path = os.fspath(path)
    fmt = detect_format(path)
    if use_ema and fmt != "pth":
        raise ValueError(f"{path}: --use-ema: {FORMATS[fmt]} holds one set of weights; EMA weights come in "
                         "timm's training checkpoints (.pth.tar)")
    if fmt == "safetensors":
        params, meta = _read_safetensors(path, load)
        params = strip_wrapper_prefixes(params, path)
        source = meta.get("source", "timm")
        if source not in SOURCES:
            raise ValueError(f"{path}: metadata names an unknown source {source!r}")
        try:
            ln_eps = float(meta["ln_eps"]) if "ln_eps" in meta else None
        except ValueError:
            ln_eps = -1.0
        if ln_eps is not None and not 0 < ln_eps < math.inf:
            raise ValueError(f"{path}: metadata ln_eps {meta['ln_eps']!r} is not a positive number")
        if meta.get("gelu") not in (None, *GELU_FORMS):
            raise ValueError(f"{path}: metadata gelu {meta['gelu']!r} is not one of {GELU_FORMS}")
        return Checkpoint(path, fmt, params, source, ln_eps, meta.get("gelu"), meta.get("preprocessing"),
                          **_trained_fields(meta, path))
    notes = ()
    if fmt == "pth":
        state, notes = select_state_dict(read_pth(path, load=load), path, use_ema)
        state = strip_wrapper_prefixes(state, path)
        if not all(hasattr(v, "shape") for v in state.values()):
            raise ValueError(f"{path}: holds no state dict of tensors (expected a dict, or {{'state_dict': dict}})")
        if mmpretrain.is_mmpretrain(state):
            source, params = "mmpretrain", mmpretrain.to_timm(state, path)
        elif "stem.proj.weight" in state:  # timm's own .pth releases use timm's names
            source, params = "timm", dict(state)
        else:
            raise ValueError(f"{path}: a .pth, but not an MLP-Mixer from MMPretrain or timm "
                             f"(keys like {', '.join(map(repr, list(state)[:3]))})")
    else:
        arrays = jax_format.read_npz(path, load=False)  # headers first: keys and sizes before any data
        if not jax_format.is_jax(arrays):
            raise ValueError(f"{path}: a .npz, but not a JAX MLP-Mixer checkpoint (no stem/kernel; "
                             f"keys like {', '.join(map(repr, list(arrays)[:3]))})")
        jax_format.to_timm(arrays, path)  # unknown keys are named now, before anything is decompressed
        if load:
            arrays = jax_format.read_npz(path)
        else:
            arrays = {k: _Shape(jax_format.torch_shape(shape, jax_format.timm_name(k)[1]))
                      for k, (shape, _) in arrays.items()}
        source, params = "jax", jax_format.to_timm(arrays, path)
    numerics = SOURCES[source]
    recorded = (numerics["ln_eps"], numerics["gelu"]) if source != "timm" else (None, None)
    return Checkpoint(path, fmt, params, source, *recorded, numerics["preprocessing"], notes)


def _json_entry(meta, key, path, check, says):
    if key not in meta:
        return None
    try:
        value = json.loads(meta[key])
    except ValueError:
        value = check = None
    if check is None or not check(value):
        raise ValueError(f"{path}: metadata {key} {meta[key][:80]!r} is not {says}")
    return value


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 20


def _numbers(v, positive=False):
    return (isinstance(v, list) and 0 < len(v) <= 16 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 or not positive)
        for x in v))


_INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box")


def _data_config_ok(d):
    return (isinstance(d, dict) and set(d) == {"mean", "std", "crop_pct", "interpolation", "pipeline"}
            and _numbers(d["mean"]) and _numbers(d["std"], positive=True) and len(d["mean"]) == len(d["std"])
            and isinstance(d["crop_pct"], (int, float)) and not isinstance(d["crop_pct"], bool)
            and 0 < d["crop_pct"] <= 1 and d["interpolation"] in _INTERPOLATIONS
            and d["pipeline"] in ("timm", "mmpretrain"))


def _trained_fields(meta, path):
    """img_size, data and classes from what train records (trained_metadata), each checked."""
    size = _json_entry(meta, "img_size", path, lambda v: _positive_int(v) or (
        isinstance(v, list) and len(v) == 2 and all(map(_positive_int, v))), "an image size")
    data = _json_entry(meta, "data_config", path, _data_config_ok, "a preprocessing (mean, std, crop_pct, "
                       f"interpolation in {_INTERPOLATIONS}, pipeline)")
    classes = _json_entry(meta, "classes", path, lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
                          "a list of class names")
    if data is not None:
        data = DataConfig(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"])})
    return {"img_size": tuple(size) if isinstance(size, list) else size, "data": data, "classes": classes}


def trained_metadata(cfg, model=None, data=None):
    """The metadata train writes into model.safetensors, so that eval and predict run the model
    as it was trained and evaluated: its numerics, input size, preprocessing and class names.
    data: the run's data info, with 'preprocessing' (a PREPROCESSING name or DataConfig fields)
    and 'classes'."""
    meta = {"source": "timm", "ln_eps": repr(cfg.ln_eps), "gelu": cfg.gelu,
            "img_size": json.dumps(list(cfg.img_size) if isinstance(cfg.img_size, tuple) else cfg.img_size)}
    if model:
        meta["model"] = model
    pre, classes = (data or {}).get("preprocessing"), (data or {}).get("classes")
    if isinstance(pre, str):
        meta["preprocessing"] = pre
    elif isinstance(pre, dict):
        meta["data_config"] = json.dumps(pre)
    if classes:
        meta["classes"] = json.dumps(list(classes))
    return meta


def _float_dtype(a):
    """Keep a float array's precision; anything else becomes float32."""
    return a.dtype if a.dtype in (np.float16, np.float32, np.float64) else np.float32


@dataclass(frozen=True)
class _Shape:
    shape: tuple


def _read_safetensors(path, load):
    if load:  # the reader checks everything and says what is wrong
        return read_safetensors(path), _safetensors_metadata(path)
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        header = f.read(min(size, 100_000_000))
    try:
        info = json.loads(header)
        meta = info.pop("__metadata__", None) or {}
        shapes = {k: _Shape(tuple(v["shape"])) for k, v in info.items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ValueError(f"{path}: not a readable safetensors file (bad header)") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: safetensors metadata is not a mapping")
    return shapes, {k: v for k, v in meta.items() if isinstance(v, str)}  # the format allows only strings


def _safetensors_metadata(path):
    try:
        with safetensors.safe_open(path, framework="np") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


# --- configs from shapes --------------------------------------------------------------------

def infer_config(ck, img_size=None):
    """The MixerConfig whose parameter shapes are the checkpoint's, with its recorded numerics.
    Shapes give the number of patches, not the grid's aspect: img_size, if it fits, says it;
    otherwise the grid is taken to be square."""
    p, path = ck.params, ck.path

    def shape(name):
        if name not in p:
            raise ValueError(f"{path}: no {name}: not a complete MLP-Mixer checkpoint")
        return tuple(p[name].shape)

    stem = shape("stem.proj.weight")
    if len(stem) != 4 or stem[2] != stem[3]:
        raise ValueError(f"{path}: stem.proj.weight has shape {stem}, expected (D, C, P, P)")
    D, C, P = stem[0], stem[1], stem[2]
    blocks = {int(k.split(".")[1]) for k in p if k.startswith("blocks.")}
    tok, chan = shape("blocks.0.mlp_tokens.fc1.weight"), shape("blocks.0.mlp_channels.fc1.weight")
    N, DS, DC = tok[1], tok[0], chan[0]
    fields = dict(num_classes=shape("head.weight")[0], in_chans=C, patch_size=P,
                  num_blocks=len(blocks), embed_dim=D, mlp_ratio=(DS / D, DC / D), **ck.recorded)
    fits = False
    if img_size is not None:
        h, w = img_size if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        fits = h % P == 0 and w % P == 0 and (h // P) * (w // P) == N
    if fits:
        fields["img_size"] = img_size
    elif math.isqrt(N) ** 2 == N:
        fields["img_size"] = math.isqrt(N) * P
    else:
        raise ValueError(f"{path}: {N} patches is not a square grid: give the model's image size")
    try:
        cfg = MixerConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    check_state_dict({k: v.shape for k, v in p.items()}, param_shapes(cfg), path)
    return cfg


def describe(cfg):
    """'Mixer-B/16 (mixer_b16_224): 12 blocks, width 768, 1000 classes' or the numbers alone."""
    name = preset_of(cfg)
    shape = f"{cfg.num_blocks} blocks, width {cfg.embed_dim}, patch {cfg.patch_size}, " \
            f"{cfg.image_hw[0]}x{cfg.image_hw[1]} input, {cfg.num_classes} classes"
    return f"{name} ({shape})" if name else f"a Mixer with {shape}"


def preset_of(cfg):
    """The preset with cfg's geometry (ignoring classes and numerics), or None."""
    for name, fields in PRESETS.items():
        ref = MixerConfig(**{**fields, "num_classes": cfg.num_classes})
        if param_shapes(ref) == param_shapes(cfg.replace(ln_eps=ref.ln_eps, gelu=ref.gelu)):
            return name
    return None


def read_for(path, cfg, use_ema=False):
    """load_weights' reader: {timm name: array} from a file of any format, checked to be the
    variant cfg describes (one line naming both otherwise). Warns (NumericsWarning) when the
    file records other numerics than cfg's, and says (CheckpointNote) what a training
    checkpoint held besides the weights read."""
    ck = read_checkpoint(path, use_ema=use_ema)
    for note in ck.notes:
        warnings.warn(note, CheckpointNote, stacklevel=3)
    held = _geometry(ck)
    # another width or patch size misshapes every tensor: name the variant, not 50 keys
    if ck.format != "safetensors" or (held is not None and held[1:3] != (cfg.embed_dim, cfg.patch_size)):
        _check_variant(ck, cfg)
    check_numerics(ck, cfg)
    return ck.params


def _check_variant(ck, cfg):
    try:
        file_cfg = infer_config(ck, img_size=cfg.img_size)
    except ValueError:  # not a whole Mixer, or a grid that cfg's image size does not make
        held = _geometry(ck)
        if held is not None and held != (cfg.num_blocks, cfg.embed_dim, cfg.patch_size, cfg.num_patches,
                                         cfg.num_classes):
            raise ValueError(f"{ck.path} holds a Mixer with {held[0]} blocks, width {held[1]}, patch {held[2]}, "
                             f"{held[3]} patches, {held[4]} classes; the model asked for is {describe(cfg)}") from None
        return  # the strict shape check names what is wrong
    if param_shapes(file_cfg) != param_shapes(cfg):
        raise ValueError(f"{ck.path} holds {describe(file_cfg)}; the model asked for is {describe(cfg)}")


def _geometry(ck):
    """(blocks, width, patch, patches, classes) from the shapes, or None."""
    try:
        p = ck.params
        blocks = len({k.split(".")[1] for k in p if k.startswith("blocks.")})
        return (blocks, p["stem.proj.weight"].shape[0], p["stem.proj.weight"].shape[2],
                p["blocks.0.mlp_tokens.fc1.weight"].shape[1], p["head.weight"].shape[0])
    except (KeyError, ValueError, IndexError, AttributeError):
        return None


def check_numerics(ck, cfg):
    differ = {k: v for k, v in ck.recorded.items() if getattr(cfg, k) != v}
    if differ:
        want = ", ".join(f"{k}={v!r}" for k, v in differ.items())
        have = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in differ)
        warnings.warn(f"{ck.path} ({ck.source}) was made for {want}; running with {have} moves the logits "
                      f"(cfg.replace({want}) reproduces the source)", NumericsWarning, stacklevel=3)


def load_weights(path, cfg, *, dtype="float32", backend="numpy", allow_nonfinite=False, use_ema=False):
    """Load a Mixer checkpoint (timm safetensors or .pth, timm's training checkpoints, MMPretrain
    .pth, JAX .npz) into a flat dict keyed by timm's names, checked against cfg. use_ema: a
    timm training checkpoint's EMA weights (timm's validate.py --use-ema).

    A tensor with NaN or Inf (also one that overflows `dtype`, e.g. 1e5 in float16) is an
    error unless allow_nonfinite is set."""
    dtype = float_dtype(dtype)
    tensors = read_for(path, cfg, use_ema)
    expected = param_shapes(cfg)
    check_state_dict({k: v.shape for k, v in tensors.items()}, expected, os.fspath(path))
    # astype copies, so every array is writable and owns its memory (not the file buffer)
    with np.errstate(over="ignore"):  # an overflow to inf is reported by name just below
        params = {k: tensors[k].astype(dtype) for k in expected}
    if not allow_nonfinite:
        check_finite(params, os.fspath(path))
    return to_backend(params, backend)


def config_for_file(path, cfg):
    """cfg with the weights file's recorded numerics, input size and number of classes: what
    --weights FILE implies before any explicit flag."""
    ck = read_checkpoint(path, load=False)
    head = ck.params.get("head.weight")
    classes = {"num_classes": head.shape[0]} if head is not None and len(head.shape) == 2 else {}
    size = {"img_size": ck.img_size} if ck.img_size is not None else {}
    return cfg.replace(**ck.recorded, **classes, **size)


def load_checkpoint(path, cfg=None, *, dtype="float32", backend="numpy", use_ema=False):
    """(params, cfg) from a file of any format. cfg=None: the config comes from the file's
    shapes and metadata; a given cfg takes the file's numerics (ln_eps, gelu) where it records
    them and its number of classes, and is checked to be the same variant."""
    cfg = infer_config(read_checkpoint(path, load=False)) if cfg is None else config_for_file(path, cfg)
    return load_weights(path, cfg, dtype=dtype, backend=backend, use_ema=use_ema), cfg


# --- writing --------------------------------------------------------------------------------

def convert(src, dst, *, like=None, preprocessing=None, img_size=None, ln_eps=None, gelu=None, use_ema=False):
    """Write src (any format) as a timm-named safetensors file with the metadata above, atomically.
    like: the MixerConfig the file must be (an error names the variant otherwise; the number of
    classes may differ); img_size: the input size, where the patch grid is not square; ln_eps,
    gelu: the numerics to record where the file does not say (a plain timm file is taken to be
    timm's 1e-6, erf). Returns (Checkpoint, MixerConfig)."""
    ck = read_checkpoint(src, use_ema=use_ema)
    cfg = infer_config(ck, img_size=img_size or (like.img_size if like else None))
    try:
        cfg = cfg.replace(**{k: v for k, v in (("ln_eps", ln_eps), ("gelu", gelu)) if v is not None})
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    if like is not None and param_shapes(like.replace(num_classes=cfg.num_classes)) != param_shapes(cfg):
        raise ValueError(f"{src} holds {describe(cfg)}, not {describe(like)}")
    preprocessing = preprocessing or ck.preprocessing
    if preprocessing is not None and preprocessing not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {preprocessing!r}; known: {', '.join(PREPROCESSING)}")
    arrays = {k: np.ascontiguousarray(ck.params[k], dtype=_float_dtype(ck.params[k])) for k in param_shapes(cfg)}
    meta = {"format": "pt", "source": ck.source, "ln_eps": repr(cfg.ln_eps), "gelu": cfg.gelu}
    if preprocessing:
        meta["preprocessing"] = preprocessing
    if preset_of(cfg):
        meta["model"] = preset_of(cfg)
    atomic_write_bytes(dst, safetensors.numpy.save(arrays, metadata=meta))
    return ck, cfg

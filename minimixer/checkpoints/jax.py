"""Google's original MLP-Mixer checkpoints (google-research/vision_transformer, JAX/Flax).

The .npz files (e.g. imagenet1k/Mixer-B_16.npz) hold Flax's parameter tree
flattened with '/'. Convolution kernels are HWIO and Dense kernels (in, out), where timm
(and minimixer) keep PyTorch's OIHW and (out, in). Numerics of the original model
(vit_jax/models_mixer.py): flax.linen.gelu, which is the tanh approximation, and Flax's
LayerNorm eps 1e-6. (timm runs the same weights with the exact, erf GELU.)
"""
import math
import os
import re
import zipfile

import numpy as np

LN_EPS = 1e-6
GELU = "tanh"

_BLOCK = re.compile(r"MixerBlock_(\d+)/(.+)")
_IN_BLOCK = {"LayerNorm_0/scale": "norm1.weight", "LayerNorm_0/bias": "norm1.bias",
             "LayerNorm_1/scale": "norm2.weight", "LayerNorm_1/bias": "norm2.bias",
             "token_mixing/Dense_0/kernel": "mlp_tokens.fc1.weight", "token_mixing/Dense_0/bias": "mlp_tokens.fc1.bias",
             "token_mixing/Dense_1/kernel": "mlp_tokens.fc2.weight", "token_mixing/Dense_1/bias": "mlp_tokens.fc2.bias",
             "channel_mixing/Dense_0/kernel": "mlp_channels.fc1.weight",
             "channel_mixing/Dense_0/bias": "mlp_channels.fc1.bias",
             "channel_mixing/Dense_1/kernel": "mlp_channels.fc2.weight",
             "channel_mixing/Dense_1/bias": "mlp_channels.fc2.bias"}
_TOP = {"stem/kernel": "stem.proj.weight", "stem/bias": "stem.proj.bias",
        "pre_head_layer_norm/scale": "norm.weight", "pre_head_layer_norm/bias": "norm.bias",
        "head/kernel": "head.weight", "head/bias": "head.bias"}
_PREFIXES = ("params/", "opt/target/")  # some trees are saved one level down
_NDIM = {"hwio": 4, "dense": 2}


def timm_name(key):
    """(timm name, how to lay the array out) for a Flax key, or (None, None)."""
    for p in _PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
    if key in _TOP:
        name = _TOP[key]
    else:
        m = _BLOCK.fullmatch(key)
        if not m or m.group(2) not in _IN_BLOCK:
            return None, None
        name = f"blocks.{int(m.group(1))}.{_IN_BLOCK[m.group(2)]}"
    if key == "stem/kernel":
        return name, "hwio"
    return name, "dense" if key.endswith("/kernel") else "same"


def to_torch_layout(array, layout):
    if layout in _NDIM and array.ndim != _NDIM[layout]:
        raise ValueError(f"a {'convolution' if layout == 'hwio' else 'Dense'} kernel of shape {array.shape}")
    if layout == "hwio":  # (P, P, C, D) -> (D, C, P, P)
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    if layout == "dense":  # (in, out) -> (out, in)
        return np.ascontiguousarray(array.T)
    return array


# A deflated entry may not inflate more than this (real weights compress by a few percent; a
# bomb of zeros by 1000x), above a size under which it does not matter.
MAX_RATIO, RATIO_FLOOR = 100, 1 << 24


def read_npz(path, *, load=True):
    """{Flax key: array} from a .npz, never unpickling (allow_pickle=False). load=False reads
    only the headers: {key: (shape, dtype)}. Every entry's header is read and checked against
    its size in the archive before any entry is decompressed, so a small file cannot inflate
    to more than it declares, nor declare more than it holds."""
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if len(set(names)) != len(names):
                raise ValueError(f"{path}: an archive with two entries of one name: forged")
            headers = {n[:-len(".npy")]: _npy_header(path, zf, n) for n in zf.namelist() if n.endswith(".npy")}
            if not load:
                return {k: (shape, dtype) for k, (shape, dtype, _) in headers.items()}
            return {k: _npy_data(path, zf, k + ".npy", header) for k, header in headers.items()}
    except ValueError as e:
        if str(e).startswith(f"{path}: "):
            raise
        raise ValueError(f"{path}: not a readable .npz ({str(e)[:160]}): truncated, or not a JAX checkpoint") from None
    except Exception as e:  # noqa: BLE001 - zipfile's and NumPy's parsers raise many kinds; all mean damage
        if isinstance(e, OSError) and not os.path.isfile(path):
            raise  # missing or unreadable: as is
        raise ValueError(f"{path}: not a readable .npz ({str(e)[:160]}): truncated, or not a JAX checkpoint") from None


def _npy_header(path, zf, name):
    """(shape, dtype, header length) of one entry, from its first bytes only; checked against
    the entry's size in the archive and its compression ratio."""
    info = zf.getinfo(name)
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)  # the header only, not the data
        header_len = f.tell()
    key = name[:-len(".npy")]
    if dtype.hasobject:
        raise ValueError(f"{path}: {key} holds Python objects, not numbers")
    declared = header_len + math.prod(shape) * dtype.itemsize
    if info.file_size != declared:
        raise ValueError(f"{path}: {key} declares shape {tuple(shape)} {dtype} ({declared} bytes with its header) "
                         f"but its entry holds {info.file_size} bytes: truncated or forged")
    if (info.compress_type != zipfile.ZIP_STORED and info.file_size > RATIO_FLOOR
            and info.file_size > MAX_RATIO * info.compress_size):
        raise ValueError(f"{path}: {key} would inflate {info.compress_size} bytes to {info.file_size} "
                         f"({info.file_size // max(info.compress_size, 1)}x), more than weights ever compress: refused")
    return tuple(shape), dtype, header_len


def _npy_data(path, zf, name, header):
    """One entry's array, read only after every header checked out; never more than declared."""
    with zf.open(name) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def is_jax(keys):
    return any(timm_name(k)[0] == "stem.proj.weight" for k in keys)


def to_timm(arrays, source):
    """{timm name: array in PyTorch's layout} from the Flax tree; ValueError naming the keys
    that are not a Mixer's."""
    out, unknown = {}, []
    for key, value in arrays.items():
        name, layout = timm_name(key)
        if name is None:
            unknown.append(key)
        else:
            try:
                out[name] = to_torch_layout(value, layout) if isinstance(value, np.ndarray) else value
            except ValueError as e:
                raise ValueError(f"{source}: {key}: {e}") from None
    if unknown:
        raise ValueError(f"{source}: not a JAX MLP-Mixer checkpoint: {len(unknown)} unknown key(s), "
                         f"e.g. {', '.join(map(repr, unknown[:3]))}")
    return out


def torch_shape(shape, layout):
    """The shape an array of Flax shape `shape` takes in PyTorch's layout (as is if it cannot)."""
    if layout in _NDIM and len(shape) != _NDIM[layout]:
        return tuple(shape)
    if layout == "hwio":
        return (shape[3], shape[2], shape[0], shape[1])
    if layout == "dense":
        return tuple(reversed(shape))
    return tuple(shape)

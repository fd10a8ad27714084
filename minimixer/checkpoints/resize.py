"""A Mixer at another image size: new token-mixing MLPs from the pretrained ones.

    params, cfg = resize(params, cfg, 448)                  # the math, on a params dict
    python -m minimixer.weights resize IN --img-size 448 --out OUT.safetensors

Every weight but the token MLPs' is independent of the image size; `mlp_tokens.fc1.weight` is
(DS, N) and `fc2.weight` (N, DS): tied to the number of patches N. Two ways to new ones:

- appendix_c (the paper's Appendix C; whenever each side of the patch grid grows by a whole
  factor, K×K in the paper): cut the new grid into parts the size of the old one and give each
  part its own copy of the pretrained token MLP (hidden width parts·DS). Token mixing then stays
  inside a part and every other layer acts per token, so the resized model's block outputs on each
  part are the old model's block outputs on that crop, and its logits the mean of the old logits
  on the parts. Fine-tuning then learns to mix across parts.
- resample (any size): read the token MLP's weights as images over the patch grid and resample
  them bilinearly (U: old grid -> new grid, half-pixel centres as torch's align_corners=False):
  fc2' = U·fc2, b2' = U·b2, fc1' = fc1·U⁺ (U⁺ the least-squares inverse of U), b1' = b1, hidden
  width DS kept. What it preserves, exactly: the new token MLP is the old one seen through U,
  mlp'(x') = U·mlp(U⁺·x'); so when the grid grows, mlp'(U·x) = U·mlp(x). What it does not: the
  LayerNorms and GELUs between the token MLPs do not commute with a bilinear U, so the model's
  logits on an upsampled image move (docs/transfer.md has the numbers).
"""
import json
import math

import numpy as np
import safetensors.numpy

from ..config import param_shapes
from .convert import Checkpoint, describe, infer_config, read_checkpoint
from .safetensors_io import atomic_write_bytes

METHODS = ("appendix_c", "resample")
TOKEN_KEYS = ("mlp_tokens.fc1.weight", "mlp_tokens.fc1.bias", "mlp_tokens.fc2.weight", "mlp_tokens.fc2.bias")


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def grid_factors(cfg, img_size):
    """(kh, kw) if the new patch grid is the old one times whole factors per side, else None."""
    (gh, gw), (nh, nw) = cfg.grid_size, cfg.replace(img_size=img_size).grid_size
    return (nh // gh, nw // gw) if nh % gh == 0 and nw % gw == 0 else None


def resize(params, cfg, img_size, method=None):
    """(params, cfg) for images of img_size (an int, or (H, W)). method: 'appendix_c' (needs whole
    grid factors; the default when they are), or 'resample'. Arrays other than the token MLPs' are
    shared with `params`, not copied."""
    try:
        new_cfg = cfg.replace(img_size=img_size)
    except ValueError as e:
        raise ValueError(f"--img-size {img_size}: {e}") from None
    factors = grid_factors(cfg, img_size)
    method = method or ("appendix_c" if factors else "resample")
    if method not in METHODS:
        raise ValueError(f"unknown resize method {method!r}; known: {', '.join(METHODS)}")
    if method == "appendix_c":
        if factors is None:
            (gh, gw), (nh, nw) = cfg.grid_size, new_cfg.grid_size
            raise ValueError(f"appendix_c needs the patch grid to grow by whole factors: {gh}x{gw} -> {nh}x{nw} "
                             "does not (use method 'resample')")
        return appendix_c(params, cfg, factors)
    return resample(params, cfg, new_cfg.grid_size)


def appendix_c(params, cfg, factors):
    """The paper's Appendix C on the spatial layout: (kh, kw) = (K, K) parts, each an old-size grid.

    Tokens are row-major over the new (kh·gh, kw·gw) grid, so a part's tokens are not a contiguous
    run of the sequence: token (r, c) belongs to part (r // gh, c // gw), where it sits at
    (r % gh, c % gw). Part p gets rows p·DS:(p+1)·DS of the new fc1 (its copy of W1 and b1,
    reading only the part's tokens) and writes only the part's tokens through its copy of W2 and b2:
    block-diagonal once the tokens are grouped by part.
    """
    (gh, gw), (kh, kw) = cfg.grid_size, factors
    DS, D = cfg.token_hidden, cfg.embed_dim
    rows, cols = np.divmod(np.arange(kh * gh * kw * gw), kw * gw)  # (N',) each new token's grid position
    part = (rows // gh) * kw + cols // gw  # (N',) which part it is in, parts in row-major order too
    out = dict(params)
    for i in range(cfg.num_blocks):
        W1, b1, W2, b2 = (params[f"blocks.{i}.{k}"] for k in TOKEN_KEYS)  # (DS, N) (DS,) (N, DS) (N,)
        parts = kh * kw
        W1n = np.zeros((parts * DS, parts * W1.shape[1]), W1.dtype)  # (K²·DS, N')
        W2n = np.zeros((parts * W2.shape[0], parts * DS), W2.dtype)  # (N', K²·DS)
        b2n = np.zeros(parts * b2.shape[0], b2.dtype)  # (N',)
        for p in range(parts):
            tokens = np.flatnonzero(part == p)  # (N,) ascending, so in the part's own row-major order
            hidden = np.arange(p * DS, (p + 1) * DS)  # (DS,) this copy's hidden units
            W1n[np.ix_(hidden, tokens)] = W1
            W2n[np.ix_(tokens, hidden)] = W2
            b2n[tokens] = b2
        out.update(zip((f"blocks.{i}.{k}" for k in TOKEN_KEYS), (W1n, np.tile(b1, parts), W2n, b2n)))
    new_cfg = cfg.replace(img_size=(kh * cfg.image_hw[0], kw * cfg.image_hw[1]) if kh != kw or
                          not isinstance(cfg.img_size, int) else kh * cfg.img_size,
                          mlp_ratio=(_ratio(kh * kw * DS, D), _pair(cfg.mlp_ratio)[1]))
    return out, new_cfg


def _ratio(hidden, width):
    """mlp_ratio r with int(r·width) == hidden, as timm computes the hidden width."""
    r = hidden / width
    while int(r * width) < hidden:  # hidden/width·width can round just below hidden
        r = math.nextafter(r, math.inf)
    return r


def bilinear_matrix(n_out, n_in):
    """(n_out, n_in): 1-D linear interpolation with half-pixel centres (torch's align_corners=False)."""
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)  # (n_out,) source coordinate
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m


def grid_resampler(old_grid, new_grid):
    """U (N', N): bilinear resampling of a row-major (gh, gw) map to (nh, nw), and U⁺ (N, N')."""
    U = np.kron(bilinear_matrix(new_grid[0], old_grid[0]), bilinear_matrix(new_grid[1], old_grid[1]))
    return U, np.linalg.pinv(U)


def resample(params, cfg, new_grid):
    """The alternative for any size: token MLP weights resampled as images (module docstring)."""
    U, U_pinv = grid_resampler(cfg.grid_size, new_grid)  # (N', N), (N, N')
    out = dict(params)
    for i in range(cfg.num_blocks):
        W1, b1, W2, b2 = (params[f"blocks.{i}.{k}"] for k in TOKEN_KEYS)  # (DS, N) (DS,) (N, DS) (N,)
        out.update(zip((f"blocks.{i}.{k}" for k in TOKEN_KEYS), (
            (W1 @ U_pinv).astype(W1.dtype),  # (DS, N'): reads a resampled input as W1 read the original
            b1,  # (DS,)
            (U @ W2).astype(W2.dtype),  # (N', DS): each hidden unit's output map, resampled
            (U @ b2).astype(b2.dtype),  # (N',)
        )))
    gh, gw = new_grid
    size = gh * cfg.patch_size if gh == gw else (gh * cfg.patch_size, gw * cfg.patch_size)
    return out, cfg.replace(img_size=size)


# --- files ----------------------------------------------------------------------------------

def resize_file(src, dst, img_size, *, like=None, method=None):
    """Read src (any format), resize it, write dst (timm-named safetensors, atomically) with its
    numerics, image size and how it was made in the metadata. like: the MixerConfig src must be
    (its image size says the old grid's shape). Returns (old cfg, new cfg, method)."""
    ck = read_checkpoint(src)
    cfg = infer_config(ck, img_size=like.img_size if like else None)
    if like is not None and param_shapes(like.replace(num_classes=cfg.num_classes)) != param_shapes(cfg):
        raise ValueError(f"{src} holds {describe(cfg)}, not {describe(like)}")
    if cfg.grid_size == cfg.replace(img_size=img_size).grid_size:
        raise ValueError(f"{src} is already made for {img_size} px (a {cfg.grid_size[0]}x{cfg.grid_size[1]} grid)")
    method = method or ("appendix_c" if grid_factors(cfg, img_size) else "resample")
    params = {k: np.asarray(ck.params[k]) for k in param_shapes(cfg)}
    params, new_cfg = resize(params, cfg, img_size, method)
    arrays = {k: np.ascontiguousarray(v) for k, v in params.items()}
    h, w = new_cfg.image_hw
    meta = {"format": "pt", "source": ck.source, "ln_eps": repr(cfg.ln_eps), "gelu": cfg.gelu,
            "img_size": json.dumps(h if h == w else [h, w]), "resized": f"{method} from {describe(cfg)}"}
    if ck.preprocessing:
        meta["preprocessing"] = ck.preprocessing
    atomic_write_bytes(dst, safetensors.numpy.save(arrays, metadata=meta))
    return cfg, new_cfg, method


# --- train --init-from FILE --img-size S ------------------------------------------------------

def _file_config(path, tensors):
    ck = Checkpoint(path, "safetensors", tensors, "timm", None, None, None)
    return infer_config(ck)  # its grid taken to be square


def _token_inputs(tensors):
    w = tensors.get("blocks.0.mlp_tokens.fc1.weight")
    return w.shape[1] if w is not None and len(w.shape) == 2 else None


def resized_config(path, cfg):
    """cfg with the token hidden width that resizing the weights file at path to cfg's image size
    gives (K²·DS for Appendix C); cfg itself if the file is made for cfg's number of patches or is
    not a whole Mixer (the shape check that follows says what is wrong)."""
    shapes = read_checkpoint(path, load=False).params
    if _token_inputs(shapes) in (None, cfg.num_patches):
        return cfg
    try:
        file_cfg = _file_config(path, shapes)
    except ValueError:
        return cfg
    factors = grid_factors(file_cfg, cfg.img_size)
    parts = factors[0] * factors[1] if factors else 1
    return cfg.replace(mlp_ratio=(_ratio(parts * file_cfg.token_hidden, cfg.embed_dim), _pair(cfg.mlp_ratio)[1]))


def fit_to(tensors, cfg, path):
    """(tensors, note): tensors read from path, resized to cfg's image size if they were made for
    another one (Appendix C where the grid grows by whole factors, else resample); note says so."""
    if _token_inputs(tensors) in (None, cfg.num_patches):
        return tensors, None
    file_cfg = _file_config(path, tensors)
    resized, new_cfg = resize(tensors, file_cfg, cfg.img_size)
    method = "appendix_c" if grid_factors(file_cfg, cfg.img_size) else "resample"
    (h, w), (nh, nw) = file_cfg.image_hw, new_cfg.image_hw
    return resized, (f"resized {path} from {h}x{w} to {nh}x{nw} px by {method} "
                     f"(token hidden {file_cfg.token_hidden} -> {new_cfg.token_hidden}; docs/transfer.md)")

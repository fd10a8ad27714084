"""The whole MLP-Mixer: stem, blocks, norm, pooling, head. Backward is forward in reverse.

    logits, cache = mixer_forward(params, x, cfg)
    dx, grads = mixer_backward(dlogits, cache)
    logits = predict(params, x, cfg)            # inference: keeps nothing for backward

Features, named and laid out as timm's MlpMixer methods, each with its backward:

    feats, cache = forward_features(params, x, cfg)                  # (B, N, D), after the final norm
    pooled, hcache = forward_head(params, feats, cfg, pre_logits=True)  # (B, D): a linear probe's input
    blocks, cache = forward_intermediates(params, x, cfg, indices=[2, 5], intermediates_only=True)
    dx, grads = backward_intermediates(None, dblocks, cache)         # each (B, D, H/P, W/P), timm's NCHW

Training regularizers (timm's drop_path_rate and drop_rate) apply only when
mixer_forward gets a NumPy Generator `rng`; without one it is the eval forward.

`params` is a flat dict keyed by timm's own names ("stem.proj.weight",
"blocks.0.norm1.weight", ...); `grads` has exactly the same keys.

Shape legend: B batch, C in_chans, H W image size, N tokens, D embed_dim, K classes.
"""
from .backend import get_xp
from .layers import (
    BLOCK_KEYS,
    dropout_backward,
    dropout_forward,
    linear_backward,
    linear_forward,
    layernorm_backward,
    layernorm_forward,
    mean_pool_backward,
    mean_pool_forward,
    mixer_block_backward,
    mixer_block_forward,
    patch_embed_backward,
    patch_embed_forward,
)


def block_params(params, i):
    """Block i's parameters, keyed as in timm's MixerBlock (BLOCK_KEYS)."""
    return {k: params[f"blocks.{i}.{k}"] for k in BLOCK_KEYS}


def mixer_forward(params, x, cfg, *, drop_path_rate=0.0, drop_rate=0.0, rng=None):
    """Inputs:  params (timm names), x (B, C, H, W) images, cfg a MixerConfig;
             training only: drop_path_rate (stochastic depth on every residual branch),
             drop_rate (dropout before the head), rng a numpy.random.Generator
    Returns: logits (B, K), cache = (features_cache, head_cache)
    """
    feats, features_cache = forward_features(params, x, cfg, drop_path_rate=drop_path_rate, rng=rng)  # (B, N, D)
    logits, head_cache = forward_head(params, feats, cfg, drop_rate=drop_rate, rng=rng)  # (B, K)
    return logits, (features_cache, head_cache)


def mixer_backward(dlogits, cache):
    """Inputs:  dlogits (B, K), the cache from mixer_forward
    Returns: dx (B, C, H, W), grads (a dict with the same keys as params)
    """
    features_cache, head_cache = cache
    dfeats, grads = backward_head(dlogits, head_cache)  # (B, N, D)
    dx, feature_grads = backward_features(dfeats, features_cache)  # (B, C, H, W)
    return dx, {**feature_grads, **grads}


# ----------------------------------------------------------------------------
# features, named as timm's MlpMixer methods: forward = forward_head(forward_features(x))

def forward_features(params, x, cfg, *, drop_path_rate=0.0, rng=None):
    """Stem, blocks and the final LayerNorm: one D-vector per token (timm's forward_features).

    Inputs:  params, x (B, C, H, W), cfg; drop_path_rate and rng as in mixer_forward
    Returns: feats (B, N, D), cache = (stem_cache, block_caches, norm_cache)
    """
    x = check_input(params, x, cfg)
    h, stem_cache = patch_embed_forward(x, params["stem.proj.weight"], params["stem.proj.bias"], cfg.patch_size)  # (B, N, D)
    block_caches = []
    for i in range(cfg.num_blocks):
        h, block_cache = mixer_block_forward(h, block_params(params, i), cfg.ln_eps, cfg.gelu,
                                             drop_path_rate, rng)  # (B, N, D)
        block_caches.append(block_cache)
    feats, norm_cache = layernorm_forward(h, params["norm.weight"], params["norm.bias"], cfg.ln_eps)  # (B, N, D)
    return feats, (stem_cache, block_caches, norm_cache)


def backward_features(dfeats, cache):
    """Inputs:  dfeats (B, N, D), the cache from forward_features
    Returns: dx (B, C, H, W), grads of the stem, every block and the final norm (timm names)
    """
    stem_cache, block_caches, norm_cache = cache
    grads = {}
    dh, grads["norm.weight"], grads["norm.bias"] = layernorm_backward(dfeats, norm_cache)  # (B, N, D)
    dh = _blocks_backward(dh, block_caches, grads)  # (B, N, D)
    dx, grads["stem.proj.weight"], grads["stem.proj.bias"] = patch_embed_backward(dh, stem_cache)  # (B, C, H, W)
    return dx, grads


def _blocks_backward(dh, block_caches, grads, dtaps=None):
    """Back through the blocks, last to first; dtaps {i: (B, N, D)} joins after block i."""
    for i in reversed(range(len(block_caches))):
        if dtaps and i in dtaps:
            dh = dh + dtaps[i]  # (B, N, D)
        dh, block_grads = mixer_block_backward(dh, block_caches[i])  # (B, N, D)
        grads.update({f"blocks.{i}.{k}": g for k, g in block_grads.items()})
    return dh


def forward_head(params, feats, cfg, *, pre_logits=False, drop_rate=0.0, rng=None):
    """Mean over tokens, then the classifier (timm's forward_head).

    Inputs:  feats (B, N, D) from forward_features; pre_logits=True stops before the
             classifier (the pooled features for a linear probe); drop_rate and rng as in mixer_forward
    Returns: logits (B, K), or pooled (B, D) with pre_logits; cache = (pool_cache, drop_cache, head_cache)
    """
    pooled, pool_cache = mean_pool_forward(feats)  # (B, D)
    pooled, drop_cache = dropout_forward(pooled, drop_rate, rng)  # (B, D)
    if pre_logits:
        return pooled, (pool_cache, drop_cache, None)
    logits, head_cache = linear_forward(pooled, params["head.weight"], params["head.bias"])  # (B, K)
    return logits, (pool_cache, drop_cache, head_cache)


def backward_head(dout, cache):
    """Inputs:  dout (B, K), or (B, D) for pre_logits; the cache from forward_head
    Returns: dfeats (B, N, D), grads {"head.weight", "head.bias"} (empty for pre_logits)
    """
    pool_cache, drop_cache, head_cache = cache
    grads = {}
    dpooled = dout  # (B, D) for pre_logits
    if head_cache is not None:
        dpooled, grads["head.weight"], grads["head.bias"] = linear_backward(dout, head_cache)  # (B, D)
    dpooled = dropout_backward(dpooled, drop_cache)  # (B, D)
    return mean_pool_backward(dpooled, pool_cache), grads  # (B, N, D)


def take_indices(num_blocks, indices):
    """timm's feature_take_indices: None -> every block, n -> the last n, a list -> those
    (negative ones count from the end)."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"indices={indices}: the last n blocks needs 1 <= n <= {num_blocks}")
        return list(range(num_blocks - indices, num_blocks))
    taken = []
    for i in indices:
        j = num_blocks + i if i < 0 else i
        if not 0 <= j < num_blocks:
            raise ValueError(f"block index {i} is out of range for {num_blocks} blocks")
        taken.append(j)
    if not taken:
        raise ValueError("indices is empty: name at least one block")
    return taken


def forward_intermediates(params, x, cfg, indices=None, *, norm=False, stop_early=False,
                          output_fmt="NCHW", intermediates_only=False):
    """Every chosen block's output, as timm's forward_intermediates (timm >= 1.0).

    Inputs:  indices: None (every block), n (the last n) or a list of block numbers;
             norm: pass each through the final LayerNorm; stop_early: skip the blocks after the last
             one taken; output_fmt 'NCHW' (timm's default: (B, D, H/P, W/P)) or 'NLC' ((B, N, D))
    Returns: (feats (B, N, D), intermediates) or, with intermediates_only, intermediates
             (a list, one per index); cache = (stem_cache, block_caches, taps, norm_cache, fmt)
    """
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    take = take_indices(cfg.num_blocks, indices)
    x = check_input(params, x, cfg)
    h, stem_cache = patch_embed_forward(x, params["stem.proj.weight"], params["stem.proj.bias"], cfg.patch_size)  # (B, N, D)
    B, (gh, gw) = h.shape[0], cfg.grid_size
    block_caches, intermediates, taps = [], [], []
    for i in range(max(take) + 1 if stop_early else cfg.num_blocks):
        h, block_cache = mixer_block_forward(h, block_params(params, i), cfg.ln_eps, cfg.gelu)  # (B, N, D)
        block_caches.append(block_cache)
        if i in take:  # once, however often indices names it (as timm)
            y, tap_norm_cache = h, None
            if norm:
                y, tap_norm_cache = layernorm_forward(h, params["norm.weight"], params["norm.bias"],
                                                      cfg.ln_eps)  # (B, N, D)
            if output_fmt == "NCHW":
                y = y.reshape(B, gh, gw, -1).transpose(0, 3, 1, 2)  # (B, D, H/P, W/P)
            intermediates.append(y)
            taps.append((i, tap_norm_cache))
    fmt = (output_fmt, gh, gw)
    if intermediates_only:
        return intermediates, (stem_cache, block_caches, taps, None, fmt)
    feats, norm_cache = layernorm_forward(h, params["norm.weight"], params["norm.bias"], cfg.ln_eps)  # (B, N, D)
    return (feats, intermediates), (stem_cache, block_caches, taps, norm_cache, fmt)


def backward_intermediates(dfeats, dintermediates, cache):
    """Inputs:  dfeats (B, N, D) (None with intermediates_only), dintermediates: one gradient per
             intermediate, in their layout (None for one that feeds no loss); the cache
    Returns: dx (B, C, H, W), grads of the stem, the blocks that ran and the final norm (timm names)
    """
    stem_cache, block_caches, taps, norm_cache, (output_fmt, gh, gw) = cache
    grads, dtaps = {}, {}
    for (i, tap_norm_cache), dy in zip(taps, dintermediates):
        if dy is None:
            continue
        if output_fmt == "NCHW":
            dy = dy.transpose(0, 2, 3, 1).reshape(dy.shape[0], gh * gw, -1)  # (B, N, D)
        if tap_norm_cache is not None:
            dy, dw, db = layernorm_backward(dy, tap_norm_cache)  # (B, N, D)
            _accumulate(grads, "norm.weight", dw)
            _accumulate(grads, "norm.bias", db)
        dtaps[i] = dtaps[i] + dy if i in dtaps else dy  # (B, N, D)
    if norm_cache is not None and dfeats is not None:
        dh, dw, db = layernorm_backward(dfeats, norm_cache)  # (B, N, D)
        _accumulate(grads, "norm.weight", dw)
        _accumulate(grads, "norm.bias", db)
    else:  # only the intermediates feed the loss
        x, w, _ = stem_cache  # x (B, C, H, W), w (D, C, P, P)
        dh = get_xp(w).zeros((x.shape[0], gh * gw, w.shape[0]), dtype=w.dtype)  # (B, N, D)
    dh = _blocks_backward(dh, block_caches, grads, dtaps)  # (B, N, D)
    dx, grads["stem.proj.weight"], grads["stem.proj.bias"] = patch_embed_backward(dh, stem_cache)  # (B, C, H, W)
    return dx, grads


def _accumulate(grads, name, g):
    grads[name] = grads[name] + g if name in grads else g


def predict(params, x, cfg):
    """Logits for images x (B, C, H, W): the same forward, but each layer's cache is dropped at once."""
    x = check_input(params, x, cfg)
    h, _ = patch_embed_forward(x, params["stem.proj.weight"], params["stem.proj.bias"], cfg.patch_size)  # (B, N, D)
    for i in range(cfg.num_blocks):
        h, _ = mixer_block_forward(h, block_params(params, i), cfg.ln_eps, cfg.gelu)  # (B, N, D)
    h, _ = layernorm_forward(h, params["norm.weight"], params["norm.bias"], cfg.ln_eps)  # (B, N, D)
    pooled, _ = mean_pool_forward(h)  # (B, D)
    logits, _ = linear_forward(pooled, params["head.weight"], params["head.bias"])  # (B, K)
    return logits


def check_input(params, x, cfg):
    """Validate x against cfg and bring it to the params' backend dtype; errors name the mismatch."""
    w = params["stem.proj.weight"]
    xp = get_xp(w, x)  # raises if x and params sit on different backends
    expected = (cfg.in_chans, *cfg.image_hw)
    if getattr(x, "ndim", None) != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"input must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}) "
                         f"for this config, got {tuple(getattr(x, 'shape', ()))}")
    return xp.asarray(x).astype(w.dtype, copy=False)

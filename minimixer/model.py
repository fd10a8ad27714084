"""The whole MLP-Mixer: stem, blocks, norm, pooling, head. Backward is forward in reverse.

    logits, cache = mixer_forward(params, x, cfg)
    dx, grads = mixer_backward(dlogits, cache)
    logits = predict(params, x, cfg)            # inference: keeps nothing for backward

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
    Returns: logits (B, K), cache = (stem_cache, block_caches, norm_cache, pool_cache, drop_cache, head_cache)
    """
    x = check_input(params, x, cfg)
    h, stem_cache = patch_embed_forward(x, params["stem.proj.weight"], params["stem.proj.bias"], cfg.patch_size)  # (B, N, D)
    block_caches = []
    for i in range(cfg.num_blocks):
        h, block_cache = mixer_block_forward(h, block_params(params, i), cfg.ln_eps, cfg.gelu,
                                             drop_path_rate, rng)  # (B, N, D)
        block_caches.append(block_cache)
    h, norm_cache = layernorm_forward(h, params["norm.weight"], params["norm.bias"], cfg.ln_eps)  # (B, N, D)
    pooled, pool_cache = mean_pool_forward(h)  # (B, D)
    pooled, drop_cache = dropout_forward(pooled, drop_rate, rng)  # (B, D)
    logits, head_cache = linear_forward(pooled, params["head.weight"], params["head.bias"])  # (B, K)
    cache = (stem_cache, block_caches, norm_cache, pool_cache, drop_cache, head_cache)
    return logits, cache


def mixer_backward(dlogits, cache):
    """Inputs:  dlogits (B, K), the cache from mixer_forward
    Returns: dx (B, C, H, W), grads (a dict with the same keys as params)
    """
    stem_cache, block_caches, norm_cache, pool_cache, drop_cache, head_cache = cache
    grads = {}
    dpooled, grads["head.weight"], grads["head.bias"] = linear_backward(dlogits, head_cache)  # (B, D)
    dpooled = dropout_backward(dpooled, drop_cache)  # (B, D)
    dh = mean_pool_backward(dpooled, pool_cache)  # (B, N, D)
    dh, grads["norm.weight"], grads["norm.bias"] = layernorm_backward(dh, norm_cache)  # (B, N, D)
    for i in reversed(range(len(block_caches))):
        dh, block_grads = mixer_block_backward(dh, block_caches[i])  # (B, N, D)
        grads.update({f"blocks.{i}.{k}": g for k, g in block_grads.items()})
    dx, grads["stem.proj.weight"], grads["stem.proj.bias"] = patch_embed_backward(dh, stem_cache)  # (B, C, H, W)
    return dx, grads


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

"""The Mixer on the fast path: predict (inference), forward and backward (training), each run as
one share of the batch per core (rows.run_shares). Same math as model.py; what differs is where
the memory goes and which work runs in parallel (see fast/__init__.py).

Shape legend: B batch, N tokens, D channels, DS/DC token/channel hidden, M = B·N rows, K classes.
"""
import threading
from typing import NamedTuple

import numpy as np

from ..backend import get_xp
from ..layers import keep_mask, patchify, unpatchify
from ..model import block_params, check_input
from ..runtime.threads import serial
from . import rows
from .kernels import (add_bias_residual_, bias_gelu_, bias_gelu_grad_, layernorm_, layernorm_backward_add_,
                      multiply_and_sum_)
from .rows import run_shares, split_batch

TOKEN_GROUP = 2  # images per token-mixing matmul batch
CHANNEL_CHUNK_BYTES = 24 << 20  # channel-MLP hidden per chunk (2048 rows of B/16): big enough for full-speed GEMMs,
# small enough to stay in a desktop L3 and well under timm's (B·N, DC) hidden and its GELU copy


# --- inference -----------------------------------------------------------------------------------

def predict(params, x, cfg):
    """Logits for images x (B, C, H, W); equal to model.predict up to float rounding."""
    x = check_input(params, x, cfg)
    xp = get_xp(x)
    if x.shape[0] == 0:  # no images: no rows to split (model.predict gives (0, K) too)
        return xp.zeros((0, cfg.num_classes), params["head.weight"].dtype)
    blocks = [block_params(params, i) for i in range(cfg.num_blocks)]
    if xp is np and x.shape[0] < rows.num_threads():
        # fewer images than cores: BLAS's own threads split each matmul; the elementwise work
        # stays in this thread (handed to the pool between GEMMs, it fights BLAS's spinning threads;
        # splitting each matmul by hand across the cores is slower than BLAS's threads)
        with serial():
            return _predict_share(params, blocks, x, cfg)
    spans = split_batch(x.shape[0]) if xp is np else [(0, x.shape[0])]
    logits = run_shares(lambda a, b: _predict_share(params, blocks, x[a:b], cfg), spans)
    return logits[0] if len(logits) == 1 else xp.concatenate(logits)


def _predict_share(params, blocks, x, cfg):
    xp = get_xp(x)
    B, N, D = x.shape[0], cfg.num_patches, cfg.embed_dim
    M = B * N
    w = params["stem.proj.weight"]
    h = xp.matmul(patchify(x, cfg.patch_size).reshape(M, -1), w.reshape(D, -1).T)  # (M, D) residual stream
    h += params["stem.proj.bias"]
    y = xp.empty_like(h)  # (M, D) LayerNorm outputs
    on_cpu = xp is np
    group = min(B, TOKEN_GROUP) if on_cpu else B
    chunk = min(M, max(64, CHANNEL_CHUNK_BYTES // (cfg.channel_hidden * h.itemsize))) if on_cpu else M
    chunk = -(-M // -(-M // chunk))  # equal chunks: a small last one would run a slow, thin GEMM
    # reused buffers: fresh large arrays would page-fault on every block
    token_hid = xp.empty((group, cfg.token_hidden, D), h.dtype)  # (g, DS, D)
    token_out = xp.empty((group, N, D), h.dtype)  # (g, N, D)
    channel_hid = xp.empty((chunk, cfg.channel_hidden), h.dtype)  # (chunk, DC)
    channel_out = xp.empty((chunk, D), h.dtype)  # (chunk, D)
    for p in blocks:
        # token mixing: h += W2 gelu(W1 LN(h) + b1) + b2, per group of images, on (N, D) slices
        layernorm_(h, y, p["norm1.weight"], p["norm1.bias"], cfg.ln_eps)
        y3, h3 = y.reshape(B, N, D), h.reshape(B, N, D)
        w1, b1 = p["mlp_tokens.fc1.weight"], p["mlp_tokens.fc1.bias"][:, None]
        w2, b2 = p["mlp_tokens.fc2.weight"], p["mlp_tokens.fc2.bias"][:, None]
        for g in range(0, B, group):
            k = min(group, B - g)
            hid = xp.matmul(w1, y3[g:g + k], out=token_hid[:k])  # (k, DS, D)
            if on_cpu:
                for j in range(k):
                    bias_gelu_(hid[j], b1, cfg.gelu)
            else:  # one kernel launch for the whole batch (the kernel broadcasts the (DS, 1) bias)
                bias_gelu_(hid, b1, cfg.gelu)
            out = xp.matmul(w2, hid, out=token_out[:k])  # (k, N, D)
            if on_cpu:
                for j in range(k):
                    add_bias_residual_(h3[g + j], out[j], b2)  # (N, D) += (N, D) + (N, 1)
            else:
                add_bias_residual_(h3[g:g + k], out, b2)
        # channel mixing: h += W2 gelu(W1 LN(h) + b1) + b2, a chunk of rows at a time
        layernorm_(h, y, p["norm2.weight"], p["norm2.bias"], cfg.ln_eps)
        w1, b1 = p["mlp_channels.fc1.weight"], p["mlp_channels.fc1.bias"]
        w2, b2 = p["mlp_channels.fc2.weight"], p["mlp_channels.fc2.bias"]
        for r in range(0, M, chunk):
            k = min(chunk, M - r)
            hid = xp.matmul(y[r:r + k], w1.T, out=channel_hid[:k])  # (k, DC)
            bias_gelu_(hid, b1, cfg.gelu)
            add_bias_residual_(h[r:r + k], xp.matmul(hid, w2.T, out=channel_out[:k]), b2)  # (k, D)
    layernorm_(h, y, params["norm.weight"], params["norm.bias"], cfg.ln_eps)
    pooled = y.reshape(B, N, D).mean(axis=1)  # (B, D)
    return pooled @ params["head.weight"].T + params["head.bias"]  # (B, K)


# --- training ------------------------------------------------------------------------------------
#
# Training keeps only what backward needs: each LayerNorm's normalized input and its rstd (its
# output, fc1's input, is rebuilt as n·w + b), and for each GELU its output and its derivative
# (the pre-activation itself is never needed again). Backward frees each block's cache as soon
# as it is done with it.

class BlockCache(NamedTuple):
    """What one block's backward needs, from one share of the batch (B images, M = B·N rows)."""
    p: dict  # the block's parameters (model.block_params)
    norm1: object  # (M, D) token-mixing LayerNorm's normalized input
    rstd1: object  # (M, 1) its 1/std
    gelu1: object  # (B, DS, D) token MLP's GELU output
    gelu_grad1: object  # (B, DS, D) gelu' at its input
    mask1: object  # (B, 1, 1) stochastic-depth mask of the token branch, or None
    norm2: object  # (M, D) channel-mixing LayerNorm's normalized input
    rstd2: object  # (M, 1)
    gelu2: object  # (M, DC) channel MLP's GELU output
    gelu_grad2: object  # (M, DC) gelu' at its input
    mask2: object  # (B, 1, 1) or None


class ShareCache(NamedTuple):
    """One share's forward cache."""
    params: dict
    cfg: object
    x_shape: tuple  # (B, C, H, W) of the share
    patches: object  # (M, C·P·P) the stem's input
    blocks: list  # a BlockCache per block
    norm: object  # (M, D) final LayerNorm's normalized input
    rstd: object  # (M, 1)
    pooled: object  # (B, D) the head's input
    head_mask: object  # (B, D) dropout mask before the head, or None


def forward(params, x, cfg, *, drop_path_rate=0.0, drop_rate=0.0, rng=None):
    """Training forward: logits (B, K) and the cache for `backward`. Same semantics (and the
    same random masks for the same rng) as model.mixer_forward."""
    x = check_input(params, x, cfg)
    xp = get_xp(x)
    B = x.shape[0]
    # draw the masks in model.mixer_forward's order, for the whole batch, before splitting it
    masks = {"blocks": [], "head": None}
    if rng is not None and drop_path_rate:
        for _ in range(cfg.num_blocks):
            masks["blocks"].append((keep_mask((B, 1, 1), drop_path_rate, rng, x),
                                    keep_mask((B, 1, 1), drop_path_rate, rng, x)))
    if rng is not None and drop_rate:
        masks["head"] = keep_mask((B, cfg.embed_dim), drop_rate, rng, x)  # (B, D)
    spans = split_batch(B) if xp is np else [(0, B)]
    shares = run_shares(lambda a, b: _forward_share(params, x[a:b], cfg, _slice_masks(masks, a, b)), spans)
    logits = xp.concatenate([s[0] for s in shares]) if len(shares) > 1 else shares[0][0]  # (B, K)
    return logits, (spans, [s[1] for s in shares])


def _slice_masks(masks, a, b):
    return {"blocks": [(m1[a:b], m2[a:b]) for m1, m2 in masks["blocks"]],
            "head": None if masks["head"] is None else masks["head"][a:b]}


def _forward_share(params, x, cfg, masks):
    xp = get_xp(x)
    B, N, D = x.shape[0], cfg.num_patches, cfg.embed_dim
    M = B * N
    patches = patchify(x, cfg.patch_size).reshape(M, -1)  # (M, C·P·P)
    w = params["stem.proj.weight"]
    h = xp.matmul(patches, w.reshape(D, -1).T)  # (M, D)
    h += params["stem.proj.bias"]  # (M, D)
    blocks = []
    for i in range(cfg.num_blocks):
        p = block_params(params, i)
        mask1, mask2 = masks["blocks"][i] if masks["blocks"] else (None, None)
        # token mixing
        norm1, rstd1, y = xp.empty_like(h), xp.empty((M, 1), h.dtype), xp.empty_like(h)  # (M, D), (M, 1), (M, D)
        layernorm_(h, y, p["norm1.weight"], p["norm1.bias"], cfg.ln_eps, norm=norm1, rstd=rstd1)
        y3 = y.reshape(B, N, D)  # not kept: backward rebuilds it from norm1 (n·w + b)
        gelu1 = xp.matmul(p["mlp_tokens.fc1.weight"], y3)  # (B, DS, D), GELU'd in place below
        gelu_grad1 = xp.empty_like(gelu1)  # (B, DS, D)
        if xp is np:
            for j in range(B):  # per image: the (DS, 1) bias runs along rows
                bias_gelu_grad_(gelu1[j], p["mlp_tokens.fc1.bias"][:, None], gelu_grad1[j], cfg.gelu)
        else:
            bias_gelu_grad_(gelu1, p["mlp_tokens.fc1.bias"][:, None], gelu_grad1, cfg.gelu)
        t = xp.matmul(p["mlp_tokens.fc2.weight"], gelu1)  # (B, N, D)
        t += p["mlp_tokens.fc2.bias"][:, None]  # (B, N, D)
        if mask1 is not None:
            t *= mask1  # (B, N, D) stochastic depth
        h += t.reshape(M, D)  # in place: backward keeps the normalized copies, not h
        # channel mixing
        norm2, rstd2, y = xp.empty_like(h), xp.empty((M, 1), h.dtype), xp.empty_like(h)  # (M, D), (M, 1), (M, D)
        layernorm_(h, y, p["norm2.weight"], p["norm2.bias"], cfg.ln_eps, norm=norm2, rstd=rstd2)
        gelu2 = xp.matmul(y, p["mlp_channels.fc1.weight"].T)  # (M, DC), GELU'd in place below
        gelu_grad2 = xp.empty_like(gelu2)  # (M, DC)
        bias_gelu_grad_(gelu2, p["mlp_channels.fc1.bias"], gelu_grad2, cfg.gelu)
        t = xp.matmul(gelu2, p["mlp_channels.fc2.weight"].T)  # (M, D)
        t += p["mlp_channels.fc2.bias"]  # (M, D)
        if mask2 is not None:
            t.reshape(B, N, D)[...] *= mask2  # (B, N, D)
        h += t  # (M, D)
        blocks.append(BlockCache(p, norm1, rstd1, gelu1, gelu_grad1, mask1, norm2, rstd2, gelu2, gelu_grad2, mask2))
    n, r, y = xp.empty_like(h), xp.empty((M, 1), h.dtype), xp.empty_like(h)  # (M, D), (M, 1), (M, D)
    layernorm_(h, y, params["norm.weight"], params["norm.bias"], cfg.ln_eps, norm=n, rstd=r)
    pooled = y.reshape(B, N, D).mean(axis=1)  # (B, D)
    if masks["head"] is not None:
        pooled = pooled * masks["head"]  # (B, D)
    logits = pooled @ params["head.weight"].T + params["head.bias"]  # (B, K)
    return logits, ShareCache(params, cfg, x.shape, patches, blocks, n, r, pooled, masks["head"])


def backward(dlogits, cache, *, need_dx=False):
    """dx (B, C, H, W) if need_dx (else None), and the gradients of every parameter (timm names),
    as model.mixer_backward returns them: each share of the batch on its own core, then the shares'
    gradients summed. It consumes the cache."""
    spans, caches = cache
    xp = get_xp(dlogits)
    by_start = {span[0]: c for span, c in zip(spans, caches)}
    grads = GradientSum()
    shares = run_shares(lambda a, b: _backward_share(dlogits[a:b], by_start[a], need_dx, grads), spans)
    dx = None
    if need_dx:
        dx = xp.concatenate(shares) if len(shares) > 1 else shares[0]  # (B, C, H, W)
    return dx, grads.total


class GradientSum:
    """Gradients summed over the shares as they arrive, so only one set is ever held."""

    def __init__(self):
        self.total, self.lock = {}, threading.Lock()

    def update(self, grads):
        for k, g in grads.items():
            with self.lock:
                if k not in self.total:
                    self.total[k] = g
                    continue
                self.total[k] += g


def _backward_share(dlogits, cache, need_dx, grads_sum):
    params, cfg, x_shape, patches, blocks, n, r, pooled, head_mask = cache
    xp = get_xp(dlogits)
    B, N, D = x_shape[0], cfg.num_patches, cfg.embed_dim
    M = B * N
    grads = {"head.weight": dlogits.T @ pooled, "head.bias": dlogits.sum(axis=0)}  # (K, D), (K,)
    dpooled = dlogits @ params["head.weight"]  # (B, D)
    if head_mask is not None:
        dpooled = dpooled * head_mask  # (B, D)
    dy = xp.repeat(dpooled[:, None, :] / N, N, axis=1).reshape(M, D)  # (M, D) mean-pool backward
    dh = xp.zeros_like(dy)  # (M, D), and the final LayerNorm's weight and bias gradients (D,), (D,)
    grads["norm.weight"], grads["norm.bias"] = layernorm_backward_add_(dy, n, r, params["norm.weight"], dh)
    for i in reversed(range(len(blocks))):
        c = blocks.pop()  # each block's cache is freed once its gradients are done
        p, g = c.p, {}
        # channel mixing
        dt = dh if c.mask2 is None else (dh.reshape(B, N, D) * c.mask2).reshape(M, D)  # (M, D)
        g["mlp_channels.fc2.weight"] = dt.T @ c.gelu2  # (D, DC)
        g["mlp_channels.fc2.bias"] = dt.sum(axis=0)  # (D,)
        da = xp.matmul(dt, p["mlp_channels.fc2.weight"], out=c.gelu2)  # (M, DC) in gelu2's memory, now unused
        g["mlp_channels.fc1.bias"] = multiply_and_sum_(da, c.gelu_grad2, 0)  # (DC,); da (M, DC) through GELU
        y = c.norm2 * p["norm2.weight"]  # (M, D) the LayerNorm output, rebuilt
        y += p["norm2.bias"]  # (M, D)
        g["mlp_channels.fc1.weight"] = da.T @ y  # (DC, D)
        dy = xp.matmul(da, p["mlp_channels.fc1.weight"])  # (M, D)
        # dh (M, D) += LayerNorm backward of dy: the residual branch joins the skip path
        g["norm2.weight"], g["norm2.bias"] = layernorm_backward_add_(dy, c.norm2, c.rstd2, p["norm2.weight"], dh)
        # token mixing
        dt3 = dh.reshape(B, N, D)  # (B, N, D)
        if c.mask1 is not None:
            dt3 = dt3 * c.mask1  # (B, N, D)
        g["mlp_tokens.fc2.weight"] = xp.matmul(dt3, c.gelu1.transpose(0, 2, 1)).sum(axis=0)  # (N, DS)
        g["mlp_tokens.fc2.bias"] = dt3.sum(axis=(0, 2))  # (N,)
        da = xp.matmul(p["mlp_tokens.fc2.weight"].T, dt3, out=c.gelu1)  # (B, DS, D) in gelu1's memory
        g["mlp_tokens.fc1.bias"] = multiply_and_sum_(da, c.gelu_grad1, (0, 2))  # (DS,); da (B, DS, D) through GELU
        y = c.norm1 * p["norm1.weight"]  # (M, D) the LayerNorm output, rebuilt
        y += p["norm1.bias"]  # (M, D)
        g["mlp_tokens.fc1.weight"] = xp.matmul(da, y.reshape(B, N, D).transpose(0, 2, 1)).sum(axis=0)  # (DS, N)
        dy = xp.matmul(p["mlp_tokens.fc1.weight"].T, da).reshape(M, D)  # (M, D)
        g["norm1.weight"], g["norm1.bias"] = layernorm_backward_add_(dy, c.norm1, c.rstd1, p["norm1.weight"], dh)
        grads_sum.update({f"blocks.{i}.{k}": v for k, v in g.items()})
    w = params["stem.proj.weight"]
    grads["stem.proj.weight"] = (dh.T @ patches).reshape(w.shape)  # (D, C, P, P)
    grads["stem.proj.bias"] = dh.sum(axis=0)  # (D,)
    grads_sum.update(grads)
    return unpatchify((dh @ w.reshape(D, -1)).reshape(B, N, -1), x_shape, cfg.patch_size) if need_dx else None

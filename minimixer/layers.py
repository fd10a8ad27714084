"""MLP-Mixer's layers, each a forward/backward pair of plain functions.

    out, cache = name_forward(x, params...)
    dx, dparams... = name_backward(dout, cache)

The cache is a tuple that holds what backward needs and nothing more: inputs
and weights by reference, small statistics (LayerNorm's mean and rstd), and
never a copy that backward can rebuild cheaply.

Every function runs on NumPy or CuPy arrays alike: `xp` is the module of the
arrays passed in.

The lines between "### BEGIN SOLUTION" and "### END SOLUTION" are what the
coursework asks students to write (python -m minimixer.coursework release).

Shape legend:
    B batch, C input channels, H W image height and width, P patch size,
    N tokens (patches) = (H/P)·(W/P), D channels (embed_dim),
    DS token-mixing hidden size, DC channel-mixing hidden size,
    I O a linear layer's input and output features, "..." any leading axes.
"""
import math

from .backend import get_xp
from .erf import erf

GELU_FORMS = ("erf", "tanh")
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_TANH_COEF = 0.044715


def _sum_leading(a):
    """Sum over every axis but the last: how a bias or a norm weight collects its gradient."""
    return a.reshape(-1, a.shape[-1]).sum(axis=0)


# ----------------------------------------------------------------------------
# linear: out = x @ w.T + b, with w stored (O, I) as in PyTorch

def linear_forward(x, w, b):
    """Fully connected layer on the last axis.

    Inputs:  x (..., I), w (O, I), b (O,)
    Returns: out (..., O), cache = (x, w)
    """
    ### BEGIN SOLUTION
    out = x @ w.T + b  # (..., O)
    ### END SOLUTION
    cache = (x, w)
    return out, cache


def linear_backward(dout, cache):
    """Returns dx (..., I), dw (O, I), db (O,)."""
    x, w = cache
    ### BEGIN SOLUTION
    dx = dout @ w  # (..., I)
    dw = dout.reshape(-1, w.shape[0]).T @ x.reshape(-1, w.shape[1])  # (O, I)
    db = _sum_leading(dout)  # (O,)
    ### END SOLUTION
    return dx, dw, db


# ----------------------------------------------------------------------------
# patch embedding: timm's stem, Conv2d(C, D, kernel=P, stride=P), as patches @ w

def patchify(x, patch_size):
    """Cut images into non-overlapping P×P patches, one row per patch.

    x (B, C, H, W) -> patches (B, N, C·P·P). Tokens run in row-major (h, w)
    order; each patch is flattened in (c, kh, kw) order, matching the conv
    weight's (D, C, P, P) layout.
    """
    B, C, H, W = x.shape
    P = patch_size
    if H % P or W % P:
        raise ValueError(f"image size {H}x{W} is not divisible by patch size {P}")
    x = x.reshape(B, C, H // P, P, W // P, P)  # (B, C, H/P, P, W/P, P)
    x = x.transpose(0, 2, 4, 1, 3, 5)  # (B, H/P, W/P, C, P, P)
    return x.reshape(B, (H // P) * (W // P), C * P * P)  # (B, N, C·P·P)


def unpatchify(patches, image_shape, patch_size):
    """The inverse of patchify: patches (B, N, C·P·P) -> images (B, C, H, W)."""
    B, C, H, W = image_shape
    P = patch_size
    x = patches.reshape(B, H // P, W // P, C, P, P)  # (B, H/P, W/P, C, P, P)
    x = x.transpose(0, 3, 1, 4, 2, 5)  # (B, C, H/P, P, W/P, P)
    return x.reshape(B, C, H, W)  # (B, C, H, W)


def patch_embed_forward(x, w, b, patch_size):
    """Linear projection of flattened patches (the paper's per-patch fully connected layer).

    Inputs:  x (B, C, H, W), w (D, C, P, P) as timm's conv weight (OIHW), b (D,)
    Returns: tokens (B, N, D), cache = (x, w, patch_size)
    The cache keeps the images, not the patches: backward re-cuts them for free.
    """
    patches = patchify(x, patch_size)  # (B, N, C·P·P)
    tokens, _ = linear_forward(patches, w.reshape(w.shape[0], -1), b)  # (B, N, D)
    cache = (x, w, patch_size)
    return tokens, cache


def patch_embed_backward(dtokens, cache):
    """Returns dx (B, C, H, W), dw (D, C, P, P), db (D,)."""
    x, w, patch_size = cache
    patches = patchify(x, patch_size)  # (B, N, C·P·P)
    dpatches, dw, db = linear_backward(dtokens, (patches, w.reshape(w.shape[0], -1)))
    dx = unpatchify(dpatches, x.shape, patch_size)  # (B, C, H, W)
    return dx, dw.reshape(w.shape), db


# ----------------------------------------------------------------------------
# layernorm over the last axis (biased variance; timm's Mixer uses eps = 1e-6)

def layernorm_forward(x, w, b, eps=1e-6):
    """Inputs:  x (..., D), w (D,), b (D,)
    Returns: out (..., D), cache = (x, w, mean, rstd) with mean, rstd (..., 1)
    """
    # float16 is normalized in float32, as PyTorch does: its squares overflow past |x - mean| ≈ 256
    in_dtype = x.dtype
    x = x.astype(get_xp(x).promote_types(in_dtype, "float32"), copy=False)
    ### BEGIN SOLUTION
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mean  # (..., D)
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., 1) biased, as in PyTorch
    rstd = 1.0 / (var + eps) ** 0.5  # (..., 1)
    out = xc * rstd * w + b  # (..., D)
    ### END SOLUTION
    cache = (x, w, mean, rstd)
    return out.astype(in_dtype, copy=False), cache


def layernorm_backward(dout, cache):
    """Returns dx (..., D), dw (D,), db (D,)."""
    x, w, mean, rstd = cache
    ### BEGIN SOLUTION
    norm = (x - mean) * rstd  # (..., D) rebuilt from the statistics
    db = _sum_leading(dout)  # (D,)
    dw = _sum_leading(dout * norm)  # (D,)
    dnorm = dout * w  # (..., D)
    # d/dx of (x - mean)·rstd: subtract the two paths through mean and rstd
    dx = dnorm - dnorm.mean(axis=-1, keepdims=True)  # (..., D)
    dx -= norm * (dnorm * norm).mean(axis=-1, keepdims=True)  # (..., D)
    dx *= rstd  # (..., D)
    ### END SOLUTION
    return dx, dw, db


# ----------------------------------------------------------------------------
# GELU: x·Φ(x), exact (erf) by default as nn.GELU(), or its tanh approximation

def gelu_forward(x, form="erf"):
    """Inputs:  x (...), form 'erf' (exact, timm's default) or 'tanh'
    Returns: out (...), cache = (x, form)
    """
    xp = get_xp(x)
    ### BEGIN SOLUTION
    if form == "erf":
        out = 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))  # (...)
    elif form == "tanh":
        out = 0.5 * x * (1.0 + xp.tanh(SQRT_2_OVER_PI * (x + GELU_TANH_COEF * x**3)))  # (...)
    else:
        raise ValueError(f"unknown GELU form {form!r}; expected one of {GELU_FORMS}")
    ### END SOLUTION
    cache = (x, form)
    return out, cache


def gelu_backward(dout, cache):
    """Returns dx (...)."""
    x, form = cache
    xp = get_xp(x)
    ### BEGIN SOLUTION
    if form == "erf":
        cdf = 0.5 * (1.0 + erf(x / math.sqrt(2.0)))  # (...) Φ(x)
        pdf = xp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)  # (...) φ(x)
        dx = dout * (cdf + x * pdf)  # (...) d/dx x·Φ(x)
    else:
        t = xp.tanh(SQRT_2_OVER_PI * (x + GELU_TANH_COEF * x**3))  # (...)
        dt = (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_COEF * x * x)  # (...)
        dx = dout * (0.5 * (1.0 + t) + 0.5 * x * dt)  # (...)
    ### END SOLUTION
    return dx


# ----------------------------------------------------------------------------
# MLP: fc1 -> GELU -> fc2 (timm's Mlp; its dropouts are 0 in Mixer)

def mlp_forward(x, fc1_w, fc1_b, fc2_w, fc2_b, gelu="erf"):
    """Inputs:  x (..., I), fc1_w (HID, I), fc1_b (HID,), fc2_w (I, HID), fc2_b (I,)
    Returns: out (..., I), cache = (fc1_cache, gelu_cache, fc2_cache)
    """
    ### BEGIN SOLUTION
    h, fc1_cache = linear_forward(x, fc1_w, fc1_b)  # (..., HID)
    a, gelu_cache = gelu_forward(h, gelu)  # (..., HID)
    out, fc2_cache = linear_forward(a, fc2_w, fc2_b)  # (..., I)
    ### END SOLUTION
    cache = (fc1_cache, gelu_cache, fc2_cache)
    return out, cache


def mlp_backward(dout, cache):
    """Returns dx (..., I), dfc1_w, dfc1_b, dfc2_w, dfc2_b."""
    fc1_cache, gelu_cache, fc2_cache = cache
    ### BEGIN SOLUTION
    da, dfc2_w, dfc2_b = linear_backward(dout, fc2_cache)  # (..., HID)
    dh = gelu_backward(da, gelu_cache)  # (..., HID)
    dx, dfc1_w, dfc1_b = linear_backward(dh, fc1_cache)  # (..., I)
    ### END SOLUTION
    return dx, dfc1_w, dfc1_b, dfc2_w, dfc2_b


# ----------------------------------------------------------------------------
# token mixing: LayerNorm, then one MLP shared by all channels, across the N tokens

def token_mixing_forward(x, norm_w, norm_b, fc1_w, fc1_b, fc2_w, fc2_b, eps=1e-6, gelu="erf"):
    """The paper's MLP1, without the residual: out = (MLP(LayerNorm(x)ᵀ))ᵀ.

    Inputs:  x (B, N, D), norm_w norm_b (D,), fc1_w (DS, N), fc1_b (DS,), fc2_w (N, DS), fc2_b (N,)
    Returns: out (B, N, D), cache = (norm_cache, mlp_cache)
    fc1 has N inputs: the token MLP is tied to the number of patches, so to the resolution.
    A curiosity: fc2's bias adds one constant per token across all D channels, and every
    consumer of the residual stream is a LayerNorm over D, which removes exactly that.
    So fc2_b never changes the logits, and its gradient is zero up to rounding.
    """
    ### BEGIN SOLUTION
    y, norm_cache = layernorm_forward(x, norm_w, norm_b, eps)  # (B, N, D)
    yt = y.transpose(0, 2, 1)  # (B, D, N) each channel becomes a row of N tokens
    zt, mlp_cache = mlp_forward(yt, fc1_w, fc1_b, fc2_w, fc2_b, gelu)  # (B, D, N)
    out = zt.transpose(0, 2, 1)  # (B, N, D)
    ### END SOLUTION
    cache = (norm_cache, mlp_cache)
    return out, cache


def token_mixing_backward(dout, cache):
    """Returns dx (B, N, D), dnorm_w, dnorm_b, dfc1_w, dfc1_b, dfc2_w, dfc2_b."""
    norm_cache, mlp_cache = cache
    ### BEGIN SOLUTION
    dzt = dout.transpose(0, 2, 1)  # (B, D, N)
    dyt, dfc1_w, dfc1_b, dfc2_w, dfc2_b = mlp_backward(dzt, mlp_cache)  # (B, D, N)
    dx, dnorm_w, dnorm_b = layernorm_backward(dyt.transpose(0, 2, 1), norm_cache)  # (B, N, D)
    ### END SOLUTION
    return dx, dnorm_w, dnorm_b, dfc1_w, dfc1_b, dfc2_w, dfc2_b


# ----------------------------------------------------------------------------
# channel mixing: LayerNorm, then one MLP shared by all tokens, across the D channels

def channel_mixing_forward(x, norm_w, norm_b, fc1_w, fc1_b, fc2_w, fc2_b, eps=1e-6, gelu="erf"):
    """The paper's MLP2, without the residual: out = MLP(LayerNorm(x)).

    Inputs:  x (B, N, D), norm_w norm_b (D,), fc1_w (DC, D), fc1_b (DC,), fc2_w (D, DC), fc2_b (D,)
    Returns: out (B, N, D), cache = (norm_cache, mlp_cache)
    """
    ### BEGIN SOLUTION
    y, norm_cache = layernorm_forward(x, norm_w, norm_b, eps)  # (B, N, D)
    out, mlp_cache = mlp_forward(y, fc1_w, fc1_b, fc2_w, fc2_b, gelu)  # (B, N, D)
    ### END SOLUTION
    cache = (norm_cache, mlp_cache)
    return out, cache


def channel_mixing_backward(dout, cache):
    """Returns dx (B, N, D), dnorm_w, dnorm_b, dfc1_w, dfc1_b, dfc2_w, dfc2_b."""
    norm_cache, mlp_cache = cache
    ### BEGIN SOLUTION
    dy, dfc1_w, dfc1_b, dfc2_w, dfc2_b = mlp_backward(dout, mlp_cache)  # (B, N, D)
    dx, dnorm_w, dnorm_b = layernorm_backward(dy, norm_cache)  # (B, N, D)
    ### END SOLUTION
    return dx, dnorm_w, dnorm_b, dfc1_w, dfc1_b, dfc2_w, dfc2_b


# ----------------------------------------------------------------------------
# the Mixer block: both mixings, each on a residual branch

# A block's parameters, named as in timm's MixerBlock.state_dict(), in the order
# token_mixing_forward / channel_mixing_forward take them.
TOKEN_MIXING_KEYS = ("norm1.weight", "norm1.bias",
                     "mlp_tokens.fc1.weight", "mlp_tokens.fc1.bias",
                     "mlp_tokens.fc2.weight", "mlp_tokens.fc2.bias")
CHANNEL_MIXING_KEYS = ("norm2.weight", "norm2.bias",
                       "mlp_channels.fc1.weight", "mlp_channels.fc1.bias",
                       "mlp_channels.fc2.weight", "mlp_channels.fc2.bias")
BLOCK_KEYS = TOKEN_MIXING_KEYS + CHANNEL_MIXING_KEYS


def mixer_block_forward(x, p, eps=1e-6, gelu="erf", drop_path=0.0, rng=None):
    """x + token mixing, then + channel mixing (the paper's equations 1 and 2).

    Inputs:  x (B, N, D); p, the block's parameters keyed as in BLOCK_KEYS;
             drop_path, the stochastic-depth rate, applied only when a NumPy Generator rng is given
    Returns: out (B, N, D), cache = (token_cache, token_drop, channel_cache, channel_drop)
    """
    ### BEGIN SOLUTION
    t, token_cache = token_mixing_forward(x, *(p[k] for k in TOKEN_MIXING_KEYS), eps, gelu)  # (B, N, D)
    t, token_drop = drop_path_forward(t, drop_path, rng)  # (B, N, D)
    u = x + t  # (B, N, D)
    c, channel_cache = channel_mixing_forward(u, *(p[k] for k in CHANNEL_MIXING_KEYS), eps, gelu)  # (B, N, D)
    c, channel_drop = drop_path_forward(c, drop_path, rng)  # (B, N, D)
    out = u + c  # (B, N, D)
    ### END SOLUTION
    cache = (token_cache, token_drop, channel_cache, channel_drop)
    return out, cache


def mixer_block_backward(dout, cache):
    """Returns dx (B, N, D) and the block's gradients, a dict keyed as in BLOCK_KEYS."""
    token_cache, token_drop, channel_cache, channel_drop = cache
    ### BEGIN SOLUTION
    dc = drop_path_backward(dout, channel_drop)  # (B, N, D)
    du, *dchannel = channel_mixing_backward(dc, channel_cache)  # (B, N, D)
    du += dout  # (B, N, D) the residual passes dout straight through
    dt = drop_path_backward(du, token_drop)  # (B, N, D)
    dx, *dtoken = token_mixing_backward(dt, token_cache)  # (B, N, D)
    dx += du  # (B, N, D)
    grads = dict(zip(TOKEN_MIXING_KEYS, dtoken)) | dict(zip(CHANNEL_MIXING_KEYS, dchannel))
    ### END SOLUTION
    return dx, grads


# ----------------------------------------------------------------------------
# global average pooling over tokens (Mixer has no class token)

def mean_pool_forward(x):
    """Inputs:  x (B, N, D)
    Returns: out (B, D), cache = (num_tokens,)
    """
    out = x.mean(axis=1)  # (B, D)
    cache = (x.shape[1],)
    return out, cache


def mean_pool_backward(dout, cache):
    """Returns dx (B, N, D): each token gets an equal 1/N share."""
    (num_tokens,) = cache
    xp = get_xp(dout)
    dx = xp.repeat(dout[:, None, :] / num_tokens, num_tokens, axis=1)  # (B, N, D)
    return dx


# ----------------------------------------------------------------------------
# regularizers, active only in training (when a NumPy Generator `rng` is passed)

def keep_mask(shape, rate, rng, like):
    """Bernoulli(1 - rate) keep mask divided by (1 - rate), drawn on the host so that
    NumPy and CuPy runs see the same random numbers."""
    keep = 1.0 - rate
    mask = (rng.random(shape) < keep) / keep  # float64 on the host
    return get_xp(like).asarray(mask, dtype=like.dtype)


def dropout_forward(x, rate, rng=None):
    """Inputs:  x (...), rate in [0, 1), rng a numpy.random.Generator or None (eval: identity)
    Returns: out (...), cache = (mask,) with mask (...) or None
    """
    if rng is None or rate == 0.0:
        return x, (None,)
    mask = keep_mask(x.shape, rate, rng, x)  # (...)
    return x * mask, (mask,)


def dropout_backward(dout, cache):
    (mask,) = cache
    return dout if mask is None else dout * mask


def drop_path_forward(x, rate, rng=None):
    """Stochastic depth: drop a residual branch for whole samples (timm's DropPath).

    Inputs:  x (B, ...), rate in [0, 1), rng a numpy.random.Generator or None (eval: identity)
    Returns: out (B, ...), cache = (mask,) with mask (B, 1, ...) or None
    """
    if rng is None or rate == 0.0:
        return x, (None,)
    mask = keep_mask((x.shape[0],) + (1,) * (x.ndim - 1), rate, rng, x)  # (B, 1, ...)
    return x * mask, (mask,)


def drop_path_backward(dout, cache):
    (mask,) = cache
    return dout if mask is None else dout * mask


# ----------------------------------------------------------------------------
# the loss: softmax cross-entropy, mean over the batch

def softmax_cross_entropy(logits, labels, *, label_smoothing=0.0):
    """Loss and its gradient in one call, as torch.nn.functional.cross_entropy computes the loss.

    Inputs:  logits (B, K); labels (B,) class indices, or (B, K) soft targets (mixup);
             label_smoothing ε: targets become (1 - ε)·target + ε/K
    Returns: loss (a Python float), dlogits (B, K)
    """
    xp = get_xp(logits, labels)
    B, K = logits.shape
    labels = _checked_labels(labels, B, K)  # (B,) int64 class indices, or (B, K) soft targets
    ### BEGIN SOLUTION
    if labels.ndim == 1:
        target = (labels[:, None] == xp.arange(K)).astype(logits.dtype)  # (B, K) one-hot; all 0 outside [0, K)
    else:
        target = labels.astype(logits.dtype, copy=False)  # (B, K)
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / K  # (B, K)
    shifted = logits - logits.max(axis=1, keepdims=True)  # (B, K) stable: exp(<= 0)
    exp = xp.exp(shifted)  # (B, K)
    total = exp.sum(axis=1, keepdims=True)  # (B, 1)
    logprobs = shifted - xp.log(total)  # (B, K)
    loss = -(target * logprobs).sum() / B  # a 0-d array
    # d/dlogits of -Σ t·log softmax = softmax·Σt - t (Σt = 1 for proper targets)
    dlogits = (exp / total * target.sum(axis=1, keepdims=True) - target) / B  # (B, K)
    ### END SOLUTION
    return _checked_loss(loss, labels, B, K), dlogits


def _checked_labels(labels, B, K):
    """Class indices (B,) as int64, or soft targets (B, K) as given; any other shape is an error."""
    xp = get_xp(labels)
    if labels.ndim != 1:
        if labels.shape != (B, K):
            raise ValueError(f"labels must have shape ({B},) or ({B}, {K}), got {labels.shape}")
        return labels  # (B, K)
    if labels.shape[0] != B:
        raise ValueError(f"got {labels.shape[0]} labels for {B} logits rows")
    return labels.astype(xp.int64, copy=False)  # (B,)


def _checked_loss(loss, labels, B, K):
    """The loss as a Python float, after checking that class indices lie in [0, K). One transfer
    for both: on a GPU, each float() or int() waits for the device."""
    xp = get_xp(loss)
    if labels.ndim != 1:
        return float(loss)
    in_range = ((labels >= 0) & (labels < K)).sum()
    loss, in_range = xp.stack([xp.asarray(loss, dtype=xp.float64), in_range.astype(xp.float64)]).tolist()
    if in_range != B:
        low, high = int(labels.min()), int(labels.max())
        raise ValueError(f"labels must be class indices in [0, {K}), got values in [{low}, {high}]")
    return loss

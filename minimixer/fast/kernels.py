"""The fast path's elementwise kernels: GELU with its bias (and its derivative), LayerNorm and its
backward, the residual adds, the gradient through GELU. Each runs in place, on row chunks over
the threads (rows.run_rows), as one of three implementations chosen by the array:

- Numba's fused one-loop kernels (kernels_numba.py), where the `fast` extra is installed:
  NumPy makes one pass over memory per operation, about 17 for GELU; a fused kernel makes one.
- NumPy, chunked so that a chunk and its scratch stay in L2. GELU reuses its one exp:
  gelu(x) = relu(x) - |x|·q and gelu'(x) = Φ(x) + x·φ(x), with q = Φ(-|x|).
- CuPy: cupy's own ops, and GELU as one fused CUDA kernel (cuda.py).

Shape legend: rows × cols, a chunk of the (M, D) residual stream or of a hidden layer.
"""
import importlib.util
import math
import sys
import threading

import numpy as np

from .. import erf as erf_module
from .. import layers
from ..backend import get_xp
from ..erf import erf
from .cuda import GELU_KERNEL, INV_SQRT_2PI, cupy_kernel
from .rows import run_rows, scratch, sums_over_threads, zeros

# --- Numba's fused kernels, where installed (the `fast` extra) ---------------------------------------

USE_NUMBA = True  # tests turn it off to check the NumPy kernels on a machine that has Numba
_numba_module = []  # [the module or None], once imported
_numba_lock = threading.Lock()


def numba_kernels(x):
    """minimixer.fast.kernels_numba if it can run on x (Numba installed, float32/float64 NumPy array), else None."""
    if not USE_NUMBA or get_xp(x) is not np or x.dtype not in (np.float32, np.float64):
        return None
    if not _numba_module:
        with _numba_lock:  # the shares' threads get here together on the first call: import once
            if not _numba_module:
                _numba_module.append(_import_numba_kernels())
    return _numba_module[0]


def _import_numba_kernels():
    if importlib.util.find_spec("numba") is None:  # not installed: the NumPy kernels below, silently
        return None
    try:
        from . import kernels_numba
        return kernels_numba
    except ImportError as e:  # e.g. a Numba built for another NumPy
        print(f"minimixer: Numba is installed but cannot run ({e}); using the NumPy kernels", file=sys.stderr)
    except Exception as e:  # noqa: BLE001  (e.g. no writable folder for Numba's cache)
        print(f"minimixer: Numba's kernels did not compile ({type(e).__name__}: {e}); using the NumPy kernels",
              file=sys.stderr)
    return None


def _run_bias_gelu(nk, x, bias, d=None):
    """x <- gelu(x + bias) (and d <- gelu'(x + bias)) through Numba; bias (cols,), (rows, 1) or None."""
    if bias is None:
        bias = np.zeros(x.shape[1], x.dtype)
    bias = np.asarray(bias, x.dtype)
    per_row = bias.ndim == 2  # (rows, 1): sliced with x's rows
    if d is None:
        kernel = nk.BIAS_GELU[x.dtype]
        run_rows(lambda xs, bs: kernel(xs, bs[:, 0] if per_row else bs, per_row), x, bias, chunk=None)
    else:
        kernel = nk.BIAS_GELU_GRAD[x.dtype]
        run_rows(lambda xs, bs, ds: kernel(xs, bs[:, 0] if per_row else bs, per_row, ds), x, bias, d, chunk=None)


# --- NumPy's kernels ---------------------------------------------------------------------------------

# Abramowitz & Stegun 7.1.26 for q = Φ(-|x|) = 0.5·erfc(|x|/√2) = P(t)·exp(-x²/2),
# t = 1/(1 + p|x|/√2); coefficients pre-multiplied by 0.5 (|error| ≤ 0.75e-7)
AS_P = erf_module.AS_P / math.sqrt(2.0)
AS_INV_P = 1.0 / AS_P
AS_A = tuple(0.5 * a for a in erf_module.AS_A)


def _phi_tail(x, a, t, q):
    """a = |x|, q = Φ(-|x|), t = exp(-x²/2) (all in the given buffers)."""
    np.abs(x, out=a)
    np.add(a, AS_INV_P, out=t)
    np.divide(AS_INV_P, t, out=t)  # 1/(1 + p·a) in two passes
    np.multiply(t, AS_A[4], out=q)
    for coef in AS_A[3::-1]:
        q += coef
        q *= t
    np.multiply(x, x, out=t)
    t *= -0.5
    np.maximum(t, erf_module.TAIL_EXP_FLOOR, out=t)  # no denormal activations (see erf.py)
    np.exp(t, out=t)
    q *= t




def _gelu_rows(x, bias):
    """x <- gelu(x + bias) in place, on a chunk of rows."""
    if bias is not None:
        x += bias
    if x.dtype == np.float64:  # float64 is for checking: keep the exact erf
        x[...] = 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
        return
    a, t, q = (scratch(i, x.shape, x.dtype) for i in range(3))
    _phi_tail(x, a, t, q)
    q *= a
    np.maximum(x, zeros(x.shape, x.dtype), out=x)  # an array operand: a scalar 0 is 4x slower
    x -= q  # relu(x) - |x|·Φ(-|x|) = x·Φ(x) for either sign of x


def _gelu_grad_rows(x, bias, d):
    """x <- gelu(x + bias) and d <- gelu'(x + bias), in place, on a chunk of rows."""
    if bias is not None:
        x += bias
    if x.dtype == np.float64:  # float64 is for checking: keep the exact erf
        cdf = 0.5 * (1.0 + erf(x / math.sqrt(2.0)))
        d[...] = cdf + x * np.exp(-0.5 * x * x) * INV_SQRT_2PI
        x *= cdf
        return
    a, t, q = (scratch(i, x.shape, x.dtype) for i in range(3))
    _phi_tail(x, a, t, q)
    t *= x
    t *= INV_SQRT_2PI  # x·φ(x)
    np.subtract(0.5, q, out=d)
    np.copysign(d, x, out=d)
    d += 0.5  # Φ(x): 1 - q for x ≥ 0, q for x < 0
    x *= d  # gelu = x·Φ(x)
    d += t  # gelu' = Φ(x) + x·φ(x)


def _gelu_tanh_rows(x, bias):
    """x <- tanh-approximate gelu(x + bias), in place (cfg.gelu == 'tanh')."""
    if bias is not None:
        x += bias
    x[...] = layers.gelu_forward(x, "tanh")[0]


def _gelu_tanh_grad_rows(x, bias, d):
    if bias is not None:
        x += bias
    out, cache = layers.gelu_forward(x, "tanh")
    d[...] = layers.gelu_backward(np.ones_like(x), cache)
    x[...] = out


def bias_gelu_(x, bias=None, form="erf"):
    """x <- gelu(x + bias), in place; x is 2-d (rows, cols), bias is (cols,) or (rows, 1)
    (on CuPy, any shapes that broadcast: one kernel launch)."""
    xp = get_xp(x)
    nk = numba_kernels(x) if form == "erf" else None
    if nk is not None:
        _run_bias_gelu(nk, x, bias)
    elif xp is np:
        run_rows(_gelu_rows if form == "erf" else _gelu_tanh_rows, x, bias)
    else:
        cupy_kernel(xp, GELU_KERNEL[form, False])(xp.zeros((), x.dtype) if bias is None else bias, x)
    return x


def bias_gelu_grad_(x, bias, d, form="erf"):
    """x <- gelu(x + bias), d <- gelu'(x + bias), in place."""
    xp = get_xp(x)
    nk = numba_kernels(x) if form == "erf" else None
    if nk is not None:
        _run_bias_gelu(nk, x, bias, d)
    elif xp is np:
        run_rows(_gelu_grad_rows if form == "erf" else _gelu_tanh_grad_rows, x, bias, d)
    else:
        cupy_kernel(xp, GELU_KERNEL[form, True])(xp.zeros((), x.dtype) if bias is None else bias, x, d)
    return x, d


def add_bias_residual_(h, out, bias):
    """h += out + bias in place; bias (cols,) or (rows, 1) for 2-d h (on CuPy, any shapes that broadcast)."""
    nk = numba_kernels(h)
    if nk is not None and h.ndim == 2 and out.dtype == h.dtype and bias.dtype == h.dtype:
        per_row = bias.ndim == 2
        run_rows(lambda hs, os_, bs: nk.add_bias_residual(hs, os_, bs[:, 0] if per_row else bs, per_row),
                 h, out, bias, chunk=None)
        return h
    h += out
    h += bias
    return h


def _layernorm_rows(x, out, w, b, norm, rstd_out, eps):
    acc = np.promote_types(x.dtype, np.float32)  # float16: statistics in float32, its squares overflow
    mean = x.mean(axis=1, keepdims=True, dtype=acc)
    np.subtract(x, mean, out=out)
    var = np.einsum("ij,ij->i", out, out, dtype=acc)[:, None] / x.shape[1]
    _normalize_(out, 1.0 / np.sqrt(var + eps), w, b, norm, rstd_out)


def _normalize_(out, r, w, b, norm, rstd):
    """out (centred x) <- out·r·w + b, keeping the normalized rows in norm and r in rstd where given."""
    out *= r
    if norm is not None:
        norm[...] = out
    if rstd is not None:
        rstd[...] = r
    if w is not None:
        out *= w
        out += b


def layernorm_(x, out, w=None, b=None, eps=1e-6, norm=None, rstd=None):
    """out <- LayerNorm(x)·w + b over the last axis of 2-d x (no affine when w is None);
    optionally also the normalized x (norm) and rstd (rows, 1) for backward."""
    xp = get_xp(x)
    nk = numba_kernels(x) if w is not None else None
    if nk is not None:
        eps = x.dtype.type(eps)
        run_rows(lambda xs, os_, ns, rs: nk.layernorm(xs, os_, w, b, eps, ns, rs), x, out, norm, rstd, chunk=None)
        return out
    if xp is np:
        run_rows(lambda xs, os_, ns, rs: _layernorm_rows(xs, os_, w, b, ns, rs, eps), x, out, norm, rstd)
        return out
    acc = xp.promote_types(x.dtype, xp.float32)  # float16: statistics in float32, its squares overflow
    mean = x.mean(axis=1, keepdims=True, dtype=acc)
    xp.subtract(x, mean, out=out)
    xc = out.astype(acc, copy=False)
    _normalize_(out, 1.0 / xp.sqrt((xc * xc).mean(axis=1, keepdims=True) + eps), w, b, norm, rstd)
    return out


def _layernorm_backward_rows(dout, norm, rstd, w, dx):
    dn = np.multiply(dout, w, out=dx)
    c1 = dn.mean(axis=1, keepdims=True)
    c2 = np.einsum("ij,ij->i", dn, norm)[:, None] / dn.shape[1]
    dn -= c1
    dn -= norm * c2
    dn *= rstd


def layernorm_backward_add_(dout, norm, rstd, w, dh):
    """dh += LayerNorm backward of dout (2-d, rows of D) from the normalized input and rstd;
    returns the weight and bias gradients (D,), (D,). dout may be overwritten."""
    xp = get_xp(dout)
    nk = numba_kernels(dout)
    if nk is not None:  # one kernel, which also sums the weight and bias gradients
        D = dout.shape[1]
        return sums_over_threads(lambda d, n, r, h, dw, db: nk.layernorm_backward_add(d, n, r, w, h, dw, db),
                                  (D, D), dout, norm, rstd, dh)
    dw, db = (dout * norm).sum(axis=0), dout.sum(axis=0)
    if xp is np:
        run_rows(lambda d, n, r: _layernorm_backward_rows(d, n, r, w, d), dout, norm, rstd)
    else:
        dn = xp.multiply(dout, w, out=dout)
        c1 = dn.mean(axis=1, keepdims=True)
        c2 = (dn * norm).mean(axis=1, keepdims=True)
        dn -= c1
        dn -= norm * c2
        dn *= rstd
    dh += dout
    return dw, db




def multiply_and_sum_(a, b, axis):
    """a <- a·b in place, and returns a.sum(axis): the gradient through GELU (a·gelu') and its
    bias's gradient. a is (R, C) with axis 0, or (B, R, C) with axis (0, 2)."""
    nk = numba_kernels(a)
    if nk is None or not (a.flags.c_contiguous and b.flags.c_contiguous):
        a *= b
        return a.sum(axis=axis)
    if axis == 0:  # column sums
        (sums,) = sums_over_threads(lambda a_rows, b_rows, s: nk.multiply_and_sum(a_rows, b_rows, s, False),
                                     (a.shape[1],), a, b)
        return sums
    B, R, C = a.shape  # row sums of every image's (R, C), then summed over the images
    row_sums = np.zeros((B * R, 1), a.dtype)
    run_rows(lambda a_rows, b_rows, s: nk.multiply_and_sum(a_rows, b_rows, s[:, 0], True),
             a.reshape(B * R, C), b.reshape(B * R, C), row_sums, chunk=None)
    return row_sums.reshape(B, R).sum(axis=0)


def load_kernels(dtype=np.float32):
    """Compile Numba's kernels for dtype now (or load them from Numba's cache), so that the first
    forward pass does not pay for it (see docs/speed-notes.md for the cost). A no-op without Numba."""
    x = np.ones((2, 3), dtype)
    nk = numba_kernels(x)
    if nk is None:
        return
    b, d = np.ones(3, dtype), np.empty_like(x)
    bias_gelu_(x, b)
    bias_gelu_(x, b[:2, None])
    bias_gelu_grad_(x, b, d)
    bias_gelu_grad_(x, b[:2, None], d)
    norm, rstd = np.empty_like(x), np.empty((2, 1), dtype)
    layernorm_(x, d, b, b)
    layernorm_(x, d, b, b, norm=norm, rstd=rstd)
    layernorm_backward_add_(x, norm, rstd, b, d)
    multiply_and_sum_(d, x, 0)
    add_bias_residual_(d, x, b)
    add_bias_residual_(d, x, b[:2, None])
    multiply_and_sum_(d.reshape(1, 2, 3), x.reshape(1, 2, 3), (0, 2))
    # AdamW's update, with the argument types fast.AdamW passes (Python floats for the scalars)
    nk.adamw_update(b.copy(), b, np.zeros_like(b), np.zeros_like(b), 1.0, 0.9, 0.999, 1.0, 1.0, 1e-8)

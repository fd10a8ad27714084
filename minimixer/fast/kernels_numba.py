"""Fused elementwise kernels for the fast path on the CPU, compiled by Numba (the `fast` extra).

Why they exist: NumPy runs one operation per pass over memory, so the exact GELU costs about 17
passes over every hidden activation and LayerNorm about 8. Each kernel here is one loop: it loads
a value once, does all the arithmetic in registers and stores the result, and LLVM vectorizes the
loop (8 float32 lanes); AdamW makes one pass over each parameter and its moments instead of about
ten (docs/speed-notes.md has the timings). Every constant is written in the arrays' dtype: one
Python int or float in a float32 loop makes it compute in float64, at half speed.

The math is the math of layers.py and erf.py:
- float32 GELU uses erf.py's Abramowitz & Stegun 7.1.26, in the form kernels.py uses:
  gelu(v) = relu(v) - |v|·q and gelu'(v) = Φ(v) + v·φ(v), with q = Φ(-|v|) = P(t)·exp(-v²/2).
  exp is written out (Cody-Waite range reduction, a degree-7 Taylor polynomial; relative error
  ≤ 3e-7, 2.5 float32 ulp), because LLVM cannot vectorize a call to libm's expf.
- float64 (the precision tests check in) uses libm's erf and exp: exact.
- fastmath allows reassociation (vectorized sums) and contraction (fused multiply-add), but not
  'nnan' or 'ninf': a NaN or an infinity still comes out as one.

kernels.py calls these on row chunks from its worker threads; every kernel releases the GIL.
Shape legend: R rows, C columns (a chunk of the (M, D) residual stream or of a hidden layer).
"""
import math

import numpy as np
from numba import njit

from ..erf import AS_A as _ERF_A, AS_P as _ERF_P, TAIL_EXP_FLOOR

JIT = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False,
           fastmath={"reassoc", "contract", "nsz", "arcp"})

# Φ(-a) = 0.5·erfc(a/√2) = P(t)·exp(-a²/2), t = 1/(1 + p·a/√2): erf.py's constants, rescaled
F32 = np.float32
P32 = F32(_ERF_P / math.sqrt(2.0))
A1, A2, A3, A4, A5 = (F32(0.5 * a) for a in _ERF_A)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
LOG2E = F32(1.0 / math.log(2.0))
LN2_HI, LN2_LO = F32(0.693359375), F32(math.log(2.0) - 0.693359375)  # ln 2 = HI + LO, HI exact in 10 bits
EXP_FLOOR = F32(TAIL_EXP_FLOOR)  # exp(x) is 0 below it: see exp_nonpositive_f32


@njit(**JIT)
def exp_nonpositive_f32(x):
    """exp(x) for float32 x ≤ 0, and 0 for x < -80 (exp(-80) ≈ 1.8e-35). The cut keeps every
    result, and Φ(-|v|) = P(t)·exp(-v²/2) after it, a normal float: on x86 a denormal GELU
    output can cost the next matmul a microcode assist per operand, and what is cut is below 1e-34."""
    y = max(x, EXP_FLOOR)
    k = np.floor(y * LOG2E + F32(0.5))  # y = k·ln2 + r, |r| ≤ ln2/2 (np.floor stays float32)
    r = y - k * LN2_HI - k * LN2_LO
    p = F32(1 / 5040)
    for c in (1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0):
        p = F32(c) + r * p
    two_k = np.int32((k + F32(127)) * F32(1 << 23)).view(np.float32)  # 2^k from its exponent bits, in 32-bit lanes
    return p * two_k if x >= EXP_FLOOR else F32(0.0)


@njit(**JIT)
def phi_tail_f32(a, e):
    """q = Φ(-a) for float32 a ≥ 0, given e = exp(-a²/2) (A&S 7.1.26; |error| ≤ 0.75e-7)."""
    t = F32(1.0) / (F32(1.0) + P32 * a)
    return t * (A1 + t * (A2 + t * (A3 + t * (A4 + t * A5)))) * e


@njit(**JIT)
def gelu_f32(v):
    a = abs(v)
    q = phi_tail_f32(a, exp_nonpositive_f32(F32(-0.5) * a * a))
    return max(v, F32(0.0)) - a * q  # relu(v) - |v|·Φ(-|v|) = v·Φ(v) for either sign


@njit(**JIT)
def gelu_and_grad_f32(v):
    a = abs(v)
    e = exp_nonpositive_f32(F32(-0.5) * a * a)  # one exp for both: φ(v) = e/√(2π)
    q = phi_tail_f32(a, e)
    cdf = q if v < 0 else F32(1.0) - q  # Φ(v)
    return v * cdf, cdf + v * e * F32(INV_SQRT_2PI)


@njit(**JIT)
def gelu_f64(v):
    return v * 0.5 * (1.0 + math.erf(v * 0.7071067811865476))


@njit(**JIT)
def gelu_and_grad_f64(v):
    cdf = 0.5 * (1.0 + math.erf(v * 0.7071067811865476))
    return v * cdf, cdf + v * math.exp(-0.5 * v * v) * INV_SQRT_2PI


# The GELU kernels first copy each row into `staged` (C,), then compute from there, in L1: on a
# chunk that has left L2, the long GELU loop (about 30 vector instructions per 8 floats) keeps too
# few loads in flight and waits on memory, while the plain copy loop streams the row at memory
# speed (docs/speed-notes.md, "Staging GELU rows").

def _bias_gelu_kernel(gelu):
    """x <- gelu(x + bias) in place; bias is (C,), or (R,) with bias_per_row."""
    @njit(**JIT)
    def bias_gelu(x, bias, bias_per_row):  # x (R, C)
        staged = np.empty(x.shape[1], x.dtype)  # (C,)
        for i in range(x.shape[0]):
            row = x[i]  # (C,)
            for j in range(row.shape[0]):
                staged[j] = row[j]
            if bias_per_row:
                b = bias[i]
                for j in range(row.shape[0]):
                    row[j] = gelu(staged[j] + b)
            else:
                for j in range(row.shape[0]):
                    row[j] = gelu(staged[j] + bias[j])
    return bias_gelu


def _bias_gelu_grad_kernel(gelu_and_grad):
    """x <- gelu(x + bias) and d <- gelu'(x + bias), in place."""
    @njit(**JIT)
    def bias_gelu_grad(x, bias, bias_per_row, d):  # x, d (R, C)
        staged = np.empty(x.shape[1], x.dtype)  # (C,)
        for i in range(x.shape[0]):
            row, drow = x[i], d[i]  # (C,), (C,)
            for j in range(row.shape[0]):
                staged[j] = row[j]
            if bias_per_row:
                b = bias[i]
                for j in range(row.shape[0]):
                    row[j], drow[j] = gelu_and_grad(staged[j] + b)
            else:
                for j in range(row.shape[0]):
                    row[j], drow[j] = gelu_and_grad(staged[j] + bias[j])
    return bias_gelu_grad


BIAS_GELU = {np.dtype(np.float32): _bias_gelu_kernel(gelu_f32), np.dtype(np.float64): _bias_gelu_kernel(gelu_f64)}
BIAS_GELU_GRAD = {np.dtype(np.float32): _bias_gelu_grad_kernel(gelu_and_grad_f32),
                  np.dtype(np.float64): _bias_gelu_grad_kernel(gelu_and_grad_f64)}


@njit(**JIT)
def add_bias_residual(h, out, bias, bias_per_row):
    """h += out + bias in place (R, C): a branch's output and its last bias join the residual stream."""
    for i in range(h.shape[0]):
        hrow, orow = h[i], out[i]  # (C,), (C,)
        if bias_per_row:
            b = bias[i]
            for j in range(hrow.shape[0]):
                hrow[j] += orow[j] + b
        else:
            for j in range(hrow.shape[0]):
                hrow[j] += orow[j] + bias[j]


@njit(**JIT)
def layernorm(x, out, w, b, eps, norm, rstd):
    """out <- (x - mean)·rstd·w + b per row; norm (R, C) and rstd (R, 1) too, unless None.
    Two passes over each row (mean, then the centred variance), as layers.py computes it."""
    t = x.dtype.type  # every constant in x's dtype: a Python int or float would make it float64
    n = x.shape[1]
    inv_n = t(1) / t(n)
    for i in range(x.shape[0]):
        row, orow = x[i], out[i]  # (C,), (C,)
        total = t(0)
        for j in range(n):
            total += row[j]
        mean = total * inv_n
        sq = t(0)
        for j in range(n):
            c = row[j] - mean
            sq += c * c
        r = t(1) / np.sqrt(sq * inv_n + eps)
        if rstd is not None:
            rstd[i, 0] = r
        if norm is not None:
            nrow = norm[i]  # (C,)
            for j in range(n):
                nrow[j] = (row[j] - mean) * r
        for j in range(n):
            orow[j] = (row[j] - mean) * r * w[j] + b[j]


@njit(**JIT)
def multiply_and_sum(a, b, sums, per_row):
    """a <- a·b in place (R, C), and sums += its column sums (C,), or with per_row its row sums (R,):
    the gradient through GELU and its bias's gradient in one pass."""
    for i in range(a.shape[0]):
        arow, brow = a[i], b[i]  # (C,), (C,)
        if per_row:
            total = sums.dtype.type(0)
            for j in range(arow.shape[0]):
                v = arow[j] * brow[j]
                arow[j] = v
                total += v
            sums[i] += total
        else:
            for j in range(arow.shape[0]):
                v = arow[j] * brow[j]
                arow[j] = v
                sums[j] += v


@njit(**JIT)
def layernorm_backward_add(dout, norm, rstd, w, dh, dw, db):
    """dh += LayerNorm backward of dout (rows of C), and dw += Σ dout·norm, db += Σ dout over the rows:
    the input, weight and bias gradients and the residual add in two passes over each row."""
    t = dout.dtype.type  # every constant in dout's dtype (see layernorm)
    n = dout.shape[1]
    inv_n = t(1) / t(n)
    for i in range(dout.shape[0]):
        drow, nrow, hrow = dout[i], norm[i], dh[i]  # (C,) each
        c1 = t(0)
        c2 = t(0)
        for j in range(n):
            d, nj = drow[j], nrow[j]
            dn = d * w[j]
            c1 += dn
            c2 += dn * nj
            dw[j] += d * nj
            db[j] += d
        c1 *= inv_n
        c2 *= inv_n
        r = rstd[i, 0]
        for j in range(n):
            hrow[j] += (drow[j] * w[j] - c1 - nrow[j] * c2) * r


@njit(**JIT)
def adamw_update(p, g, m, v, decay, beta1, beta2, step_size, sqrt_bias_correction2, eps):
    """optim.AdamW.update in one pass over flat arrays (p, m, v in place), in the arrays' dtype:
    m += (1-β1)(g - m); v = β2·v + (1-β2)·g²; p = p·decay - step_size·m / (√v / √(1-β2ᵗ) + eps)."""
    t = p.dtype.type
    decay, one_minus_beta1, beta2, one_minus_beta2 = t(decay), t(1.0 - beta1), t(beta2), t(1.0 - beta2)
    step_size, sqrt_bias_correction2, eps = t(step_size), t(sqrt_bias_correction2), t(eps)
    for i in range(p.shape[0]):
        gi = g[i]
        mi = m[i] + one_minus_beta1 * (gi - m[i])
        vi = v[i] * beta2 + one_minus_beta2 * gi * gi
        m[i], v[i] = mi, vi
        p[i] = p[i] * decay - step_size * (mi / (np.sqrt(vi) / sqrt_bias_correction2 + eps))

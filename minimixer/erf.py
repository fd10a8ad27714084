"""The error function, erf, for NumPy and CuPy arrays.

NumPy has no erf, and exact GELU needs one: gelu(x) = 0.5·x·(1 + erf(x/√2)).

- float64: to float64 precision (max |error| ≈ 1.3e-15, checked against
  math.erf in tests/test_erf.py), because the float64 gradient checks and the
  float64 comparison with PyTorch autograd depend on it. Two classical forms:
    |x| < 2.5:  erf(x)  = 2/√π · e^(-x²) · Σ_n 2ⁿ x^(2n+1) / (1·3·5···(2n+1))
                (every term is positive, so nothing cancels; 40 terms suffice)
    |x| ≥ 2.5:  erfc(x) = e^(-x²)/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + ...))))
                (Laplace's continued fraction, 40 levels, evaluated from the tail)
- float32 (and float16, computed in float32): Abramowitz & Stegun 7.1.26,
    erf(x) = 1 - (a1·t + a2·t² + a3·t³ + a4·t⁴ + a5·t⁵)·e^(-x²),  t = 1/(1 + p·x),
  |error| ≤ 1.5e-7 in exact arithmetic, < 7e-7 in float32 (6.7e-7 at worst over
  all float32 inputs with 2^-9 ≤ |x| ≤ 6, at |x| ≈ 0.046, where 1 - poly·e^(-x²)
  cancels): far below float32 noise in a network, and one pass of cheap
  elementwise work.
"""
import math

from .backend import get_xp

SERIES_CUTOFF = 2.5
NUM_TERMS = 40

# Abramowitz & Stegun, Handbook of Mathematical Functions, 7.1.26
AS_P = 0.3275911
AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
# The fast paths' float32 GELU takes exp of nothing below this (exp(-80) ≈ 1.8e-35), so that no
# activation is a denormal float: each denormal operand costs a matmul a microcode assist on x86
TAIL_EXP_FLOOR = -80.0


def erf(x):
    """erf(x), elementwise, in x's dtype (float64 exact; lower precisions via A&S 7.1.26)."""
    xp = get_xp(x)
    if x.dtype == xp.float64:
        return _erf_float64(x, xp)
    return _erf_float32(x.astype(xp.float32, copy=False), xp).astype(x.dtype, copy=False)


def _erf_float64(x, xp):
    ax = xp.abs(x)
    near = ax < SERIES_CUTOFF
    # series on the near part (a = 0 elsewhere, which the series maps to 0)
    a = xp.where(near, ax, 0.0)
    a2 = a * a
    term = a.copy()
    total = a.copy()
    for n in range(1, NUM_TERMS):
        term *= 2.0 * a2 / (2 * n + 1)
        total += term
    erf_near = (2.0 / math.sqrt(math.pi)) * xp.exp(-a2) * total
    # continued fraction on the far part (b = cutoff elsewhere; erf(10) is 1.0 in float64)
    b = xp.clip(xp.where(near, SERIES_CUTOFF, ax), SERIES_CUTOFF, 10.0)
    f = b.copy()
    for k in range(NUM_TERMS, 0, -1):
        f = b + (0.5 * k) / f
    erf_far = 1.0 - xp.exp(-b * b) / (math.sqrt(math.pi) * f)
    return xp.sign(x) * xp.where(near, erf_near, erf_far)


def _erf_float32(x, xp):
    ax = xp.abs(x)
    t = 1.0 / (1.0 + AS_P * ax)
    a1, a2, a3, a4, a5 = AS_A
    poly = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5))))  # Horner form
    return xp.sign(x) * (1.0 - poly * xp.exp(-ax * ax))

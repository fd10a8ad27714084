"""Numba's float32 kernels (minimixer/fast/kernels_numba.py): the written-out exp, and GELU's accuracy.
The kernels' agreement with the clear path is tests/test_fast.py's, run with `-m numba`."""
import math

import numpy as np
import pytest

pytestmark = pytest.mark.numba


@pytest.fixture(scope="module")
def nk():
    from minimixer.fast import kernels_numba as numba_kernels
    return numba_kernels


def test_exp_relative_error_and_cut(nk):
    x = np.concatenate([np.linspace(-80, 0, 400001), -np.logspace(-8, 0, 1000)]).astype(np.float32)
    got = np.array([nk.exp_nonpositive_f32(v) for v in x[::97]]
                   + [nk.exp_nonpositive_f32(np.float32(0))])
    ref = np.exp(np.append(x[::97], 0).astype(np.float64))
    rel = np.abs(got - ref) / ref
    worst = x[::97][rel[:-1].argmax()]
    assert rel.max() <= 3e-7, f"exp (2.5 float32 ulp): max relative error {rel.max():.3g} at x = {worst}"
    for v in (-80.001, -100.0, -1e30, -np.inf):
        assert nk.exp_nonpositive_f32(np.float32(v)) == 0.0, v


@pytest.mark.parametrize("grad", [False, True])
def test_float32_gelu_within_a_few_ulp_of_exact(nk, grad):
    """GELU from float32 A&S 7.1.26 against float64 math.erf: |error| ≤ 1e-7·max(1, |v|)."""
    v = np.concatenate([np.linspace(-14, 14, 280000), np.random.default_rng(0).standard_normal(20000)])
    v = v.astype(np.float32).reshape(-1, 100)
    exact = np.vectorize(lambda t: t * 0.5 * (1 + math.erf(t / math.sqrt(2))))(v.astype(np.float64))
    x = v.copy()
    if grad:
        d = np.empty_like(x)
        nk.BIAS_GELU_GRAD[x.dtype](x, np.zeros(100, np.float32), False, d)
        dexact = np.vectorize(lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2))) + t * math.exp(-t * t / 2)
                              / math.sqrt(2 * math.pi))(v.astype(np.float64))
        derr = np.abs(d - dexact).max()
        assert derr <= 3e-7, f"gelu': max |error| {derr:.3g}"
    else:
        nk.BIAS_GELU[x.dtype](x, np.zeros(100, np.float32), False)
    err = np.abs(x - exact) / np.maximum(1.0, np.abs(v))
    assert err.max() <= 3e-7, f"gelu: max |error|/max(1, |v|) {err.max():.3g} at v = {v.ravel()[err.argmax()]}"

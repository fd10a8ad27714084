"""erf against Python's math.erf (correctly rounded to within an ulp or so)."""
import math

import numpy as np
import pytest

from minimixer.erf import erf

ref = np.vectorize(math.erf)


def grid():
    # dense on [-7, 7] (both float64 branches and the cutoff at 2.5), plus edge values
    return np.concatenate([np.linspace(-7, 7, 280_001), [0.0, -0.0, 1e-300, -1e-12, 2.5, -2.5,
                                                          np.nextafter(2.5, 0), 9.0, 30.0, 1e300, np.inf, -np.inf]])


def test_float64_is_exact_to_1e14():
    x = grid()
    diff = np.abs(erf(x) - ref(x)).max()
    print(f"float64 erf max|Δ| vs math.erf: {diff:.3e}")
    assert diff <= 1e-14
    # tiny arguments keep their relative precision (erf(x) ≈ 2x/√π)
    small = np.array([1e-300, 1e-20, 1e-8])
    assert np.abs(erf(small) / ref(small) - 1).max() <= 1e-15


def test_float32_is_within_1e6():
    x = grid()
    x = x[np.abs(x) < 1e30].astype(np.float32)  # 1e300 does not fit
    out = erf(x)
    assert out.dtype == np.float32
    diff = np.abs(out.astype(np.float64) - ref(x.astype(np.float64))).max()
    print(f"float32 erf max|Δ| vs math.erf: {diff:.3e}")
    assert diff <= 1e-6


def test_float16_computes_in_float32():
    x = np.linspace(-4, 4, 101).astype(np.float16)
    out = erf(x)
    assert out.dtype == np.float16
    assert np.abs(out.astype(np.float64) - ref(x.astype(np.float64))).max() <= 1e-3  # fp16's own rounding


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_odd_bounded_and_nan(dtype):
    x = np.linspace(-10, 10, 2001).astype(dtype)
    out = erf(x)
    assert np.array_equal(out, -erf(-x))
    assert np.abs(out).max() <= 1.0
    assert np.isnan(erf(np.array([np.nan], dtype))).all()

"""The fast path's fused CUDA kernels for CuPy: GELU (erf or tanh form) with its bias, and its
derivative, in one launch each.

(in params, out params, body) by name; tests/test_nvrtc.py compiles each for float16/32/64. C is
the type they compute in: float for float16 and float32 arrays (CUDA's erff is within 2 ulp),
double for float64 (erf, exp, tanh in double), as the NumPy path computes.
"""
import math

from .. import layers

INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
CUPY_PREAMBLE = """
template <typename T> struct minimixer_compute { typedef float type; };
template <> struct minimixer_compute<double> { typedef double type; };
"""
_V = "typedef minimixer_compute<T>::type C; C v = (C)x + (C)b;"
_ERF_CDF = f"C cdf = C(0.5) * (C(1) + erf(v * C({math.sqrt(0.5)!r})));"
_TANH = (f"C t = tanh(C({layers.SQRT_2_OVER_PI!r}) * (v + C({layers.GELU_TANH_COEF!r}) * v * v * v));")
CUPY_KERNELS = {
    "minimixer_bias_gelu": ("T b", "T x", f"{_V} {_ERF_CDF} x = (T)(v * cdf);"),
    "minimixer_bias_gelu_grad": (
        "T b", "T x, T d",
        f"{_V} {_ERF_CDF} d = (T)(cdf + v * exp(C(-0.5) * v * v) * C({INV_SQRT_2PI!r})); x = (T)(v * cdf);"),
    "minimixer_bias_gelu_tanh": ("T b", "T x", f"{_V} {_TANH} x = (T)(C(0.5) * v * (C(1) + t));"),
    "minimixer_bias_gelu_tanh_grad": (
        "T b", "T x, T d",
        f"{_V} {_TANH} d = (T)(C(0.5) * (C(1) + t) + C(0.5) * v * (C(1) - t * t) * C({layers.SQRT_2_OVER_PI!r})"
        f" * (C(1) + C({3 * layers.GELU_TANH_COEF!r}) * v * v)); x = (T)(C(0.5) * v * (C(1) + t));"),
}
GELU_KERNEL = {("erf", False): "minimixer_bias_gelu", ("erf", True): "minimixer_bias_gelu_grad",
               ("tanh", False): "minimixer_bias_gelu_tanh", ("tanh", True): "minimixer_bias_gelu_tanh_grad"}


def cupy_kernel(cp, name):
    """CUPY_KERNELS[name] as a cp.ElementwiseKernel, built once per process (CuPy compiles it on first use)."""
    cache = cupy_kernel.__dict__.setdefault("cache", {})
    if (cp, name) not in cache:
        cache[cp, name] = cp.ElementwiseKernel(*CUPY_KERNELS[name], name, preamble=CUPY_PREAMBLE)
    return cache[cp, name]

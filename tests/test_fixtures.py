"""Parity with timm through committed fixtures: runs without torch.

tests/fixtures/make_fixtures.py saved timm's weights and timm's outputs (logits,
and dx plus every parameter gradient of sum(logits·dlogits) from torch autograd).
Here minimixer loads the same safetensors file and must reproduce them.
"""
import json
import os

import numpy as np
import pytest

import minimixer as mm
from minimixer import model
from support.helpers import assert_all_close, assert_grads_close

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CASES = ["tiny_erf_f64", "tiny_tanh_f64", "small_erf_f32"]


def load_case(name, backend="numpy"):
    ref = np.load(os.path.join(FIXTURES, f"{name}.npz"))
    cfg = mm.MixerConfig.from_dict(json.loads(str(ref["config"])))
    dtype = ref["x"].dtype
    params = mm.load_weights(os.path.join(FIXTURES, f"{name}.safetensors"), cfg, dtype=dtype, backend=backend)
    return cfg, params, ref


@pytest.mark.parametrize("name", CASES)
def test_logits_and_grads_match_timm(name, backend):
    cfg, params, ref = load_case(name, backend)
    f64 = ref["x"].dtype == np.float64
    x, dlogits = mm.to_backend(ref["x"], backend), mm.to_backend(ref["dlogits"], backend)
    logits, cache = mm.mixer_forward(params, x, cfg)
    dx, grads = mm.mixer_backward(dlogits, cache)
    logits, dx, grads = mm.to_numpy(logits), mm.to_numpy(dx), mm.to_numpy(grads)
    assert set(grads) == set(params)
    # float64: the same math up to summation order; float32: timm's erf and BLAS differ in the last bits
    assert_all_close([("logits", logits, ref["logits"])], 1e-12 if f64 else 1e-5)
    pairs = [("dx", dx, ref["dx"])] + [(k, grads[k], ref[f"grad/{k}"]) for k in params]
    assert_grads_close(pairs, 1e-9 if f64 else 1e-4, zero_tol=1e-13 if f64 else 1e-5)


@pytest.mark.parametrize("name", CASES)
def test_predict_matches_forward(name, backend):
    """model.predict is mixer_forward without caches: identical. mm.predict is the fast
    path: equal up to rounding, and to timm's logits like the forward."""
    cfg, params, ref = load_case(name, backend)
    x = mm.to_backend(ref["x"], backend)
    logits, _ = mm.mixer_forward(params, x, cfg)
    f64 = ref["x"].dtype == np.float64
    assert_all_close([("model.predict vs forward", mm.to_numpy(model.predict(params, x, cfg)), mm.to_numpy(logits)),
                      ], 0.0)
    fast_logits = mm.to_numpy(mm.predict(params, x, cfg))
    assert_all_close([("fast predict vs forward", fast_logits, mm.to_numpy(logits))], 1e-12 if f64 else 2e-6)
    assert_all_close([("fast predict vs timm", fast_logits, ref["logits"])], 1e-12 if f64 else 1e-5)

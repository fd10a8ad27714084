"""Backend selection: the array decides; asking for CuPy without a GPU is a clear error."""
import numpy as np
import pytest

import minimixer as mm
from minimixer import backend


def test_numpy_arrays_pick_numpy():
    assert mm.get_xp(np.zeros(2), np.ones(3)) is np
    assert backend.xp_for("numpy") is np


def test_to_backend_numpy_roundtrip_and_cast():
    params = {"a": np.arange(3, dtype=np.float64), "b": [1.0, 2.0]}
    out = mm.to_backend(params, "numpy", dtype="float32")
    assert out["a"].dtype == np.float32 and out["b"].dtype == np.float32
    assert mm.to_numpy(out["a"]) is out["a"]  # numpy in, numpy out, no copy


def test_unknown_backend_is_valueerror():
    with pytest.raises(ValueError, match="unknown backend 'torch'"):
        mm.to_backend(np.zeros(2), "torch")


@pytest.mark.skipif(mm.cupy_available(), reason="a GPU is usable here")
def test_cupy_without_gpu_is_a_clear_error():
    with pytest.raises(mm.BackendError, match="backend 'cupy' needs"):
        mm.to_backend(np.zeros(2), "cupy")
    with pytest.raises(mm.BackendError, match="backend 'cupy' needs"):
        mm.init_params(mm.MixerConfig(embed_dim=8, img_size=32, patch_size=8), backend="cupy")


def test_cupy_is_not_imported_by_numpy_work():
    import subprocess
    import sys
    code = ("import sys, numpy as np, minimixer as mm\n"
            "cfg = mm.MixerConfig(embed_dim=8, img_size=16, patch_size=8, num_blocks=1, num_classes=3)\n"
            "p = mm.init_params(cfg)\n"
            "mm.predict(p, np.zeros((1, 3, 16, 16), np.float32), cfg)\n"
            "print('cupy' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_float_dtype():
    assert backend.float_dtype("float16") == np.float16
    for bad in ("int32", "bfloat16", "nonsense", None):
        with pytest.raises(ValueError, match="unsupported dtype"):
            backend.float_dtype(bad)

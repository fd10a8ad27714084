import pytest

import minimixer as mm

CUPY_OK = mm.cupy_available()  # try/except inside: False without CuPy or without a GPU


@pytest.fixture(params=["numpy", "cupy"])
def backend(request):
    """Run a test on each backend; cupy only where a GPU is usable."""
    if request.param == "cupy" and not CUPY_OK:
        pytest.skip("CuPy backend: no usable GPU here")
    return request.param

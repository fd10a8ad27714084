"""What the tests share and are not tests themselves: comparison helpers (helpers.py), the CuPy
stand-in (fake_cupy.py), the grader's attack submissions (coursework_attacks.py) and the timm
reference builders (timm_reference.py, needs the `timm` extra)."""

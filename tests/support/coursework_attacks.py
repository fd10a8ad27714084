"""Submissions that try to cheat or to break the grader, for tests/test_coursework.py.

Each function takes the correct layers.py and optim.py texts (the answer key) and the blank
ones (the student edition), and returns (layers_src, optim_src, affected exercises, reason
regex). `secret` is a path whose contents the submission must not be able to read.
"""
import textwrap

LAYER_EXERCISES = ("linear_forward", "linear_backward", "gelu_forward", "gelu_backward", "layernorm_forward",
                   "layernorm_backward", "mlp_forward", "mlp_backward", "token_mixing_forward",
                   "token_mixing_backward", "channel_mixing_forward", "channel_mixing_backward",
                   "mixer_block_forward", "mixer_block_backward", "softmax_cross_entropy")


def replace_function(text, name, new_body_src):
    """Swap the top-level function `name` in a module's text for new source."""
    import re
    m = re.search(rf"^def {name}\b.*?(?=^\S|\Z)", text, flags=re.S | re.M)
    return text[:m.start()] + textwrap.dedent(new_body_src).strip() + "\n\n\n" + text[m.end():]


def import_full_package(key, blank, full_package_dir, secret):
    code = f'''

# try to take every answer from the full minimixer (which holds the solutions)
import importlib.util as _u, sys as _s
_s.path.insert(0, {str(full_package_dir)!r})
_spec = _u.spec_from_file_location("minimixer._full_layers", {str(full_package_dir) + "/minimixer/layers.py"!r})
_full = _u.module_from_spec(_spec)
_spec.loader.exec_module(_full)
globals().update({{k: v for k, v in vars(_full).items() if k.endswith(("_forward", "_backward", "_entropy"))}})
from minimixer.layers import *  # noqa
'''
    return blank["layers"] + code, blank["optim"], LAYER_EXERCISES, r"does not import: .*(Permission|not allowed)"


def import_solutions_quietly(key, blank, full_package_dir, secret):
    code = f'''

# the issue's recipe (a star import from the package), then the full package imported afresh
# from its folder (without its __init__), each in a try so that the file still imports
try:
    from minimixer.layers import *  # noqa
except Exception:
    pass
try:
    import sys as _s, types as _t
    _saved = {{k: _s.modules.pop(k) for k in list(_s.modules) if k.split(".")[0] == "minimixer"}}
    try:
        _pkg = _t.ModuleType("minimixer")
        _pkg.__path__ = [{str(full_package_dir) + "/minimixer"!r}]
        _s.modules["minimixer"] = _pkg
        import minimixer.layers as _full
        _found = {{k: v for k, v in vars(_full).items() if k.endswith(("_forward", "_backward", "_entropy"))}}
    finally:
        for _k in [k for k in _s.modules if k.split(".")[0] == "minimixer"]:
            del _s.modules[_k]
        _s.modules.update(_saved)
    globals().update(_found)
except Exception:
    pass
'''
    return blank["layers"] + code, blank["optim"], LAYER_EXERCISES, r"^not implemented$"


def replace_grader_functions(key, blank, full_package_dir, secret):
    code = '''

# replace the grader's functions from inside the submission (the issue's recipe first)
import sys as _s
try:
    import minimixer.coursework as _c
    _c.grade_exercise = lambda *a: (10, "looks right")
except Exception:
    pass
for _name in list(_s.modules):
    _m = _s.modules[_name]
    for _attr in ("grade_exercise", "grade", "score", "run_job", "compare", "explain"):
        if hasattr(_m, _attr):
            try:
                setattr(_m, _attr, lambda *a, **k: (10, "looks right"))
            except Exception:
                pass
'''
    return blank["layers"] + code, blank["optim"], LAYER_EXERCISES, r"(not implemented|tampered|protocol)"


def stack_frames(key, blank, full_package_dir, secret):
    body = '''
    def linear_forward(x, w, b):
        import sys
        f = sys._getframe()
        while f is not None:  # look for the grader's expected outputs up the stack
            for k, v in f.f_locals.items():
                if k in ("expected", "reference", "expected_cases", "cases_for", "_cases"):
                    return v, (x, w)
            f = f.f_back
        for mod in list(sys.modules.values()):
            for k in ("_cases", "REFERENCE", "expected"):
                if hasattr(mod, k):
                    return getattr(mod, k), (x, w)
        return x[..., :w.shape[0]] * 0, None
    '''
    return replace_function(blank["layers"], "linear_forward", body), blank["optim"], ("linear_forward",), \
        r"out (max rel error|has shape|is )"


def file_system(key, blank, full_package_dir, secret):
    forward = f'''
    def linear_forward(x, w, b):
        secret = open({str(secret)!r}).read()  # a private reference, anywhere on the disk
        return x @ w.T + b, (x, w)
    '''
    backward = f'''
    def linear_backward(dout, cache):
        src = open({str(full_package_dir) + "/minimixer/layers.py"!r}).read()  # the solutions
        scope = {{}}
        exec(src.replace("from .", "from minimixer."), scope)
        return scope["linear_backward"](dout, cache)
    '''
    text = replace_function(replace_function(key["layers"], "linear_forward", forward), "linear_backward", backward)
    return text, key["optim"], ("linear_forward", "linear_backward"), \
        r"(PermissionError|not allowed).*layers\.py, line \d+, in linear_(for|back)ward: (secret|src) = open"


def infinite_loop(key, blank, full_package_dir, secret):
    body = '''
    def gelu_backward(dout, cache):
        while True:
            pass
    '''
    return replace_function(key["layers"], "gelu_backward", body), key["optim"], ("gelu_backward",), r"timed out"


def sys_exit(key, blank, full_package_dir, secret):
    body = '''
    def layernorm_forward(x, w, b, eps=1e-6):
        import sys
        sys.exit(3)
    '''
    return replace_function(key["layers"], "layernorm_forward", body), key["optim"], ("layernorm_forward",), \
        r"sys\.exit\(3\)"


def os_exit_at_import(key, blank, full_package_dir, secret):
    return key["layers"] + "\nimport os\nos._exit(0)\n", key["optim"], LAYER_EXERCISES, \
        r"exited with status 0 .*while importing layers\.py"


def syntax_error(key, blank, full_package_dir, secret):
    text = key["layers"].replace("db = _sum_leading(dout)  # (O,)", "db = _sum_leading(dout  # (O,)", 1)
    assert text != key["layers"]
    return text, key["optim"], LAYER_EXERCISES, r"SyntaxError at layers\.py, line \d+"


ATTACKS = {f.__name__: f for f in (import_full_package, import_solutions_quietly, replace_grader_functions, stack_frames, file_system,
                                   infinite_loop, sys_exit, os_exit_at_import, syntax_error)}

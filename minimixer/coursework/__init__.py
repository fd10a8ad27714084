"""Coursework: students write MLP-Mixer's forward and backward passes, and an autograder checks them.

    python -m minimixer.coursework release --out hw/            # student files, solutions stripped
    python -m minimixer.coursework release --out key/ --solutions
    python -m minimixer.coursework grade hw/ [--json]            # per-exercise scores and a total
    python -m minimixer.coursework make-reference --seed 7       # rotate the hidden cases

There is one source of truth: minimixer's own layers.py and optim.py, where each
exercise's body sits between "### BEGIN SOLUTION" and "### END SOLUTION" (nbgrader's
markers). Releasing copies those functions, signatures, docstrings (shapes and cache
contents) and return lines included, and replaces each solution region with
`raise NotImplementedError`.

The grader imports the student's files (no torch needed). Every exercise is graded on
its own: the other functions it calls are minimixer's, and a backward pass receives the
cache of minimixer's forward. Each exercise is checked against stored reference outputs
(reference.npz, made from the solution with a seed) and, for backward passes and the
loss, by central differences.
"""
import importlib.util
import inspect
import json
import os
import textwrap
import zlib
from dataclasses import dataclass
from unittest import mock

import numpy as np

from .. import layers, optim
from ..cli import ArgumentParser, UserError
from ..checkpoints.safetensors_io import atomic_write_bytes

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "reference.npz")
TOL = 1e-7  # relative to each tensor's scale: float64 implementations agree far better than this


# --- the assignments ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Assignment:
    key: str
    filename: str
    title: str
    preamble: str
    objects: tuple  # (source module, name) in file order; names in `exercises` are stripped
    exercises: tuple


ASSIGNMENTS = (
    Assignment(
        "A1", "a1_layers.py", "Layers: linear, GELU and LayerNorm",
        '''import math

from minimixer.backend import get_xp
from minimixer.erf import erf  # NumPy has no erf: minimixer's, exact in float64
from minimixer.layers import GELU_FORMS, GELU_TANH_COEF, SQRT_2_OVER_PI, _sum_leading
''',
        ((layers, "linear_forward"), (layers, "linear_backward"), (layers, "gelu_forward"),
         (layers, "gelu_backward"), (layers, "layernorm_forward"), (layers, "layernorm_backward")),
        ("linear_forward", "linear_backward", "gelu_forward", "gelu_backward", "layernorm_forward",
         "layernorm_backward")),
    Assignment(
        "A2", "a2_mixing.py", "Mixing: the MLP, token mixing, channel mixing and the Mixer block",
        '''# The A1 layers and the regularizers, as minimixer implements them
from minimixer.layers import (CHANNEL_MIXING_KEYS, TOKEN_MIXING_KEYS, drop_path_backward,  # noqa: F401
                              drop_path_forward, gelu_backward, gelu_forward, layernorm_backward,
                              layernorm_forward, linear_backward, linear_forward)
''',
        ((layers, "mlp_forward"), (layers, "mlp_backward"), (layers, "token_mixing_forward"),
         (layers, "token_mixing_backward"), (layers, "channel_mixing_forward"), (layers, "channel_mixing_backward"),
         (layers, "mixer_block_forward"), (layers, "mixer_block_backward")),
        ("mlp_forward", "mlp_backward", "token_mixing_forward", "token_mixing_backward", "channel_mixing_forward",
         "channel_mixing_backward", "mixer_block_forward", "mixer_block_backward")),
    Assignment(
        "A3", "a3_training.py", "Training: the loss and AdamW",
        '''import math

from minimixer.backend import get_xp
from minimixer.optim import Optimizer  # the params dict, lr, weight-decay exemptions, state
''',
        ((layers, "softmax_cross_entropy"), (optim, "AdamW")),
        ("softmax_cross_entropy", "AdamW")),
)


def strip_solutions(source, name):
    """Replace every BEGIN/END SOLUTION region with `raise NotImplementedError`."""
    out, inside = [], False
    for line in source.splitlines():
        marker = line.strip()
        if marker == BEGIN:
            inside = True
            indent = line[:len(line) - len(line.lstrip())]
            out.append(f'{indent}raise NotImplementedError("{name}: write your solution here")')
        elif marker == END:
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{name}: unterminated {BEGIN}")
    return "\n".join(out)


def assignment_source(a, solutions):
    header = textwrap.dedent(f'''\
        """{a.key}: {a.title}.

        Fill in every function that raises NotImplementedError. The docstrings give each
        input, output and cache with its shapes (B batch, N tokens, D channels, DS/DC hidden
        sizes, "..." any leading axes). Forward passes return (out, cache); backward passes
        take (dout, cache) and return the gradients. The arrays may be NumPy or CuPy: use
        xp = get_xp(x) for array functions.

        Check your work: python -m minimixer.coursework grade <this folder>
        """
        ''')
    parts = [header + a.preamble.rstrip()]
    for module, name in a.objects:
        src = inspect.getsource(getattr(module, name))
        parts.append(src.rstrip() if solutions else strip_solutions(src, name))
    return "\n\n\n".join(parts) + "\n"


def release(out_dir, solutions=False):
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for a in ASSIGNMENTS:
        path = os.path.join(out_dir, a.filename)
        atomic_write_bytes(path, assignment_source(a, solutions).encode())
        written.append(path)
    return written


# --- cases: deterministic inputs, and how to run one exercise ---------------------------------------

def _rng(seed, name, case):
    return np.random.default_rng([seed, zlib.crc32(name.encode()), case])


def _block_params(rng, N, D, DS, DC):
    r = rng.standard_normal
    return {"norm1.weight": 1 + 0.3 * r(D), "norm1.bias": 0.3 * r(D),
            "mlp_tokens.fc1.weight": r((DS, N)), "mlp_tokens.fc1.bias": r(DS),
            "mlp_tokens.fc2.weight": 0.5 * r((N, DS)), "mlp_tokens.fc2.bias": r(N),
            "norm2.weight": 1 + 0.3 * r(D), "norm2.bias": 0.3 * r(D),
            "mlp_channels.fc1.weight": r((DC, D)), "mlp_channels.fc1.bias": r(DC),
            "mlp_channels.fc2.weight": 0.5 * r((D, DC)), "mlp_channels.fc2.bias": r(D)}


SHAPES = [(2, 5, 4, 3, 8), (3, 7, 6, 4, 12), (1, 4, 9, 2, 5)]  # (B, N, D, DS, DC) per case


def forward_args(name, rng, case):
    """Positional arguments of the forward pass behind an exercise."""
    B, N, D, DS, DC = SHAPES[case]
    r = rng.standard_normal
    form = "tanh" if case == 2 else "erf"
    if name.startswith("linear"):
        return (r((B, N, D)), r((DS, D)), r(DS))
    if name.startswith("gelu"):
        return (3 * r((B, N, D)), form)
    if name.startswith("layernorm"):
        return (2 * r((B, N, D)) + 0.5, 1 + 0.3 * r(D), 0.3 * r(D), 1e-6)
    if name.startswith("mlp"):
        return (r((B, N, D)), r((DS, D)), r(DS), 0.5 * r((D, DS)), r(D), form)
    p = _block_params(rng, N, D, DS, DC)
    x = r((B, N, D))
    if name.startswith("token_mixing"):
        return (x, *(p[k] for k in layers.TOKEN_MIXING_KEYS), 1e-6, form)
    if name.startswith("channel_mixing"):
        return (x, *(p[k] for k in layers.CHANNEL_MIXING_KEYS), 1e-6, form)
    return (x, p, 1e-6, form)  # mixer block


def _as_list(out):
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    if isinstance(out, tuple):
        return [v for item in out for v in _as_list(item)]
    return [np.asarray(out, dtype=np.float64)]


def run_exercise(module, name, seed, case):
    """The exercise's outputs (a list of arrays) on case `case`, with every other function
    taken from minimixer so that each exercise is graded on its own."""
    rng = _rng(seed, name, case)
    if name == "softmax_cross_entropy":
        B, K = 4 + case, 3 + 2 * case
        logits = 3 * rng.standard_normal((B, K))
        labels = rng.integers(0, K, B) if case != 1 else rng.dirichlet(np.ones(K), B)
        loss, dlogits = module.softmax_cross_entropy(logits, labels, label_smoothing=0.1 * case)
        return [np.array(loss), dlogits]
    if name == "AdamW":
        params = {"w": rng.standard_normal((3, 4)), "norm.weight": 1 + rng.standard_normal(4)}
        opt = module.AdamW(params, lr=0.01 * (case + 1), betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                           no_decay=optim.bias_and_norm)
        for _ in range(3):
            opt.step({k: rng.standard_normal(v.shape) for k, v in params.items()})
        return [params[k] for k in sorted(params)]
    base = name.rsplit("_", 1)[0]
    args = forward_args(name, rng, case)
    forward = getattr(layers, f"{base}_forward")
    if name.endswith("_forward"):
        out, cache = getattr(module, name)(*args)
        # the cache must hold what the docstring says: minimixer's backward runs on it
        dout = rng.standard_normal(np.shape(out))
        return _as_list(out) + _as_list(getattr(layers, f"{base}_backward")(dout, cache))
    out, cache = forward(*args)  # minimixer's forward: a backward pass gets the documented cache
    dout = rng.standard_normal(out.shape)
    return _as_list(getattr(module, name)(dout, cache))


def make_reference(path=REFERENCE, seed=0):
    """Reference outputs of every exercise, computed by minimixer itself."""
    data = {"seed": np.array(seed)}
    for a in ASSIGNMENTS:
        for name in a.exercises:
            src = optim if name == "AdamW" else layers
            for case in range(len(SHAPES)):
                for i, v in enumerate(run_exercise(src, name, seed, case)):
                    data[f"{name}/{case}/{i}"] = v
    with open(path + ".tmp", "wb") as f:
        np.savez_compressed(f, **data)
    os.replace(path + ".tmp", path)
    return path


# --- the gradient checks ---------------------------------------------------------------------------

def _relative(got, expected):
    """max|got - expected| over a list of arrays, relative to the largest expected value. One
    scale for all, because some gradients are zero in exact arithmetic (a token-mixing fc2
    bias feeds only LayerNorms) and hold nothing but rounding noise."""
    got = [np.asarray(g, dtype=np.float64) for g in got]
    expected = [np.asarray(e, dtype=np.float64) for e in expected]
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
        return np.inf
    scale = max(max(np.abs(e).max(initial=0) for e in expected), 1e-12)
    return float(max(np.abs(g - e).max(initial=0) for g, e in zip(got, expected)) / scale)


def gradient_check(module, name, seed):
    """Central differences of minimixer's forward against the student's backward (or the
    student's loss gradient): the worst relative error over every input."""
    rng = _rng(seed, name + "/gradcheck", 0)
    h = 1e-6
    if name == "softmax_cross_entropy":
        logits, labels = 2 * rng.standard_normal((3, 4)), rng.integers(0, 4, 3)
        _, dlogits = module.softmax_cross_entropy(logits, labels, label_smoothing=0.1)
        numeric = np.zeros_like(logits)
        for i in np.ndindex(logits.shape):
            old = logits[i]
            logits[i] = old + h
            fp = module.softmax_cross_entropy(logits, labels, label_smoothing=0.1)[0]
            logits[i] = old - h
            fm = module.softmax_cross_entropy(logits, labels, label_smoothing=0.1)[0]
            logits[i] = old
            numeric[i] = (fp - fm) / (2 * h)
        return _relative([dlogits], [numeric])
    base = name.rsplit("_", 1)[0]
    forward = getattr(layers, f"{base}_forward")
    args = list(forward_args(name, rng, 1))
    out, cache = forward(*args)
    dout = rng.standard_normal(out.shape)
    analytic = _as_list(getattr(module, name)(dout, cache))
    arrays = [a for a in args if isinstance(a, np.ndarray)]
    if isinstance(args[1], dict):  # the block: x, then its parameters in sorted-key order (as returned)
        arrays = [args[0]] + [args[1][k] for k in sorted(args[1])]
    numerics = []
    for array in arrays:
        numeric = np.zeros_like(array)
        for i in np.ndindex(array.shape):
            old = array[i]
            array[i] = old + h
            fp = float((forward(*args)[0] * dout).sum())
            array[i] = old - h
            fm = float((forward(*args)[0] * dout).sum())
            array[i] = old
            numeric[i] = (fp - fm) / (2 * h)
        numerics.append(numeric)
    return _relative(analytic, numerics)


# --- grading -------------------------------------------------------------------------------------------

POINTS = 10
GRADCHECK_TOL = 1e-6  # central differences with h = 1e-6 in float64


def load_student(path):
    name = f"student_{os.path.splitext(os.path.basename(path))[0]}_{abs(hash(path))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def grade_exercise(module, a, name, reference):
    """(points, message) for one exercise."""
    seed = int(reference["seed"])
    others = [n for n in a.exercises if n != name and hasattr(module, n)]
    patches = [mock.patch.object(module, n, getattr(optim if n == "AdamW" else layers, n)) for n in others]
    try:
        for p in patches:
            p.start()
        worst = 0.0
        for case in range(len(SHAPES)):
            got = run_exercise(module, name, seed, case)
            expected = [reference[f"{name}/{case}/{i}"] for i in range(sum(k.startswith(f"{name}/{case}/")
                                                                            for k in reference.files))]
            if len(got) != len(expected):
                return 0, f"case {case}: returned {len(got)} arrays, expected {len(expected)}"
            shapes = [(np.shape(g), np.shape(e)) for g, e in zip(got, expected) if np.shape(g) != np.shape(e)]
            if shapes:
                return 0, f"case {case}: an output has shape {shapes[0][0]}, expected {shapes[0][1]}"
            err = _relative(got, expected)
            if err > TOL:
                return 0, f"case {case}: max rel error {err:.2e} (tolerance {TOL:.0e})"
            worst = max(worst, err)
        message = f"max rel error {worst:.1e}"
        if name.endswith("_backward") or name == "softmax_cross_entropy":
            err = gradient_check(module, name, seed)
            if err > GRADCHECK_TOL:
                return 0, f"gradient check: max rel error {err:.2e}"
            message += f", gradient check {err:.1e}"
        return POINTS, message
    except NotImplementedError:
        return 0, "not implemented"
    except Exception as e:  # noqa: BLE001 - a student's bug is a score, not a crash
        return 0, f"{type(e).__name__}: {e}".splitlines()[0][:120]
    finally:
        for p in patches:
            p.stop()


def grade(folder, reference_path=REFERENCE):
    reference = np.load(reference_path)
    rows = []
    for a in ASSIGNMENTS:
        path = os.path.join(folder, a.filename)
        module, problem = None, None
        if not os.path.exists(path):
            problem = f"missing {a.filename}"
        else:
            try:
                module = load_student(path)
            except Exception as e:  # noqa: BLE001
                problem = f"{a.filename} does not import: {type(e).__name__}: {e}".splitlines()[0][:160]
        for name in a.exercises:
            if module is None:
                points, message = 0, problem
            elif not hasattr(module, name):
                points, message = 0, f"{name} not defined"
            else:
                points, message = grade_exercise(module, a, name, reference)
            rows.append({"assignment": a.key, "exercise": name, "points": points, "max": POINTS, "message": message})
    return {"exercises": rows, "total": sum(r["points"] for r in rows), "max": POINTS * len(rows),
            "reference_seed": int(reference["seed"])}


def print_table(result):
    print(f"{'':4}{'exercise':26}{'score':>8}  notes")
    for r in result["exercises"]:
        print(f"{r['assignment']:4}{r['exercise']:26}{r['points']:>4}/{r['max']:<3}  {r['message']}")
    print(f"{'':4}{'total':26}{result['total']:>4}/{result['max']}")


def main(argv=None):
    p = ArgumentParser(prog="python -m minimixer.coursework", description="MLP-Mixer coursework")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("release", help="write the assignments (solutions stripped unless --solutions)")
    r.add_argument("--out", required=True, metavar="DIR")
    r.add_argument("--solutions", action="store_true", help="write the answer key instead")
    g = sub.add_parser("grade", help="grade a folder of assignment files")
    g.add_argument("folder", nargs="?", default=".")
    g.add_argument("--json", action="store_true", help="print the scores as JSON")
    g.add_argument("--reference", default=REFERENCE, help="reference outputs (default: the bundled ones)")
    m = sub.add_parser("make-reference", help="recompute the reference outputs, e.g. with a new seed")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", default=REFERENCE)
    args = p.parse_args(argv)
    if args.command == "release":
        for path in release(args.out, args.solutions):
            print(path)
        return 0
    if args.command == "make-reference":
        print(make_reference(args.out, args.seed))
        return 0
    if not os.path.isdir(args.folder):
        raise UserError(f"no such folder: {args.folder}")
    if not os.path.exists(args.reference):
        raise UserError(f"no reference outputs at {args.reference} (python -m minimixer.coursework make-reference)")
    result = grade(args.folder, args.reference)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


"""The graded cases: inputs drawn from a seed, expected outputs from minimixer's own solutions."""
import threading
import zlib

import numpy as np

from .. import layers, optim
from . import protocol
from .exercises import EXERCISES

PUBLIC_SEED = 0  # the self-check's cases, shipped to students
SHAPES = [(2, 5, 4, 3, 8), (3, 7, 6, 4, 12), (1, 4, 9, 2, 5)]  # (B, N, D, DS, DC) of cases 0-2
# case 3: extreme inputs (numerical stability); case 4: float32 inputs (the output keeps their dtype)
EXTREME, FLOAT32 = 3, 4
CASES = len(SHAPES) + 2
TOLERANCE = {"float64": 1e-7, "float32": 1e-4}  # relative to the output's scale
SOLUTIONS = {e.name: getattr(optim if e.module == "optim" else layers, e.name) for e in EXERCISES}


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


def _shape(case):
    return SHAPES[{EXTREME: 0, FLOAT32: 1}.get(case, case)]


def forward_args(name, rng, case):
    """Positional arguments of the forward pass behind an exercise."""
    B, N, D, DS, DC = _shape(case)
    r = rng.standard_normal
    extreme = case == EXTREME
    form = "tanh" if case in (2, EXTREME) else "erf"
    if name.startswith("linear"):
        return (r((B, N, D)), r((DS, D)), r(DS))
    if name.startswith("gelu"):  # extreme: |x| up to ~150, where exp(2u) in a hand-made tanh overflows
        return (40 * r((B, N, D)) if extreme else 3 * r((B, N, D)), form)
    if name.startswith("layernorm"):  # extreme: a large offset and a variance near eps
        x = 1e4 + 1e-2 * r((B, N, D)) if extreme else 2 * r((B, N, D)) + 0.5
        return (x, 1 + 0.3 * r(D), 0.3 * r(D), 1e-6)
    x = 1e4 + 1e-2 * r((B, N, D)) if extreme else r((B, N, D))
    if name.startswith("mlp"):
        return (x, r((DS, D)), r(DS), 0.5 * r((D, DS)), r(D), form)
    p = _block_params(rng, N, D, DS, DC)
    if name.startswith("token_mixing"):
        return (x, *(p[k] for k in layers.TOKEN_MIXING_KEYS), 1e-6, form)
    if name.startswith("channel_mixing"):
        return (x, *(p[k] for k in layers.CHANNEL_MIXING_KEYS), 1e-6, form)
    return (x, p, 1e-6, form)  # mixer block


def describe_case(name, case):
    """The settings of a case, for feedback."""
    B, N, D, DS, DC = _shape(case)
    dims = {"linear": f"x ({B}, {N}, {D}), w ({DS}, {D})", "softmax_cross_entropy": "",
            "AdamW": "params w (3, 4), norm.weight (4,); 3 steps"}
    parts = [next((v for k, v in dims.items() if name.startswith(k)), f"B={B} N={N} D={D} DS={DS} DC={DC}")]
    if name == "softmax_cross_entropy":
        parts = [f"logits ({4 + min(case, 2)}, {3 + 2 * min(case, 2)}), "
                 f"{'soft' if case == 1 else 'hard'} labels, label_smoothing={0.1 * (case % 3):g}"]
        if case == EXTREME:
            parts.append("logits near +-1000")
    elif name == "AdamW":
        if case == EXTREME:
            parts.append("gradients near 1e-9 (eps matters)")
    elif not name.startswith("linear"):
        parts.append(f"form='{'tanh' if case in (2, EXTREME) else 'erf'}'")
        if case == EXTREME:
            parts.append("|x| up to ~150" if name.startswith("gelu") else "x = 1e4 + 1e-2 * noise")
    if case == FLOAT32:
        parts.append("float32 inputs")
    return ", ".join(p for p in parts if p)


def _float32(tree):
    if isinstance(tree, np.ndarray) and tree.dtype == np.float64:
        return tree.astype(np.float32)
    if isinstance(tree, tuple):
        return tuple(_float32(v) for v in tree)
    if isinstance(tree, list):
        return [_float32(v) for v in tree]
    if isinstance(tree, dict):
        return {k: _float32(v) for k, v in tree.items()}
    return tree


def _copy(tree):
    return protocol.decode(protocol.encode(tree))


def _labels(rng, B, K, last):
    """Class indices in a random order that hold class 0 and, if `last`, class K-1, else never
    K-1: a one-hot sized by labels.max() is then wrong at every seed, not on some draws."""
    labels = rng.integers(0, K if last else K - 1, B)
    labels[:2] = [0, K - 1 if last else labels[1]]
    return rng.permutation(labels)


def case_inputs(name, seed, case):
    rng = _rng(seed, name, case)
    cast = _float32 if case == FLOAT32 else (lambda t: t)
    if name == "softmax_cross_entropy":
        c = min(case, 2)
        B, K = 4 + c, 3 + 2 * c
        logits = 3 * rng.standard_normal((B, K))
        if case == EXTREME:  # exp overflows without the max subtracted
            logits = 1000 * np.sign(logits) + logits
        labels = _labels(rng, B, K, last=case == 0) if case != 1 else rng.dirichlet(np.ones(K), B)
        return {"args": (cast(logits), labels), "kwargs": {"label_smoothing": 0.1 * (case % 3)}}
    if name == "AdamW":
        params = {"w": rng.standard_normal((3, 4)), "norm.weight": 1 + rng.standard_normal(4)}
        scale = 1e-9 if case == EXTREME else 1.0  # sqrt(v) near eps: where eps goes matters
        grads = [{k: scale * rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(3)]
        return cast({"params": params, "grads": grads, "no_decay": [k for k in params if optim.bias_and_norm(k)],
                     "hyper": {"lr": 0.01 * (min(case, 2) + 1), "betas": (0.9, 0.95), "eps": 1e-8,
                               "weight_decay": 0.1}})
    args = cast(forward_args(name, rng, case))
    if name.endswith("_forward"):
        return {"args": args, "kwargs": {}}
    out, cache = getattr(layers, name.replace("_backward", "_forward"))(*args)  # the documented cache
    return {"args": (cast(rng.standard_normal(out.shape)), cache), "kwargs": {}}


def expected_result(name, inputs):
    inputs = _copy(inputs)  # the solution must not see (or change) the arrays the child gets
    if name == "AdamW":
        params = inputs["params"]
        no_decay = frozenset(inputs["no_decay"])
        opt = optim.AdamW(params, no_decay=lambda k: k in no_decay, **inputs["hyper"])
        for g in inputs["grads"]:
            opt.step(g)
        return params
    return SOLUTIONS[name](*inputs["args"], **inputs["kwargs"])


def make_cases(seed):
    """{exercise: [{"inputs": ..., "expected": ...} per case]}, computed by minimixer itself."""
    cases = {}
    for e in EXERCISES:
        cases[e.name] = []
        for case in range(CASES):
            inputs = case_inputs(e.name, seed, case)
            cases[e.name].append({"inputs": inputs, "expected": _copy(expected_result(e.name, inputs)),
                                  "about": describe_case(e.name, case),
                                  "tol": TOLERANCE["float32" if case == FLOAT32 else "float64"]})
    return cases


_cases_lock = threading.Lock()
_cases = {}


def cases_for(seed):
    with _cases_lock:
        if seed not in _cases:
            _cases[seed] = make_cases(seed)
        return _cases[seed]

"""The graded cases: inputs drawn from a seed, expected outputs from minimixer's own solutions."""
import threading
import zlib

import numpy as np

from .. import layers, optim
from . import protocol
from .exercises import EXERCISES

PUBLIC_SEED = 0  # the self-check's cases, shipped to students
SHAPES = [(2, 5, 4, 3, 8), (3, 7, 6, 4, 12), (1, 4, 9, 2, 5)]  # (B, N, D, DS, DC) per case
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


def _copy(tree):
    return protocol.decode(protocol.encode(tree))


def case_inputs(name, seed, case):
    rng = _rng(seed, name, case)
    if name == "softmax_cross_entropy":
        B, K = 4 + case, 3 + 2 * case
        logits = 3 * rng.standard_normal((B, K))
        labels = rng.integers(0, K, B) if case != 1 else rng.dirichlet(np.ones(K), B)
        return {"args": (logits, labels), "kwargs": {"label_smoothing": 0.1 * case}}
    if name == "AdamW":
        params = {"w": rng.standard_normal((3, 4)), "norm.weight": 1 + rng.standard_normal(4)}
        grads = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(3)]
        return {"params": params, "grads": grads, "no_decay": [k for k in params if optim.bias_and_norm(k)],
                "hyper": {"lr": 0.01 * (case + 1), "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}}
    args = forward_args(name, rng, case)
    if name.endswith("_forward"):
        return {"args": args, "kwargs": {}}
    out, cache = getattr(layers, name.replace("_backward", "_forward"))(*args)  # the documented cache
    return {"args": (rng.standard_normal(out.shape), cache), "kwargs": {}}


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
        for case in range(len(SHAPES)):
            inputs = case_inputs(e.name, seed, case)
            cases[e.name].append({"inputs": inputs, "expected": _copy(expected_result(e.name, inputs))})
    return cases


_cases_lock = threading.Lock()
_cases = {}


def cases_for(seed):
    with _cases_lock:
        if seed not in _cases:
            _cases[seed] = make_cases(seed)
        return _cases[seed]

"""The exercises, their outputs and points, and the comparison that turns outputs into feedback.

Shared by the grader and the student's self-check, so both give the same verdict. Each
exercise's 10 points are split over its outputs (a backward pass: each gradient; a forward
pass: its output and its cache), and an output earns its points when it is right on every case.
"""
from dataclasses import dataclass

import numpy as np

from .protocol import Opaque

TOL = 1e-7  # relative to the output's scale: float64 implementations agree far better than this
POINTS = 10

TOKEN_MIXING_KEYS = ("norm1.weight", "norm1.bias", "mlp_tokens.fc1.weight", "mlp_tokens.fc1.bias",
                     "mlp_tokens.fc2.weight", "mlp_tokens.fc2.bias")
CHANNEL_MIXING_KEYS = ("norm2.weight", "norm2.bias", "mlp_channels.fc1.weight", "mlp_channels.fc1.bias",
                       "mlp_channels.fc2.weight", "mlp_channels.fc2.bias")


@dataclass(frozen=True)
class Exercise:
    assignment: str
    name: str
    module: str  # the student's file: "layers" (layers.py) or "optim" (optim.py)
    outputs: tuple  # (label, points, getter) with points summing to POINTS
    callees: tuple = ()  # other exercises it calls: correct versions are lent during a graded run
    cache: tuple = ()  # what a forward's cache holds, named as in its docstring
    kind: str = "call"  # "call": fn(*args, **kwargs); "adamw": build the optimizer, take steps


def item(i):
    def get(result):
        if not isinstance(result, (tuple, list)):
            raise Structure(f"returned {describe(result)}, expected a tuple")
        if i >= len(result):
            raise Structure(f"returned a tuple of {len(result)}, expected at least {i + 1} items")
        return result[i]
    return get


def whole(result):
    return result


def keys_of(i, keys):
    def get(result):
        grads = item(i)(result)
        if not isinstance(grads, dict):
            raise Structure(f"item {i} is {describe(grads)}, expected a dict keyed {keys[0]!r}, ...")
        return {k: grads.get(k, MISSING) for k in keys}
    return get


def forward(a, name, cache, callees=()):
    return Exercise(a, name, "layers", (("out", 7, item(0)), ("cache", 3, item(1))), callees, cache)


def backward(a, name, grads, points, callees=()):
    return Exercise(a, name, "layers", tuple((g, p, item(i)) for i, (g, p) in enumerate(zip(grads, points))),
                    callees)


PARAM_GRADS = ("dx", "dnorm_w", "dnorm_b", "dfc1_w", "dfc1_b", "dfc2_w", "dfc2_b")
EXERCISES = (
    forward("A1", "linear_forward", ("x", "w")),
    backward("A1", "linear_backward", ("dx", "dw", "db"), (4, 3, 3)),
    forward("A1", "gelu_forward", ("x", "form")),
    Exercise("A1", "gelu_backward", "layers", (("dx", 10, whole),)),
    forward("A1", "layernorm_forward", ("x", "w", "mean", "rstd")),
    backward("A1", "layernorm_backward", ("dx", "dw", "db"), (4, 3, 3)),
    forward("A2", "mlp_forward", ("fc1_cache", "gelu_cache", "fc2_cache"), ("linear_forward", "gelu_forward")),
    backward("A2", "mlp_backward", ("dx", "dfc1_w", "dfc1_b", "dfc2_w", "dfc2_b"), (2, 2, 2, 2, 2),
             ("linear_backward", "gelu_backward")),
    forward("A2", "token_mixing_forward", ("norm_cache", "mlp_cache"), ("layernorm_forward", "mlp_forward")),
    backward("A2", "token_mixing_backward", PARAM_GRADS, (4, 1, 1, 1, 1, 1, 1), ("layernorm_backward", "mlp_backward")),
    forward("A2", "channel_mixing_forward", ("norm_cache", "mlp_cache"), ("layernorm_forward", "mlp_forward")),
    backward("A2", "channel_mixing_backward", PARAM_GRADS, (4, 1, 1, 1, 1, 1, 1),
             ("layernorm_backward", "mlp_backward")),
    forward("A2", "mixer_block_forward", ("token_cache", "token_drop", "channel_cache", "channel_drop"),
            ("token_mixing_forward", "channel_mixing_forward")),
    Exercise("A2", "mixer_block_backward", "layers",
             (("dx", 4, item(0)), ("grads (token mixing)", 3, keys_of(1, TOKEN_MIXING_KEYS)),
              ("grads (channel mixing)", 3, keys_of(1, CHANNEL_MIXING_KEYS))),
             ("token_mixing_backward", "channel_mixing_backward")),
    Exercise("A3", "softmax_cross_entropy", "layers", (("loss", 5, item(0)), ("dlogits", 5, item(1)))),
    Exercise("A3", "AdamW", "optim", (("params['w'] after 3 steps", 5, lambda r: _param(r, "w")),
                                      ("params['norm.weight'] after 3 steps (no decay)", 5,
                                       lambda r: _param(r, "norm.weight"))), kind="adamw"),
)
BY_NAME = {e.name: e for e in EXERCISES}  # the edition's one-line stops name an exercise's assignment
FILES = {"layers": "layers.py", "optim": "optim.py"}
assert all(sum(p for _, p, _ in e.outputs) == POINTS for e in EXERCISES)


def _param(result, key):
    if not isinstance(result, dict) or key not in result:
        raise Structure("the params dict lost its keys")
    return result[key]


class Structure(Exception):
    """The result does not have the documented structure."""


class _Missing:
    def __repr__(self):
        return "missing"


MISSING = _Missing()


def describe(v):
    if v is None:
        return "None"
    if isinstance(v, Opaque):
        return v.what
    if isinstance(v, np.ndarray):
        return f"an array of shape {v.shape}"
    if isinstance(v, (tuple, list)):
        return f"a {type(v).__name__} of {len(v)}"
    return f"a {type(v).__name__}"


# --- comparing one output ------------------------------------------------------------------------

def _leaves(tree, path=""):
    if isinstance(tree, (tuple, list)):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{path}[{i}]")
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{path}[{k!r}]")
    else:
        yield path, tree


def scale_floor(expected):
    """A tensor that is zero in exact arithmetic (a token-mixing fc2 bias gradient) holds only
    rounding noise: its errors are measured against the case's largest value instead."""
    big = max((float(np.abs(v).max(initial=0)) for _, v in _leaves(expected)
               if isinstance(v, (np.ndarray, float)) and np.size(v)), default=0.0)
    return max(1e-3 * big, 1e-12)


def compare(got, expected, floor, names=None, tol=TOL):
    """None when got matches expected (each array of the expected dtype, within tol relative to
    the output's scale), else a message saying what is wrong, with the worst relative error and
    where it occurs. `names` labels the items of a cache."""
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            what = f"({', '.join(names)})" if names else f"{type(expected).__name__} of {len(expected)}"
            return f"is {describe(got)}, expected a tuple {what}"
        for i, (g, e) in enumerate(zip(got, expected)):
            problem = compare(g, e, floor, tol=tol)
            if problem:
                label = f"[{i}]" + (f" ({names[i]})" if names and i < len(names) else "")
                return f"{label}{'' if problem.startswith('[') else ' '}{problem}"
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return f"is {describe(got)}, expected a dict"
        for k, e in expected.items():
            g = got.get(k, MISSING)
            if g is MISSING:
                return f"[{k!r}] is missing"
            problem = compare(g, e, floor, tol=tol)
            if problem:
                return f"[{k!r}] {problem}"
        return None
    if expected is None or isinstance(expected, (str, bool)):
        return None if (type(got) is type(expected) and got == expected) else f"is {got!r}, expected {expected!r}"
    return _compare_array(got, expected, floor, tol)


def _compare_array(got, expected, floor, tol=TOL):
    e = np.asarray(expected, dtype=np.float64)
    if got is MISSING:
        return "is missing"
    if isinstance(got, (bool, str, Opaque, tuple, list, dict)) or got is None:
        return f"is {describe(got)}, expected {'a number' if e.ndim == 0 else f'an array of shape {e.shape}'}"
    try:
        g = np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return f"is {describe(got)}, which is not an array of numbers"
    if g.shape != e.shape:
        return f"has shape {g.shape}, expected {e.shape}"
    if isinstance(expected, np.ndarray) and expected.dtype.kind == "f" and getattr(got, "dtype", None) != expected.dtype:
        return f"has dtype {getattr(got, 'dtype', type(got).__name__)}, expected {expected.dtype} (the inputs' dtype)"
    bad = ~np.isfinite(g)
    if bad.any():
        at = np.unravel_index(np.argmax(bad), g.shape) if g.ndim else ()
        return f"holds {g[at]} at {_index(at)}"
    if g.size == 0:
        return None
    diff = np.abs(g - e)
    scale = max(float(np.abs(e).max()), floor)
    at = np.unravel_index(np.argmax(diff), g.shape)
    err = float(diff[at]) / scale
    if err <= tol:
        return None
    where = f" at {_index(at)}" if g.ndim else ""
    return f"max rel error {err:.2e}{where} (got {g[at]:.6g}, expected {e[at]:.6g}); shape {g.shape}"


def _index(at):
    return "[" + ", ".join(str(int(i)) for i in at) + "]"


def max_error(got, expected, floor):
    worst = 0.0
    for (_, g), (_, e) in zip(_leaves(got), _leaves(expected)):
        if isinstance(e, (np.ndarray, float)) and np.size(e):
            g = np.asarray(g, dtype=np.float64)
            worst = max(worst, float(np.abs(g - e).max()) / max(float(np.abs(e).max()), floor))
    return worst


# --- scoring an exercise -------------------------------------------------------------------------

def score(ex, outcome, expected_cases, about=None, tols=None):
    """A gradebook row for one exercise.

    outcome: {"status": "ran", "cases": [{"value": tree, "modified": name?} or {"error": text}]}, or
             {"status": "timeout" | "crashed" | "missing" | "refused", "reason": text}
    expected_cases: the expected result tree of each case; about: each case's settings (for
    the feedback); tols: each case's relative tolerance.
    A function that changes its inputs in place loses its first output's points.
    """
    about = about or [None] * len(expected_cases)
    tols = tols or [TOL] * len(expected_cases)

    def case_name(case):
        settings = f"{about[case]}; " if about[case] else ""
        return f"case {case} ({settings}tolerance {tols[case]:g})"

    row = {"assignment": ex.assignment, "exercise": ex.name, "max": POINTS, "status": "ok", "outputs": []}
    if outcome["status"] != "ran":
        row.update(points=0, status=outcome["status"], message=outcome["reason"])
        row["outputs"] = [{"output": label, "points": 0, "max": p, "message": outcome["reason"]}
                          for label, p, _ in ex.outputs]
        return row
    errors = [(k, c.get("error")) for k, c in enumerate(outcome["cases"]) if "error" in c]
    if errors:
        k, message = errors[0]
        if len(errors) < len(expected_cases):  # only some cases fail: say which one
            message = f"{case_name(k)}: {message}"
        if any(c.get("exit") for c in outcome["cases"]):
            row["status"] = "crashed"
        row.update(points=0, message=message)
        row["outputs"] = [{"output": label, "points": 0, "max": p, "message": message} for label, p, _ in ex.outputs]
        return row
    worst, total = 0.0, 0
    for i, (label, points, get) in enumerate(ex.outputs):
        problem = None
        for case, (c, expected) in enumerate(zip(outcome["cases"], expected_cases)):
            if i == 0 and c.get("modified"):
                problem = (f"{case_name(case)}: modified its input {c['modified']} in place (the caller's arrays "
                           "must stay as they were: copy before changing)")
                break
            e = get(expected)
            try:
                g = get(c["value"])
            except Structure as s:
                problem = f"{case_name(case)}: {s}"
                break
            floor = scale_floor(expected)
            found = compare(g, e, floor, names=ex.cache if label == "cache" else None, tol=tols[case])
            if found:
                problem = f"{case_name(case)}: {label} {found}"
                if label == "cache":
                    problem += " (the cache must hold what the docstring says: the backward pass reads it)"
                break
            worst = max(worst, max_error(g, e, floor))
        earned = 0 if problem else points
        total += earned
        row["outputs"].append({"output": label, "points": earned, "max": points,
                               "message": problem or "correct"})
    wrong = [o["message"] for o in row["outputs"] if o["points"] == 0]
    row["points"] = total
    row["message"] = "; ".join(wrong) if wrong else f"correct (max rel error {worst:.1e})"
    return row


def jobs_for(cases, lend=True):
    return [{"exercise": e.name, "module": e.module, "file": FILES[e.module], "kind": e.kind,
             "lend": list(e.callees) if lend else [], "cases": [c["inputs"] for c in cases[e.name]]}
            for e in EXERCISES]


def score_all(outcomes, cases, seed=None, elapsed=None, landlock=None):
    rows = [score(e, outcomes[e.name], [c["expected"] for c in cases[e.name]], [c.get("about") for c in cases[e.name]],
                  [c.get("tol", TOL) for c in cases[e.name]]) for e in EXERCISES]
    statuses = {r["status"] for r in rows}
    status = ("no files" if statuses == {"missing"} and all("not handed in" in r["message"] for r in rows)
              else "timeout" if "timeout" in statuses else "crashed" if "crashed" in statuses else "ok")
    result = {"exercises": rows, "total": sum(r["points"] for r in rows), "max": POINTS * len(rows),
              "status": status}
    if seed is not None:
        result["seed"] = seed
    if elapsed is not None:
        result["seconds"] = round(elapsed, 2)
    if landlock is not None:
        result["landlock"] = landlock
    return result


def print_table(result, file=None):
    print(f"{'':4}{'exercise':26}{'score':>8}  notes", file=file)
    for r in result["exercises"]:
        print(f"{r['assignment']:4}{r['exercise']:26}{r['points']:>4}/{r['max']:<3}  {r['message']}", file=file)
        if 0 < r["points"] < r["max"] or (r["points"] == 0 and len(r["outputs"]) > 1 and r["status"] == "ok"
                                          and len({o["message"] for o in r["outputs"]}) > 1):
            for o in r["outputs"]:
                print(f"{'':6}{o['output']:24}{o['points']:>4}/{o['max']:<3}  {o['message']}", file=file)
    print(f"{'':4}{'total':26}{result['total']:>4}/{result['max']}", file=file)

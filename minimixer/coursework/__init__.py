"""Coursework for instructors: release a student edition, grade submissions in isolation.

    python -m minimixer.coursework release --out hw/                    # the student edition
    python -m minimixer.coursework grade SUBMISSION/ --seed 2026         # one student, a table
    python -m minimixer.coursework grade --batch SUBMISSIONS/ --csv grades.csv --seed 2026

One source of truth: minimixer's own layers.py and optim.py, where each exercise's body sits
between "### BEGIN SOLUTION" and "### END SOLUTION". The student edition is a copy of the
package in which those regions raise NotImplementedError and the fast path (whose fused
kernels contain the same answers) is replaced by the clear path on the student's own layers.

Grading runs the student's files in a child process (child.py) that holds only the inputs;
the outputs come back as plain arrays and are compared here, against this package's own
solutions on inputs drawn from a private seed. This module is not part of the student edition.
"""
import ast
import csv
import io
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import layers, optim
from ..cli import ArgumentParser, UserError, run
from ..checkpoints.safetensors_io import atomic_write_bytes
from . import exercises, protocol, runner
from .exercises import EXERCISES, FILES, POINTS, jobs_for, print_table, score_all

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.dirname(HERE)
REPO = os.path.dirname(PACKAGE)
SELFCHECK = "selfcheck.data"
PUBLIC_SEED = 0  # the self-check's cases, shipped to students
DEFAULT_TIMEOUT = 60.0  # seconds per exercise
DEFAULT_BUDGET = 600.0  # seconds per submission
# shipped with the student edition: what the self-check needs, and nothing with a solution in it
SHIPPED = ("__main__.py", "protocol.py", "exercises.py", "child.py", "runner.py", "selfcheck.py")


# --- the student edition -------------------------------------------------------------------------

def strip_solutions(source, where="source"):
    """Replace every BEGIN/END SOLUTION region with `raise NotImplementedError`."""
    out, inside, name = [], False, where
    for line in source.splitlines():
        marker = line.strip()
        m = re.match(r"\s*(?:def|class) (\w+)", line)
        if m and not inside:
            name = m.group(1) if not line.startswith((" ", "\t")) else f"{name.split('.')[0]}.{m.group(1)}"
        if marker == BEGIN:
            if inside:
                raise ValueError(f"{where}: nested {BEGIN} in {name}")
            inside = True
            indent = line[:len(line) - len(line.lstrip())]
            out.append(f'{indent}raise NotImplementedError("{name}: write your solution here")')
        elif marker == END:
            if not inside:
                raise ValueError(f"{where}: {END} without {BEGIN} in {name}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: unterminated {BEGIN} in {name}")
    return "\n".join(out) + "\n"


def guarded_init(source):
    """The package's __init__ with its imports in a try: `python -m minimixer.coursework check`
    then runs (and says what is wrong) while the student's layers.py does not import."""
    tree = ast.parse(source)
    doc = tree.body[0] if tree.body and isinstance(tree.body[0], ast.Expr) else None
    lines = source.splitlines(keepends=True)
    head = "".join(lines[:doc.end_lineno]) if doc else ""
    rest = "".join(("    " + line) if line.strip() else line for line in lines[doc.end_lineno if doc else 0:])
    text = head + f"""
# Student edition: while your layers.py does not import, the self-check still runs
try:
{rest.strip(chr(10))}
except Exception as _error:  # noqa: BLE001
    def __getattr__(name, _error=_error):
        raise AttributeError(f"minimixer.{{name}}: the package did not import ({{type(_error).__name__}}: {{_error}})")
"""
    ast.parse(text)
    return text


# the fast path's fused kernels are the layers' passes again, written for speed: they give the answers away
ANSWER_FILES = {"numba_kernels.py"}


def _edition_files(with_selfcheck=True):
    """{relative path: bytes} of the student edition."""
    files = {}
    for root, dirs, names in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        rel_root = os.path.relpath(root, os.path.dirname(PACKAGE))
        if os.path.relpath(root, PACKAGE).split(os.sep)[0] == "coursework":
            continue
        for n in sorted(names):
            if n.endswith((".pyc", ".pyo")) or n.startswith(".") or n in ANSWER_FILES:
                continue
            with open(os.path.join(root, n), "rb") as f:
                files[os.path.join(rel_root, n)] = f.read()
    for module in ("layers", "optim"):
        path = os.path.join(PACKAGE, f"{module}.py")
        with open(path, encoding="utf-8") as f:
            files[os.path.join("minimixer", f"{module}.py")] = strip_solutions(f.read(), f"{module}.py").encode()
    with open(os.path.join(PACKAGE, "__init__.py"), encoding="utf-8") as f:
        files[os.path.join("minimixer", "__init__.py")] = guarded_init(f.read()).encode()
    with open(os.path.join(HERE, "student_fast.py"), "rb") as f:
        files[os.path.join("minimixer", "fast.py")] = f.read()
    cw = os.path.join("minimixer", "coursework")
    for n in SHIPPED:
        with open(os.path.join(HERE, n), "rb") as f:
            files[os.path.join(cw, n)] = f.read()
    files[os.path.join(cw, "__init__.py")] = (
        b'"""Self-check for the MLP-Mixer coursework: python -m minimixer.coursework check"""\n'
        b"from .selfcheck import main  # noqa: F401\n")
    with open(os.path.join(HERE, "STUDENT.md"), "rb") as f:
        student_readme = f.read()
    files[os.path.join(cw, "README.md")] = student_readme
    if with_selfcheck:
        files[os.path.join(cw, SELFCHECK)] = protocol.encode({"seed": PUBLIC_SEED, "cases": make_cases(PUBLIC_SEED)})
    return files, student_readme


def _extras():
    """The walkthrough notebooks, the weights and photo they open, when this is a source checkout.
    (The bundled digits model, eval's and predict's default, is package data: it comes with the package.)"""
    files = {}
    nb = os.path.join(REPO, "notebooks")
    if os.path.isdir(nb):
        for n in sorted(os.listdir(nb)):
            if n.endswith((".py", ".md")):
                with open(os.path.join(nb, n), "rb") as f:
                    files[os.path.join("notebooks", n)] = f.read()
        assets = os.path.join(nb, "assets")  # the trained Fig. 5 models that notebook 05 loads
        for n in sorted(os.listdir(assets)) if os.path.isdir(assets) else []:
            with open(os.path.join(assets, n), "rb") as f:
                files[os.path.join("notebooks", "assets", n)] = f.read()
        photo = os.path.join(REPO, "tests", "images", "china.jpg")
        if os.path.exists(photo):
            with open(photo, "rb") as f:
                files[os.path.join("tests", "images", "china.jpg")] = f.read()
    return files


PYPROJECT = b'''[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "minimixer"
version = "0.1.0+student"
description = "MLP-Mixer from scratch in NumPy: the student edition (the layers are yours to write)"
requires-python = ">=3.10"
dependencies = ["numpy>=1.24", "safetensors>=0.4", "pillow>=9.0", "tqdm>=4.60", "huggingface_hub>=0.23"]

[tool.setuptools.packages.find]
include = ["minimixer*"]

[tool.setuptools.package-data]
minimixer = ["assets/*", "coursework/*.data", "coursework/README.md"]
'''


def release(out_dir, force=False):
    """Write the student edition into out_dir; a non-empty out_dir needs force=True."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise UserError(f"{out_dir} is not empty: it may hold a student's work. Choose an empty folder, "
                        f"or pass --force to overwrite the files the release writes")
    files, student_readme = _edition_files()
    files.update(_extras())
    files["pyproject.toml"] = PYPROJECT
    files["README.md"] = student_readme
    written = []
    for rel, data in sorted(files.items()):
        path = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_bytes(path, data)
        written.append(path)
    return written


_edition_lock = threading.Lock()
_editions = {}


def grading_edition():
    """A private student edition for the child processes (made once per grader process)."""
    with _edition_lock:
        if "path" not in _editions:
            root = tempfile.mkdtemp(prefix="minimixer-grading-")
            files, _ = _edition_files(with_selfcheck=False)
            for rel, data in files.items():
                if rel.endswith(".py") or os.sep + "assets" + os.sep not in rel:
                    path = os.path.join(root, rel)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "wb") as f:
                        f.write(data)
            _editions["path"] = root
            import atexit
            atexit.register(shutil.rmtree, root, True)
        return _editions["path"]


# --- the cases: inputs from a seed, expected outputs from minimixer's own solutions ----------------

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


# --- grading -------------------------------------------------------------------------------------

def find_files(folder):
    """{module: path} of the files a submission hands in: layers.py and optim.py, at its top or
    inside a minimixer/ folder (a whole student edition handed back)."""
    found = {}
    for module, fname in FILES.items():
        for candidate in (os.path.join(folder, fname), os.path.join(folder, "minimixer", fname)):
            if os.path.isfile(candidate):
                found[module] = candidate
                break
    return found


def grade(folder, seed, timeout=DEFAULT_TIMEOUT, budget=DEFAULT_BUDGET, sandbox=True, audit=True):
    """Grade one submission folder on the cases of `seed`; the student's code runs in a child process."""
    start = time.monotonic()
    cases = cases_for(seed)
    found = find_files(folder)
    outcomes, info = {}, {"landlock": None}
    missing = [e for e in EXERCISES if e.module not in found]
    for e in missing:
        outcomes[e.name] = {"status": "missing", "reason": f"{FILES[e.module]} was not handed in"}
    if found:
        with tempfile.TemporaryDirectory(prefix="minimixer-submission-") as overlay:
            for module, path in found.items():  # only these files: nothing else from the folder is imported
                shutil.copyfile(path, os.path.join(overlay, FILES[module]))
            jobs = [j for j in jobs_for(cases) if j["module"] in found]
            ran, info = runner.run_jobs(jobs, edition=grading_edition(), overlay=overlay,
                                        files=[FILES[m] for m in found], timeout=timeout, budget=budget,
                                        lent=SOLUTIONS, sandbox=sandbox, audit=audit)
            outcomes.update(ran)
    return score_all(outcomes, cases, seed, time.monotonic() - start, info["landlock"])


def grade_batch(root, csv_path, seed, timeout=DEFAULT_TIMEOUT, budget=DEFAULT_BUDGET, jobs=None, feedback_dir=None,
                log=None):
    """Grade every subfolder of root (one per student), in parallel; write the CSV and a feedback
    file per student. One bad submission never stops the batch."""
    students = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not students:
        raise UserError(f"{root} has no student folders")
    feedback_dir = feedback_dir or os.path.splitext(csv_path)[0] + "_feedback"
    os.makedirs(feedback_dir, exist_ok=True)
    cases_for(seed)
    grading_edition()

    def one(student):
        try:
            result = grade(os.path.join(root, student), seed, timeout, budget)
        except Exception as e:  # noqa: BLE001 - a grader failure on one student is reported, not fatal
            result = {"exercises": [], "total": 0, "max": POINTS * len(EXERCISES), "status": "error",
                      "error": f"{type(e).__name__}: {e}"}
        text = io.StringIO()
        print(f"student {student}: {result['total']}/{result['max']} ({result['status']})", file=text)
        if result["exercises"]:
            print_table(result, file=text)
        else:
            print(result.get("error", ""), file=text)
        atomic_write_bytes(os.path.join(feedback_dir, f"{student}.txt"), text.getvalue().encode())
        atomic_write_bytes(os.path.join(feedback_dir, f"{student}.json"), json.dumps(result, indent=1).encode())
        if log:
            print(f"{student}: {result['total']}/{result['max']} {result['status']} "
                  f"({result.get('seconds', 0):.1f} s)", file=log, flush=True)
        return student, result

    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        results = dict(pool.map(one, students))
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["student"] + [e.name for e in EXERCISES] + ["total", "max", "status"])
    for s in students:
        r = results[s]
        points = {row["exercise"]: row["points"] for row in r["exercises"]}
        w.writerow([s] + [points.get(e.name, 0) for e in EXERCISES] + [r["total"], r["max"], r["status"]])
    atomic_write_bytes(csv_path, out.getvalue().encode())
    return results


# --- command line --------------------------------------------------------------------------------

def _seed(args):
    if args.seed is not None:
        return args.seed
    return secrets.randbits(31)  # a private seed: fresh hidden cases, written into the results


def main(argv=None):
    return run(_main, argv, prog="python -m minimixer.coursework")


def _main(argv=None):
    p = ArgumentParser(prog="python -m minimixer.coursework", description="MLP-Mixer coursework (instructors)")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("release", help="write the student edition (the package without the solutions)")
    r.add_argument("--out", required=True, metavar="DIR")
    r.add_argument("--force", action="store_true", help="write into a non-empty folder, overwriting its files")
    g = sub.add_parser("grade", help="grade a submission (layers.py, optim.py) or, with --batch, a class")
    g.add_argument("folder", nargs="?", help="one submission folder")
    g.add_argument("--batch", metavar="DIR", help="a folder of submission folders, one per student")
    g.add_argument("--csv", metavar="FILE", help="with --batch: the gradebook to write (default DIR/../grades.csv)")
    g.add_argument("--feedback", metavar="DIR", help="with --batch: where each student's feedback goes "
                   "(default: next to the CSV, <csv name>_feedback/)")
    g.add_argument("--seed", type=int, help="the hidden cases' seed (default: a fresh private one; "
                   f"{PUBLIC_SEED} is the students' self-check)")
    g.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per exercise (default %(default)g)")
    g.add_argument("--submission-timeout", type=float, default=DEFAULT_BUDGET, metavar="SECONDS",
                   help="seconds for all of a submission's exercises (default %(default)g)")
    g.add_argument("--jobs", type=int, help="with --batch: submissions graded at once (default: the cores)")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if args.command == "release":
        for path in release(args.out, args.force):
            print(path)
        return 0
    if not (args.timeout > 0 and args.submission_timeout > 0):
        raise UserError("--timeout and --submission-timeout must be > 0")
    seed = _seed(args)
    if args.batch:
        if args.folder:
            raise UserError("give either a submission folder or --batch DIR, not both")
        if not os.path.isdir(args.batch):
            raise UserError(f"no such folder: {args.batch}")
        csv_path = args.csv or os.path.join(os.path.dirname(os.path.abspath(args.batch)), "grades.csv")
        if not os.path.isdir(os.path.dirname(os.path.abspath(csv_path))):
            raise UserError(f"no folder for the CSV: {csv_path}")
        start = time.monotonic()
        results = grade_batch(args.batch, csv_path, seed, args.timeout, args.submission_timeout, args.jobs,
                              args.feedback, log=sys.stderr)
        print(f"graded {len(results)} submissions in {time.monotonic() - start:.1f} s (seed {seed}): {csv_path}")
        return 0
    folder = args.folder or "."
    if not os.path.isdir(folder):
        raise UserError(f"no such folder: {folder}")
    result = grade(folder, seed, args.timeout, args.submission_timeout)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
        print(f"(seed {seed}, {result['seconds']:.1f} s, status {result['status']})")
    return 0

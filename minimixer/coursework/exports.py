"""Exports for an LMS: Gradescope's results.json for one submission, and the Gradescope
autograder (a zip of setup.sh, run_autograder and this package) that writes it.
(The Canvas CSV is gradebook.write_canvas.)"""
import io
import json
import os
import stat
import zipfile

from ..checkpoints.safetensors_io import atomic_write_bytes

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN = "after_due_date"  # Gradescope shows these tests once the due date has passed


def _reveals_cases(message):
    # a comparison message quotes the hidden cases' expected values; an exception, a timeout or
    # "not implemented" says only what the student's own code did
    return "expected" in message or "max rel error" in message


def gradescope_results(result):
    """Gradescope's results.json for one graded submission: a visible test per exercise with its
    score and which outputs are right, and a 0-point test per exercise, shown after the due
    date, with the hidden cases' details (values, positions, expected numbers)."""
    tests = []
    for r in result["exercises"]:
        name = f"{r['assignment']} {r['exercise']}"
        lines = []
        for o in r["outputs"]:
            msg = o["message"]
            shown = msg if o["points"] == o["max"] or not _reveals_cases(msg) else \
                "wrong on a hidden case (the details are shown after the due date)"
            lines.append(f"{o['output']}: {o['points']}/{o['max']} {shown}")
        tests.append({"name": name, "score": r["points"], "max_score": r["max"], "output": "\n".join(lines),
                      "visibility": "visible"})
        if r["points"] < r["max"]:
            tests.append({"name": f"{name}: details", "score": 0, "max_score": 0, "output": r["message"],
                          "visibility": HIDDEN})
    box = result.get("sandbox", {})
    return {"score": result["total"], "visibility": "visible", "stdout_visibility": "hidden",
            "output": f"{result['total']}/{result['max']} ({result['status']}); sandbox: {box.get('mode', '?')}",
            "tests": tests}


def write_results_json(path, result):
    atomic_write_bytes(path, json.dumps(gradescope_results(result), indent=1).encode())


SETUP = """#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder's image (Ubuntu).
set -euo pipefail
apt-get update
apt-get install -y python3 python3-venv python3-pip bubblewrap
python3 -m venv /autograder/venv
/autograder/venv/bin/pip install "numpy>=1.24" "safetensors>=0.4" "pillow>=9.0" "tqdm>=4.60" "threadpoolctl>=3.1"
"""

RUN = """#!/usr/bin/env bash
# Gradescope runs this for each submission: grade /autograder/submission, write
# /autograder/results/results.json. AUTOGRADER_ROOT and AUTOGRADER_PYTHON are for local tests.
set -uo pipefail
ROOT="${{AUTOGRADER_ROOT:-/autograder}}"
PY="${{AUTOGRADER_PYTHON:-$ROOT/venv/bin/python}}"
mkdir -p "$ROOT/results"
cd "$ROOT/source"
PYTHONPATH="$ROOT/source" "$PY" -m minimixer.coursework grade "$ROOT/submission" --seed {seed} \\
    --timeout {timeout:g} --submission-timeout {budget:g} --sandbox {sandbox} \\
    --results-json "$ROOT/results/results.json"
status=$?
if [ $status -ne 0 ] && [ ! -s "$ROOT/results/results.json" ]; then
    printf '{{"score": 0, "output": "the autograder failed (status %s): see its log", "tests": []}}\\n' \\
        "$status" > "$ROOT/results/results.json"
fi
"""


def _package_files():
    for root, dirs, names in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        for n in sorted(names):
            if not n.endswith((".pyc", ".pyo")) and not n.startswith("."):
                path = os.path.join(root, n)
                yield path, os.path.join("minimixer", os.path.relpath(path, PACKAGE))


def build_autograder(out, seed, timeout, budget, sandbox="strong"):
    """Write Gradescope's autograder zip: setup.sh and run_autograder at its top, this package
    (the solutions are the answer key: keep the zip private) and the seed baked in."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in (("setup.sh", SETUP),
                           ("run_autograder", RUN.format(seed=int(seed), timeout=timeout, budget=budget,
                                                         sandbox=sandbox))):
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | 0o755) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, text)
        for path, arc in _package_files():
            z.write(path, arc)
    atomic_write_bytes(out, buf.getvalue())
    return out

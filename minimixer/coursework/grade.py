"""Grading: each submission's files run in a child process (child.py) that holds only the inputs;
the outputs come back as plain arrays and are compared here, against this package's own
solutions on inputs drawn from a private seed."""
import csv
import io
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from ..checkpoints.safetensors_io import atomic_write_bytes
from ..commands.cli import UserError
from . import runner
from .cases import SOLUTIONS, cases_for
from .exercises import EXERCISES, FILES, POINTS, jobs_for, print_table, score_all
from .release import grading_edition

DEFAULT_TIMEOUT = 60.0  # seconds per exercise
DEFAULT_BUDGET = 600.0  # seconds per submission


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

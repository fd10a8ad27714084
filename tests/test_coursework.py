"""Coursework: the release hides every solution; the grader gives full, zero and exact partial marks."""
import inspect
import json
import re
import subprocess
import sys

import pytest

from minimixer import coursework, layers, optim


def cw(*args):
    return subprocess.run([sys.executable, "-m", "minimixer.coursework", *args], capture_output=True, text=True,
                          timeout=300)


def solution_lines():
    """Every non-blank line inside a solution region of minimixer's sources."""
    lines, inside = set(), False
    for module in (layers, optim):
        for line in inspect.getsource(module).splitlines():
            if line.strip() == coursework.BEGIN:
                inside = True
            elif line.strip() == coursework.END:
                inside = False
            elif inside and line.strip():
                lines.add(line.strip())
    return lines


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("cw")
    assert cw("release", "--out", str(root / "student")).returncode == 0
    assert cw("release", "--out", str(root / "key"), "--solutions").returncode == 0
    return root


def test_release_contains_no_solution_text(released):
    secret = solution_lines()
    assert len(secret) > 40  # the regions really are there
    for path in sorted((released / "student").glob("*.py")):
        text = path.read_text()
        leaked = [line for line in text.splitlines() if line.strip() in secret]
        assert not leaked, f"{path.name} leaks solution lines: {leaked[:3]}"
        assert coursework.BEGIN not in text
        # signatures, docstrings and return lines are still there
        n_exercises = len(re.findall(r"raise NotImplementedError", text))
        assert n_exercises == {"a1_layers.py": 6, "a2_mixing.py": 8, "a3_training.py": 2}[path.name]
    a1 = (released / "student" / "a1_layers.py").read_text()
    assert "def layernorm_forward(x, w, b, eps=1e-6):" in a1
    assert "cache = (x, w, mean, rstd) with mean, rstd (..., 1)" in a1 and "return dx, dw, db" in a1


def grade(folder):
    r = cw("grade", str(folder), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_solutions_get_full_marks(released):
    result = grade(released / "key")
    print(json.dumps(result, indent=1))
    assert result["total"] == result["max"] == 160
    assert all(r["points"] == 10 for r in result["exercises"])


def test_untouched_release_gets_zero(released):
    result = grade(released / "student")
    assert result["total"] == 0
    assert {r["message"] for r in result["exercises"]} == {"not implemented"}


def function_source(text, name):
    """The source of top-level def/class `name` in a module's text."""
    match = re.search(rf"^(def|class) {name}\b.*?(?=^\S|\Z)", text, flags=re.S | re.M)
    return match.group(0)


@pytest.mark.parametrize("solved", ["layernorm_backward", "token_mixing_forward", "AdamW"])
def test_one_solved_exercise_gets_exactly_its_marks(released, tmp_path, solved):
    work = tmp_path / "hw"
    work.mkdir()
    for path in (released / "student").glob("*.py"):
        text = path.read_text()
        if re.search(rf"^(def|class) {solved}\b", text, flags=re.M):
            key = (released / "key" / path.name).read_text()
            text = text.replace(function_source(text, solved), function_source(key, solved))
        (work / path.name).write_text(text)
    result = grade(work)
    scores = {r["exercise"]: r["points"] for r in result["exercises"]}
    assert scores[solved] == 10 and result["total"] == 10, scores


def test_wrong_answers_get_zero_with_a_reason(released, tmp_path):
    work = tmp_path / "hw"
    work.mkdir()
    for path in (released / "key").glob("*.py"):
        (work / path.name).write_text(path.read_text())
    a1 = (work / "a1_layers.py").read_text()
    a1 = a1.replace("out = x @ w.T + b  # (..., O)", "out = x @ w.T  # (..., O) forgot the bias")
    a1 = a1.replace("var = (xc * xc).mean(axis=-1, keepdims=True)", "var = (xc * xc).sum(axis=-1, keepdims=True)")
    (work / "a1_layers.py").write_text(a1)
    a2 = (work / "a2_mixing.py").read_text()  # the classic bug: mixing across channels instead of tokens
    a2 = a2.replace("yt = y.transpose(0, 2, 1)  # (B, D, N)", "yt = y  # (B, N, D)")
    (work / "a2_mixing.py").write_text(a2)
    result = grade(work)
    scores = {r["exercise"]: (r["points"], r["message"]) for r in result["exercises"]}
    assert scores["linear_forward"][0] == 0 and "max rel error" in scores["linear_forward"][1]
    assert scores["layernorm_forward"][0] == 0
    assert scores["token_mixing_forward"][0] == 0
    assert result["total"] == 130  # the other 13 exercises still pass on their own


def test_text_table_and_bad_folder(released):
    r = cw("grade", str(released / "key"))
    assert r.returncode == 0 and "total" in r.stdout and "160/160" in r.stdout
    r = cw("grade", "/nonexistent/hw")
    assert r.returncode == 2 and "no such folder" in r.stderr and "Traceback" not in r.stderr


def test_rotating_hidden_cases(released, tmp_path):
    ref = tmp_path / "ref7.npz"
    assert cw("make-reference", "--seed", "7", "--out", str(ref)).returncode == 0
    r = cw("grade", str(released / "key"), "--json", "--reference", str(ref))
    result = json.loads(r.stdout)
    assert result["reference_seed"] == 7 and result["total"] == 160


def test_bundled_reference_is_current(tmp_path):
    """reference.npz equals what the solution produces today (regenerate it after changing a layer)."""
    import numpy as np
    fresh = coursework.make_reference(str(tmp_path / "ref.npz"), seed=0)
    a, b = np.load(coursework.REFERENCE), np.load(fresh)
    assert sorted(a.files) == sorted(b.files)
    assert all(np.allclose(a[k], b[k], rtol=1e-12, atol=1e-14) for k in a.files)  # BLAS may round differently

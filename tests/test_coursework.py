"""Coursework: the student edition holds no solution, grading runs the student's code in an
isolated child, and the gradebook gives exactly the points each submission earns."""
import csv
import inspect
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minimixer import coursework, fast, layers, optim
from minimixer.coursework import exercises
from minimixer.coursework import sandbox as kernel_sandbox

sys.path.insert(0, str(Path(__file__).parent))
from support.coursework_attacks import ATTACKS, LAYER_EXERCISES, replace_function  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SEED = 1234  # a "private" seed for the graded runs in these tests
ALL = [e.name for e in exercises.EXERCISES]
# The strong sandbox needs bubblewrap: CI installs it and requires it (MINIMIXER_REQUIRE_SANDBOX=1);
# on a machine without it these tests grade as `--sandbox weak` does (Landlock, the audit hook, rlimits)
SANDBOX = ("strong" if kernel_sandbox.available()[0] or os.environ.get("MINIMIXER_REQUIRE_SANDBOX") == "1"
           else "weak")


def grade(*args, **kwargs):
    kwargs.setdefault("sandbox", SANDBOX)
    return coursework.grade(*args, **kwargs)


def cw(*args, cwd=None, env=None, timeout=120):
    if args and args[0] == "grade" and SANDBOX == "weak":
        args = (*args, "--sandbox", "weak")
    return subprocess.run([sys.executable, "-m", "minimixer.coursework", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def edition(tmp_path_factory):
    root = tmp_path_factory.mktemp("cw")
    r = cw("release", "--out", str(root / "hw"))
    assert r.returncode == 0, r.stderr
    return root / "hw"


@pytest.fixture(scope="module")
def texts(edition):
    key = {m: (REPO / "minimixer" / f"{m}.py").read_text() for m in ("layers", "optim")}
    blank = {m: (edition / "minimixer" / f"{m}.py").read_text() for m in ("layers", "optim")}
    return key, blank


def hand_in(folder, layers_src, optim_src=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "layers.py").write_text(layers_src)
    if optim_src is not None:
        (folder / "optim.py").write_text(optim_src)
    return folder


def scores(result):
    return {r["exercise"]: r["points"] for r in result["exercises"]}


# --- the student edition ---------------------------------------------------------------------------

def solution_regions():
    """Each solution region of layers.py and optim.py: its non-blank lines, stripped."""
    regions, inside = [], False
    for module in (layers, optim):
        for line in inspect.getsource(module).splitlines():
            if line.strip() == coursework.BEGIN:
                inside, current = True, []
            elif line.strip() == coursework.END:
                inside = False
                regions.append(current)
            elif inside and line.strip():
                current.append(line.strip())
    return regions


def fast_equivalents():
    """The lines of the fast path's fused kernels (LayerNorm backward, the GELU derivative, ...)
    that compute something: they hold the same answers as the solution regions."""
    lines = set()
    modules = [m for _, m in inspect.getmembers(fast, inspect.ismodule) if m.__name__.startswith(fast.__name__ + ".")]
    kernels = [f for m in modules for name, f in inspect.getmembers(m, inspect.isfunction)
               if f.__module__ == m.__name__ and re.search("gelu|layernorm|phi|cupy|erf|backward", name)]
    sources = [inspect.getsource(kernel) for kernel in kernels]
    with open(os.path.join(os.path.dirname(fast.__file__), "kernels_numba.py"), encoding="utf-8") as f:
        sources.append(f.read())  # read, not imported: Numba is an extra
    for source in sources:
        for line in source.splitlines():
            s = line.split("#")[0].strip()
            if len(s) >= 16 and re.search(r"[*+/-]", s) and not s.startswith(("def ", '"""', "return ")):
                lines.add(s)
    return lines


def test_student_edition_contains_no_solution(edition):
    regions = solution_regions()
    assert len(regions) == 16 and sum(map(len, regions)) > 40  # the regions really are there
    secret_lines = {line for region in regions for line in region if len(line) >= 12}  # not "else:"
    fast_lines = fast_equivalents()
    assert len(fast_lines) > 10
    received = [p for p in edition.rglob("*") if p.is_file()]
    assert len(received) > 20
    assert not any(p.name in coursework.ANSWER_FILES for p in received)
    for path in received:
        text = path.read_bytes().decode("latin-1")  # every file, binary ones included
        normalized = {line.split("#")[0].strip() for line in text.splitlines()} | \
                     {line.strip() for line in text.splitlines()}
        leaked = sorted(secret_lines & normalized)
        assert not leaked, f"{path} holds solution lines: {leaked[:3]}"
        leaked = sorted(fast_lines & normalized)
        assert not leaked, f"{path} holds the fast path's equivalents: {leaked[:3]}"
        joined = "\n".join(line.strip() for line in text.splitlines())
        for region in regions:
            assert "\n".join(region) not in joined, f"{path} holds a solution body"
    for path in edition.rglob("*.py"):
        assert not any(line.strip() in (coursework.BEGIN, coursework.END) for line in path.read_text().splitlines())
    student_layers = (edition / "minimixer" / "layers.py").read_text()
    assert student_layers.count("raise NotImplementedError") == 15
    assert (edition / "minimixer" / "optim.py").read_text().count("raise NotImplementedError") == 1
    # signatures, docstrings, caches and return lines stay
    assert "def layernorm_forward(x, w, b, eps=1e-6):" in student_layers
    assert "cache = (x, w, mean, rstd)" in student_layers and "return dx, dw, db" in student_layers
    # no answer key: the instructor's package (with the grader) is not in the edition, nor an option for it
    assert not (edition / "minimixer" / "coursework" / "student_fast.py").exists()
    assert "def release" not in (edition / "minimixer" / "coursework" / "__init__.py").read_text()
    r = cw("release", "--out", str(edition.parent / "key"), "--solutions")
    assert r.returncode == 2 and "unrecognized arguments: --solutions" in r.stderr


def test_release_refuses_a_non_empty_folder_without_force(tmp_path):
    """Issue 9 item 17: release never overwrites a student's edited files without --force."""
    hw = tmp_path / "hw"
    (hw / "minimixer").mkdir(parents=True)
    mine = hw / "minimixer" / "layers.py"
    mine.write_text("# my work\n")
    r = cw("release", "--out", str(hw))
    assert r.returncode == 2 and "not empty" in r.stderr and "--force" in r.stderr and "Traceback" not in r.stderr
    assert mine.read_text() == "# my work\n" and len(list(hw.rglob("*"))) == 2
    r = cw("release", "--out", str(hw), "--force")
    assert r.returncode == 0, r.stderr
    assert "NotImplementedError" in mine.read_text()
    (tmp_path / "file").write_text("x")
    r = cw("release", "--out", str(tmp_path / "file"))
    assert r.returncode == 2 and "not a folder" in r.stderr


def test_student_edition_runs_the_students_own_code(edition, texts, tmp_path):
    """Blank: the self-check says "not implemented" everywhere and eval stops at the first
    unwritten layer. Solved: the self-check gives full marks and eval runs on the student's code."""
    key, _ = texts
    work = tmp_path / "hw"
    subprocess.run(["cp", "-r", str(edition), str(work)], check=True)
    env = {**os.environ, "PYTHONPATH": str(work)}
    r = cw("check", "--json", cwd=work, env=env)
    assert r.returncode == 0, r.stderr
    blank = json.loads(r.stdout)
    assert blank["total"] == 0 and {x["message"] for x in blank["exercises"]} == {"not implemented"}
    for m in ("layers", "optim"):
        (work / "minimixer" / f"{m}.py").write_text(key[m])
    r = cw("check", "--json", cwd=work, env=env)
    checked = json.loads(r.stdout)
    assert checked["total"] == 160, r.stdout
    graded = grade(hand_in(tmp_path / "sub", key["layers"], key["optim"]), SEED, timeout=30)
    assert scores(graded) == scores(checked) and graded["total"] == 160  # the same verdict
    r = subprocess.run([sys.executable, "-m", "minimixer.eval"], cwd=work, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Acc@1 99.155" in r.stdout  # the bundled digits model, on the student's layers
    code = ("import minimixer, minimixer.fast as f, minimixer.layers as l; "
            "print(f.__file__, l.__file__, 'NotImplementedError' in open(f.__file__).read())")
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True)
    assert r.stdout.split()[:2] == [str(work / "minimixer" / "fast" / "__init__.py"), str(work / "minimixer" / "layers.py")]


# --- the graded run ----------------------------------------------------------------------------------

def test_full_and_zero_marks(texts, tmp_path):
    key, blank = texts
    full = grade(hand_in(tmp_path / "key", key["layers"], key["optim"]), SEED, timeout=30)
    assert full["total"] == full["max"] == 160 and full["status"] == "ok", exercises.print_table(full)
    zero = grade(hand_in(tmp_path / "blank", blank["layers"], blank["optim"]), SEED, timeout=30)
    assert zero["total"] == 0 and {r["message"] for r in zero["exercises"]} == {"not implemented"}
    (tmp_path / "nothing").mkdir()
    none = grade(tmp_path / "nothing", SEED)
    assert none["total"] == 0 and none["status"] == "no files"


@pytest.mark.parametrize("solved", ["layernorm_backward", "token_mixing_forward", "mixer_block_backward", "AdamW"])
def test_one_solved_exercise_gets_exactly_its_marks(texts, tmp_path, solved):
    """An exercise that calls others gets correct ones lent: it is graded on its own."""
    key, blank = texts
    subs = dict(blank)
    if solved == "AdamW":
        subs["optim"] = key["optim"]
    else:
        source = re.search(rf"^def {solved}\b.*?(?=^\S|\Z)", key["layers"], flags=re.S | re.M).group(0)
        subs["layers"] = replace_function(blank["layers"], solved, source)
    result = grade(hand_in(tmp_path / "s", subs["layers"], subs["optim"]), SEED, timeout=30)
    assert scores(result)[solved] == 10 and result["total"] == 10, scores(result)


PLANTED = {  # mistake -> (replaced text, new text, exercise, points, output named, message pattern)
    "layernorm_backward without the rstd factor": (
        "    dx *= rstd  # (..., D)\n", "", "layernorm_backward", 6, "dx", r"dx max rel error .* at \[\d+, \d+, \d+\]"),
    "layernorm_forward caching the variance": (
        "    cache = (x, w, mean, rstd)\n", "    cache = (x, w, mean, 1.0 / rstd**2)\n", "layernorm_forward", 7, "cache",
        r"cache \[3\] \(rstd\) max rel error"),
    "token mixing, not transposed back": (
        "    out = zt.transpose(0, 2, 1)  # (B, N, D)\n", "    out = zt\n",
        "token_mixing_forward", 3, "out", r"out has shape \(2, 4, 5\), expected \(2, 5, 4\)"),
    "linear_backward with db summed over the wrong axis": (
        "    db = _sum_leading(dout)  # (O,)\n", "    db = dout.reshape(-1, dout.shape[-1]).sum(axis=1)\n",
        "linear_backward", 7, "db", r"db has shape \(\d+,\), expected \(3,\)"),
}


def test_planted_mistakes_are_named(texts, tmp_path):
    key, _ = texts
    text = key["layers"]
    for old, new, *_ in PLANTED.values():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    result = grade(hand_in(tmp_path / "s", text, key["optim"]), SEED, timeout=30)
    exercises.print_table(result)
    rows = {r["exercise"]: r for r in result["exercises"]}
    for mistake, (_, _, name, points, output, pattern) in PLANTED.items():
        row = rows[name]
        assert row["points"] == points, (mistake, row)
        named = [o for o in row["outputs"] if o["points"] == 0]
        assert output in {o["output"] for o in named}, (mistake, row)
        assert re.search(pattern, row["message"]), (mistake, row["message"])
    assert result["total"] == 160 - sum(10 - p for *_, p, _, _ in PLANTED.values())


def test_an_exception_shows_the_students_file_and_line(texts, tmp_path):
    key, _ = texts
    text = key["layers"].replace("    dw = _sum_leading(dout * norm)  # (D,)\n",
                                 "    dw = _sum_leading(dout * norm.T)  # (D,)\n")
    line = text.splitlines().index("    dw = _sum_leading(dout * norm.T)  # (D,)") + 1
    row = {r["exercise"]: r for r in grade(hand_in(tmp_path / "s", text, key["optim"]), SEED,
                                                      timeout=30)["exercises"]}["layernorm_backward"]
    assert row["points"] == 0
    assert "ValueError" in row["message"] and f"layers.py, line {line}, in layernorm_backward" in row["message"]


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_cheats_and_crashes_cost_only_the_affected_exercises(texts, tmp_path, attack):
    key, blank = texts
    secret = tmp_path / "private_reference.txt"
    secret.write_text("the hidden seed is 1234")
    layers_src, optim_src, affected, reason = ATTACKS[attack](key, blank, REPO, secret)
    start = time.monotonic()
    result = grade(hand_in(tmp_path / "s", layers_src, optim_src), SEED, timeout=3)
    seconds = time.monotonic() - start
    rows = {r["exercise"]: r for r in result["exercises"]}
    for name in affected:
        assert rows[name]["points"] == 0, (name, rows[name])
        assert re.search(reason, rows[name]["message"]), (name, rows[name]["message"])
    intact = key["optim"] == optim_src and [n for n in ALL if n not in affected] or []
    for name in intact:  # the rest of a correct submission still earns its marks
        assert rows[name]["points"] == 10, (name, rows[name])
    assert seconds < 3 + 20  # the endless loop ends at its timeout; nothing else waits
    expected_status = {"infinite_loop": "timeout", "sys_exit": "crashed", "os_exit_at_import": "crashed",
                       "replace_grader_functions": "crashed", "import_full_package": "import error",
                       "syntax_error": "syntax error"}.get(attack, "ok")
    assert result["status"] == expected_status


def test_a_submission_that_hangs_everywhere_stops_at_its_budget(texts, tmp_path):
    key, _ = texts
    text = key["layers"]
    for name in ("linear_forward", "gelu_forward", "layernorm_forward"):
        args = re.search(rf"^def {name}(\(.*?\)):", text, flags=re.M).group(1)
        text = replace_function(text, name, f"def {name}{args}:\n    while True:\n        pass\n")
    start = time.monotonic()
    result = grade(hand_in(tmp_path / "s", text, key["optim"]), SEED, timeout=2, budget=3)
    assert time.monotonic() - start < 3 + 15
    rows = {r["exercise"]: r for r in result["exercises"]}
    assert "timed out after 2 s in linear_forward" in rows["linear_forward"]["message"]
    assert all(r["points"] == 0 and r["status"] == "timeout" for n, r in rows.items() if n not in ("linear_backward",))
    assert "the submission's 3 s were spent" in rows["AdamW"]["message"] and result["status"] == "timeout"


def test_landlock_alone_keeps_the_files_out(texts, tmp_path):
    """The kernel sandbox holds even without the audit hook (where the kernel has Landlock)."""
    key, blank = texts
    secret = tmp_path / "private_reference.txt"
    secret.write_text("the hidden seed is 1234")
    layers_src, optim_src, _, _ = ATTACKS["file_system"](key, blank, REPO, secret)
    result = grade(hand_in(tmp_path / "s", layers_src, optim_src), SEED, timeout=10, audit=False,
                              sandbox="weak")
    if not result.get("landlock"):
        pytest.skip("this kernel has no Landlock")
    rows = {r["exercise"]: r for r in result["exercises"]}
    for name in ("linear_forward", "linear_backward"):
        assert rows[name]["points"] == 0 and "[Errno 13] Permission denied" in rows[name]["message"], rows[name]


def test_hard_coded_self_check_answers_get_zero_on_the_hidden_cases(edition, texts, tmp_path):
    """A linear_forward that returns the bundled public answers passes the self-check's cases
    (seed 0) and fails the graded run (a private seed)."""
    from minimixer.coursework import protocol
    key, _ = texts
    data = protocol.decode((edition / "minimixer" / "coursework" / "selfcheck.data").read_bytes())
    answers = {float(c["inputs"]["args"][0].sum()): (c["expected"][0].tolist(), c["expected"][1][0].shape)
               for c in data["cases"]["linear_forward"]}
    body = f'''
    def linear_forward(x, w, b):
        import numpy as np
        out, _ = {answers!r}[float(x.sum())]
        return np.array(out, dtype=x.dtype), (x, w)
    '''
    sub = hand_in(tmp_path / "s", replace_function(key["layers"], "linear_forward", body), key["optim"])
    assert scores(grade(sub, coursework.PUBLIC_SEED, timeout=30))["linear_forward"] == 10
    hidden = {r["exercise"]: r for r in grade(sub, SEED, timeout=30)["exercises"]}["linear_forward"]
    assert hidden["points"] == 0 and "KeyError" in hidden["message"]


# --- batch grading -----------------------------------------------------------------------------------

def test_batch_gradebook_for_a_generated_class(texts, tmp_path):
    key, blank = texts
    root = tmp_path / "submissions"
    expected = {}
    planted = list(PLANTED.values())
    for i in range(22):
        sid = f"s{i:02d}"
        folder = root / sid
        kind = ["correct", "blank", "partial", "hang", "crash", "import_crash", "no_files", "one_bug",
                "whole_edition", "only_layers", "exit"][i % 11]
        points = {n: 10 for n in ALL}
        status = "ok"
        if kind == "correct":
            hand_in(folder, key["layers"], key["optim"])
        elif kind == "blank":
            hand_in(folder, blank["layers"], blank["optim"])
            points = {n: 0 for n in ALL}
        elif kind == "partial":  # the A1 layers and AdamW only
            text = blank["layers"]
            for name in ALL[:6]:
                text = replace_function(text, name, re.search(rf"^def {name}\b.*?(?=^\S|\Z)", key["layers"],
                                                              flags=re.S | re.M).group(0))
            hand_in(folder, text, key["optim"])
            points = {n: (10 if n in ALL[:6] or n == "AdamW" else 0) for n in ALL}
        elif kind == "hang":
            hand_in(folder, replace_function(key["layers"], "mlp_backward",
                                             "def mlp_backward(dout, cache):\n    while True:\n        pass\n"),
                    key["optim"])
            points["mlp_backward"], status = 0, "timeout"
        elif kind == "crash":
            hand_in(folder, replace_function(key["layers"], "gelu_forward",
                                             "def gelu_forward(x, form='erf'):\n    import os\n    os._exit(1)\n"),
                    key["optim"])
            points["gelu_forward"], status = 0, "crashed"
        elif kind == "import_crash":
            hand_in(folder, key["layers"] + "\nimport os\nos._exit(0)\n", key["optim"])
            points = {n: (10 if n == "AdamW" else 0) for n in ALL}
            status = "crashed"
        elif kind == "no_files":
            folder.mkdir(parents=True)
            (folder / "notes.txt").write_text("forgot to hand in")
            points, status = {n: 0 for n in ALL}, "no files"
        elif kind == "one_bug":
            old, new, name, pts, *_ = planted[(i // 11) % len(planted)]
            hand_in(folder, key["layers"].replace(old, new), key["optim"])
            points[name] = pts
        elif kind == "whole_edition":  # handed back as minimixer/layers.py, minimixer/optim.py
            hand_in(folder / "minimixer", key["layers"], key["optim"])
        elif kind == "only_layers":
            hand_in(folder, key["layers"])
            points["AdamW"], status = 0, "missing optim.py"
        elif kind == "exit":
            hand_in(folder, key["layers"].replace("    xp = get_xp(logits, labels)\n",
                                                  "    xp = get_xp(logits, labels)\n    raise SystemExit(3)\n"),
                    key["optim"])
            points["softmax_cross_entropy"], status = 0, "crashed"
        expected[sid] = (points, status)
    out = tmp_path / "grades.csv"
    start = time.monotonic()
    r = cw("grade", "--batch", str(root), "--csv", str(out), "--seed", str(SEED), "--timeout", "2", "--jobs", "2",
           timeout=300)
    seconds = time.monotonic() - start
    assert r.returncode == 0, r.stderr
    print(out.read_text())
    print(f"{len(expected)} submissions in {seconds:.1f} s")
    rows = list(csv.DictReader(out.open()))
    assert [row["student"] for row in rows] == sorted(expected)
    for row in rows:
        points, status = expected[row["student"]]
        got = {n: int(row[n]) for n in ALL}
        assert got == points, (row["student"], {n: (got[n], points[n]) for n in ALL if got[n] != points[n]})
        assert int(row["total"]) == sum(points.values()) and row["status"] == status, row
    feedback = tmp_path / "grades_feedback"
    assert sorted(p.stem for p in feedback.glob("*.txt")) == sorted(expected)
    assert "timed out after 2 s in mlp_backward" in (feedback / "s03.txt").read_text()
    seconds = {p.stem: json.loads(p.read_text())["seconds"] for p in feedback.glob("*.json")
               if "seconds" in json.loads(p.read_text())}
    print("grading seconds per student:", dict(sorted(seconds.items())))
    assert not list(tmp_path.glob(".tmp-*"))  # the CSV was written atomically


def test_cli_one_submission_and_bad_input(texts, tmp_path):
    key, _ = texts
    sub = hand_in(tmp_path / "s", key["layers"], key["optim"])
    r = cw("grade", str(sub))
    assert r.returncode == 0 and "160/160" in r.stdout and "seed" in r.stdout
    assert not re.search(r"\(seed 0,", r.stdout)  # the default is a private seed, not the public cases
    for args, message in [(("grade", "/nonexistent/hw"), "no such folder"),
                          (("grade", "--batch", "/nonexistent"), "no such folder"),
                          (("grade", str(sub), "--timeout", "0"), "must be > 0")]:
        r = cw(*args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("attack", ["import_full_package", "import_solutions_quietly", "file_system"])
def test_the_attacks_work_without_the_sandbox(texts, tmp_path, attack):
    """The attacks above are real: with the sandbox off, they take the solutions' points. (The
    child's clean sys.path alone does not stop a submission that knows where the package is.)"""
    key, blank = texts
    secret = tmp_path / "private_reference.txt"
    secret.write_text("the hidden seed is 1234")
    layers_src, optim_src, affected, _ = ATTACKS[attack](key, blank, REPO, secret)
    result = grade(hand_in(tmp_path / "s", layers_src, optim_src), SEED, timeout=10, sandbox=False)
    rows = {r["exercise"]: r for r in result["exercises"]}
    assert all(rows[name]["points"] == 10 for name in affected), {n: rows[n]["message"] for n in affected}

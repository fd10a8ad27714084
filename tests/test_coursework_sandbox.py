"""A class with hostile students, graded in the strong sandbox (bubblewrap + seccomp + rlimits +
Landlock) with the in-process audit hook switched off, as if the submissions had escaped it:
the correct students get 160/160, each attacker gets nothing it did not write, the batch ends
within its timeouts and the CSV is complete. Each attack is a test."""
import csv
import importlib
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minimixer import coursework
from minimixer.commands.cli import UserError
from minimixer.coursework import sandbox

grading = importlib.import_module("minimixer.coursework.grade")

sys.path.insert(0, str(Path(__file__).parent))
from support.coursework_attacks import replace_function  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SEED = 4321
SECRET_ENV = "MINIMIXER_TEST_GRADER_SECRET"
SECRET = "s3cr3t-grader-token-8b1f"
ROOT_ONLY = "root-only-contents-77ad"
CORRECT = ("correct_a", "correct_b", "correct_c")
SLEEP = "6170"  # a detached process would be `sleep 6170`

needs_bwrap = pytest.mark.skipif(not sandbox.available()[0], reason=f"no strong sandbox here: {sandbox.available()[1]}")


def body(name, args, code):
    lines = "\n".join("    " + line for line in code.strip().splitlines())
    return f"def {name}({args}):\n{lines}\n"


def attacks(tmp, key, blank):
    """{student: (setup(folder), pattern its feedback must show)}."""
    secret_file = tmp / "root_only.txt"
    secret_file.write_text(ROOT_ONLY)
    os.chmod(secret_file, 0o600)
    pid = os.getpid()

    def blank_with(name, args, code):
        return lambda d: _hand_in(d, replace_function(blank["layers"], name, body(name, args, code)), blank["optim"])

    def links(**targets):
        def setup(d):
            d.mkdir(parents=True)
            for fname, target in targets.items():
                os.symlink(target, d / fname)
        return setup

    return {
        "link_to_package": (links(**{"layers.py": REPO / "minimixer" / "layers.py",
                                     "optim.py": REPO / "minimixer" / "optim.py"}), "layers.py is a symbolic link"),
        "link_to_package_folder": (links(minimixer=REPO / "minimixer"), "minimixer/ is a symbolic link"),
        "link_to_student": (links(**{"layers.py": Path("..") / "correct_a" / "layers.py",
                                     "optim.py": Path("..") / "correct_a" / "optim.py"}), "is a symbolic link"),
        "folder_link_to_student": (lambda d: os.symlink(d.parent / "correct_a", d),  # the whole folder
                                   "the submission folder is a symbolic link: nothing was graded"),
        "link_to_root_only_file": (links(**{"layers.py": secret_file}), "layers.py is a symbolic link"),
        "link_to_proc": (links(**{"layers.py": "/proc/self/environ", "optim.py": f"/proc/{pid}/environ"}),
                         "is a symbolic link"),
        "hard_link": (lambda d: (d.mkdir(parents=True), os.link(secret_file, d / "layers.py")), "is a hard link"),
        "named_pipe": (lambda d: (d.mkdir(parents=True), os.mkfifo(d / "layers.py")),  # would block a plain open
                       "layers.py is a named pipe: only regular files are graded"),
        "parent_limits": (blank_with("linear_forward", "x, w, b", f"""
import resource, os
done = []
for pid in ({pid}, os.getppid(), 1):
    for res in (resource.RLIMIT_NOFILE, resource.RLIMIT_AS, resource.RLIMIT_NPROC):
        try:
            resource.prlimit(pid, res, (1, 1))
            done.append(pid)
        except OSError as e:
            err = e
raise RuntimeError(f"changed the limits of {{done}}; last refusal: {{err}}")
"""), r"RuntimeError: changed the limits of \[\]; last refusal: \[Errno (1|3)\]"),
        "detached_process": (blank_with("linear_forward", "x, w, b", f"""
import os
tried = []
try:
    if os.fork() == 0:
        os.setsid()
        os.execv("/usr/bin/sleep", ["sleep", "{SLEEP}"])
except OSError as e:
    tried.append(f"fork: {{e}}")
try:
    os.posix_spawn("/usr/bin/sleep", ["sleep", "{SLEEP}"], {{}})
except OSError as e:
    tried.append(f"spawn: {{e}}")
raise RuntimeError("; ".join(tried))
"""), r"fork: \[Errno 1\] Operation not permitted; spawn: \[Errno 1\] Operation not permitted"),
        "memory_outside_rlimit_as": (blank_with("linear_forward", "x, w, b", """
import os
fd = os.memfd_create("hoard")  # shared memory: not counted in RLIMIT_AS until mapped
chunk = b"\\0" * (1 << 20)
for _ in range(64):  # the test stops at 64 MB: a sandbox that failed would not cost the machine
    os.write(fd, chunk)
raise RuntimeError("hoarded 64 MB in a memfd")
"""), r"PermissionError: \[Errno 1\] Operation not permitted"),
        "oversized_request": (blank_with("mlp_forward", "x, fc1_w, fc1_b, fc2_w, fc2_b, form='erf'", """
import numpy as np
# a broadcast of 16 kB of inputs asks the grader for an 8 GB output
return linear_forward(np.ones((1000, 1000, 1)), np.ones((1000, 1)), np.ones(1000)), None
"""), r"refused: an argument of shape \(1000, 1000, 1\) is larger than any of the exercise's inputs"),
        "grader_environment": (blank_with("linear_forward", "x, w, b", f"""
import os
seen = [repr(dict(os.environ))]
for path in ("/proc/self/environ", "/proc/1/environ", "/proc/{pid}/environ"):
    try:
        seen.append(open(path, "rb").read().decode(errors="replace"))
    except OSError as e:
        seen.append(str(e))
raise RuntimeError(" | ".join(seen))
"""), r"RuntimeError: \{.*'OPENBLAS_NUM_THREADS'"),
    }


def _hand_in(folder, layers_src, optim_src=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "layers.py").write_text(layers_src)
    if optim_src is not None:
        (folder / "optim.py").write_text(optim_src)


def _sleepers():
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", SLEEP.encode()]:
                    found.append(p.name)
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    if not sandbox.available()[0]:
        pytest.skip(sandbox.available()[1])
    key = {m: (REPO / "minimixer" / f"{m}.py").read_text() for m in ("layers", "optim")}
    blank = {m: coursework.strip_solutions(key[m], m) for m in key}
    tmp = tmp_path_factory.mktemp("hostile")
    root = tmp / "submissions"
    for s in CORRECT:
        _hand_in(root / s, key["layers"], key["optim"])
    table = attacks(tmp, key, blank)
    for s, (setup, _) in table.items():
        setup(root / s)
    limits = {r: resource.getrlimit(r) for r in (resource.RLIMIT_NOFILE, resource.RLIMIT_AS, resource.RLIMIT_NPROC)}
    os.environ[SECRET_ENV] = SECRET
    csv_path = tmp / "grades.csv"
    start = time.monotonic()
    try:
        results = coursework.grade_batch(str(root), str(csv_path), SEED, timeout=5, budget=60, jobs=2,
                                         audit=False)  # as if every submission had escaped the hook
    finally:
        del os.environ[SECRET_ENV]
    seconds = time.monotonic() - start
    after = {r: resource.getrlimit(r) for r in limits}
    rows = {r["student"]: r for r in csv.DictReader(csv_path.open())}
    feedback = {p.stem: p.read_text() for p in (tmp / "grades_feedback").glob("*.txt")}
    return {"results": results, "rows": rows, "feedback": feedback, "seconds": seconds, "table": table,
            "limits": (limits, after), "csv": csv_path.read_text()}


@needs_bwrap
class TestHostileClass:
    def check_attacker(self, graded, student):
        result = graded["results"][student]
        _, pattern = graded["table"][student]
        assert result["total"] == 0 and graded["rows"][student]["total"] == "0", result
        text = graded["feedback"][student]
        assert re.search(pattern, text), text
        for leak in (SECRET, ROOT_ONLY, "### BEGIN SOLUTION"):
            assert leak not in text and leak not in graded["csv"], (leak, text[:2000])
        assert result["sandbox"]["mode"] == "strong" and result["sandbox"]["seccomp"]
        return result

    def test_correct_students_get_full_marks(self, graded):
        for s in CORRECT:
            assert graded["results"][s]["total"] == 160, coursework.exercises.print_table(graded["results"][s])
            assert graded["rows"][s]["total"] == "160" and graded["rows"][s]["status"] == "ok"

    def test_the_csv_is_complete_and_the_batch_ends_in_time(self, graded):
        assert sorted(graded["rows"]) == sorted(CORRECT + tuple(graded["table"]))
        assert graded["seconds"] < 60, graded["seconds"]
        assert not [n for n in os.listdir(grading.run_dir()) if n.startswith("submission-")]

    def test_link_to_package(self, graded):
        result = self.check_attacker(graded, "link_to_package")
        assert result["status"] == "refused link"

    def test_link_to_package_folder(self, graded):
        self.check_attacker(graded, "link_to_package_folder")

    def test_link_to_another_student(self, graded):
        self.check_attacker(graded, "link_to_student")

    def test_a_folder_that_links_to_another_student(self, graded):
        self.check_attacker(graded, "folder_link_to_student")

    def test_link_to_a_root_only_file(self, graded):
        self.check_attacker(graded, "link_to_root_only_file")

    def test_link_to_proc(self, graded):
        self.check_attacker(graded, "link_to_proc")

    def test_hard_link(self, graded):
        self.check_attacker(graded, "hard_link")

    def test_a_named_pipe(self, graded):
        self.check_attacker(graded, "named_pipe")

    def test_changing_the_parents_limits(self, graded):
        self.check_attacker(graded, "parent_limits")
        before, after = graded["limits"]
        assert before == after

    def test_a_detached_process_holding_the_pipe(self, graded):
        self.check_attacker(graded, "detached_process")
        assert not _sleepers()

    def test_memory_outside_rlimit_as(self, graded):
        self.check_attacker(graded, "memory_outside_rlimit_as")

    def test_an_oversized_request_to_the_parent(self, graded):
        result = self.check_attacker(graded, "oversized_request")
        assert result["seconds"] < 30

    def test_reading_the_graders_environment(self, graded):
        self.check_attacker(graded, "grader_environment")
        text = graded["feedback"]["grader_environment"]
        assert SECRET_ENV not in text and "PATH" in text  # it saw its own small environment, nothing else


@needs_bwrap
def test_the_seccomp_filter_refuses_fork_memfd_and_sockets(tmp_path):
    """The seccomp filter (the second wall, behind the namespaces): fork, memfd_create and
    socket fail with EPERM."""
    code = "import os, socket\nfor f in (os.fork, lambda: os.memfd_create('x'), socket.socket):\n    try:\n" \
           "        f(); print('ran')\n    except OSError as e:\n        print(e.errno)\n"
    argv, fds, close = sandbox.command([os.path.realpath(sys.executable), "-I", "-S", "-c", code], [])
    try:
        r = subprocess.run(argv, pass_fds=fds, capture_output=True, text=True, timeout=30)
    finally:
        close()
    assert r.stdout.split() == ["1", "1", "1"], (r.stdout, r.stderr)  # EPERM each: fork, memfd, a socket


@needs_bwrap
def test_installed_packages_are_hidden_but_numpy():
    """The Python installation is visible, its site-packages (where a full minimixer could be
    installed) are empty, and NumPy is there when it lives in one."""
    import numpy
    hidden = sandbox.installed_packages(sandbox.python_binds() + ["/usr"])
    assert hidden
    np_dir = os.path.dirname(os.path.realpath(numpy.__file__))
    code = f"import os, json\nprint(json.dumps([sorted(os.listdir(p)) for p in {hidden!r}]))\n" \
           f"print(os.path.isdir({np_dir!r}))"
    argv, fds, close = sandbox.command([os.path.realpath(sys.executable), "-I", "-S", "-c", code], [np_dir])
    try:
        r = subprocess.run(argv, pass_fds=fds, capture_output=True, text=True, timeout=30)
    finally:
        close()
    listed, seen = r.stdout.splitlines()
    outside = {h: sorted(os.listdir(h)) for h in hidden}
    assert any(outside.values())  # something is installed there, outside the sandbox
    for h, names in zip(hidden, json.loads(listed)):
        assert names == (["numpy"] if np_dir.startswith(h + os.sep) else []), (h, names)
    assert seen == "True", r.stderr


def test_grading_for_credit_refuses_without_the_strong_sandbox(tmp_path, monkeypatch):
    monkeypatch.setitem(sandbox._checked, "result", (False, "bubblewrap is not installed"))
    _hand_in(tmp_path / "s", "x = 1\n")
    with pytest.raises(UserError, match="not available here: bubblewrap is not "
                       "installed. Grading for credit refuses"):
        coursework.grade(str(tmp_path / "s"), SEED)
    result = coursework.grade(str(tmp_path / "s"), SEED, timeout=10, sandbox="weak")
    assert result["sandbox"] == {"mode": "weak", "bwrap": False, "seccomp": False, "landlock": result["landlock"]}


def test_the_sandbox_is_there_where_ci_requires_it():
    """CI (.ci/run) installs bubblewrap and sets MINIMIXER_REQUIRE_SANDBOX=1: the attack tests
    above then run, never skip."""
    if os.environ.get("MINIMIXER_REQUIRE_SANDBOX") != "1":
        pytest.skip("MINIMIXER_REQUIRE_SANDBOX is not set")
    assert sandbox.available() == (True, ""), sandbox.available()

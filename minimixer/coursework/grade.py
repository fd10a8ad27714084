"""Grading: each submission's files run in a child process (child.py) inside a kernel sandbox
(sandbox.py); the outputs come back as plain arrays and are compared here, against this
package's own solutions on inputs drawn from a private seed."""
import atexit
import io
import json
import os
import shutil
import stat
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from ..checkpoints.safetensors_io import atomic_write_bytes
from ..commands.cli import UserError
from . import gradebook, runner, sandbox as kernel
from .cases import PUBLIC_SEED, SOLUTIONS, cases_for
from .exercises import EXERCISES, FILES, POINTS, jobs_for, print_table, score_all
from .release import grading_edition

DEFAULT_TIMEOUT = 60.0  # seconds per exercise
DEFAULT_BUDGET = 600.0  # seconds per submission
MAX_FILE = 1 << 20  # bytes: a handed-in layers.py or optim.py is a few tens of kB
SANDBOXES = ("strong", "weak", "none")
WEAK = ("without bubblewrap and seccomp: the child runs as the grading user in the grader's namespaces; "
        "it cannot fork only while the audit hook holds (not a boundary), and it can see the grader's "
        "process; Landlock (if the kernel has it) still guards the files, rlimits the memory")


# --- where the grader keeps its files ------------------------------------------------------------

_run = {}
_run_lock = threading.Lock()


def run_dir():
    """This grader process's temporary folder, <tmp>/minimixer-grader/<pid>: removed at exit, and
    by the next grader that starts if this one was killed."""
    with _run_lock:
        if "path" not in _run:
            base = os.path.join(tempfile.gettempdir(), "minimixer-grader")
            os.makedirs(base, mode=0o700, exist_ok=True)
            for name in os.listdir(base):
                if name.isdigit() and not _alive(int(name)):
                    shutil.rmtree(os.path.join(base, name), ignore_errors=True)
            path = os.path.join(base, str(os.getpid()))
            os.makedirs(path, mode=0o700, exist_ok=True)
            atexit.register(shutil.rmtree, path, True)
            _run["path"] = path
        return _run["path"]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def edition():
    return grading_edition(run_dir())


# --- taking the files: regular files only, never through a link -----------------------------------

_KINDS = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")]


def take_files(folder):
    """({module: bytes}, {module: why it was refused}, [misnamed files], newest mtime) of the
    files a submission hands in: layers.py and optim.py, at its top or in a minimixer/ folder.
    Every open is O_NOFOLLOW relative to a folder opened O_NOFOLLOW: a symbolic link anywhere
    is refused with a reason, as are hard links, special files and files over MAX_FILE."""
    found, refused, misnamed, mtime = {}, {}, [], None
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0)
    try:
        top = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        why = "is a symbolic link" if os.path.islink(folder) else f"cannot be opened ({e.strerror})"
        return {}, {m: f"the submission folder {why}: nothing was graded" for m in FILES}, [], None
    dirs = [("", top)]
    try:
        try:
            dirs.append(("minimixer/", os.open("minimixer", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                               | os.O_CLOEXEC, dir_fd=top)))
        except FileNotFoundError:
            pass
        except OSError:
            for m in FILES:
                refused[m] = "minimixer/ is a symbolic link or not a folder: only regular files are graded"
        for module, fname in FILES.items():
            for prefix, d in dirs:
                try:
                    fd = os.open(fname, flags, dir_fd=d)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    kind = "a symbolic link" if os.path.islink(os.path.join(folder, prefix, fname)) else \
                        f"unreadable ({e.strerror})"
                    refused[module] = f"{prefix}{fname} is {kind}: only regular files are graded"
                    break
                try:
                    st = os.fstat(fd)
                    why = next((f"is {what}" for test, what in _KINDS if test(st.st_mode)), None)
                    if why is None and st.st_nlink > 1:
                        why = "is a hard link to another file"
                    if why is None and st.st_size > MAX_FILE:
                        why = f"holds {st.st_size} bytes, over the {MAX_FILE}-byte limit"
                    if why:
                        refused[module] = f"{prefix}{fname} {why}: only regular files are graded"
                        break
                    os.set_blocking(fd, True)
                    data = os.read(fd, MAX_FILE + 1)
                    found[module] = data[:MAX_FILE]
                    mtime = max(mtime or 0, st.st_mtime)
                finally:
                    os.close(fd)
                refused.pop(module, None)
                break
        names = []
        for _, d in dirs:
            try:
                names += os.listdir(d)
            except OSError:
                pass
        for module, fname in FILES.items():
            if module not in found and module not in refused:
                misnamed += sorted(n for n in names if n != fname and n.lower() == fname.lower())
    finally:
        for _, d in dirs:
            os.close(d)
    return found, refused, misnamed, mtime


def find_files(folder):
    """{module: path} of the handed-in files that take_files accepts (for tools and tests)."""
    found, _, _, _ = take_files(folder)
    out = {}
    for module in found:
        for candidate in (os.path.join(folder, FILES[module]), os.path.join(folder, "minimixer", FILES[module])):
            if os.path.isfile(candidate):
                out[module] = candidate
                break
    return out


# --- the sandbox --------------------------------------------------------------------------------

def resolve_sandbox(mode):
    """(wrap for runner, description) for a sandbox mode; UserError when "strong" is not
    available here. True means "strong", False "none"."""
    mode = {True: "strong", False: "none"}.get(mode, mode)
    if mode not in SANDBOXES:
        raise UserError(f"unknown sandbox {mode!r}: one of {', '.join(SANDBOXES)}")
    if mode == "strong":
        ok, why = kernel.available()
        if not ok:
            raise UserError(f"the grading sandbox is not available here: {why}. Grading for credit refuses "
                            f"to run without it; --sandbox weak grades anyway, {WEAK}")
        return kernel.command, {"mode": "strong", "bwrap": True, "seccomp": True}
    return None, {"mode": mode, "bwrap": False, "seccomp": False}


# --- one submission -----------------------------------------------------------------------------

def grade(folder, seed, timeout=DEFAULT_TIMEOUT, budget=DEFAULT_BUDGET, sandbox="strong", audit=True):
    """Grade one submission folder on the cases of `seed`; the student's code runs in a child
    process. sandbox: "strong" (bubblewrap + seccomp + Landlock + rlimits; refused where it is not
    available), "weak" (Landlock, rlimits and the audit hook only) or "none" (tests only)."""
    start = time.monotonic()
    wrap, box = resolve_sandbox(sandbox)
    cases = cases_for(seed)
    found, refused, misnamed, mtime = take_files(folder)
    outcomes, info = {}, {"landlock": None}
    for e in EXERCISES:
        if e.module in refused:
            outcomes[e.name] = {"status": "refused", "reason": refused[e.module]}
        elif e.module not in found:
            also = f" (found {', '.join(misnamed)}: the name must be exactly {FILES[e.module]})" if misnamed else ""
            outcomes[e.name] = {"status": "missing", "reason": f"{FILES[e.module]} was not handed in{also}"}
    if found:
        overlay = tempfile.mkdtemp(prefix="submission-", dir=run_dir())
        try:
            for module, data in found.items():  # only these files: nothing else from the folder is imported
                with open(os.path.join(overlay, FILES[module]), "wb") as f:
                    f.write(data)
                os.chmod(os.path.join(overlay, FILES[module]), 0o444)
            jobs = [j for j in jobs_for(cases) if j["module"] in found]
            ran, info = runner.run_jobs(jobs, edition=edition(), overlay=overlay,
                                        files=[FILES[m] for m in found], timeout=timeout, budget=budget,
                                        lent=SOLUTIONS, sandbox=box["mode"] != "none", audit=audit, wrap=wrap)
            outcomes.update(ran)
        finally:
            shutil.rmtree(overlay, ignore_errors=True)
    result = score_all(outcomes, cases, seed, time.monotonic() - start, info["landlock"])
    result["status"] = submission_status(result, found, refused, misnamed)
    result["sandbox"] = dict(box, landlock=bool(info["landlock"]))
    if mtime is not None:
        result["submitted"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime))
    return result


def submission_status(result, found, refused, misnamed):
    """One word or two for the gradebook: what went wrong first, or ok."""
    rows = result["exercises"]
    messages = [r.get("message", "") for r in rows]
    if refused:
        return "refused link" if any("symbolic link" in m or "hard link" in m for m in refused.values()) \
            else "refused file"
    if not found:
        return f"misnamed {misnamed[0]}" if misnamed else "no files"
    if any("does not import: SyntaxError" in m for m in messages):
        return "syntax error"
    if any("does not import" in m for r, m in zip(rows, messages) if r["status"] == "ok"):
        return "import error"
    missing = [FILES[m] for m in FILES if m not in found]
    if missing:
        return f"misnamed {misnamed[0]}" if misnamed else f"missing {missing[0]}"
    return result["status"]  # timeout, crashed or ok


def _error_result(message, status="error"):
    return {"exercises": [], "total": 0, "max": POINTS * len(EXERCISES), "status": status, "error": message}


def feedback_text(student, result):
    text = io.StringIO()
    print(f"student {student}: {result['total']}/{result['max']} ({result['status']})", file=text)
    if result["exercises"]:
        print_table(result, file=text)
    else:
        print(result.get("error", ""), file=text)
    return text.getvalue()


# --- a class ------------------------------------------------------------------------------------

def student_folders(root):
    """The student ids of root: its subfolders (symbolic links included, to be refused by take_files)."""
    out = []
    for d in sorted(os.listdir(root)):
        if d.startswith("."):
            continue
        path = os.path.join(root, d)
        if os.path.isdir(path) or os.path.islink(path):
            out.append(d)
    return out


def grade_batch(root, csv_path, seed, timeout=DEFAULT_TIMEOUT, budget=DEFAULT_BUDGET, jobs=None, feedback_dir=None,
                log=None, sandbox="strong", audit=True, replace=False, policy=None, roster=None,
                adjustments=None, canvas=None):
    """Grade every subfolder of root (one per student), in parallel; update the gradebook CSV and
    write a feedback file per student. One bad submission never stops the batch; Ctrl-C (or
    SIGTERM, see cli) writes what was graded, marked partial, and re-raises KeyboardInterrupt.

    Returns {student: result}. policy: gradebook.LatePolicy; roster: a list of ids;
    adjustments: the path of a manual adjustments CSV (read, never written)."""
    students = student_folders(root)
    if not students:
        raise UserError(f"{root} has no student folders")
    resolve_sandbox(sandbox)  # refuse before anything starts
    feedback_dir = feedback_dir or os.path.splitext(csv_path)[0] + "_feedback"
    os.makedirs(feedback_dir, exist_ok=True)
    cases_for(seed)
    edition()
    runner.STOP.clear()

    def one(student):
        try:
            result = grade(os.path.join(root, student), seed, timeout, budget, sandbox, audit)
        except runner.Interrupted:
            return student, None
        except Exception as e:  # noqa: BLE001 - a grader failure on one student is reported, not fatal
            result = _error_result(f"{type(e).__name__}: {e}")
        if runner.STOP.is_set():
            return student, None  # killed by Ctrl-C midway: not a grade
        fb = gradebook.safe_name(student)
        atomic_write_bytes(os.path.join(feedback_dir, f"{fb}.txt"), feedback_text(student, result).encode())
        atomic_write_bytes(os.path.join(feedback_dir, f"{fb}.json"), json.dumps(result, indent=1).encode())
        if log:
            print(f"{student}: {result['total']}/{result['max']} {result['status']} "
                  f"({result.get('seconds', 0):.1f} s)", file=log, flush=True)
        return student, result

    results, interrupted = {}, False
    pool = ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1)
    try:
        pending = {pool.submit(one, s) for s in students}
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in done:
                student, result = f.result()
                if result is not None:
                    results[student] = result
    except KeyboardInterrupt:
        interrupted = True
        runner.stop_all()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        runner.STOP.clear()
    report = gradebook.write(csv_path, results, seed, replace=replace, policy=policy, roster=roster,
                             adjustments=adjustments, canvas=canvas,
                             partial=[s for s in students if s not in results] if interrupted else ())
    lines = []
    if report["missing"]:
        lines.append(f"roster: no submission from {len(report['missing'])}: {', '.join(report['missing'])}")
    if report["unknown"]:
        lines.append(f"roster: {len(report['unknown'])} not on the roster: {', '.join(report['unknown'])}")
    if report["unmatched_adjustments"]:
        lines.append(f"adjustments for students not in the gradebook: {', '.join(report['unmatched_adjustments'])}")
    if not interrupted:
        lines += gradebook.write_statistics(csv_path, report["rows"])
    for line in lines:
        if log:
            print(line, file=log, flush=True)
    if interrupted:
        raise KeyboardInterrupt(f"{len(results)} of {len(students)} graded")
    return results


__all__ = ["DEFAULT_BUDGET", "DEFAULT_TIMEOUT", "PUBLIC_SEED", "find_files", "grade", "grade_batch", "take_files"]

"""The grader's side of a child process: start it, hand it one exercise at a time, answer its
requests for the correct version of a callee, and enforce the time limit.

A hang, a crash, sys.exit or os._exit costs only the exercise that was running (or, during an
import, every exercise in that file); the next exercise gets a fresh child.
"""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from . import protocol

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_CALLS = 10_000  # requests for a lent function per exercise
MEMORY_LIMIT = 4 << 30  # bytes of address space for a child
# hard rlimits child.py sets before any student code runs (and that everything it starts inherits);
# RLIMIT_CPU is the submission's budget plus a margin, set per child
LIMITS = {"RLIMIT_AS": MEMORY_LIMIT, "RLIMIT_FSIZE": 16 << 20, "RLIMIT_NOFILE": 64, "RLIMIT_NPROC": 16,
          "RLIMIT_CORE": 0}
STOP = threading.Event()  # set by the grader on Ctrl-C: running children are killed, none start
_live, _live_lock = set(), threading.Lock()


class Interrupted(Exception):
    """The grader was interrupted (STOP): the submission's outcome is unknown."""


def stop_all():
    """Ctrl-C: no new child starts, and every running child is killed."""
    STOP.set()
    with _live_lock:
        children = list(_live)
    for child in children:
        child.kill()


def _describe_exit(rc, wrapped=False):
    if wrapped and rc > 128:  # bubblewrap passes a killed child's signal on as 128 + signal
        rc = 128 - rc
    if rc < 0:
        try:
            return f"the process was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"the process was killed by signal {-rc}"
    return f"the process exited with status {rc} (os._exit, or a crash in native code)"


class Child:
    def __init__(self, edition, overlay, files, sandbox, audit=True, wrap=None, cpu=None):
        """wrap(argv, read_only, env) -> (argv, fds to pass, close): runs the child inside a
        kernel sandbox that shows it only the read_only paths (sandbox.command); None: a plain
        child process."""
        env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LC_ALL": "C.UTF-8",
               "PATH": "/usr/bin:/bin"}
        script = os.path.join(edition, "minimixer", "coursework", "child.py")
        numpy_dir = os.path.dirname(os.path.realpath(np.__file__))
        numpy_parent = os.path.dirname(numpy_dir)
        argv = [os.path.realpath(sys.executable), "-I", "-S", "-B", script, numpy_parent]
        fds, close = (), None
        if wrap is not None:
            argv, fds, close = wrap(argv, [overlay, edition, numpy_dir, numpy_dir + ".libs"], env)
        self.wrapped = wrap is not None
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         env=env, cwd=overlay, start_new_session=True, pass_fds=fds)
        finally:
            if close:
                close()
        with _live_lock:
            _live.add(self)
        if STOP.is_set():  # Ctrl-C came while this child started: stop_all may have missed it
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.tail = b""
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        limits = dict(LIMITS, RLIMIT_CPU=int(cpu)) if cpu else dict(LIMITS)
        self.config = {"overlay": overlay, "edition": edition, "files": list(files), "sandbox": sandbox,
                       "audit": audit, "memory": MEMORY_LIMIT, "limits": limits}

    def _read_stderr(self):
        for chunk in iter(lambda: self.proc.stderr.read1(4096), b""):
            self.tail = (self.tail + chunk)[-2000:]

    def start(self, deadline):
        self.send(self.config, deadline)
        hello = self.receive(deadline)
        if not (isinstance(hello, dict) and hello.get("type") == "hello"):
            raise protocol.ProtocolError("no greeting from the child")
        self.landlock = hello["landlock"]

    def send(self, tree, deadline):
        protocol.send(self.proc.stdin.fileno(), tree, deadline)

    def receive(self, deadline):
        return protocol.receive(self.proc.stdout.fileno(), deadline)

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.wait()

    def wait(self):
        rc = self.proc.wait()
        with _live_lock:
            _live.discard(self)
        self._drain.join(timeout=1)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        return rc

    def last_words(self):
        lines = self.tail.decode(errors="replace").strip().splitlines()
        return f"; its last output: {lines[-1][:160]}" if lines else ""


def run_jobs(jobs, *, edition, overlay, files, timeout, budget=None, lent=None, sandbox=True, audit=True, wrap=None):
    """Run each job in a child process. Returns {exercise: outcome} where an outcome is
    {"status": "ran", "cases": [...]} or {"status": "timeout" | "crashed", "reason": ...}.

    jobs: dicts with exercise, module, file, kind, cases (inputs), lend (callee names);
    lent: {name: correct function} that the grader runs for the child (None: nothing is lent);
    timeout: seconds per exercise; budget: seconds for all of them (the rest then time out unrun);
    sandbox: Landlock and the audit hook; audit=False leaves the hook out (to test Landlock alone).
    wrap: the kernel sandbox around each child (see Child).
    """
    outcomes, failed_files, child = {}, {}, None
    info = {"landlock": None}
    end = time.monotonic() + budget if budget else float("inf")
    try:
        for job in jobs:
            name = job["exercise"]
            if job["file"] in failed_files:
                outcomes[name] = dict(failed_files[job["file"]])
                continue
            if STOP.is_set():
                raise Interrupted()
            if time.monotonic() >= end:
                outcomes[name] = {"status": "timeout", "reason": f"not run: the submission's {budget:g} s were spent"}
                continue
            state = {"phase": "start"}
            try:
                deadline = min(time.monotonic() + timeout, end)
                if child is None:
                    child = _start(edition, overlay, files, sandbox, audit, deadline + 30, wrap,
                                   (budget or timeout * len(jobs)) + 30)  # start-up: not the student's time
                    info["landlock"] = child.landlock
                outcomes[name], whole_file = _converse(child, job, lent, deadline, state)
                if whole_file:
                    failed_files[job["file"]] = outcomes[name]
            except protocol.Deadline:
                child.kill()
                child = None
                where = f"while importing {job['file']}" if state["phase"] in ("start", "import") else f"in {name}"
                limit = f"after {timeout:g} s" if time.monotonic() < end else f"(the submission's {budget:g} s were spent)"
                outcome = {"status": "timeout", "reason": f"timed out {limit} {where} (an endless loop?)"}
                outcomes[name] = outcome
                if state["phase"] == "import":
                    failed_files[job["file"]] = outcome
            except (EOFError, OSError, protocol.ProtocolError) as e:
                if child is None:
                    raise
                if STOP.is_set():
                    raise Interrupted() from None
                rc = child.kill()
                words, wrapped = child.last_words(), child.wrapped
                child = None
                where = f"while importing {job['file']}" if state["phase"] == "import" else f"in {name}"
                reason = (_describe_exit(rc, wrapped) if isinstance(e, EOFError) or rc != -signal.SIGKILL
                          else f"the child broke the protocol ({e})")
                outcome = {"status": "crashed", "reason": f"{reason} {where}{words}"}
                outcomes[name] = outcome
                if state["phase"] == "import" or not isinstance(e, EOFError) and rc == -signal.SIGKILL:
                    failed_files[job["file"]] = outcome  # an import-time crash, or tampering: the whole file
        return outcomes, info
    finally:
        if child is not None:
            try:
                child.send(None, time.monotonic() + 2)
                child.proc.wait(timeout=2)
            except Exception:  # noqa: BLE001 - it is killed below either way
                pass
            child.kill()


def _converse(child, job, lent, deadline, state):
    """Send one job and serve the child's calls until its answer. Returns (outcome, whole_file):
    whole_file when the file did not import (each of its exercises then gets that outcome).
    state["phase"] follows the child's phase messages (start, import, run) for the caller's errors."""
    child.send(job, deadline)
    calls = 0
    while True:
        msg = child.receive(deadline)
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "phase":
            state["phase"] = msg["phase"]
        elif kind == "call":
            if time.monotonic() > deadline:
                raise protocol.Deadline()
            calls += 1
            child.send(_serve(msg, job, lent, calls), deadline)
        elif kind == "import_error":
            return {"status": "ran", "cases": [{"error": msg["reason"], "exit": msg["exit"]}]}, True
        elif kind == "result":
            return {"status": "ran", "cases": _checked(msg.get("cases"), job)}, False
        else:
            raise protocol.ProtocolError("unexpected message")


def _checked(cases, job):
    """The child's per-case results, if they have the shape child.py gives them."""
    ok = isinstance(cases, list) and len(cases) == len(job["cases"]) and all(
        isinstance(c, dict) and (("value" in c) or isinstance(c.get("error"), str)) for c in cases)
    if not ok:
        raise protocol.ProtocolError("malformed results: the submission tampered with the grading process")
    return cases


def _start(edition, overlay, files, sandbox, audit, deadline, wrap=None, cpu=None):
    child = Child(edition, overlay, files, sandbox, audit, wrap, cpu)
    try:
        child.start(deadline)
    except (EOFError, OSError, protocol.ProtocolError, protocol.Deadline) as e:
        child.kill()
        raise RuntimeError(f"the grader could not start its child process ({type(e).__name__}{child.last_words()})")
    return child


def _serve(msg, job, lent, calls):
    """The correct callee's result for the child, or why not."""
    name = msg.get("name")
    if lent is None or name not in job["lend"] or name not in lent:
        return {"error": f"{name} is not lent while grading {job['exercise']}"}
    if calls > MAX_CALLS:
        return {"error": f"more than {MAX_CALLS} calls"}
    too_big = _oversized((msg.get("args", ()), msg.get("kwargs", {})), job)
    if too_big:  # checked before computing: a broadcast of small arrays can ask for gigabytes
        return {"error": too_big}
    try:
        return {"value": lent[name](*msg.get("args", ()), **msg.get("kwargs", {}))}
    except Exception as e:  # noqa: BLE001 - bad arguments from the student's code: their error
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}


def _arrays(tree, depth=0):
    if depth > 20:
        raise ValueError("nested too deeply")
    if isinstance(tree, (tuple, list)):
        for v in tree:
            yield from _arrays(v, depth + 1)
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _arrays(v, depth + 1)
    elif isinstance(tree, np.ndarray):
        yield tree


def _oversized(request, job):
    """Why a request for a lent function is refused unrun, or None: every array in it must be
    no larger, in rank and in each dimension, than the arrays of the exercise's own cases."""
    if "_bounds" not in job:
        shapes = [a.shape for a in _arrays(job["cases"])]
        job["_bounds"] = (max((len(s) for s in shapes), default=0), max((max(s, default=0) for s in shapes), default=0))
    rank, side = job["_bounds"]
    try:
        for a in _arrays(request):
            if a.ndim > rank or any(n > side for n in a.shape):
                return (f"refused: an argument of shape {a.shape} is larger than any of the exercise's inputs "
                        f"(at most {rank} dimensions of {side})")
    except ValueError as e:
        return f"refused: the arguments are {e}"
    return None

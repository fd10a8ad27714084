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


def _describe_exit(rc):
    if rc < 0:
        try:
            return f"the process was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"the process was killed by signal {-rc}"
    return f"the process exited with status {rc} (os._exit, or a crash in native code)"


class Child:
    def __init__(self, edition, overlay, files, sandbox, audit=True):
        env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
        script = os.path.join(edition, "minimixer", "coursework", "child.py")
        numpy_parent = os.path.dirname(os.path.dirname(os.path.realpath(np.__file__)))
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", script, numpy_parent], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=overlay,
                                     start_new_session=True)
        self.tail = b""
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        self.config = {"overlay": overlay, "edition": edition, "files": list(files), "sandbox": sandbox,
                       "audit": audit, "memory": MEMORY_LIMIT}

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


def run_jobs(jobs, *, edition, overlay, files, timeout, budget=None, lent=None, sandbox=True, audit=True):
    """Run each job in a child process. Returns {exercise: outcome} where an outcome is
    {"status": "ran", "cases": [...]} or {"status": "timeout" | "crashed", "reason": ...}.

    jobs: dicts with exercise, module, file, kind, cases (inputs), lend (callee names);
    lent: {name: correct function} that the grader runs for the child (None: nothing is lent);
    timeout: seconds per exercise; budget: seconds for all of them (the rest then time out unrun);
    sandbox: Landlock and the audit hook; audit=False leaves the hook out (to test Landlock alone).
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
            if time.monotonic() >= end:
                outcomes[name] = {"status": "timeout", "reason": f"not run: the submission's {budget:g} s were spent"}
                continue
            phase = "start"
            try:
                deadline = min(time.monotonic() + timeout, end)
                if child is None:
                    child = _start(edition, overlay, files, sandbox, audit, deadline + 30)  # start-up: not the student's time
                    info["landlock"] = child.landlock
                child.send(job, deadline)
                calls = 0
                while True:
                    msg = child.receive(deadline)
                    kind = msg.get("type") if isinstance(msg, dict) else None
                    if kind == "phase":
                        phase = msg["phase"]
                    elif kind == "call":
                        if time.monotonic() > deadline:
                            raise protocol.Deadline()
                        calls += 1
                        child.send(_serve(msg, job, lent, calls), deadline)
                    elif kind == "import_error":
                        outcome = {"status": "ran", "cases": [{"error": msg["reason"], "exit": msg["exit"]}]}
                        failed_files[job["file"]] = outcomes[name] = outcome
                        break
                    elif kind == "result":
                        outcomes[name] = {"status": "ran", "cases": _checked(msg.get("cases"), job)}
                        break
                    else:
                        raise protocol.ProtocolError("unexpected message")
            except protocol.Deadline:
                child.kill()
                child = None
                where = f"while importing {job['file']}" if phase in ("start", "import") else f"in {name}"
                limit = f"after {timeout:g} s" if time.monotonic() < end else f"(the submission's {budget:g} s were spent)"
                outcome = {"status": "timeout", "reason": f"timed out {limit} {where} (an endless loop?)"}
                outcomes[name] = outcome
                if phase == "import":
                    failed_files[job["file"]] = outcome
            except (EOFError, OSError, protocol.ProtocolError) as e:
                if child is None:
                    raise
                rc = child.kill()
                words = child.last_words()
                child = None
                where = f"while importing {job['file']}" if phase == "import" else f"in {name}"
                reason = (_describe_exit(rc) if isinstance(e, EOFError) or rc != -signal.SIGKILL
                          else f"the child broke the protocol ({e})")
                outcome = {"status": "crashed", "reason": f"{reason} {where}{words}"}
                outcomes[name] = outcome
                if phase == "import" or not isinstance(e, EOFError) and rc == -signal.SIGKILL:
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


def _checked(cases, job):
    """The child's per-case results, if they have the shape child.py gives them."""
    ok = isinstance(cases, list) and len(cases) == len(job["cases"]) and all(
        isinstance(c, dict) and (("value" in c) or isinstance(c.get("error"), str)) for c in cases)
    if not ok:
        raise protocol.ProtocolError("malformed results: the submission tampered with the grading process")
    return cases


def _start(edition, overlay, files, sandbox, audit, deadline):
    child = Child(edition, overlay, files, sandbox, audit)
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
    try:
        return {"value": lent[name](*msg.get("args", ()), **msg.get("kwargs", {}))}
    except Exception as e:  # noqa: BLE001 - bad arguments from the student's code: their error
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}

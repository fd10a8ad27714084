"""The child process that runs a student's code: python -I -S -B child.py (started by runner.py).

It receives the configuration and then one job at a time (an exercise and its inputs) on
stdin, and sends its messages on what was stdout; the student's prints go to stderr. Before
any student code runs it narrows what the process can reach:
- sys.path holds the submission, the student edition and the standard library, nothing else;
- on Linux >= 5.13, Landlock (kernel-enforced, irreversible, no privileges needed) allows
  reading only those folders plus NumPy's, and no writing, no TCP, no signals to the grader;
- an audit hook refuses new processes, sockets, ctypes and files outside those folders.
It holds no reference outputs: it returns what the student's functions return, and the
grader compares. It reports an exception with the student's own file and line.
"""
import os
import sys

_OUT = os.dup(1)  # the protocol's channel; fd 1 then becomes stderr, so prints cannot corrupt it
_IN = os.dup(0)
os.dup2(2, 1)
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)

if __name__ == "__main__":  # NumPy, from where the grader's NumPy lives, and nothing else of that folder
    _np_parent = sys.argv[1]
    sys.path[:] = [p for p in sys.path if "site-packages" not in p and "dist-packages" not in p]
    sys.path.insert(0, _np_parent)
    import numpy  # noqa: F401,E402 - before the sandbox: its shared libraries live next to it
    sys.path.remove(_np_parent)

import importlib.util  # noqa: E402
import linecache  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402

_spec = importlib.util.spec_from_file_location("_coursework_protocol",
                                               os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                            "protocol.py"))
protocol = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(protocol)


# --- the sandbox ---------------------------------------------------------------------------------

def landlock(read_dirs, read_files):
    """Allow reading beneath read_dirs (and the single read_files), nothing else; True if applied."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    abi = syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return False
    fs = (1 << 13) - 1  # ABI 1: execute, write, read file/dir, remove, make ...
    if abi >= 2:
        fs |= 1 << 13  # refer
    if abi >= 3:
        fs |= 1 << 14  # truncate
    if abi >= 5:
        fs |= 1 << 15  # ioctl on devices
    attr = (ctypes.c_uint64 * 3)(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # net: bind+connect TCP;
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8  # scoped: abstract unix sockets, signals
    ruleset = syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return False
    read_file, read_dir, execute = 1 << 2, 1 << 3, 1 << 0

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    for path, rights in [(d, read_file | read_dir | execute) for d in read_dirs] + \
                        [(f, read_file | execute) for f in read_files]:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        rule = PathBeneath(rights, fd)
        syscall(445, ruleset, 1, ctypes.byref(rule), ctypes.c_uint32(0))  # LANDLOCK_RULE_PATH_BENEATH
        os.close(fd)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        return False
    ok = syscall(446, ruleset, ctypes.c_uint32(0)) == 0
    os.close(ruleset)
    return ok


def stdlib_entries():
    """The standard library's files and folders, except site-packages (where a full minimixer
    with the solutions may be installed)."""
    import sysconfig
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    dirs, files = [], []
    for entry in os.scandir(stdlib):
        if entry.name in ("site-packages", "dist-packages"):
            continue
        (dirs if entry.is_dir() else files).append(entry.path)
    platstdlib = os.path.realpath(sysconfig.get_paths()["platstdlib"])
    dynload = os.path.join(platstdlib, "lib-dynload")
    if os.path.isdir(dynload):
        dirs.append(dynload)
    return dirs, files


BLOCKED_EVENTS = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
                  "os.killpg", "signal.pthread_kill", "subprocess.Popen", "socket.", "ctypes.", "sys.addaudithook",
                  "os.putenv", "os.unsetenv", "winreg.", "webbrowser.", "shutil.", "os.remove", "os.rename",
                  "os.rmdir", "os.mkdir", "os.chmod", "os.truncate", "os.link", "os.symlink", "os.chdir")
BLOCKED_MODULES = ("ctypes", "_ctypes", "_posixsubprocess", "subprocess", "socket", "_socket", "multiprocessing",
                   "_multiprocessing", "signal", "mmap", "pty", "fcntl", "resource")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def audit_hook(dirs, files):
    dirs = tuple(os.path.join(os.path.realpath(p), "") for p in dirs)
    files = frozenset(os.path.realpath(p) for p in files)

    def hook(event, args, _dirs=dirs, _files=files, _blocked=BLOCKED_EVENTS, _modules=BLOCKED_MODULES,
             _realpath=os.path.realpath, _fspath=os.fspath, _write=_WRITE_FLAGS):
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            p = _realpath(_fspath(path))
            writes = (mode is not None and any(c in str(mode) for c in "wax+")) or \
                (isinstance(flags, int) and flags & _write)
            if writes or not (p in _files or p.startswith(_dirs)):
                raise PermissionError(f"grading sandbox: access to {path} is not allowed")
        elif event == "import" and args[0].split(".")[0] in _modules:
            raise ImportError(f"grading sandbox: module {args[0]} is not allowed")
        elif event.startswith(_blocked):
            raise PermissionError(f"grading sandbox: {event} is not allowed")
    sys.addaudithook(hook)


# --- running the student's functions -------------------------------------------------------------

class SubmissionError(Exception):
    """What the student's code did, as a message (with their file and line)."""

    def __init__(self, message, exit=False):
        super().__init__(message)
        self.exit = exit


def explain(exc, student_files):
    """One line: the exception and the deepest line of the student's own code it came from."""
    try:
        return _explain(exc, student_files)
    except Exception:  # noqa: BLE001 - an exception whose str() raises, say
        return f"{type(exc).__name__} (its message could not be shown)"


def _explain(exc, student_files):
    if isinstance(exc, NotImplementedError):
        return "not implemented"
    if isinstance(exc, SystemExit):
        return f"the submission called sys.exit({exc.code!r})"
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f"{os.path.basename(exc.filename)}, line {exc.lineno}"
        return f"SyntaxError at {where}: {exc.msg}: {(exc.text or '').strip()}"
    text = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.realpath(f.filename) in student_files]
    if frames:
        f = frames[-1]
        line = f.line or linecache.getline(f.filename, f.lineno).strip()
        text += f" (at {os.path.basename(f.filename)}, line {f.lineno}, in {f.name}: {line})"
    return text


def die_with_parent():
    """Linux: the kernel kills this process when the grader that started it dies (even by
    SIGKILL), endless loop or not. (Under bubblewrap, --die-with-parent does the same.)"""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != parent:  # the grader died before the line above
        os._exit(1)


def main():
    import numpy
    die_with_parent()
    config = protocol.receive(_IN)
    overlay, edition = config["overlay"], config["edition"]
    numpy_dirs = [os.path.dirname(os.path.realpath(numpy.__file__))]
    libs = os.path.join(_np_parent, "numpy.libs")
    if os.path.isdir(libs):
        numpy_dirs.append(libs)
    dirs, files = stdlib_entries()
    readable = [overlay, edition] + numpy_dirs + dirs
    student_files = {os.path.realpath(os.path.join(overlay, f)) for f in config["files"]}
    # the package, without running its __init__ (which imports extras the child does not have);
    # the submission's files shadow the edition's
    pkg = types.ModuleType("minimixer")
    pkg.__path__ = [overlay, os.path.join(edition, "minimixer")]
    pkg.__file__ = os.path.join(edition, "minimixer", "__init__.py")
    sys.modules["minimixer"] = pkg
    sandboxed = False
    limits = dict(config.get("limits") or {})
    if config.get("memory"):
        limits.setdefault("RLIMIT_AS", config["memory"])
    try:  # hard limits, before any student code: a process cannot raise them again
        import resource  # a runaway allocation fails in the student's code, not in the machine
    except ImportError:
        resource = None
    for name, value in limits.items():
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (AttributeError, ValueError, OSError):  # not settable here (macOS): the timeout still holds
            pass
    if config.get("sandbox", True):
        sandboxed = landlock(readable, files)
        for name in [m for m in sys.modules if m == "ctypes" or m.startswith("ctypes.") or m == "_ctypes"]:
            del sys.modules[name]
        if config.get("audit", True):
            audit_hook(readable, files)
    # held in locals: a submission that replaces this module's functions changes nothing here
    send, receive, run = protocol.send, protocol.receive, run_job
    send(_OUT, {"type": "hello", "landlock": sandboxed})
    modules = {}
    while True:
        job = receive(_IN)
        if job is None:
            return
        send(_OUT, {"type": "phase", "phase": "import"})
        mod = job["module"]
        if mod not in modules:
            try:
                modules[mod] = __import__(f"minimixer.{mod}", fromlist=["_"])
            except BaseException as e:  # noqa: BLE001 - the student's import is graded, not fatal
                modules[mod] = SubmissionError(f"{job['file']} does not import: {explain(e, student_files)}",
                                               exit=isinstance(e, SystemExit))
        module = modules[mod]
        if isinstance(module, SubmissionError):
            send(_OUT, {"type": "import_error", "reason": str(module), "exit": module.exit})
            continue
        send(_OUT, {"type": "phase", "phase": "run"})
        send(_OUT, {"type": "result", "cases": run(module, job, student_files)})


def lend(name):
    """A stand-in that asks the grader to run the correct `name` on these arguments."""
    def correct(*args, **kwargs):
        protocol.send(_OUT, {"type": "call", "name": name, "args": args, "kwargs": kwargs})
        reply = protocol.receive(_IN)
        if "error" in reply:
            raise RuntimeError(f"{name}: {reply['error']}")
        return reply["value"]
    correct.__name__ = name
    return correct


def _argument_name(fn, i):
    try:
        names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
        return f"`{names[i]}`" if i < len(names) else f"argument {i}"
    except AttributeError:
        return f"argument {i}"


def run_job(module, job, student_files):
    name = job["exercise"]
    saved = {n: getattr(module, n) for n in job["lend"] if hasattr(module, n)}
    for n in job["lend"]:
        setattr(module, n, lend(n))
    cases = []
    try:
        fn = getattr(module, name, None)
        for inputs in job["cases"]:
            if fn is None:
                cases.append({"error": f"{name} is not defined in {job['file']}"})
                continue
            try:
                if job["kind"] == "adamw":
                    params = inputs["params"]
                    no_decay = frozenset(inputs["no_decay"])
                    opt = fn(params, no_decay=lambda k: k in no_decay, **inputs["hyper"])
                    for grads in inputs["grads"]:
                        opt.step(grads)
                    value = params
                else:
                    before = [protocol.encode(a) for a in inputs["args"]]
                    value = fn(*inputs["args"], **inputs["kwargs"])
                    changed = [i for i, a in enumerate(inputs["args"]) if protocol.encode(a) != before[i]]
                size = protocol.nbytes(value)
                if size > protocol.MAX_MESSAGE // 4:
                    raise ValueError(f"the result takes {size} bytes: far more than the exercise asks for")
                protocol.encode(value)  # fails here, not in send, for a result that cannot travel
                cases.append({"value": value})
                if job["kind"] != "adamw" and changed:
                    cases[-1]["modified"] = _argument_name(fn, changed[0])
            except BaseException as e:  # noqa: BLE001 - includes SystemExit: reported, then the next case
                cases.append({"error": explain(e, student_files), "exit": isinstance(e, SystemExit)})
    finally:
        for n in job["lend"]:
            if n in saved:
                setattr(module, n, saved[n])
    return cases


if __name__ == "__main__":
    main()

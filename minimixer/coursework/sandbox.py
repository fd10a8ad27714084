"""The kernel's boundary around a submission's child process (Linux): bubblewrap and seccomp.

bubblewrap (bwrap, a well-kept setuid-free sandbox that Flatpak uses) starts the child in new
namespaces: its own user, PID, network, IPC, UTS and cgroup namespaces (no network, no grader
process to see or signal: the grader's PID does not exist in there), an empty read-only root
holding only read-only binds of what the child needs (the Python install, NumPy's folders, the
student edition, the submission's copy, /dev/null), no environment of the grader's, a new
session (no terminal), no capabilities, and death with its parent; when the namespace's first
process ends, the kernel kills every process left in it.

Inside, a seccomp filter (classic BPF, written here: a deny list, arch-checked) refuses what
the namespaces do not already: new processes (fork, vfork, clone without CLONE_THREAD, clone3),
memory outside the address-space limit (memfd_create, SysV shared memory), another process's
limits or memory (prlimit64 on a pid other than 0, ptrace, process_vm_*), sockets, and kernel
surfaces a grader never needs (mount, keys, bpf, perf, io_uring, userfaultfd, modules).
child.py adds hard rlimits (address space, CPU, file size, open files, processes, no core
dumps) and Landlock before any student code runs.
"""
import os
import platform
import shutil
import struct
import sys
import sysconfig

# --- the seccomp filter ----------------------------------------------------------------------------

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# syscall numbers per architecture (asm/unistd.h); a name missing on an arch is skipped
_NR = {
    "x86_64": {"fork": 57, "vfork": 58, "clone": 56, "clone3": 435, "memfd_create": 319, "memfd_secret": 447,
               "shmget": 29, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
               "prlimit64": 302, "socket": 41, "socketpair": 53, "mount": 165, "umount2": 166,
               "pivot_root": 155, "unshare": 272, "setns": 308, "keyctl": 250, "add_key": 248,
               "request_key": 249, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
               "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "kexec_load": 246,
               "init_module": 175, "finit_module": 313, "delete_module": 176, "open_by_handle_at": 304,
               "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
               "fspick": 433, "mount_setattr": 442, "acct": 163, "reboot": 169, "swapon": 167,
               "swapoff": 168, "setrlimit": 160},
    "aarch64": {"clone": 220, "clone3": 435, "memfd_create": 279, "memfd_secret": 447, "shmget": 194,
                "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "prlimit64": 261,
                "socket": 198, "socketpair": 199, "mount": 40, "umount2": 39, "pivot_root": 41,
                "unshare": 97, "setns": 268, "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280,
                "perf_event_open": 241, "userfaultfd": 282, "io_uring_setup": 425, "io_uring_enter": 426,
                "io_uring_register": 427, "kexec_load": 104, "init_module": 105, "finit_module": 273,
                "delete_module": 106, "open_by_handle_at": 265, "open_tree": 428, "move_mount": 429,
                "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
                "acct": 89, "reboot": 142, "swapon": 224, "swapoff": 225},
}
DENIED = ("fork", "vfork", "memfd_create", "memfd_secret", "shmget", "ptrace", "process_vm_readv",
          "process_vm_writev", "socket", "socketpair", "mount", "umount2", "pivot_root", "unshare", "setns",
          "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
          "io_uring_enter", "io_uring_register", "kexec_load", "init_module", "finit_module", "delete_module",
          "open_by_handle_at", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
          "mount_setattr", "acct", "reboot", "swapon", "swapoff")
CLONE_THREAD = 0x10000
EPERM, ENOSYS = 1, 38
_RET_ALLOW, _RET_ERRNO, _RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06


def _insn(code, k, jt=0, jf=0):
    return struct.pack("<HBBI", code, jt, jf, k)


def seccomp_filter(arch=None):
    """The filter as bytes for `bwrap --seccomp FD` (an array of struct sock_filter), or None on an
    architecture this file has no syscall table for."""
    arch = arch or platform.machine()
    if arch not in _NR:
        return None
    nr = _NR[arch]
    deny = _insn(_RET, _RET_ERRNO | EPERM)
    prog = [_insn(_LD_W_ABS, 4),  # seccomp_data.arch: another ABI (i386 on x86_64) is killed
            _insn(_JEQ, _AUDIT_ARCH[arch], 1, 0), _insn(_RET, _RET_KILL_PROCESS),
            _insn(_LD_W_ABS, 0)]  # seccomp_data.nr
    if arch == "x86_64":  # the x32 ABI's numbers
        prog += [_insn(_JGE, 0x40000000, 0, 1), deny]
    for name in DENIED:
        if name in nr:
            prog += [_insn(_JEQ, nr[name], 0, 1), deny]
    # clone3 passes its flags in memory a filter cannot read: ENOSYS makes glibc fall back to clone
    prog += [_insn(_JEQ, nr["clone3"], 0, 1), _insn(_RET, _RET_ERRNO | ENOSYS)]
    # clone: threads only (flags are args[0] on x86_64 and aarch64; low word at offset 16)
    prog += [_insn(_JEQ, nr["clone"], 0, 4), _insn(_LD_W_ABS, 16), _insn(_JSET, CLONE_THREAD, 0, 1),
             _insn(_RET, _RET_ALLOW), deny]
    # prlimit64: on itself only (pid 0; a process cannot raise its own hard limits in a user namespace)
    prog += [_insn(_JEQ, nr["prlimit64"], 0, 5),
             _insn(_LD_W_ABS, 16), _insn(_JEQ, 0, 0, 2),  # args[0] (pid), low word ...
             _insn(_LD_W_ABS, 20), _insn(_JEQ, 0, 1, 0),  # ... and high word
             deny]
    prog.append(_insn(_RET, _RET_ALLOW))
    return b"".join(prog)


# --- bubblewrap ------------------------------------------------------------------------------------

_checked = {}


def bwrap_path():
    return shutil.which("bwrap")


def available():
    """(True, "") when the strong sandbox runs here, else (False, why not). Tried once per process."""
    if "result" not in _checked:
        _checked["result"] = _probe()
    return _checked["result"]


def _probe():
    if not sys.platform.startswith("linux"):
        return False, f"bubblewrap needs Linux (this is {sys.platform})"
    if not bwrap_path():
        return False, "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    if seccomp_filter() is None:
        return False, f"no seccomp syscall table for {platform.machine()} in sandbox.py"
    import subprocess
    argv, fds, close = command([os.path.realpath(sys.executable), "-I", "-S", "-c", "print('ok')"], [])
    try:
        r = subprocess.run(argv, pass_fds=fds, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"bubblewrap did not start: {e}"
    finally:
        close()
    if r.returncode != 0 or r.stdout.strip() != b"ok":
        err = r.stderr.decode(errors="replace").strip().splitlines()
        return False, f"bubblewrap cannot create its namespaces here ({err[-1] if err else r.returncode}): " \
                      "user namespaces are off (sysctl kernel.unprivileged_userns_clone) or a container forbids them"
    return True, ""


def python_binds():
    """The folders the child's Python needs: its installation (the standard library) and,
    for a virtual environment, nothing of the venv (the child runs the base interpreter)."""
    prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    return sorted(prefixes | {os.path.dirname(stdlib)})


def installed_packages(binds):
    """The site-packages and dist-packages folders inside the bound trees."""
    import glob
    found = set()
    for b in binds:
        for pattern in ("lib/python3*/site-packages", "lib/python3*/dist-packages", "lib/python3/dist-packages",
                        "local/lib/python3*/site-packages", "local/lib/python3*/dist-packages"):
            found.update(os.path.realpath(p) for p in glob.glob(os.path.join(b, pattern)) if os.path.isdir(p))
    return sorted(found)


def command(argv, read_only, env=None):
    """(argv under bwrap, fds to pass, close) for running argv with only `read_only` paths (and the
    system's /usr, the Python installation) visible, read-only. close() frees the filter's pipe."""
    binds = []
    for p in ["/usr"] + python_binds() + list(read_only):
        p = os.path.realpath(p)
        if os.path.exists(p) and not any(p == b or p.startswith(b + os.sep) for b in binds):
            binds.append(p)
    args = [bwrap_path(), "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--uid", "65534", "--gid", "65534", "--clearenv", "--chdir", "/"]
    for p in binds:
        args += ["--ro-bind", p, p]
    hidden = installed_packages(binds)
    for p in hidden:  # a package installed there (minimixer itself, with the solutions) is not shown
        args += ["--tmpfs", p]
    for p in read_only:  # NumPy's folders may live in one of them: bound again on top
        p = os.path.realpath(p)
        if os.path.exists(p) and any(p.startswith(h + os.sep) for h in hidden):
            args += ["--ro-bind", p, p]
    for p in hidden:
        args += ["--remount-ro", p]
    for link in ("lib", "lib64", "bin"):  # merged-/usr systems: /lib -> usr/lib
        target = os.path.join("/", link)
        if os.path.islink(target) and not os.path.realpath(target).startswith(("/usr", "/" + link)):
            continue
        if os.path.islink(target):
            args += ["--symlink", os.readlink(target), target]
        elif os.path.isdir(target):
            args += ["--ro-bind", target, target]
    args += ["--dev-bind", "/dev/null", "/dev/null", "--remount-ro", "/"]
    for k, v in (env or {}).items():
        args += ["--setenv", k, v]
    r, w = os.pipe()
    os.write(w, seccomp_filter())
    os.close(w)
    args += ["--seccomp", str(r), "--"]

    def close():
        try:
            os.close(r)
        except OSError:
            pass
    return args + list(argv), (r,), close

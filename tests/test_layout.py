"""The package's shape, checked so that it cannot drift: short functions, a core that imports only
the core, no import cycles, every command's --help, and a student edition whose fast path has every
name the rest of the package takes from it."""
import ast
import os
import subprocess
import sys

import pytest

import minimixer
from minimixer.commands import COMMANDS

PACKAGE = os.path.dirname(os.path.abspath(minimixer.__file__))
CORE = ("layers", "model", "optim", "erf", "config", "params", "backend")
MAX_FUNCTION_LINES = 80


def modules():
    """{dotted name: path} of every module in the package."""
    found = {}
    for root, dirs, files in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PACKAGE))[:-3].split(os.sep)
                found[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(root, f)
    return found


MODULES = modules()


def tree(name):
    with open(MODULES[name], encoding="utf-8") as f:
        return ast.parse(f.read(), MODULES[name])


def imported(name, node):
    """The modules an import statement in module `name` names, as dotted names (absolute ones as written)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level == 0:
        base = node.module
    else:
        package = name if MODULES[name].endswith("__init__.py") else name.rpartition(".")[0]
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
    # `from pkg import sub` imports the module pkg.sub where there is one, else names from pkg
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def top_level_imports(name):
    """The package modules `name` imports when it is imported (not those imported inside functions)."""
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update(m for m in imported(name, node) if m in MODULES)
            elif isinstance(node, (ast.If, ast.Try)):  # module-level conditionals run at import too
                visit(node.body + node.orelse + getattr(node, "finalbody", [])
                      + [n for h in getattr(node, "handlers", []) for n in h.body])
    visit(tree(name).body)
    return found


def test_no_function_is_over_80_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(tree(name)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{os.path.relpath(path, PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("core", CORE)
def test_the_core_imports_only_the_core(core):
    """Anywhere in the file, function-level imports included: the stdlib, NumPy, and the core (and
    backend.py alone imports cupy)."""
    allowed = {f"minimixer.{c}" for c in CORE}
    outside = []
    for node in ast.walk(tree(f"minimixer.{core}")):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for m in imported(f"minimixer.{core}", node):
                top = m.split(".")[0]
                ok = (m in allowed if top == "minimixer" else
                      top in sys.stdlib_module_names or top == "numpy" or (top == "cupy" and core == "backend"))
                if not ok:
                    outside.append(f"line {node.lineno}: {m}")
    assert not outside, f"minimixer/{core}.py imports outside the core: {outside}"


def test_no_import_cycles():
    graph = {name: top_level_imports(name) for name in MODULES}
    assert all(graph[f"minimixer.{c}"] <= {f"minimixer.{d}" for d in CORE} for c in CORE)  # the walk sees imports
    assert "minimixer.fast.kernels" in graph["minimixer.fast.mixer"]
    cycles, state = [], {}

    def walk(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", [*COMMANDS, None])
def test_every_command_has_help(name):
    """python -m minimixer.X --help, and python -m minimixer --help (the console script's main)."""
    args = [sys.executable, "-m", "minimixer" if name is None else f"minimixer.{name}", "--help"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage:"), r.stderr[-2000:]
    if name is None:
        assert all(f"  {c} " in r.stdout for c in COMMANDS)
    else:
        assert r.stdout.startswith(f"usage: python -m minimixer.{name} ")


@pytest.mark.parametrize("name", list(COMMANDS))
def test_console_script_names_itself(name, capsys):
    """`minimixer eval --help` says `minimixer eval`, not `python -m minimixer.eval`."""
    from minimixer.commands import main
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: minimixer {name} ")


def test_student_fast_has_every_name_the_package_takes_from_fast():
    """The student edition's fast/__init__.py is coursework/student_fast.py: whatever the rest of the
    package imports from fast, or reads as fast.NAME, it must define too."""
    student = tree("minimixer.coursework.student_fast")
    defined = {n.name for n in student.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {"AdamW"}  # its module __getattr__ gives the clear optimizer
    needed = set()
    for name in MODULES:
        if name.startswith(("minimixer.fast", "minimixer.coursework.student_fast")):
            continue
        for node in ast.walk(tree(name)):
            if isinstance(node, ast.ImportFrom) and node.level and node.module and node.module.split(".")[-1] == "fast":
                needed.update(f"{a.name} ({name})" for a in node.names)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "fast":
                needed.add(f"{node.attr} ({name})")
    assert len(needed) > 5  # the walk finds them
    missing = sorted(n for n in needed if n.split()[0] not in defined)
    assert not missing, f"coursework/student_fast.py lacks: {missing}"

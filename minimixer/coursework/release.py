"""The student edition: the package with every solution region replaced by `raise NotImplementedError`.

One source of truth: minimixer's own layers.py and optim.py, where each exercise's body sits
between "### BEGIN SOLUTION" and "### END SOLUTION". The edition is a copy of the package
without those bodies, without the grader, and with the fast path (whose fused kernels contain
the same answers) replaced by the clear path on the student's own layers (student_fast.py).

The walkthrough notebooks carry the same markers (nbgrader's): a code region between them becomes
`raise course.Todo()`, a line ending in `# SOLUTION LINE` keeps its target and loses its value, and
markdown between `<!-- BEGIN ANSWER -->` and `<!-- END ANSWER -->` is left for the student.
"""
import ast
import os
import re
import shutil
import tempfile
import threading

from ..checkpoints.safetensors_io import atomic_write_bytes
from ..commands.cli import UserError
from . import protocol
from .cases import PUBLIC_SEED, make_cases
from .exercises import BY_NAME, FILES

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.dirname(HERE)
REPO = os.path.dirname(PACKAGE)
SELFCHECK = "selfcheck.data"
# shipped with the student edition: what the self-check needs, and nothing with a solution in it
SHIPPED = ("__main__.py", "protocol.py", "exercises.py", "child.py", "runner.py", "selfcheck.py")
# the fast path's modules hold the layers' passes again, fused for speed: they give the answers away, and
# the edition's fast/__init__.py is student_fast.py instead
ANSWER_FILES = frozenset(n for n in os.listdir(os.path.join(PACKAGE, "fast")) if n.endswith(".py")) - {"__init__.py"}


def strip_solutions(source, where="source"):
    """Replace every BEGIN/END SOLUTION region with `raise NotImplementedError`."""
    out, inside, name = [], False, where
    for line in source.splitlines():
        marker = line.strip()
        m = re.match(r"\s*(?:def|class) (\w+)", line)
        if m and not inside:
            name = m.group(1) if not line.startswith((" ", "\t")) else f"{name.split('.')[0]}.{m.group(1)}"
        if marker == BEGIN:
            if inside:
                raise ValueError(f"{where}: nested {BEGIN} in {name}")
            inside = True
            indent = line[:len(line) - len(line.lstrip())]
            out.append(f'{indent}raise NotImplementedError("{unwritten(name)}")')
        elif marker == END:
            if not inside:
                raise ValueError(f"{where}: {END} without {BEGIN} in {name}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: unterminated {BEGIN} in {name}")
    return "\n".join(out) + "\n"


def unwritten(name):
    """The one line a student sees when their code reaches an exercise they have not written."""
    ex = BY_NAME.get(name.split(".")[0])
    if ex is None:
        return f"{name} is not written yet"
    return (f"{name} is not written yet: it is assignment {ex.assignment}, in minimixer/{FILES[ex.module]}; "
            f"write it, then check it with: python -m minimixer.coursework check")


NB_LINE = "# SOLUTION LINE"
NB_ANSWER = ("# <!-- BEGIN ANSWER -->", "# <!-- END ANSWER -->")


def strip_notebook(source, where="notebook"):
    """The student's version of a walkthrough notebook (jupytext py:percent): the answers taken out."""
    out, inside = [], None
    for n, line in enumerate(source.splitlines(), 1):
        marker = line.strip()
        indent = line[:len(line) - len(line.lstrip())]
        if marker in (BEGIN, NB_ANSWER[0]):
            if inside:
                raise ValueError(f"{where}, line {n}: {marker} inside another answer")
            inside = marker
            out.append(f"{indent}raise course.Todo()  # your code here" if marker == BEGIN else "# *Your answer:*")
        elif marker in (END, NB_ANSWER[1]):
            if inside != (BEGIN if marker == END else NB_ANSWER[0]):
                raise ValueError(f"{where}, line {n}: {marker} without its BEGIN")
            inside = None
        elif inside:
            continue
        elif line.rstrip().endswith(NB_LINE):
            target, sep, _ = line.partition(" = ")
            if not sep:
                raise ValueError(f"{where}, line {n}: {NB_LINE} needs `name = value`")
            out.append(f"{target} = ...  # your line here")
        else:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: unterminated {inside}")
    return "\n".join(out) + "\n"


def as_ipynb(source):
    """A notebook's .ipynb (no outputs), made from its py:percent source with jupytext."""
    try:
        import jupytext
    except ImportError:
        raise UserError("writing the notebooks as .ipynb needs jupytext: pip install -e \".[notebooks]\"") from None
    nb = jupytext.reads(source, fmt="py:percent")
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata.pop("jupytext", None)
    return jupytext.writes(nb, fmt="ipynb").encode()


def guarded_init(source):
    """The package's __init__ with its imports in a try: `python -m minimixer.coursework check`
    then runs (and says what is wrong) while the student's layers.py does not import."""
    tree = ast.parse(source)
    doc = tree.body[0] if tree.body and isinstance(tree.body[0], ast.Expr) else None
    lines = source.splitlines(keepends=True)
    head = "".join(lines[:doc.end_lineno]) if doc else ""
    rest = "".join(("    " + line) if line.strip() else line for line in lines[doc.end_lineno if doc else 0:])
    text = head + f"""
# Student edition: while your layers.py does not import, the self-check still runs
try:
{rest.strip(chr(10))}
except Exception as _error:  # noqa: BLE001
    def __getattr__(name, _error=_error):
        raise AttributeError(f"minimixer.{{name}}: the package did not import ({{type(_error).__name__}}: {{_error}})")
"""
    ast.parse(text)
    return text


def _edition_files(with_selfcheck=True):
    """{relative path: bytes} of the student edition."""
    files = {}
    for root, dirs, names in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        rel_root = os.path.relpath(root, os.path.dirname(PACKAGE))
        if os.path.relpath(root, PACKAGE).split(os.sep)[0] in ("coursework", "fast"):
            continue  # the grader's code; the fast path, whose fused kernels give the answers away
        for n in sorted(names):
            if n.endswith((".pyc", ".pyo")) or n.startswith("."):
                continue
            with open(os.path.join(root, n), "rb") as f:
                files[os.path.join(rel_root, n)] = f.read()
    for module in ("layers", "optim"):
        path = os.path.join(PACKAGE, f"{module}.py")
        with open(path, encoding="utf-8") as f:
            files[os.path.join("minimixer", f"{module}.py")] = strip_solutions(f.read(), f"{module}.py").encode()
    with open(os.path.join(PACKAGE, "__init__.py"), encoding="utf-8") as f:
        files[os.path.join("minimixer", "__init__.py")] = guarded_init(f.read()).encode()
    with open(os.path.join(HERE, "student_fast.py"), "rb") as f:
        files[os.path.join("minimixer", "fast", "__init__.py")] = f.read()
    cw = os.path.join("minimixer", "coursework")
    for n in SHIPPED:
        with open(os.path.join(HERE, n), "rb") as f:
            files[os.path.join(cw, n)] = f.read()
    files[os.path.join(cw, "__init__.py")] = (
        b'"""Self-check for the MLP-Mixer coursework: python -m minimixer.coursework check"""\n'
        b"from .selfcheck import main  # noqa: F401\n")
    with open(os.path.join(HERE, "STUDENT.md"), "rb") as f:
        student_readme = f.read()
    files[os.path.join(cw, "README.md")] = student_readme
    if with_selfcheck:
        files[os.path.join(cw, SELFCHECK)] = protocol.encode({"seed": PUBLIC_SEED, "cases": make_cases(PUBLIC_SEED)})
    return files, student_readme


# what notebook 04 compares with when timm is not installed: timm's logits and gradients on small models
NOTEBOOK_FIXTURES = tuple(f"{name}.{ext}" for name in ("tiny_erf_f64", "tiny_tanh_f64", "small_erf_f32")
                          for ext in ("npz", "safetensors"))


def _extras():
    """The walkthrough notebooks (answers taken out; as .py and .ipynb), the weights, photo and fixtures
    they open, when this is a source checkout. (The bundled digits model, eval's and predict's default,
    is package data: it comes with the package.)"""
    files = {}
    nb = os.path.join(REPO, "notebooks")
    if os.path.isdir(nb):
        for n in sorted(os.listdir(nb)):
            if n.endswith((".py", ".md")):
                with open(os.path.join(nb, n), encoding="utf-8") as f:
                    text = f.read()
                if n.endswith(".py"):
                    text = strip_notebook(text, n)
                    if re.match(r"\d\d\w*_", n):
                        files[os.path.join("notebooks", n[:-3] + ".ipynb")] = as_ipynb(text)
                files[os.path.join("notebooks", n)] = text.encode()
        assets = os.path.join(nb, "assets")  # the trained Fig. 5 models that notebook 05 loads
        for n in sorted(os.listdir(assets)) if os.path.isdir(assets) else []:
            with open(os.path.join(assets, n), "rb") as f:
                files[os.path.join("notebooks", "assets", n)] = f.read()
        for rel in [os.path.join("images", "china.jpg")] + [os.path.join("fixtures", n) for n in NOTEBOOK_FIXTURES]:
            path = os.path.join(REPO, "tests", rel)
            if os.path.exists(path):
                with open(path, "rb") as f:
                    files[os.path.join("tests", rel)] = f.read()
    return files


PYPROJECT = b'''[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "minimixer"
version = "0.1.0+student"
description = "MLP-Mixer from scratch in NumPy: the student edition (the layers are yours to write)"
requires-python = ">=3.10"
dependencies = ["numpy>=1.24", "safetensors>=0.4", "pillow>=9.0", "tqdm>=4.60", "threadpoolctl>=3.1"]

[project.optional-dependencies]
notebooks = ["jupyter", "jupytext>=1.14", "matplotlib>=3.6"]

[tool.setuptools.packages.find]
include = ["minimixer*"]

[tool.setuptools.package-data]
minimixer = ["assets/*", "coursework/*.data", "coursework/README.md"]
'''


def release(out_dir, force=False):
    """Write the student edition into out_dir; a non-empty out_dir needs force=True."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise UserError(f"{out_dir} is not empty: it may hold a student's work. Choose an empty folder, "
                        f"or pass --force to overwrite the files the release writes")
    files, student_readme = _edition_files()
    files.update(_extras())
    files["pyproject.toml"] = PYPROJECT
    files["README.md"] = student_readme
    written = []
    for rel, data in sorted(files.items()):
        path = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_bytes(path, data)
        written.append(path)
    return written


_edition_lock = threading.Lock()
_editions = {}


def grading_edition(parent=None):
    """A private student edition for the child processes (made once per grader process), in a
    new folder inside `parent` (default: the system's temporary folder)."""
    with _edition_lock:
        if "path" not in _editions:
            root = tempfile.mkdtemp(prefix="minimixer-grading-", dir=parent)
            files, _ = _edition_files(with_selfcheck=False)
            for rel, data in files.items():
                if rel.endswith(".py") or os.sep + "assets" + os.sep not in rel:
                    path = os.path.join(root, rel)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "wb") as f:
                        f.write(data)
            _editions["path"] = root
            import atexit
            atexit.register(shutil.rmtree, root, True)
        return _editions["path"]

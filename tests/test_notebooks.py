"""The walkthrough notebooks: they execute (offline, CPU) and draw the figures their text promises;
their exercises ask for code; the student edition strips their answers and runs them on a
complete solution; notebook 2b's line checks catch one planted mistake, and only it."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minimixer.coursework.release import BEGIN, END, NB_ANSWER, NB_LINE, strip_notebook

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]*_*.py"))
INLINE = "module://matplotlib_inline.backend_inline"


def _site():
    spec = importlib.util.spec_from_file_location("build_site", REPO / "docs" / "build_site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SITE = _site()
FIGURES = SITE.FIGURES


def execute(path, cwd=None, env=None):
    """(notebook, seconds, error) with outputs; figures drawn inline, as in Jupyter."""
    os.environ["MPLBACKEND"] = INLINE
    nb = jupytext.read(path)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd or path.parent)}})
    start, error = time.perf_counter(), None
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        error = e
    finally:
        os.environ.clear()
        os.environ.update(old)
    return nb, time.perf_counter() - start, error


def outputs(nb):
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def figures(nb):
    return sum("image/png" in o.get("data", {}) for o in outputs(nb))


def exercises(text):
    """{exercise heading: True when it asks for code (a solution region or line follows it)}"""
    heads = list(re.finditer(r"\*\*Exercise ([\w.]+)\.\*\*|^# ## Exercise ([\w.]+):", text, re.M))
    ends = [h.start() for h in heads[1:]] + [len(text)]
    return {h.group(1) or h.group(2): BEGIN in text[h.end():end] or NB_LINE in text[h.end():end]
            for h, end in zip(heads, ends)}


def test_the_walkthrough_is_complete():
    # every notebook has at least one exercise; at least half of all exercises ask for code that the
    # notebook checks; every notebook has its figure count
    assert len(NOTEBOOKS) >= 8
    total = code = 0
    for path in NOTEBOOKS:
        found = exercises(path.read_text())
        assert found, f"{path.name}: no exercise"
        assert path.stem in FIGURES, f"{path.name}: no figure count in docs/build_site.py"
        total, code = total + len(found), code + sum(found.values())
    print(f"{total} exercises, {code} ask for code")
    assert 2 * code >= total


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_and_draws_its_figures(path):
    nb, seconds, error = execute(path)
    assert error is None, str(error)[-2000:]
    assert not [o for o in outputs(nb) if o.get("output_type") == "error"]
    assert any(o.get("output_type") in ("stream", "display_data", "execute_result") for o in outputs(nb))
    drawn = figures(nb)
    print(f"{path.name}: {seconds:.1f} s, {drawn} figures")
    assert drawn >= FIGURES[path.stem], f"{path.name} drew {drawn} figures, its text promises {FIGURES[path.stem]}"
    assert "not answered yet" not in "".join(o.get("text", "") for o in outputs(nb))  # the answers are filled in
    assert seconds < 180  # CI budget per notebook; each takes well under a minute on an idle 2-core machine


def test_site_check_catches_a_lost_figure_and_an_error():
    img = '<img alt="No description has been provided for this image" src="data:image/png;base64,iVBO"/>'
    assert SITE.page_problems(f"<p>text</p>{img}{img}", 2) == []
    assert SITE.page_problems(f"<p>text</p>{img}", 2) == ["1 figures shown, 2 expected"]
    assert SITE.page_problems(f"{img}<pre>Traceback (most recent call last):</pre>", 1) == ["shows an error"]


# --- the markers ---------------------------------------------------------------------------------

def test_strip_notebook_takes_out_regions_lines_and_answers():
    src = ("# %% [markdown]\n# **Exercise 9.1.** Why?\n#\n# <!-- BEGIN ANSWER -->\n# *Answer:* because.\n"
           "# <!-- END ANSWER -->\n\n# %%\nwith course.exercise('9.1'):\n    def f(x):\n"
           f"        {BEGIN}\n        return 2 * x\n        {END}\n\n    assert f(2) == 4\n"
           f"dx = 3 * g  {NB_LINE}\ndx = check('dx', dx)\n")
    out = strip_notebook(src)
    assert "because" not in out and "2 * x" not in out and "3 * g" not in out
    assert "# *Your answer:*" in out and "        raise course.Todo()  # your code here" in out
    assert "dx = ...  # your line here" in out and "dx = check('dx', dx)" in out and "assert f(2) == 4" in out
    for bad in (f"{BEGIN}\nx\n", f"{END}\n", f"{BEGIN}\n{BEGIN}\n{END}\n", f"{NB_ANSWER[0]}\n{END}\n",
                f"x + 1  {NB_LINE}\n"):
        with pytest.raises(ValueError):
            strip_notebook(bad)


def test_release_without_jupytext_says_which_extra(monkeypatch):
    from minimixer.commands.cli import UserError
    from minimixer.coursework.release import as_ipynb
    monkeypatch.setitem(sys.modules, "jupytext", None)  # as if not installed
    with pytest.raises(UserError, match=r"notebooks\]"):
        as_ipynb("# %%\nprint(1)\n")


def solution_texts(text):
    """The answers in a notebook: each solution region's code, each solution line's value, each answer."""
    found = re.findall(rf"{re.escape(BEGIN)}\n(.*?)\n\s*{re.escape(END)}", text, re.S)
    found += re.findall(rf"{re.escape(NB_ANSWER[0])}\n(.*?)\n{re.escape(NB_ANSWER[1])}", text, re.S)
    found += [line.split(" = ", 1)[1] for line in text.splitlines() if line.rstrip().endswith(NB_LINE)]
    return found


@pytest.fixture(scope="module")
def edition(tmp_path_factory):
    out = tmp_path_factory.mktemp("ed") / "hw"
    r = subprocess.run([sys.executable, "-m", "minimixer.coursework", "release", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def test_edition_notebooks_hold_no_answers(edition):
    for path in NOTEBOOKS:
        text = path.read_text()
        answers = solution_texts(text)
        assert answers, f"{path.name}: no answer to take out"
        mine = (edition / "notebooks" / path.name).read_text()
        ipynb = json.loads((edition / "notebooks" / f"{path.stem}.ipynb").read_text())
        code = "\n".join("".join(c["source"]) for c in ipynb["cells"])
        for answer in answers:
            assert answer not in mine and answer.strip() not in code, f"{path.name}: {answer[:60]!r}"
        assert BEGIN not in mine and NB_ANSWER[0] not in mine and NB_LINE not in mine
        assert ipynb["metadata"]["kernelspec"]["name"] == "python3"
    toml = (edition / "pyproject.toml").read_text()
    assert "[project.optional-dependencies]" in toml and "notebooks = [" in toml
    assert (edition / "tests" / "fixtures" / "tiny_erf_f64.npz").exists()
    assert (edition / "notebooks" / "course.py").exists()


def test_blank_edition_stops_notebook_01_with_one_line(edition):
    nb, _, error = execute(edition / "notebooks" / "01_patches_and_stem.py",
                           env={"PYTHONPATH": str(edition)})
    assert error is not None
    shown = [o for o in outputs(nb)]
    text = "".join(o.get("text", "") for o in shown if o.get("output_type") == "stream")
    assert not [o for o in shown if o.get("output_type") == "error"]  # no traceback on the page
    lines = [line for line in text.splitlines() if "not written yet" in line]
    print(lines)
    assert len(lines) == 1 and "Traceback" not in text
    assert "linear_forward" in lines[0] and "assignment A1" in lines[0]
    assert "python -m minimixer.coursework check" in lines[0]


# --- notebook 2b: the line checks ----------------------------------------------------------------

def run_2b(source, cwd):
    code = "\n".join(c.source for c in jupytext.reads(source, fmt="py:percent").cells if c.cell_type == "code")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND="Agg"))
    assert r.returncode == 0, r.stderr[-2000:]
    return dict(re.findall(r"^(\S+)\s+(ok|WRONG|not written yet)", r.stdout, re.M))


NB2B = REPO / "notebooks" / "02b_block_backward_by_hand.py"


def test_backprop_checks_pass_on_the_answers_and_wait_for_the_student(edition):
    full = run_2b(NB2B.read_text(), REPO / "notebooks")
    assert len(full) >= 30 and set(full.values()) == {"ok"}, full
    blank = run_2b((edition / "notebooks" / NB2B.name).read_text(), REPO / "notebooks")
    assert set(blank) == set(full) and set(blank.values()) == {"not written yet"}, blank


@pytest.mark.parametrize("line,name", [
    ("dh2 = da2 * (Phi(h2) + h2 * phi(h2))", "dh2"),  # dGELU
    ("dxc2 = dxhat2 * rstd2 + dvar2 * 2 * xc2 / D", "dxc2"),  # inside the LayerNorm
    ("dfc1_w = dh1.reshape(-1, DS).T @ t.reshape(-1, N)", "fc1.weight"),  # a weight's gradient
])
def test_backprop_checks_catch_one_planted_mistake(line, name):
    text = NB2B.read_text()
    target, value = line.split(" = ", 1)
    assert f"{line}  {NB_LINE}" in text
    planted = text.replace(f"{line}  {NB_LINE}", f"{target} = 1.01 * ({value})")
    verdicts = run_2b(planted, REPO / "notebooks")
    assert verdicts[name] == "WRONG"
    assert [k for k, v in verdicts.items() if v != "ok"] == [name], verdicts


# --- the edition end to end (marker `edition`: .ci/run's docs stage runs it) -----------------------

@pytest.mark.edition
def test_edition_runs_every_notebook_on_a_complete_solution(edition, tmp_path):
    for module in ("layers", "optim"):
        shutil.copy(REPO / "minimixer" / f"{module}.py", edition / "minimixer" / f"{module}.py")
    env = dict(os.environ, PYTHONPATH=str(edition))
    r = subprocess.run([sys.executable, "-m", "minimixer.coursework", "check"], capture_output=True, text=True,
                       cwd=edition, env=env, timeout=600)
    print(r.stdout[-600:])
    assert re.search(r"total\s+160/160", r.stdout), r.stdout + r.stderr
    slow = []
    for path in sorted((edition / "notebooks").glob("[0-9][0-9]*_*.py")):
        nb, seconds, error = execute(path, env={"PYTHONPATH": str(edition)})
        print(f"edition {path.name}: {seconds:.1f} s, {figures(nb)} figures")
        assert error is None, f"{path.name}: {str(error)[-1500:]}"
        assert figures(nb) >= FIGURES[path.stem]
        if seconds >= 60:
            slow.append(f"{path.name} {seconds:.0f} s")
    assert not slow, slow

"""Build the rendered walkthrough: execute every notebook, then let MkDocs (Material theme,
mkdocs-jupyter) render one page per notebook with its outputs and figures.

    pip install -e ".[docs]" && python docs/build_site.py        # -> build/site/index.html

No network is needed. The build fails (exit 1, one line per problem) if a notebook raises, or if a
page shows fewer figures than its notebook promises (FIGURES: a code cell turned into markdown
would lose its figure silently otherwise).
"""
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SOURCE = ROOT / "build" / "site-src"  # executed notebooks and the index, as MkDocs reads them
SITE = ROOT / "build" / "site"
# the figures each notebook draws (its text promises them); 05 draws one more with the B/16 weights
FIGURES = {"01_patches_and_stem": 2, "02_layernorm_and_gelu": 1, "02b_block_backward_by_hand": 0,
           "03_token_vs_channel_mixing": 2, "04_full_model_parity": 0, "05_training_on_digits": 5,
           "06_gpu_with_cupy": 0, "07_data_parallel": 0,
           "08_fine_tuning_at_another_resolution": 2}
INLINE = "module://matplotlib_inline.backend_inline"  # Agg would draw nothing into the notebook


def notebook_paths():
    return sorted(NOTEBOOKS.glob("[0-9][0-9]*_*.py"))


def execute(path, timeout=600):
    """The executed notebook (nbformat), its seconds, and the first error's one-line summary or None."""
    import jupytext
    import nbclient
    os.environ["MPLBACKEND"] = INLINE
    nb = jupytext.read(path)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    start, error = time.perf_counter(), None
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        error = f"{e.ename}: {e.evalue}" if getattr(e, "ename", None) else str(e).strip().splitlines()[-1]
    return nb, time.perf_counter() - start, error


def figures(nb):
    return sum("image/png" in o.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for o in cell.get("outputs", []))


def page_problems(html, want):
    """What is wrong with a rendered notebook page: fewer figures than `want`, or an error shown."""
    problems = []
    shown = len(re.findall(r'<img[^>]+src="data:image/png', html))
    if shown < want:
        problems.append(f"{shown} figures shown, {want} expected")
    if "Traceback (most recent call last)" in html or "is not written yet" in html:
        problems.append("shows an error")
    return problems


def main():
    import nbformat
    if SOURCE.exists():
        shutil.rmtree(SOURCE)
    (SOURCE / "walkthrough").mkdir(parents=True)
    shutil.copy(ROOT / "docs" / "walkthrough.md", SOURCE / "index.md")
    shutil.copy(ROOT / "docs" / "site.css", SOURCE / "site.css")
    import jupyter_server_mathjax  # MathJax 2.7 from PyPI: the pages typeset their math offline too
    shutil.copytree(Path(jupyter_server_mathjax.__file__).parent / "static", SOURCE / "assets" / "mathjax")
    paths = notebook_paths()
    problems = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for path, (nb, seconds, error) in zip(paths, pool.map(execute, paths)):
            n, want = figures(nb), FIGURES.get(path.stem)
            print(f"{path.name}: {seconds:.0f} s, {n} figures")
            if error:
                problems.append(f"{path.name}: {error}")
            if want is None:
                problems.append(f"{path.name}: add its figure count to FIGURES in docs/build_site.py")
            elif n < want:
                problems.append(f"{path.name}: {n} figures, its text promises {want}")
            nbformat.write(nb, SOURCE / "walkthrough" / f"{path.stem}.ipynb")
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--quiet", "-f", str(ROOT / "mkdocs.yml")], check=True)
    for path in paths:  # what a reader gets: the page, its figures, no error output
        page = SITE / "walkthrough" / path.stem / "index.html"
        if not page.exists():
            problems.append(f"{page.relative_to(ROOT)}: missing")
            continue
        problems += [f"{page.relative_to(ROOT)}: {p}"
                     for p in page_problems(page.read_text(encoding="utf-8"), FIGURES.get(path.stem, 0))]
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    print(f"site: {SITE / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

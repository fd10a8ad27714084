"""Classic mistakes lose points at every seed, not on a lucky draw: extreme inputs (numerical
stability), inputs changed in place, the output's dtype, and labels that only some draws would
show. Each mistake is graded on its own exercise at 5 seeds; the feedback names the case's
settings and its tolerance."""
import importlib
import re
import tempfile
from pathlib import Path

import pytest

from minimixer.coursework import runner
from minimixer.coursework.cases import SOLUTIONS, cases_for
from minimixer.coursework.exercises import BY_NAME, FILES, jobs_for, score

grading = importlib.import_module("minimixer.coursework.grade")
REPO = Path(__file__).resolve().parent.parent
SEEDS = (11, 22, 33, 44, 55)
TEXT = {m: (REPO / "minimixer" / f"{m}.py").read_text() for m in ("layers", "optim")}

MISTAKES = {  # name: (file, solution line(s), the mistake, exercise, what the feedback must say)
    "softmax without the max subtracted": (
        "layers", "    shifted = logits - logits.max(axis=1, keepdims=True)  # (B, K) stable: exp(<= 0)\n",
        "    shifted = logits\n", "softmax_cross_entropy", r"case 3 \(.*logits near \+-1000; tolerance 1e-07\): loss holds nan"),
    "softmax shifting the logits in place": (
        "layers", "    shifted = logits - logits.max(axis=1, keepdims=True)  # (B, K) stable: exp(<= 0)\n",
        "    logits -= logits.max(axis=1, keepdims=True)\n    shifted = logits\n", "softmax_cross_entropy",
        r"case 0 \(.*\): modified its input `logits` in place"),
    "one-hot sized by the largest label": (
        "layers", "        target = (labels[:, None] == xp.arange(K)).astype(logits.dtype)  # (B, K) one-hot; all 0 outside [0, K)\n",
        "        target = xp.eye(int(labels.max()) + 1, dtype=logits.dtype)[labels]\n", "softmax_cross_entropy",
        r"case 2 \(logits \(6, 7\), hard labels, label_smoothing=0.2; tolerance 1e-07\): .*(ValueError|broadcast)"),
    "LayerNorm variance as E[x^2] - E[x]^2": (
        "layers", "    var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., 1) biased, as in PyTorch\n",
        "    var = (x * x).mean(axis=-1, keepdims=True) - mean * mean\n", "layernorm_forward",
        r"case 3 \(B=2 N=5 D=4 DS=3 DC=8, form='tanh', x = 1e4 \+ 1e-2 \* noise; tolerance 1e-07\): out max rel error"),
    "LayerNorm eps outside the square root": (
        "layers", "    rstd = 1.0 / (var + eps) ** 0.5  # (..., 1)\n", "    rstd = 1.0 / (var ** 0.5 + eps)\n",
        "layernorm_forward", r"case \d \(.*; tolerance 1e-07\): out max rel error"),
    "LayerNorm centering x in place": (
        "layers", "    xc = x - mean  # (..., D)\n", "    x -= mean\n    xc = x\n", "layernorm_forward",
        r"case 0 \(.*\): modified its input `x` in place"),
    "GELU's tanh through exp (overflows)": (
        "layers", "        out = 0.5 * x * (1.0 + xp.tanh(SQRT_2_OVER_PI * (x + GELU_TANH_COEF * x**3)))  # (...)\n",
        "        u = SQRT_2_OVER_PI * (x + GELU_TANH_COEF * x**3)\n"
        "        out = 0.5 * x * (1.0 + (xp.exp(2 * u) - 1) / (xp.exp(2 * u) + 1))  # (...)\n", "gelu_forward",
        r"case 3 \(.*form='tanh', \|x\| up to ~150; tolerance 1e-07\): out holds nan"),
    "AdamW's eps inside the square root": (
        "optim", "        denom = xp.sqrt(v) / math.sqrt(1.0 - beta2**t) + self.eps\n",
        "        denom = xp.sqrt(v / (1.0 - beta2**t) + self.eps)\n", "AdamW",
        r"case \d \(.*; tolerance 1e-07\): params\['w'\] after 3 steps max rel error"),
    "linear_forward in float64 for float32 inputs": (
        "layers", "    out = x @ w.T + b  # (..., O)\n", "    out = x.astype('float64') @ w.T + b\n", "linear_forward",
        r"case 4 \(.*float32 inputs; tolerance 0.0001\): out has dtype float64, expected float32"),
    "linear_forward rounding to float32": (
        "layers", "    out = x @ w.T + b  # (..., O)\n", "    out = (x @ w.T + b).astype('float32')\n", "linear_forward",
        r"case 0 \(x \(2, 5, 4\), w \(3, 4\); tolerance 1e-07\): out has dtype float32, expected float64"),
}


def grade_exercise(files, exercise, seed):
    """One exercise of a submission graded on the cases of `seed` (its callees lent), as grade() does."""
    cases = cases_for(seed)
    jobs = [j for j in jobs_for(cases) if j["exercise"] == exercise]
    with tempfile.TemporaryDirectory(dir=grading.run_dir()) as overlay:
        for module, text in files.items():
            Path(overlay, FILES[module]).write_text(text)
        outcomes, _ = runner.run_jobs(jobs, edition=grading.edition(), overlay=overlay,
                                      files=[FILES[m] for m in files], timeout=30, lent=SOLUTIONS)
    c = cases[exercise]
    return score(BY_NAME[exercise], outcomes[exercise], [x["expected"] for x in c], [x["about"] for x in c],
                 [x["tol"] for x in c])


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_a_classic_mistake_loses_points_at_every_seed(mistake):
    module, old, new, exercise, pattern = MISTAKES[mistake]
    assert TEXT[module].count(old) == 1, old
    files = dict(TEXT, **{module: TEXT[module].replace(old, new)})
    for seed in SEEDS:
        row = grade_exercise(files, exercise, seed)
        assert row["points"] < 10, (mistake, seed, row)
        assert re.search(pattern, row["message"]), (mistake, seed, row["message"])
    # and the solution itself gets full marks on the same cases
    assert grade_exercise(TEXT, exercise, SEEDS[0])["points"] == 10

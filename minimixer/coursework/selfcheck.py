"""The self-check of the student edition: python -m minimixer.coursework check

It grades your minimixer/layers.py and minimixer/optim.py exactly as the course's grader
does (a separate process runs your code, the same comparison gives the same points and
messages), on the public cases bundled in selfcheck.data. Two differences: the graded run
uses hidden cases (fresh inputs from a private seed), and there an exercise that calls other
exercises (mlp_forward calls linear_forward, ...) gets correct versions of them, so one
mistake costs one exercise. Here it calls yours: fix the A1 layers first.
"""
import argparse
import json
import os
import sys

from . import protocol, runner
from .exercises import FILES, jobs_for, print_table, score_all

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.dirname(HERE)


def check(timeout=60.0):
    path = os.path.join(HERE, "selfcheck.data")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no self-check cases at {path}: this command runs in the student edition")
    with open(path, "rb") as f:
        data = protocol.decode(f.read())
    cases = data["cases"]
    outcomes, info = runner.run_jobs(jobs_for(cases, lend=False), edition=os.path.dirname(PACKAGE),
                                     overlay=PACKAGE, files=list(FILES.values()), timeout=timeout)
    return score_all(outcomes, cases, seed=data["seed"], landlock=info["landlock"])


def main(argv=None):
    # no minimixer imports here: the check must run (and say what is wrong) while layers.py is broken
    p = argparse.ArgumentParser(prog="python -m minimixer.coursework", description="check your coursework")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="grade your layers.py and optim.py on the public cases")
    c.add_argument("--timeout", type=float, default=60.0, help="seconds per exercise (default %(default)g)")
    c.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if sys.platform == "win32":
        print(f"{p.prog}: error: the check runs your code in a separate process with POSIX pipes: "
              "use Linux, macOS or WSL", file=sys.stderr)
        return 2
    try:
        result = check(args.timeout)
    except OSError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0

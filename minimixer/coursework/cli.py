"""python -m minimixer.coursework: release | grade (the instructor's command line)."""
import json
import os
import secrets
import sys
import time

from ..commands.cli import ArgumentParser, UserError, run
from .cases import PUBLIC_SEED
from .exercises import print_table
from .grade import DEFAULT_BUDGET, DEFAULT_TIMEOUT, grade, grade_batch
from .release import release

PROG = "python -m minimixer.coursework"


def _seed(args):
    if args.seed is not None:
        return args.seed
    return secrets.randbits(31)  # a private seed: fresh hidden cases, written into the results


def main(argv=None, prog=PROG):
    return run(lambda a: _main(a, prog), argv, prog=prog)


def _main(argv=None, prog=PROG):
    p = ArgumentParser(prog=prog, description="MLP-Mixer coursework (instructors)")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("release", help="write the student edition (the package without the solutions)")
    r.add_argument("--out", required=True, metavar="DIR")
    r.add_argument("--force", action="store_true", help="write into a non-empty folder, overwriting its files")
    g = sub.add_parser("grade", help="grade a submission (layers.py, optim.py) or, with --batch, a class")
    g.add_argument("folder", nargs="?", help="one submission folder")
    g.add_argument("--batch", metavar="DIR", help="a folder of submission folders, one per student")
    g.add_argument("--csv", metavar="FILE", help="with --batch: the gradebook to write (default DIR/../grades.csv)")
    g.add_argument("--feedback", metavar="DIR", help="with --batch: where each student's feedback goes "
                   "(default: next to the CSV, <csv name>_feedback/)")
    g.add_argument("--seed", type=int, help="the hidden cases' seed (default: a fresh private one; "
                   f"{PUBLIC_SEED} is the students' self-check)")
    g.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per exercise (default %(default)g)")
    g.add_argument("--submission-timeout", type=float, default=DEFAULT_BUDGET, metavar="SECONDS",
                   help="seconds for all of a submission's exercises (default %(default)g)")
    g.add_argument("--jobs", type=int, help="with --batch: submissions graded at once (default: the cores)")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if args.command == "release":
        for path in release(args.out, args.force):
            print(path)
        return 0
    if not (args.timeout > 0 and args.submission_timeout > 0):
        raise UserError("--timeout and --submission-timeout must be > 0")
    seed = _seed(args)
    if args.batch:
        if args.folder:
            raise UserError("give either a submission folder or --batch DIR, not both")
        if not os.path.isdir(args.batch):
            raise UserError(f"no such folder: {args.batch}")
        csv_path = args.csv or os.path.join(os.path.dirname(os.path.abspath(args.batch)), "grades.csv")
        if not os.path.isdir(os.path.dirname(os.path.abspath(csv_path))):
            raise UserError(f"no folder for the CSV: {csv_path}")
        start = time.monotonic()
        results = grade_batch(args.batch, csv_path, seed, args.timeout, args.submission_timeout, args.jobs,
                              args.feedback, log=sys.stderr)
        print(f"graded {len(results)} submissions in {time.monotonic() - start:.1f} s (seed {seed}): {csv_path}")
        return 0
    folder = args.folder or "."
    if not os.path.isdir(folder):
        raise UserError(f"no such folder: {folder}")
    result = grade(folder, seed, args.timeout, args.submission_timeout)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
        print(f"(seed {seed}, {result['seconds']:.1f} s, status {result['status']})")
    return 0

"""python -m minimixer.coursework: release | grade | gradescope (the instructor's command line)."""
import json
import os
import secrets
import signal
import sys
import time

from ..commands.cli import ArgumentParser, UserError, run
from . import gradebook
from .cases import PUBLIC_SEED
from .exercises import print_table
from .exports import build_autograder, write_results_json
from .grade import DEFAULT_BUDGET, DEFAULT_TIMEOUT, SANDBOXES, WEAK, grade, grade_batch
from .release import release

PROG = "python -m minimixer.coursework"


def _seed(args):
    if args.seed is not None:
        if args.seed == PUBLIC_SEED:
            print(f"{PROG}: warning: seed {PUBLIC_SEED} draws the self-check's public cases, whose answers every "
                  "student has (selfcheck.data): use a private seed to grade for credit", file=sys.stderr)
        return args.seed
    return secrets.randbits(31)  # a private seed: fresh hidden cases, written into the results


def main(argv=None, prog=PROG):
    return run(lambda a: _main(a, prog), argv, prog=prog)


def _add_common(g):
    g.add_argument("--seed", type=int, help="the hidden cases' seed (default: a fresh private one; "
                   f"{PUBLIC_SEED} is the students' self-check)")
    g.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per exercise (default %(default)g)")
    g.add_argument("--submission-timeout", type=float, default=DEFAULT_BUDGET, metavar="SECONDS",
                   help="seconds for all of a submission's exercises (default %(default)g)")
    g.add_argument("--sandbox", choices=SANDBOXES[:2], default="strong",
                   help="strong (default): bubblewrap + seccomp + Landlock + rlimits, refused where unavailable; "
                        "weak: Landlock, rlimits and an audit hook only (says what does not hold)")


def build_parser(prog=PROG):
    p = ArgumentParser(prog=prog, description="MLP-Mixer coursework (instructors)")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("release", help="write the student edition (the package without the solutions)")
    r.add_argument("--out", required=True, metavar="DIR")
    r.add_argument("--force", action="store_true", help="write into a non-empty folder, overwriting its files")
    g = sub.add_parser("grade", help="grade a submission (layers.py, optim.py) or, with --batch, a class")
    g.add_argument("folder", nargs="?", help="one submission folder")
    g.add_argument("--batch", metavar="DIR", help="a folder of submission folders, one per student")
    g.add_argument("--csv", metavar="FILE", help="the gradebook to update (with --batch, default DIR/../grades.csv): "
                   "the graded students' rows are replaced, the others kept")
    g.add_argument("--replace", action="store_true", help="start the gradebook over instead of updating it")
    g.add_argument("--student", help="with a submission folder and --csv: the student's id (default: the folder's name)")
    g.add_argument("--feedback", metavar="DIR", help="with --batch: where each student's feedback goes "
                   "(default: next to the CSV, <csv name>_feedback/)")
    g.add_argument("--adjustments", metavar="FILE", help="manual adjustments, a CSV student,points[,reason] added to "
                   "the totals; read, never written (default: <csv name>_adjustments.csv if it exists)")
    g.add_argument("--roster", metavar="FILE", help="the class's student ids (one per line, or a CSV with a student "
                   "column): lists who handed in nothing and who is not on it")
    g.add_argument("--deadline", help="ISO 8601 time (e.g. 2026-03-01T23:59:00+01:00): later submissions lose "
                   "--late-penalty percent of their score per started day")
    g.add_argument("--late-penalty", type=float, default=10.0, metavar="PERCENT", help="per day (default %(default)g)")
    g.add_argument("--late-days", type=int, default=0, metavar="N", help="days late that cost nothing (default 0)")
    g.add_argument("--timestamps", metavar="FILE", help="a CSV student,time of each submission (default: the newest "
                   "modification time of the handed-in files)")
    g.add_argument("--canvas", metavar="FILE", help="also write a Canvas gradebook import CSV")
    g.add_argument("--jobs", type=int, help="with --batch: submissions graded at once (default: the cores)")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.add_argument("--results-json", metavar="FILE", help="write Gradescope's results.json for the submission")
    _add_common(g)
    a = sub.add_parser("gradescope", help="build a Gradescope autograder zip (setup.sh, run_autograder, the package)")
    a.add_argument("--out", required=True, metavar="ZIP")
    _add_common(a)
    return p


def _main(argv=None, prog=PROG):
    args = build_parser(prog).parse_args(argv)
    if args.command == "release":
        for path in release(args.out, args.force):
            print(path)
        return 0
    if not (args.timeout > 0 and args.submission_timeout > 0):
        raise UserError("--timeout and --submission-timeout must be > 0")
    if args.sandbox == "weak":
        print(f"{prog}: warning: --sandbox weak: {WEAK}", file=sys.stderr)
    if args.command == "gradescope":
        if args.seed is None:
            raise UserError("gradescope needs --seed (the private seed baked into the autograder)")
        _seed(args)
        print(build_autograder(args.out, args.seed, args.timeout, args.submission_timeout, args.sandbox))
        return 0
    seed = _seed(args)
    policy = _policy(args)
    roster = gradebook.read_roster(args.roster) if args.roster else None
    if args.batch:
        return _grade_class(args, seed, policy, roster, prog)
    return _grade_one(args, seed, policy, roster)


def _grade_class(args, seed, policy, roster, prog):
    """grade --batch DIR: every student folder into the gradebook; Ctrl-C or SIGTERM keeps what was graded."""
    if args.folder:
        raise UserError("give either a submission folder or --batch DIR, not both")
    if args.results_json or args.student or args.json:
        raise UserError("--results-json, --student and --json grade one submission folder, not --batch")
    if not os.path.isdir(args.batch):
        raise UserError(f"no such folder: {args.batch}")
    csv_path = args.csv or os.path.join(os.path.dirname(os.path.abspath(args.batch)), "grades.csv")
    _check_csv(csv_path)
    start = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        results = grade_batch(args.batch, csv_path, seed, args.timeout, args.submission_timeout, args.jobs,
                              args.feedback, log=sys.stderr, sandbox=args.sandbox, replace=args.replace,
                              policy=policy, roster=roster, adjustments=_adjustments(args, csv_path),
                              canvas=args.canvas)
    except KeyboardInterrupt as e:
        print(f"{prog}: interrupted: {e.args[0] if e.args else 'nothing'} graded; {csv_path} holds them, the "
              "rest marked 'not graded (interrupted)' (or kept from before)", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"graded {len(results)} submissions in {time.monotonic() - start:.1f} s (seed {seed}): {csv_path}")
    return 0


def _grade_one(args, seed, policy, roster):
    """grade FOLDER: one submission, a table (or JSON), and optionally its gradebook row and results.json."""
    folder = args.folder or "."
    if not os.path.isdir(folder):
        raise UserError(f"no such folder: {folder}")
    result = grade(folder, seed, args.timeout, args.submission_timeout, sandbox=args.sandbox)
    if args.results_json:
        write_results_json(args.results_json, result)
    if args.csv:
        _check_csv(args.csv)
        student = args.student or os.path.basename(os.path.abspath(folder))
        report = gradebook.write(args.csv, {student: result}, seed, replace=args.replace, policy=policy,
                                 roster=roster, adjustments=_adjustments(args, args.csv), canvas=args.canvas)
        row = report["rows"][student]
        print(f"{args.csv}: {student} {row['total']}/{row['max']} ({len(report['rows'])} rows)", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
        print(f"(seed {seed}, {result['seconds']:.1f} s, status {result['status']}, "
              f"sandbox {result['sandbox']['mode']})")
    return 0


def _terminate(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def _check_csv(path):
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UserError(f"no folder for the CSV: {path}")


def _adjustments(args, csv_path):
    if args.adjustments:
        if not os.path.isfile(args.adjustments):
            raise UserError(f"no such adjustments file: {args.adjustments}")
        return args.adjustments
    default = os.path.splitext(csv_path)[0] + "_adjustments.csv"
    return default if os.path.isfile(default) else None


def _policy(args):
    if not args.deadline:
        if args.timestamps:
            raise UserError("--timestamps needs --deadline")
        return None
    if not (0 <= args.late_penalty <= 100) or args.late_days < 0:
        raise UserError("--late-penalty must be 0-100 and --late-days >= 0")
    stamps = gradebook.read_timestamps(args.timestamps) if args.timestamps else {}
    return gradebook.LatePolicy(gradebook.parse_time(args.deadline, "--deadline"), args.late_penalty, args.late_days,
                                stamps)

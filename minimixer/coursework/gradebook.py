"""The class gradebook: a CSV that grading updates (never loses a row it did not grade), with
manual adjustments from a file of the instructor's, a late policy, a roster check, per-exercise
statistics and a histogram, and an LMS export. Every cell a spreadsheet could run as a formula
is escaped."""
import csv
import io
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..checkpoints.safetensors_io import atomic_write_bytes
from ..commands.cli import UserError
from .exercises import EXERCISES, POINTS

EXERCISE_NAMES = [e.name for e in EXERCISES]
FIELDS = ["student"] + EXERCISE_NAMES + ["score", "days_late", "late_penalty", "adjustment", "total", "max",
                                         "status", "seed", "submitted"]
MAX = POINTS * len(EXERCISES)
_TRIGGERS = ("=", "+", "-", "@", "\t", "\r", "|", "%")


TEXT_FIELDS = ("student", "status", "submitted")


def escape(value, text=True):
    """A cell a spreadsheet shows as text: a string that starts like a formula gets a leading
    apostrophe (OWASP's CSV injection advice). In a numeric column (text=False) a number such as
    -2 stays as it is."""
    if not isinstance(value, str) or not value.startswith(_TRIGGERS) or (not text and _number(value) is not None):
        return value
    return "'" + value


def unescape(value):
    return value[1:] if value.startswith("'") and value[1:].startswith(_TRIGGERS) else value


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def safe_name(student):
    """A file name for a student's feedback (an id is a folder name: no '/', but maybe '..')."""
    name = re.sub(r"[^\w.@+-]", "_", student)
    return "_" + name if name.startswith(".") or not name else name


# --- late policy ----------------------------------------------------------------------------------

def parse_time(text, what="a time"):
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"{what} {text!r} is not an ISO 8601 time (e.g. 2026-03-01T23:59:00+01:00)") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


@dataclass
class LatePolicy:
    """deadline: aware datetime; per_day: percent of the score lost per started day late, after
    grace_days free days; timestamps: {student: datetime} that override the files' times."""
    deadline: datetime
    per_day: float = 10.0
    grace_days: int = 0
    timestamps: dict = field(default_factory=dict)

    def days_late(self, student, submitted):
        t = self.timestamps.get(student) or (parse_time(submitted) if submitted else None)
        if t is None or t <= self.deadline:
            return 0
        return math.ceil((t - self.deadline).total_seconds() / 86400)

    def penalty(self, score, days):
        charged = max(0, days - self.grace_days)
        return round(min(score, score * self.per_day / 100 * charged), 2)


def read_timestamps(path):
    """{student: datetime} from a CSV of student,timestamp (a header row is allowed)."""
    out = {}
    for row in _rows(path):
        if len(row) < 2 or row[0].strip().lower() in ("student", "id"):
            continue
        out[row[0].strip()] = parse_time(row[1], f"{path}: the time of {row[0]!r},")
    return out


def read_roster(path):
    """Student ids: one per line, or the first column (or the 'student' column) of a CSV."""
    rows = [r for r in _rows(path) if r and r[0].strip()]
    col = 0
    if rows and "student" in [c.strip().lower() for c in rows[0]]:
        col = [c.strip().lower() for c in rows[0]].index("student")
        rows = rows[1:]
    elif rows and rows[0][0].strip().lower() in ("id", "sis login id"):
        rows = rows[1:]
    return [r[col].strip() for r in rows if len(r) > col and r[col].strip()]


def read_adjustments(path):
    """{student: (points, reasons)} from the instructor's CSV: student,points[,reason]. Several
    rows for a student add up. The grader reads this file and never writes it."""
    out = {}
    for i, row in enumerate(_rows(path), 1):
        if not row or not row[0].strip() or row[0].strip().lower() == "student":
            continue
        points = _number(row[1]) if len(row) > 1 else None
        if points is None or not math.isfinite(points):
            raise UserError(f"{path}, line {i}: the points {row[1] if len(row) > 1 else ''!r} are not a number")
        pts, reasons = out.get(row[0].strip(), (0.0, []))
        out[row[0].strip()] = (pts + points, reasons + ([row[2].strip()] if len(row) > 2 and row[2].strip() else []))
    return out


def _rows(path):
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.reader(f))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path} is not a UTF-8 CSV file ({e})") from None


# --- the gradebook ------------------------------------------------------------------------------

def _row(student, result, seed):
    points = {r["exercise"]: r["points"] for r in result.get("exercises", [])}
    row = {"student": student, **{n: points.get(n, 0) for n in EXERCISE_NAMES}, "score": result["total"],
           "max": result["max"], "status": result["status"], "seed": seed, "submitted": result.get("submitted", "")}
    return row


def read(csv_path):
    """{student: row} of an existing gradebook (escapes removed); {} if there is none."""
    if not os.path.exists(csv_path):
        return {}
    rows = {}
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "student" not in reader.fieldnames:
                raise UserError(f"{csv_path} is not a gradebook (no 'student' column): use --replace to start over")
            for r in reader:
                r = {k: unescape(v or "") for k, v in r.items() if k}
                if "score" not in r or not r.get("score"):
                    r["score"] = r.get("total", 0)  # a gradebook from before adjustments
                rows[r["student"]] = r
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{csv_path} is not a readable CSV ({e}): use --replace to start over") from None
    return rows


def write(csv_path, results, seed, replace=False, policy=None, roster=None, adjustments=None, partial=(),
          canvas=None):
    """Update the gradebook at csv_path with `results` ({student: result}); keep every other row
    unless replace. Returns the report: {"missing", "unknown", "unmatched_adjustments", "rows"}."""
    rows = {} if replace else read(csv_path)
    for student, result in results.items():
        rows[student] = _row(student, result, seed)
    for student in partial:
        if student not in rows:
            rows[student] = {"student": student, "status": "not graded (interrupted)", "seed": seed, "score": 0}
    report = {"missing": [], "unknown": [], "unmatched_adjustments": []}
    if roster is not None:
        listed = set(roster)
        report["unknown"] = sorted(s for s in rows if s not in listed)
        for s in roster:
            if s not in rows:
                rows[s] = {"student": s, "status": "no submission", "score": 0, "seed": seed}
                report["missing"].append(s)
    adjust = read_adjustments(adjustments) if adjustments and os.path.exists(adjustments) else {}
    report["unmatched_adjustments"] = sorted(s for s in adjust if s not in rows)
    for s, row in rows.items():
        score = _number(row.get("score")) or 0.0
        days = policy.days_late(s, row.get("submitted")) if policy and row.get("status") not in (
            "no submission", "not graded (interrupted)") else _number(row.get("days_late")) or 0
        penalty = policy.penalty(score, days) if policy else _number(row.get("late_penalty")) or 0.0
        extra = adjust.get(s, (0.0, []))[0]
        row.update(days_late=int(days), late_penalty=_clean(penalty), adjustment=_clean(extra),
                   total=_clean(max(0.0, round(score - penalty + extra, 2))), max=MAX)
        row["score"] = _clean(score)
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n")
    w.writerow(FIELDS)
    for s in sorted(rows):
        w.writerow([escape(v, k in TEXT_FIELDS) for k, v in ((k, rows[s].get(k, "")) for k in FIELDS)])
    atomic_write_bytes(csv_path, out.getvalue().encode())
    report["rows"] = rows
    if canvas:
        write_canvas(canvas, rows)
    return report


def _clean(x):
    x = float(x)
    return int(x) if x == int(x) else round(x, 2)


# --- statistics and the instructor's histogram ---------------------------------------------------

def statistics_rows(rows):
    """Per exercise (and the total): graded submissions, mean, median, full marks, zeros."""
    graded = [r for r in rows.values() if r.get("status") not in ("no submission", "not graded (interrupted)")]
    out = []
    for name, top in [(n, POINTS) for n in EXERCISE_NAMES] + [("total", MAX)]:
        values = [_number(r.get(name)) or 0.0 for r in graded]
        out.append({"exercise": name, "graded": len(values),
                    "mean": _clean(statistics.fmean(values)) if values else "",
                    "median": _clean(statistics.median(values)) if values else "",
                    "full": sum(v >= top for v in values), "zero": sum(v == 0 for v in values)})
    return out


def write_statistics(csv_path, rows):
    """<csv stem>_stats.csv, and <csv stem>_histogram.png when matplotlib is installed.
    Returns the lines to print."""
    stem = os.path.splitext(csv_path)[0]
    stats = statistics_rows(rows)
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=list(stats[0]), lineterminator="\r\n")
    w.writeheader()
    w.writerows(stats)
    atomic_write_bytes(stem + "_stats.csv", out.getvalue().encode())
    lines = [f"per-exercise statistics: {stem}_stats.csv"]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return lines + ["no histogram: matplotlib is not installed (pip install matplotlib)"]
    totals = [_number(r.get("total")) or 0.0 for r in rows.values()
              if r.get("status") not in ("no submission", "not graded (interrupted)")]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(totals, bins=range(0, MAX + 11, 10), edgecolor="black")
    ax.set_xlabel(f"total (of {MAX})")
    ax.set_ylabel("students")
    ax.set_title(f"{len(totals)} graded submissions")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(stem + "_histogram.png", buf.getvalue())
    return lines + [f"histogram: {stem}_histogram.png"]


# --- exports ------------------------------------------------------------------------------------

CANVAS_ASSIGNMENT = "MLP-Mixer coursework"


def write_canvas(path, rows, assignment=CANVAS_ASSIGNMENT):
    """Canvas's gradebook import: Student, ID, SIS User ID, SIS Login ID, Section, then the
    assignment's column; a 'Points Possible' row first. The student id goes in SIS Login ID."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n")
    w.writerow(["Student", "ID", "SIS User ID", "SIS Login ID", "Section", assignment])
    w.writerow(["Points Possible", "", "", "", "", MAX])
    for s in sorted(rows):
        w.writerow([escape(s), "", "", escape(s), "", rows[s].get("total", 0)])
    atomic_write_bytes(path, out.getvalue().encode())

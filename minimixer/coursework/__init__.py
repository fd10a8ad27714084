"""Coursework for instructors: release a student edition, grade submissions in isolation.

    python -m minimixer.coursework release --out hw/                    # the student edition
    python -m minimixer.coursework grade SUBMISSION/ --seed 2026         # one student, a table
    python -m minimixer.coursework grade --batch SUBMISSIONS/ --csv grades.csv --seed 2026
    python -m minimixer.coursework gradescope --out autograder.zip --seed 2026

release.py writes the edition (the package with the solution regions removed), cases.py draws
the hidden cases, grade.py runs each submission in a child process (child.py, runner.py) inside
the kernel sandbox (sandbox.py) and scores it (exercises.py), gradebook.py keeps the class's
CSV, exports.py writes Gradescope's files, cli.py is the command line. None of this but the self-check's files
(release.SHIPPED) is part of the student edition.
"""
from .cases import PUBLIC_SEED, case_inputs, cases_for, expected_result, make_cases
from .cli import main
from .exercises import EXERCISES, FILES, POINTS
from .grade import DEFAULT_BUDGET, DEFAULT_TIMEOUT, find_files, grade, grade_batch
from .release import ANSWER_FILES, BEGIN, END, SHIPPED, grading_edition, guarded_init, release, strip_solutions

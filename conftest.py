"""Report how long each notebook took, at the end of every test run (the course's time budget:
under 3 minutes per notebook and 20 for the whole course on 2 CPU cores), and how long grading
each notebook's handout took (tests/test_handouts.py::test_grade runs the learner's copy)."""

import re
from collections import defaultdict
from pathlib import Path

_seconds = defaultdict(float)
_grading = {}
GRADE = re.compile(r"test_handouts\.py::test_grade\[(.+\.ipynb)\]$")


def pytest_runtest_logreport(report):
    path = Path(report.nodeid.split("::")[0])
    if path.suffix == ".ipynb":
        _seconds[path.name] += report.duration
    elif (graded := GRADE.search(report.nodeid)) and report.when == "call":
        _grading[graded.group(1)] = report.duration


def _section(terminalreporter, title, seconds, total):
    terminalreporter.section(title)
    for name, value in sorted(seconds.items()):
        terminalreporter.write_line(f"{name:<28}{value / 60:6.1f} min")
    terminalreporter.write_line(f"{total:<28}{sum(seconds.values()) / 60:6.1f} min")


def pytest_terminal_summary(terminalreporter):
    if _seconds:
        _section(terminalreporter, "notebook run times", _seconds, "the whole course")
    if _grading:
        _section(terminalreporter, "handout grading times (the learner's copy, every exercise checked)",
                 _grading, "all handouts")

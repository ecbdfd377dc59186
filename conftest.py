"""Report how long each notebook took, at the end of every test run (the course's time budget:
under 3 minutes per notebook and 20 for the whole course on 2 CPU cores)."""

from collections import defaultdict
from pathlib import Path

_seconds = defaultdict(float)


def pytest_runtest_logreport(report):
    path = Path(report.nodeid.split("::")[0])
    if path.suffix == ".ipynb":
        _seconds[path.name] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _seconds:
        return
    terminalreporter.section("notebook run times")
    for name, seconds in sorted(_seconds.items()):
        terminalreporter.write_line(f"{name:<28}{seconds / 60:6.1f} min")
    terminalreporter.write_line(f"{'the whole course':<28}{sum(_seconds.values()) / 60:6.1f} min")

"""Learners' copies of the course notebooks (workshop handouts), and the grader for their exercises.

    python tools/handouts.py build notebooks/*.ipynb        # writes handouts/NAME.ipynb (`make handouts`)
    python tools/handouts.py check notebooks/*.ipynb        # fails if handouts/ is not what `build` makes
    python tools/handouts.py lint notebooks/*.ipynb         # the exercise cells' structure, no kernel
    python tools/handouts.py grade notebooks/02_lora.ipynb  # runs the handout and grades every exercise

A course notebook ends with a markdown cell holding the line `## Exercises`, then its exercises. Each
exercise is a stub cell (what the learner fills in), one or more cells tagged `solution` (nbval runs
them in the course notebook) and one cell tagged `check`. The handout is the course notebook with the
`solution` cells dropped and the outputs of every code cell from `## Exercises` on cleared; the cells
above the exercises, outputs included, are the course's.

`grade` runs the handout top to bottom in a fresh kernel. Every cell must run, except that each check
must fail on its stub (AssertionError or NotImplementedError, with a message that names its exercise);
then the grader runs that exercise's solution cells from the course notebook, and the check must pass.
"""

import copy
import re
import sys
import time
from pathlib import Path

import nbformat

HANDOUTS = Path(__file__).resolve().parent.parent / "handouts"
HEADING = re.compile(r"^## Exercises\s*$", re.MULTILINE)
EXPECTED_FAILURES = ("AssertionError", "NotImplementedError")
MIN_EXERCISES, MAX_EXERCISES = 3, 5


def tags(cell) -> list:
    return cell.get("metadata", {}).get("tags", [])


def exercises_start(nb) -> int:
    """Index of the markdown cell with the `## Exercises` heading."""
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown" and HEADING.search(cell.source):
            return index
    raise ValueError("no markdown cell with the line '## Exercises'")


def solutions_by_check(nb) -> dict:
    """{check cell id: [its solution cells]}: the solution cells since the previous check."""
    groups, pending = {}, []
    for cell in nb.cells:
        if "solution" in tags(cell):
            pending.append(cell)
        elif "check" in tags(cell):
            groups[cell.id], pending = pending, []
    return groups


def make_handout(nb):
    """The learner's copy: no solution cells, no outputs from the exercises on."""
    start = exercises_start(nb)
    handout = copy.deepcopy(nb)
    cells = []
    for index, cell in enumerate(handout.cells):
        if "solution" in tags(cell):
            continue
        if cell.cell_type == "code" and index >= start:
            cell.outputs, cell.execution_count = [], None
        cells.append(cell)
    handout.cells = cells
    return handout


def handout_text(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return nbformat.writes(make_handout(nb), version=4) + "\n"


def lint(nb) -> list:
    """Problems with the structure of a notebook's exercises (an empty list when there are none)."""
    try:
        start = exercises_start(nb)
    except ValueError as error:
        return [str(error)]
    problems, pending, checks = [], 0, 0
    for index, cell in enumerate(nb.cells):
        kinds = {"solution", "check"} & set(tags(cell))
        if kinds and index < start:
            problems.append(f"cell {index} is tagged {sorted(kinds)} above the '## Exercises' heading")
        if len(kinds) == 2:
            problems.append(f"cell {index} is tagged both solution and check")
        if kinds and cell.cell_type != "code":
            problems.append(f"cell {index} is a {cell.cell_type} cell tagged {sorted(kinds)}")
        if "solution" in kinds:
            pending += 1
        elif "check" in kinds:
            checks += 1
            if not pending:
                problems.append(f"check cell {index} has no solution cell before it")
            if f"exercise {checks}" not in cell.source:
                problems.append(f"check cell {index} never says 'exercise {checks}' in its messages")
            pending = 0
    if pending:
        problems.append("solution cells after the last check cell")
    if not MIN_EXERCISES <= checks <= MAX_EXERCISES:
        problems.append(f"{checks} checked exercises; a notebook has {MIN_EXERCISES} to {MAX_EXERCISES}")
    return problems


def first_error(cell):
    return next((out for out in cell.get("outputs", []) if out.output_type == "error"), None)


def grade(path: Path, timeout: int = 1800, log=print) -> list:
    """Run the handout of the course notebook at `path`; return the problems found (empty: all good)."""
    from nbclient import NotebookClient

    course = nbformat.read(path, as_version=4)
    problems = lint(course)
    if problems:
        return problems
    handout, solutions = make_handout(course), solutions_by_check(course)
    client = NotebookClient(handout, timeout=timeout, allow_errors=True,
                            resources={"metadata": {"path": str(path.parent)}})
    checks = 0
    with client.setup_kernel():
        for index, cell in enumerate(handout.cells):
            if cell.cell_type != "code":
                continue
            client.execute_cell(cell, index)
            error = first_error(cell)
            if "check" not in tags(cell):
                if error:
                    return problems + [f"cell {index} failed: {error.ename}: {error.evalue}"]
                continue
            checks += 1
            label = f"exercise {checks} (handout cell {index})"
            if error is None:
                problems.append(f"{label}: the check passes on the stub")
            elif error.ename not in EXPECTED_FAILURES or f"exercise {checks}" not in error.evalue:
                problems.append(f"{label}: on the stub the check fails with {error.ename}: {error.evalue!r}; "
                                f"expected {' or '.join(EXPECTED_FAILURES)} naming 'exercise {checks}'")
            for solution in solutions[cell.id]:
                solution = copy.deepcopy(solution)
                client.execute_cell(solution, index)
                if first_error(solution):
                    problems.append(f"{label}: its solution fails: {first_error(solution).evalue}")
            rerun = copy.deepcopy(cell)
            client.execute_cell(rerun, index)
            if first_error(rerun):
                problems.append(f"{label}: fails after its solution: {first_error(rerun).evalue}")
            else:
                log(f"  {label}: fails on the stub ({error.ename if error else 'no error'}), passes on the solution")
    return problems


def main(argv) -> int:
    command, paths = argv[0], [Path(p) for p in argv[1:]]
    failed = False
    for path in paths:
        target = HANDOUTS / path.name
        if command == "build":
            HANDOUTS.mkdir(exist_ok=True)
            target.write_text(handout_text(path))
            print("wrote", target.relative_to(HANDOUTS.parent))
            continue
        if command == "check":
            problems = [] if target.exists() and target.read_text() == handout_text(path) else \
                [f"{target.name} is not what `make handouts` writes from {path.name}: run `make handouts`"]
        elif command == "lint":
            problems = lint(nbformat.read(path, as_version=4))
        elif command == "grade":
            start = time.perf_counter()
            print(f"grading {path.name}")
            problems = grade(path)
            print(f"  {time.perf_counter() - start:.0f} s")
        else:
            raise SystemExit(f"unknown command {command!r}: use build, check, lint or grade")
        for problem in problems:
            print(f"{path.name}: {problem}")
        failed |= bool(problems)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Handouts (the learners' copies) and the exercise grader: tools/handouts.py.

The fast tests check that handouts/ is exactly what `make handouts` writes from the current notebooks
and that each notebook's exercises are laid out as the grader expects. `test_grade` runs every handout
top to bottom in a kernel: each check cell must fail on its stub and pass on its solution.
"""

import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import handouts  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NAMES = [path.name for path in NOTEBOOKS]


def tagged(source, *tags):
    return new_code_cell(source, metadata={"tags": list(tags)})


def toy(*exercises):
    """A notebook: one lesson cell, the heading, then (stub, solution, check) per exercise."""
    cells = [new_code_cell("lesson = 21"), new_markdown_cell("## Summary\n\n## Exercises")]
    for stub, solution, check in exercises:
        cells += [new_code_cell(stub), tagged(solution, "solution"), tagged(check, "check")]
    return new_notebook(cells=cells)


GOOD = ("x = ...", "x = lesson * 2", 'assert x is not ..., "exercise {n}: fill in x"\nassert x == 42, "exercise {n}: no"')


def good(n):
    return tuple(part.format(n=n) for part in GOOD)


@pytest.mark.parametrize("name", NAMES)
def test_handout_is_current(name):
    course, handout = ROOT / "notebooks" / name, ROOT / "handouts" / name
    assert handout.exists(), f"handouts/{name} is missing: run `make handouts`"
    assert handout.read_text() == handouts.handout_text(course), f"handouts/{name} is stale: run `make handouts`"


@pytest.mark.parametrize("name", NAMES)
def test_exercises_are_laid_out_for_the_grader(name):
    assert handouts.lint(nbformat.read(ROOT / "notebooks" / name, as_version=4)) == []


def test_handout_drops_solutions_and_clears_exercise_outputs():
    nb = toy(good(1), good(2), good(3))
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="kept\n")]
    for cell in nb.cells[2:]:
        cell.outputs = [nbformat.v4.new_output("stream", text="ran\n")]
    handout = handouts.make_handout(nb)
    assert [c.source for c in handout.cells if c.cell_type == "code"][1:] == \
        ["x = ...", good(1)[2], "x = ...", good(2)[2], "x = ...", good(3)[2]]
    assert handout.cells[0].outputs[0].text == "kept\n"  # above the exercises: as in the course
    assert all(not c.outputs for c in handout.cells[2:])
    assert len(nb.cells) == 11  # the course notebook itself is untouched


def test_lint_names_each_problem():
    nb = toy(good(1), good(2))
    nb.cells.insert(0, tagged("y = 1", "solution"))  # a solution above the heading
    nb.cells.append(tagged("z = 1", "solution"))  # and one no check follows
    problems = "\n".join(handouts.lint(nb))
    assert "above the '## Exercises' heading" in problems
    assert "after the last check" in problems
    assert "2 checked exercises" in problems
    assert handouts.lint(new_notebook(cells=[new_code_cell("1")])) == ["no markdown cell with the line '## Exercises'"]
    wrong_number = toy(good(1), good(1), good(3))
    assert handouts.lint(wrong_number) == ["check cell 7 never says 'exercise 2' in its messages"]


def test_grader_passes_good_exercises_and_reports_bad_ones(tmp_path):
    path = tmp_path / "toy.ipynb"
    nbformat.write(toy(good(1), good(2), good(3)), path)
    assert handouts.grade(path, timeout=120, log=lambda _: None) == []

    passes_on_stub = ("x = 42", "x = 42", 'assert x == 42, "exercise 1: no"')
    silent = ("x = ...", "x = 42", "assert x == 42  # exercise 2")  # fails on the stub, but says nothing helpful
    wrong_solution = ("x = ...", "x = 41", 'assert x is not ..., "exercise 3: fill in"\nassert x == 42, "exercise 3: no"')
    nbformat.write(toy(passes_on_stub, silent, wrong_solution), path)
    problems = handouts.grade(path, timeout=120, log=lambda _: None)
    assert len(problems) == 3, problems
    assert "exercise 1" in problems[0] and "passes on the stub" in problems[0]
    assert "exercise 2" in problems[1] and "TypeError" not in problems[1] and "naming 'exercise 2'" in problems[1]
    assert "exercise 3" in problems[2] and "fails after its solution: exercise 3: no" in problems[2]

    broken = toy(good(1), good(2), good(3))
    broken.cells[0].source = "lesson = 1 / 0"  # a lesson cell that fails: grading stops there
    nbformat.write(broken, path)
    assert handouts.grade(path, timeout=120, log=lambda _: None) == ["cell 0 failed: ZeroDivisionError: division by zero"]


@pytest.mark.parametrize("name", NAMES)
def test_grade(name):
    """The learner's copy runs top to bottom; each check fails on its stub and passes on its solution."""
    assert handouts.grade(ROOT / "notebooks" / name, log=print) == []

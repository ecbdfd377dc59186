"""The coverage matrix: every technique x every family of tests/families.py, checked by tests/matrix_checks.py
(forward, backward, gradients, save/load, merge, peft), and the README's copy of it kept up to date.

PENDING lists the pairs that fail on this branch because another part of issue 15 is not merged yet. Each is a
strict xfail: once the part lands, the pair passes, its test reports XPASS(strict), and the entry is deleted.
After a merge: ``python tools/coverage_matrix.py`` (rewrites README.md's block and names stale entries), then
delete those entries here.
"""

import importlib.util
from pathlib import Path

import pytest

import families
import matrix_checks

ROOT = Path(__file__).resolve().parents[1]

PENDING = {  # (technique, family) -> what it waits for; the matrix shows it as the cell's reason
}
PAIRS = [(t, f) for t in matrix_checks.TECHNIQUES for f in families.FAMILIES]


def load_tool():
    spec = importlib.util.spec_from_file_location("coverage_matrix", ROOT / "tools" / "coverage_matrix.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize("technique, family", [
    pytest.param(t, f, marks=pytest.mark.xfail(strict=True, reason=PENDING[t, f])) if (t, f) in PENDING else (t, f)
    for t, f in PAIRS])
def test_pair_works_or_is_refused_naming_the_family(technique, family):
    assert matrix_checks.cell(technique, family) == "✔" or matrix_checks.cell(technique, family).startswith("✘ ")


def test_pending_entries_name_real_pairs():
    assert set(PENDING) <= set(PAIRS)


def test_a_refusal_counts_only_when_it_names_the_family():
    assert matrix_checks.refusal(ValueError("houlsby: xlnet keeps it as a parameter"), "xlnet").startswith("✘ ")
    assert matrix_checks.refusal(ValueError("no such layer in XLNetModel"), "xlnet") is None
    assert matrix_checks.refusal(ValueError("roberta is not supported"), "bert") is None
    assert matrix_checks.refusal(TypeError("xlnet"), "xlnet") is None


def test_a_broken_pair_fails_its_check(monkeypatch):
    monkeypatch.setitem(matrix_checks.TECHNIQUES, "broken", lambda family: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        matrix_checks.check("broken", "bert")


def test_readme_holds_the_matrix_the_tool_generates():
    tool = load_tool()
    assert tool.readme_block(ROOT / "README.md") == tool.render(tool.results(PENDING)[0]), \
        "README.md's model-family matrix is out of date: run python tools/coverage_matrix.py"

"""Write README.md's model-family matrix: every technique x family, as tests/matrix_checks.py finds it.

    python tools/coverage_matrix.py           # rewrite the block between the matrix markers in README.md
    python tools/coverage_matrix.py --check   # exit 1 if README.md's block is out of date

A cell is "✔" (every check passed), "✘ <reason>" (the technique refuses the family, naming it), or, for a pair
listed in tests/test_matrix.py's PENDING that still fails, "✘ pending: <what>". Any other failure stops the tool.
A PENDING pair that now works is named on stderr: delete its entry. Deterministic (seeded, CPU), a few seconds.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

import families  # noqa: E402
import matrix_checks  # noqa: E402

START, END = "<!-- matrix:start -->", "<!-- matrix:end -->"
QUIRKS = {  # family -> footnote
    "albert": "ALBERT has one layer whose weights every pass reuses: it gets one set of adapters (LoRA "
              "pairs, ...), shared by every pass, so it trains as many numbers as a 1-layer model would. peft has no "
              "(IA)³ default for ALBERT, ELECTRA or XLNet: the check names the same roles (keys, values, the "
              "feed-forward's second layer; XLNet: its feed-forward only).",
    "xlnet": "XLNet keeps its attention projections q, k, v, o as parameters used in einsums, not as linear "
             "layers: LoRA q/v has no module to wrap (\"all-linear\" adapts its feed-forward), and Houlsby's adapter "
             "after attention has none to follow.",
    "t5": "T5 is an encoder-decoder: adapters follow self-attention and feed-forward in both stacks (not "
          "cross-attention, as AdapterHub); soft prompts go in front of the encoder input (peft keeps 2N rows and "
          "reads the first N there); prefixes go in the decoder's self-attention only, as peft lays them out "
          "(prompt_common.py).",
    "gpt2": "GPT-2 stores its projections as transformers' Conv1D, weight transposed (in, out); "
            "its fused query/key/value projection is c_attn. LoRA wraps it as peft does (fan_in_fan_out).",
}


def results(pending: dict) -> tuple[dict, list]:
    """({(technique, family): cell}, [stale PENDING pairs, that now pass or are refused])."""
    cells, stale = {}, []
    for technique in matrix_checks.TECHNIQUES:
        for family in families.FAMILIES:
            try:
                cells[technique, family] = matrix_checks.cell(technique, family)
                stale += [(technique, family)] if (technique, family) in pending else []
            except Exception:
                if (technique, family) not in pending:
                    raise
                cells[technique, family] = "✘ " + pending[technique, family]
    return cells, stale


def render(cells: dict) -> str:
    marks = {family: "¹²³⁴"[i] for i, family in enumerate(QUIRKS)}
    rows = ["| family | " + " | ".join(matrix_checks.TECHNIQUES) + " |",
            "|---|" + "---|" * len(matrix_checks.TECHNIQUES)]
    for family in families.FAMILIES:
        name = matrix_checks.NAMES[family] + marks.get(family, "")
        rows.append(f"| {name} | " + " | ".join(cells[t, family] for t in matrix_checks.TECHNIQUES) + " |")
    notes = [f"{marks[family]} {text}" for family, text in QUIRKS.items()]
    return "\n".join([START, *rows, "", *[n + "<br>" for n in notes[:-1]], notes[-1], END])


def readme_block(path: Path) -> str:
    text = path.read_text()
    return text[text.index(START):text.index(END) + len(END)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if README.md differs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from test_matrix import PENDING
    cells, stale = results(PENDING)
    for pair in stale:
        print(f"stale PENDING entry in tests/test_matrix.py, delete it: {pair}", file=sys.stderr)
    block, readme = render(cells), ROOT / "README.md"
    if args.check:
        same = readme_block(readme) == block
        print("README.md's matrix is " + ("up to date" if same else "out of date: run python tools/coverage_matrix.py"))
        return 0 if same else 1
    readme.write_text(readme.read_text().replace(readme_block(readme), block))
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())

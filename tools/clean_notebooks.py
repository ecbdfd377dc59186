"""Tidy executed notebooks before they are committed.

    python tools/clean_notebooks.py notebooks/02_lora.ipynb [...]

Keeps the outputs (they are part of the lesson and nbval compares against them) but drops what
differs between machines or clutters the page: execution timing metadata, widget state, and
the intermediate frames of tqdm progress bars (only each bar's final line is kept).
Fails if an output still contains a machine path.
"""

import json
import re
import sys
from pathlib import Path

MACHINE_PATH = re.compile(r"(/home/|/root/|/tmp/|/work/|site-packages|[A-Z]:\\\\Users)")


def final_frames(text: str) -> str:
    """Keep, on each line, only what follows the last carriage return (a bar's final frame)."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def clean(path: Path) -> None:
    nb = json.loads(path.read_text())
    nb["metadata"].pop("widgets", None)
    for cell in nb["cells"]:
        cell["metadata"].pop("execution", None)
        if "outputs" not in cell:
            continue
        merged = []  # consecutive chunks of one stream, joined so that a bar's frames meet
        for out in cell["outputs"]:
            out.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
            if merged and out["output_type"] == "stream" == merged[-1]["output_type"] \
                    and out["name"] == merged[-1]["name"]:
                merged[-1]["text"] = "".join(merged[-1]["text"]) + "".join(out["text"])
            else:
                merged.append(out)
        for out in merged:
            if out["output_type"] == "stream":
                text = "".join(out["text"])
                if out["name"] == "stderr":
                    text = final_frames(text)
                out["text"] = text.splitlines(keepends=True)
        cell["outputs"] = [o for o in merged if o["output_type"] != "stream" or "".join(o["text"]).strip()]
    text = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            shown = json.dumps({k: v for k, v in out.items() if k != "data"}) + str(out.get("data", {}).get("text/plain", ""))
            if MACHINE_PATH.search(shown):
                raise SystemExit(f"{path}: an output shows a machine path: {MACHINE_PATH.search(shown).group(0)!r}")
    path.write_text(text)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        clean(Path(name))
        print("cleaned", name)

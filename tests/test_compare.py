"""benchmarks/compare.py at a tiny budget: the JSON it writes has every field the comparison reads."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_the_tables(compare, tmp_path):
    out = tmp_path / "compare.json"
    # one thread: under pytest, torch is imported before the script can ask OpenMP not to spin
    compare.main(["--quick", "--no-progress", "--threads", "1", "--out", str(out),
                  "--topic-methods", "linear probe", "LoRA q/v", "--generation-methods", "prefix-tuning"])
    result = json.loads(out.read_text())
    assert {"torch", "transformers", "peft", "cpu", "torch_threads"} <= result["environment"].keys()
    assert result["wall_seconds"] > 0
    probe, lora = result["topic_classification"]
    assert [probe["method"], lora["method"]] == ["linear probe", "LoRA q/v"]
    for row in (probe, lora):
        assert isinstance(row["test_accuracy"], float) and 0 <= row["test_accuracy"] <= 1
        assert row["trainable"] > 0 and 0 < row["trainable_percent"] < 100
        assert row["adapter_bytes"] > 4 * row["trainable"] * 0.99  # float32 tensors, plus a small header
        assert row["step_seconds"] > 0 and row["peak_memory_mb"] == row["peak_memory_mb"]  # not NaN
        assert [r["lr"] for r in row["sweep"]] == list(compare.TOPIC_METHODS[row["method"]].lrs)
        assert row["lr"] == compare.best_lr(row["sweep"])
        assert row["val_accuracy"] == next(r["val_accuracy"] for r in row["sweep"] if r["lr"] == row["lr"])
    assert "peft" not in probe  # peft has no linear probe
    assert lora["peft"]["trainable"] == lora["trainable"]  # the same method, counted by both
    assert lora["step_time_ratio_vs_peft"] > 0 and 0 <= lora["peft"]["test_accuracy"] <= 1
    assert lora["interleaved_step_seconds"]["peft"] > 0
    frozen, prefix = result["generation"]
    assert frozen["method"].startswith("frozen") and prefix["method"] == "prefix-tuning"
    assert 0 <= prefix["slot_error_rate"] <= 1 and prefix["heldout_loss"] > 0
    assert prefix["adapter_bytes"] < 4 * prefix["trainable"]  # the exported prefix, without its MLP


def test_best_lr_prefers_accuracy_then_loss(compare):
    runs = [{"lr": 1e-3, "val_accuracy": 0.5, "val_loss": 1.0}, {"lr": 1e-2, "val_accuracy": 0.6, "val_loss": 1.5},
            {"lr": 1e-1, "val_accuracy": 0.6, "val_loss": 1.2}, {"lr": 1.0, "diverged": "loss became nan"}]
    assert compare.best_lr(runs) == 1e-1
    assert compare.best_lr(runs[-1:]) is None


def test_committed_results_cover_every_method(compare):
    result = json.loads(SCRIPT.with_name("compare.json").read_text())
    assert [r["method"] for r in result["topic_classification"]] == list(compare.TOPIC_METHODS)
    assert [r["method"] for r in result["generation"]][1:] == list(compare.GENERATION_METHODS)
    for row in result["topic_classification"]:
        assert 0 <= row["test_accuracy"] <= 1 and row["lr"] == compare.best_lr(row["sweep"])
        if compare.TOPIC_METHODS[row["method"]].peft is not None:  # the same training, so the same accuracy
            assert abs(row["peft"]["test_accuracy"] - row["test_accuracy"]) <= 0.05
    assert result["settings"]["topic"]["steps"] == 45 and result["environment"]["torch_threads"] >= 1

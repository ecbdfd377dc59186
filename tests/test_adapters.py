"""Bottleneck adapters: peft has no reference for them, so each check here is against the formula
h + W_up f(W_down h + b_down) + b_up written out by hand, or against the frozen model itself; the
outputs of AdapterHub's own adapters are matched in test_adapterhub.py."""

import importlib.util
import math
import shutil
import sys

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers import BertModel

import peftkit.adapter_layouts
import peftkit.adapters
from peftkit import adapter_files
from peftkit.adapters import (AdaptedSublayer, AdapterConfig, BottleneckAdapter, adapter_state_dict, add_adapters,
                              load_adapter, remove_adapters, save_adapter)

import families  # noqa: E402
from tiny import assert_unchanged, snapshot, tiny_bert, tiny_llama  # noqa: E402

# Largest output change allowed at initialisation with the default init_std=1e-3. The adapter's
# extra term is of order init_std**2 * sqrt(d * m) * |h|, about 1e-5 here; init_std=0.1 makes it
# 1e4 times larger, which this tolerance catches (checked below).
IDENTITY_ATOL = 1e-4

# Per family: where the adapted projections and the trained norms sit inside layer i.
PATHS = {
    "bert": {"prefix": "encoder.layer.{i}.", "attention": "attention.output.dense",
             "feed_forward": "output.dense", "norms": ("attention.output.LayerNorm", "output.LayerNorm")},
    "llama": {"prefix": "model.layers.{i}.", "attention": "self_attn.o_proj",
              "feed_forward": "mlp.down_proj", "norms": ("input_layernorm", "post_attention_layernorm")},
}
SUBLAYERS = {"houlsby": ("attention", "feed_forward"), "pfeiffer": ("feed_forward",)}


def make(family, seed=0):
    """The bare encoder or the causal LM; same seed, same frozen base. Default positions and labels."""
    if family == "bert":
        return tiny_bert(seed, model_class=BertModel, num_labels=None)
    return tiny_llama(seed, max_position_embeddings=None)


def ids():
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def run(model):
    out = model(ids())
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def relu(x):
    return torch.where(x > 0, x, torch.zeros_like(x))


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def silu(x):
    return x * torch.sigmoid(x)


HAND = {"relu": relu, "gelu": gelu, "tanh": torch.tanh, "silu": silu, "swish": silu}


def by_hand(adapter, h, f=relu):
    down, up = adapter.adapter_down, adapter.adapter_up
    return h + f(h @ down.weight.T + down.bias) @ up.weight.T + up.bias


def randomize(model):
    """Give every trainable tensor values far from its init, as training would."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)


def expected_wrapped(family, placement):
    p = PATHS[family]
    return {p["prefix"].format(i=i) + p[s] for i in range(2) for s in SUBLAYERS[placement]}


def expected_trainable(family, placement):
    p = PATHS[family]
    names = {f"{w}.adapter.{lin}.{t}" for w in expected_wrapped(family, placement)
             for lin in ("adapter_down", "adapter_up") for t in ("weight", "bias")}
    if placement == "houlsby":
        model = make(family)
        names |= {n for n, _ in model.named_parameters()
                  if any(n.startswith(p["prefix"].format(i=i) + norm + ".") for i in range(2) for norm in p["norms"])}
    return names


# --- the module ---------------------------------------------------------------------------

@pytest.mark.parametrize("non_linearity", sorted(HAND))
def test_adapter_matches_the_formula(non_linearity):
    adapter = BottleneckAdapter(32, reduction_factor=4, non_linearity=non_linearity)
    randomize(adapter)
    h = torch.randn(2, 7, 32)  # (B, T, d)
    assert_close(adapter(h), by_hand(adapter, h, HAND[non_linearity]))


def test_adapter_shapes_and_init():
    adapter = BottleneckAdapter(32, reduction_factor=4)
    assert adapter.bottleneck_size == 8
    assert adapter.adapter_down.weight.shape == (8, 32) and adapter.adapter_up.weight.shape == (32, 8)
    assert sum(p.numel() for p in adapter.parameters()) == 2 * 32 * 8 + 8 + 32
    assert torch.count_nonzero(adapter.adapter_down.bias) == 0 and torch.count_nonzero(adapter.adapter_up.bias) == 0
    for w in (adapter.adapter_down.weight, adapter.adapter_up.weight):
        assert 0.7e-3 < w.std().item() < 1.3e-3
    assert BottleneckAdapter(32, reduction_factor=0.5).bottleneck_size == 64


def test_adapter_is_near_identity_at_init():
    h = torch.randn(4, 32)
    assert (BottleneckAdapter(32, 4)(h) - h).abs().max() < IDENTITY_ATOL
    assert (BottleneckAdapter(32, 4, init_std=0.1)(h) - h).abs().max() > IDENTITY_ATOL


def test_float32_adapter_under_half_precision_input():
    adapter = BottleneckAdapter(32, 4)
    randomize(adapter)
    h = torch.randn(3, 32).to(torch.bfloat16)
    out = adapter(h)
    assert out.dtype == torch.bfloat16
    assert_close(out, by_hand(adapter, h.float()).to(torch.bfloat16), atol=0.05, rtol=0.02)


# --- placement ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_placement(family, placement):
    model = make(family)
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    add_adapters(model, placement, reduction_factor=4)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, AdaptedSublayer)}
    assert wrapped == expected_wrapped(family, placement)
    for name in wrapped:
        module = model.get_submodule(name)
        assert module.base is originals[name]  # the frozen projection itself, not a copy
        assert module.adapter.hidden_size == 32 and module.adapter.bottleneck_size == 8
    # print(model) folds identical layers into one entry, so count inside the first layer.
    first_layer = model.get_submodule(PATHS[family]["prefix"].format(i=0).rstrip("."))
    assert str(first_layer).count("AdaptedSublayer") == len(SUBLAYERS[placement])
    assert model.adapter_config == AdapterConfig(placement=placement, reduction_factor=4)


def test_bert_adapters_sit_before_dropout_residual_and_layernorm():
    model = add_adapters(make("bert"), "houlsby", reduction_factor=4)
    randomize(model)
    calls = []
    for layer in model.encoder.layer:
        for block in (layer.attention.output, layer.output):
            block.register_forward_hook(lambda m, a, k, o: calls.append((m, a, k, o)), with_kwargs=True)
    run(model)
    assert len(calls) == 4
    for block, args, kwargs, out in calls:
        x = args[0] if args else kwargs["hidden_states"]
        residual = args[1] if len(args) > 1 else kwargs["input_tensor"]
        projected = block.dense.base(x)
        assert_close(out, block.LayerNorm(by_hand(block.dense.adapter, projected) + residual))
        assert not torch.allclose(out, block.LayerNorm(projected + residual), atol=1e-3)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_original_ln_before_puts_the_adapter_after_residual_and_layernorm(placement):
    """AdapterHub's SeqBnConfig: the adapter reads y = LN(x + h), skips from h, then LN(x + ...) again."""
    model = add_adapters(make("bert"), placement, reduction_factor=4, original_ln_before=True)
    randomize(model)
    calls = []
    for block in [m for m in model.modules() if isinstance(m, AdaptedSublayer)]:
        block.register_forward_hook(lambda m, a, k, o: calls.append((m, a, k, o)), with_kwargs=True)
    run(model)
    assert len(calls) == 2 * len(SUBLAYERS[placement])
    for block, args, kwargs, out in calls:
        x, residual = args if len(args) == 2 else (args[0], kwargs["input_tensor"])
        norm, h = block.base.LayerNorm, block.base.dense(x)
        y = norm(h + residual)
        assert_close(out, norm(by_hand(block.adapter, y) - y + h + residual))
        assert not torch.allclose(out, norm(by_hand(block.adapter, h) + residual), atol=1e-3)  # the default's


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_original_ln_before_starts_near_the_frozen_model_and_removes_cleanly(placement):
    frozen, model = run(make("bert")), make("bert")
    modules = dict(model.named_modules())
    add_adapters(model, placement, reduction_factor=4, original_ln_before=True)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, AdaptedSublayer)}
    assert wrapped == {w.removesuffix(".dense") for w in expected_wrapped("bert", placement)}
    assert (run(model) - frozen).abs().max() < IDENTITY_ATOL
    assert dict(remove_adapters(model).named_modules()) == modules and torch.equal(run(model), frozen)


def test_original_ln_before_round_trips_and_is_checked_on_load(tmp_path):
    model = add_adapters(make("bert"), "pfeiffer", reduction_factor=4, original_ln_before=True)
    randomize(model)
    path = save_adapter(model, tmp_path / "seqbn.safetensors")
    bare = make("bert")
    assert load_adapter(bare, path).original_ln_before is True and torch.equal(run(bare), run(model))
    default = add_adapters(make("bert"), "pfeiffer", reduction_factor=4)
    with pytest.raises(ValueError, match=r"different config.*'original_ln_before': \(True, False\)"):
        load_adapter(default, path)


@pytest.mark.parametrize("value", ["yes", None, 2])
def test_original_ln_before_must_be_a_bool(value):
    with pytest.raises(ValueError, match=r"unknown original_ln_before.*\[False, True\]"):
        add_adapters(make("bert"), original_ln_before=value)


def test_llama_adapters_sit_before_the_residual_adds():
    model = add_adapters(make("llama"), "houlsby", reduction_factor=4)
    randomize(model)
    seen = {}
    layer = model.model.layers[1]
    layer.register_forward_hook(lambda m, a, k, o: seen.update(x=a[0] if a else k["hidden_states"], out=o),
                                with_kwargs=True)
    layer.self_attn.o_proj.base.register_forward_hook(lambda m, a, o: seen.update(o=o))
    layer.mlp.down_proj.base.register_forward_hook(lambda m, a, o: seen.update(d=o))
    run(model)
    out = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    expected = seen["x"] + by_hand(layer.self_attn.o_proj.adapter, seen["o"]) \
        + by_hand(layer.mlp.down_proj.adapter, seen["d"])
    assert_close(out, expected)
    assert not torch.allclose(out, seen["x"] + seen["o"] + seen["d"], atol=1e-3)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_outputs_match_frozen_model_at_init(family, placement):
    frozen = run(make(family))
    assert (run(add_adapters(make(family), placement, reduction_factor=4)) - frozen).abs().max() < IDENTITY_ATOL
    # The tolerance is tight enough to notice a too-large init.
    loud = add_adapters(make(family), placement, reduction_factor=4, init_std=0.1)
    assert (run(loud) - frozen).abs().max() > IDENTITY_ATOL


# --- training -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_gradients_reach_only_adapters_and_houlsby_norms(family, placement):
    model = add_adapters(make(family), placement, reduction_factor=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(family, placement)
    run(model).pow(2).mean().backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_modules_to_save_train_in_full():
    model = add_adapters(tiny_bert(seed=0), "pfeiffer", reduction_factor=4, modules_to_save=["classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert not any(n.startswith("bert.pooler") or "LayerNorm" in n for n in trainable)


@pytest.mark.parametrize("name, matched", [
    ("classifier", {"classifier"}),
    ("bert.pooler.dense", {"bert.pooler.dense"}),  # a full name
    ("pooler.dense", {"bert.pooler.dense"}),  # its last components
    ("query", {f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)}),  # every layer's
])
def test_modules_to_save_match_full_names_or_their_last_components(name, matched):
    model = add_adapters(tiny_bert(seed=0), "pfeiffer", reduction_factor=4, modules_to_save=[name])
    assert {n.rpartition(".")[0] for n in adapter_state_dict(model) if ".adapter." not in n} == matched


def test_modules_to_save_do_not_match_a_partial_name():
    with pytest.raises(ValueError, match="'ooler.dense' matches no module"):
        add_adapters(tiny_bert(seed=0), "pfeiffer", reduction_factor=4, modules_to_save=["ooler.dense"])


def test_modules_to_save_are_saved(tmp_path):
    model = add_adapters(tiny_bert(seed=0), "pfeiffer", reduction_factor=4, modules_to_save=["classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    tensors, config = adapter_files.load_tensors(save_adapter(model, tmp_path / "a.safetensors"))
    assert set(tensors) == trainable and config["modules_to_save"] == ["classifier"]


def test_houlsby_trains_the_papers_parameter_count():
    model = add_adapters(make("bert"), "houlsby", reduction_factor=4)
    per_adapter = 2 * 32 * 8 + 8 + 32
    per_layer_norms = 2 * (32 + 32)
    assert sum(t.numel() for t in adapter_state_dict(model).values()) == 2 * (2 * per_adapter + per_layer_norms)


# --- saving, loading, removing ----------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "llama"])
def test_save_load_round_trip_is_exact(family, tmp_path):
    model = add_adapters(make(family), "houlsby", reduction_factor=4, non_linearity="gelu")
    randomize(model)
    path = save_adapter(model, tmp_path / "adapters.safetensors")
    tensors, config = adapter_files.load_tensors(path)
    assert set(tensors) == set(adapter_state_dict(model))
    assert config == {"technique": "bottleneck_adapters", "placement": "houlsby", "reduction_factor": 4,
                      "non_linearity": "gelu", "init_std": 1e-3, "modules_to_save": [],
                      "original_ln_before": False}

    torch.manual_seed(123)  # different adapter init, so the load has something to overwrite
    same_config = add_adapters(make(family), "houlsby", reduction_factor=4, non_linearity="gelu")
    bare = make(family)  # no adapters yet: load_adapter adds them from the file's config
    for target in (same_config, bare):
        assert load_adapter(target, path) == AdapterConfig("houlsby", 4, "gelu") == target.adapter_config
        for name, t in adapter_state_dict(model).items():
            assert torch.equal(target.get_parameter(name), t), name
        assert torch.equal(run(target), run(model))


def test_load_with_other_config_fails_and_leaves_model_unchanged(tmp_path):
    path = save_adapter(add_adapters(make("bert"), "houlsby", reduction_factor=4), tmp_path / "a.safetensors")
    model = add_adapters(make("bert"), "houlsby", reduction_factor=4, non_linearity="tanh")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"different config.*'non_linearity': \('relu', 'tanh'\)"):
        load_adapter(model, path)
    assert_unchanged(model, before)


def test_load_into_a_bare_model_of_other_shape_fails_and_adds_nothing(tmp_path):
    path = save_adapter(add_adapters(make("bert"), "houlsby", reduction_factor=4), tmp_path / "a.safetensors")
    bigger = tiny_bert(seed=None, model_class=BertModel, num_labels=None, num_hidden_layers=3,
                       eval_mode=False)  # the file lacks layer 2
    before = snapshot(bigger)
    with pytest.raises(ValueError, match="missing keys"):
        load_adapter(bigger, path)
    assert_unchanged(bigger, before)


@pytest.mark.parametrize("injected", [False, True])
def test_load_refuses_a_file_of_another_technique_naming_both(tmp_path, injected):
    lora_file = adapter_files.save_tensors(  # what peftkit.lora.save_adapter writes: tagged "lora"
        {"bert.encoder.layer.0.attention.self.query.lora_A.weight": torch.zeros(4, 32)},
        tmp_path / "lora.safetensors", {"technique": "lora", "target_modules": ["query"], "rank": 4})
    model = add_adapters(make("bert"), reduction_factor=4) if injected else make("bert")
    before = snapshot(model)
    with pytest.raises(ValueError, match="holds a lora adapter, not bottleneck_adapters"):
        load_adapter(model, lora_file)
    assert_unchanged(model, before)


def test_the_saved_file_is_tagged_with_the_technique(tmp_path):
    path = save_adapter(add_adapters(make("bert"), reduction_factor=4), tmp_path / "a.safetensors")
    assert adapter_files.load_tensors(path)[1]["technique"] == AdapterConfig.technique == "bottleneck_adapters"


def test_adding_to_a_model_that_carries_another_technique_is_refused():
    model = make("bert")
    model.adapter_config = type("LoRAConfig", (), {"technique": "lora"})()  # as peftkit.lora.add_lora leaves it
    before = snapshot(model)
    with pytest.raises(ValueError, match="already carries lora"):
        add_adapters(model, reduction_factor=4)
    assert_unchanged(model, before)


def test_remove_adapters_restores_the_model():
    model = make("bert")
    model.embeddings.requires_grad_(False)  # a user's own freezing must survive add + remove
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    frozen = run(model)
    add_adapters(model, "houlsby", reduction_factor=4)
    with torch.no_grad():  # only the adapters: trained norms would stay trained after removal
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.normal_(0, 0.3)
    assert not torch.allclose(run(model), frozen, atol=1e-3)
    assert remove_adapters(model) is model
    assert dict(model.named_modules()) == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(run(model), frozen)
    assert "adapter_config" not in vars(model) and "_peftkit_adapters" not in vars(model)


def test_removing_twice_is_an_error():
    model = remove_adapters(add_adapters(make("bert"), reduction_factor=4))
    with pytest.raises(ValueError, match="no adapters to remove"):
        remove_adapters(model)


def test_adding_again_after_removing_works():
    model = remove_adapters(add_adapters(make("bert"), "houlsby", reduction_factor=4))
    add_adapters(model, "pfeiffer", reduction_factor=4)
    assert len([m for m in model.modules() if isinstance(m, AdaptedSublayer)]) == 2
    assert model.adapter_config.placement == "pfeiffer"


# --- bad input ------------------------------------------------------------------------------

def test_unknown_config_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'lora'.*\['houlsby', 'pfeiffer'\]"):
        add_adapters(make("bert"), "lora")


def test_a_config_that_is_no_name_or_adapter_config_is_a_type_error():
    with pytest.raises(TypeError, match="AdapterConfig"):
        add_adapters(make("bert"), {"placement": "houlsby"})


@pytest.mark.parametrize("factor", [0, -4, float("nan"), True, "16"])
def test_reduction_factor_must_be_positive(factor):
    with pytest.raises(ValueError, match="reduction_factor must be a positive number"):
        add_adapters(make("bert"), reduction_factor=factor)


@pytest.mark.parametrize("factor", [5, 64])  # 32 / 5 is not whole; 32 / 64 < 1
def test_reduction_factor_must_give_a_whole_positive_bottleneck(factor):
    model = make("bert")
    with pytest.raises(ValueError, match=r"does not divide hidden_size=32.*\[1, 2, 4, 8, 16, 32\]"):
        add_adapters(model, reduction_factor=factor)
    assert not any(isinstance(m, AdaptedSublayer) for m in model.modules())  # nothing half-done
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="does not divide"):
        BottleneckAdapter(32, reduction_factor=factor)


def test_adding_twice_is_an_error():
    model = add_adapters(make("bert"), reduction_factor=4)
    with pytest.raises(ValueError, match="already has adapters"):
        add_adapters(model, reduction_factor=4)


def test_unknown_architecture_names_what_was_looked_for():
    with pytest.raises(ValueError, match=r"attention\.output\.dense.*self_attn\.o_proj"):
        add_adapters(nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32)))


def test_a_model_that_is_no_module_is_a_type_error():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        add_adapters("bert-base-uncased")


@pytest.mark.parametrize("bad, message", [
    (dict(non_linearity="sigmoid"), r"'sigmoid'.*\['gelu', 'relu', 'silu', 'swish', 'tanh'\]"),
    (dict(init_std=0.0), "init_std must be a positive number"),
    (dict(init_std=-1e-3), "init_std must be a positive number"),
    (dict(modules_to_save=["classifer"]), r"'classifer' matches no module.*\['embeddings', 'encoder', 'pooler'\]"),
])
def test_other_bad_knobs(bad, message):
    with pytest.raises(ValueError, match=message):
        add_adapters(make("bert"), reduction_factor=4, **bad)


def test_bad_hidden_size():
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        BottleneckAdapter(0)


@pytest.mark.parametrize("call", [lambda m, d: adapter_state_dict(m), lambda m, d: save_adapter(m, d / "a.safetensors")],
                         ids=["adapter_state_dict", "save_adapter"])
def test_a_model_without_adapters_has_nothing_to_save(call, tmp_path):
    with pytest.raises(ValueError, match="has no adapters: call add_adapters"):
        call(make("bert"), tmp_path)


def import_copy(module, path):
    """Copy ``module``'s file to ``path`` and import it from there, outside the peftkit package."""
    spec = importlib.util.spec_from_file_location(path.stem, shutil.copy(module.__file__, path))
    copied = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copied)
    return copied


def copy_beside_layouts(tmp_path, monkeypatch):  # adapters.py, with the other families' tables beside it
    alone = import_copy(peftkit.adapters, tmp_path / "adapters.py")
    monkeypatch.setitem(sys.modules, "adapters", alone)  # what adapter_layouts.py's `import adapters` finds
    beside = import_copy(peftkit.adapter_layouts, tmp_path / "adapter_layouts.py")
    monkeypatch.setitem(sys.modules, "adapter_layouts", beside)  # what `import adapter_layouts` finds
    return alone


def test_file_works_when_copied_beside_adapter_layouts_only(tmp_path, monkeypatch):
    alone = copy_beside_layouts(tmp_path, monkeypatch)
    model = alone.add_adapters(make("bert"), "pfeiffer", reduction_factor=4)
    assert len(alone.adapter_state_dict(model)) == 2 * 4
    with pytest.raises(ImportError, match="adapter_files"):  # saving needs adapter_files.py beside it
        alone.save_adapter(model, tmp_path / "a.safetensors")


def test_file_copied_beside_adapter_files_saves_and_loads(tmp_path, monkeypatch):
    beside = import_copy(peftkit.adapter_files, tmp_path / "adapter_files.py")
    monkeypatch.setitem(sys.modules, "adapter_files", beside)  # what `import adapter_files` finds
    alone = copy_beside_layouts(tmp_path, monkeypatch)
    model = alone.add_adapters(make("bert"), "pfeiffer", reduction_factor=4)
    randomize(model)
    path = alone.save_adapter(model, tmp_path / "a.safetensors")
    restored = make("bert")
    assert alone.load_adapter(restored, path) == model.adapter_config
    assert torch.equal(run(restored), run(model))


# --- every family the course names (tests/families.py) -----------------------------------------
# Where each family's adapters must sit: (layer prefixes, sublayer path per placement). The paths are
# written out here, not read from peftkit/adapter_layouts.py, so a wrong table there fails these tests.
FAMILY_LAYERS = {
    "bert": ["bert.encoder.layer.{i}."], "roberta": ["roberta.encoder.layer.{i}."],
    "electra": ["electra.encoder.layer.{i}."], "albert": ["albert.encoder.albert_layer_groups.0.albert_layers.0."],
    "xlnet": ["transformer.layer.{i}."], "t5": ["encoder.block.{i}.", "decoder.block.{i}."],
    "gpt2": ["transformer.h.{i}."], "llama": ["model.layers.{i}."]}
BERT_LIKE = {"attention": "attention.output.dense", "feed_forward": "output.dense"}
FAMILY_SUBLAYERS = {"bert": BERT_LIKE, "roberta": BERT_LIKE, "electra": BERT_LIKE,
                    "albert": {"attention": "attention.dense", "feed_forward": "ffn_output"},
                    "xlnet": {"feed_forward": "ff.layer_2"},
                    "gpt2": {"attention": "attn.c_proj", "feed_forward": "mlp.c_proj"},
                    "llama": {"attention": "self_attn.o_proj", "feed_forward": "mlp.down_proj"}}
PLACEMENT_CASES = [(f, p) for f in families.FAMILIES for p in SUBLAYERS if not (f == "xlnet" and p == "houlsby")]


def family_wrapped(family, placement):
    if family == "t5":  # the feed-forward block is the encoder's 2nd sublayer, the decoder's 3rd
        paths = {"encoder": {"attention": "layer.0.SelfAttention.o", "feed_forward": "layer.1.DenseReluDense.wo"},
                 "decoder": {"attention": "layer.0.SelfAttention.o", "feed_forward": "layer.2.DenseReluDense.wo"}}
        return {f"{stack}.block.{i}.{paths[stack][s]}"
                for stack in paths for i in range(2) for s in SUBLAYERS[placement]}
    return {prefix.format(i=i) + FAMILY_SUBLAYERS[family][s]
            for prefix in FAMILY_LAYERS[family] for i in range(2) for s in SUBLAYERS[placement]}


def logits(model, family):
    return model(**families.inputs(family)).logits


@pytest.mark.parametrize("family, placement", PLACEMENT_CASES)
def test_every_family_gets_adapters_where_its_layout_says(family, placement):
    model = add_adapters(families.build(family), placement, reduction_factor=4)
    assert {n for n, m in model.named_modules() if isinstance(m, AdaptedSublayer)} == family_wrapped(family, placement)


@pytest.mark.parametrize("family, placement", PLACEMENT_CASES)
def test_every_family_matches_the_formula_applied_by_hand(family, placement):
    """The frozen model with the formula hooked onto each projection's output is the adapted model."""
    model = add_adapters(families.build(family), placement, reduction_factor=4, non_linearity="gelu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.normal_(0, 0.3)
    reference = families.build(family)
    for name in family_wrapped(family, placement):
        adapter = model.get_submodule(name).adapter
        reference.get_submodule(name).register_forward_hook(lambda m, i, out, a=adapter: by_hand(a, out, gelu))
    with torch.no_grad():
        assert not torch.allclose(logits(model, family), logits(families.build(family), family), atol=1e-3)
        assert_close(logits(model, family), logits(reference, family))


@pytest.mark.parametrize("family, placement", PLACEMENT_CASES)
def test_every_family_trains_only_adapters_norms_and_saved_head(family, placement):
    head = {"gpt2": "lm_head", "llama": "lm_head", "t5": "lm_head", "xlnet": "logits_proj"}.get(family, "classifier")
    model = add_adapters(families.build(family, eval_mode=False), placement, reduction_factor=4,
                         modules_to_save=[head])
    logits(model, family).square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad <= trainable == set(adapter_state_dict(model))
    adapters = {n for n in trainable if ".adapter." in n}
    assert adapters and adapters <= with_grad
    norms = {n for n in trainable if "norm" in n.lower() or ".ln_" in n}
    assert bool(norms) == (placement == "houlsby")
    head_ids = {id(p) for p in model.get_submodule(head).parameters()}  # T5's lm_head is tied to `shared`
    assert trainable - adapters - norms == {n for n, p in model.named_parameters() if id(p) in head_ids}


@pytest.mark.parametrize("family, placement", PLACEMENT_CASES)
def test_every_family_round_trips_and_removes_bit_exactly(family, placement, tmp_path):
    model = add_adapters(families.build(family), placement, reduction_factor=4)
    randomize(model)
    path = save_adapter(model, tmp_path / "a.safetensors")
    fresh = families.build(family)
    load_adapter(fresh, path)
    assert torch.equal(logits(fresh, family), logits(model, family))
    # Removing gives the model back bit for bit, when its own norms ("houlsby") were not trained.
    model = families.build(family)
    before, frozen = snapshot(model), logits(model, family)
    add_adapters(model, placement, reduction_factor=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.normal_(0, 0.3)
    assert not torch.allclose(logits(model, family), frozen, atol=1e-3)
    remove_adapters(model)
    assert_unchanged(model, before)
    assert torch.equal(logits(model, family), frozen)


def test_albert_shares_one_set_of_adapters_between_all_passes_of_its_one_layer():
    model = add_adapters(families.build("albert"), "houlsby", reduction_factor=4)
    d, m, passes = 32, 8, model.config.num_hidden_layers
    norms = 2 * 2 * d  # two LayerNorms, weight and bias
    assert sum(p.numel() for p in adapter_state_dict(model).values()) == 2 * (2 * d * m + m + d) + norms
    calls = []
    model.get_submodule(next(iter(family_wrapped("albert", "pfeiffer")))).adapter.register_forward_hook(
        lambda *args: calls.append(1))
    logits(model, "albert")
    assert len(calls) == passes == 2


def test_xlnet_refuses_houlsby_naming_the_family_and_those_supported():
    model = families.build("xlnet")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"xlnet keeps as a parameter.*'bert'.*'t5'.*'pfeiffer'"):
        add_adapters(model, "houlsby")
    assert_unchanged(model, before)


def test_t5_has_no_adapter_in_cross_attention_as_adapterhub():
    model = add_adapters(families.build("t5"), "houlsby", reduction_factor=4)
    assert not any("EncDecAttention" in n for n, m in model.named_modules() if isinstance(m, AdaptedSublayer))


@pytest.mark.parametrize("family", ["roberta", "gpt2", "t5"])
def test_original_ln_before_names_the_family_without_bert_blocks(family):
    if family == "roberta":  # BERT's blocks: allowed
        add_adapters(families.build(family), "pfeiffer", reduction_factor=4, original_ln_before=True)
        return
    with pytest.raises(ValueError, match=f"residual add: {family} has none.*bert, electra, roberta"):
        add_adapters(families.build(family), "pfeiffer", original_ln_before=True)


def test_unknown_family_names_its_model_type_and_the_supported_ones():
    model = nn.Sequential(nn.Linear(4, 4))
    model.config = type("Config", (), {"model_type": "mamba"})()
    with pytest.raises(ValueError, match=r"family 'mamba'.*albert, bert, electra, gpt2, llama, roberta, t5, xlnet"):
        add_adapters(model)

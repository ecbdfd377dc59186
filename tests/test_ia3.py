"""(IA)³ (peftkit.ia3) against Hugging Face peft's IA3 on tiny BERT, GPT-2 (Conv1D), Llama and T5 models."""

import copy
import json

import peft
import pytest
import torch
from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_FEEDFORWARD,
                                  TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_TARGETS)
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import adapter_files
from peftkit.ia3 import (DEFAULTS, IA3Linear, adapter_state_dict, add_ia3, export_peft, load_adapter, merge_ia3,
                         save_adapter, unmerge_ia3)

from families import build, inputs  # noqa: E402

torch.set_num_threads(1)
pytestmark = [pytest.mark.filterwarnings("ignore:fan_in_fan_out"),  # peft sets it for Conv1D itself
              pytest.mark.filterwarnings("ignore:Unmerge result can be inaccurate")]


def logits(model, family):
    return model(**inputs(family)).logits


def ours_name(peft_name: str) -> str:
    """peft's parameter name -> peftkit's (a wrapper prefix, the adapter name, `base_layer`, modules_to_save)."""
    name = peft_name.removeprefix("base_model.model.").replace(".default.", ".").removesuffix(".default")
    return name.replace(".base_layer.", ".base.").replace(".modules_to_save.", ".")


def twins(family, seed=5, **kwargs):
    """(base with random biases, peft's IA3 model, ours) with the same random vectors around 1 copied in;
    ``kwargs`` are add_ia3's, which are peft's IA3Config's names too."""
    base, g = build(family, **kwargs.pop("overrides", {})), torch.Generator().manual_seed(seed)
    with torch.no_grad():  # biases start at zero: make them count, so that merging must scale them
        for n, p in base.named_parameters():
            if n.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kwargs))
    ours = add_ia3(copy.deepcopy(base), **kwargs)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.5)
                ours.get_parameter(ours_name(n)).copy_(p)
    return base, theirs, ours


def trainable(model) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def feedforward_flags(model) -> dict[str, bool]:
    return {n.removeprefix("base_model.model."): m.is_feedforward for n, m in model.named_modules()
            if isinstance(m, (IA3Linear, peft.tuners.ia3.IA3Layer))}


def test_the_family_defaults_are_peft_s():
    assert set(DEFAULTS) == set(PEFT_TARGETS) == set(PEFT_FEEDFORWARD)
    assert all(DEFAULTS[f] == (PEFT_TARGETS[f], PEFT_FEEDFORWARD[f]) for f in DEFAULTS)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
def test_peft_s_default_layers_counts_and_outputs(family):
    base, theirs, ours = twins(family)
    assert feedforward_flags(ours) == feedforward_flags(theirs)  # the same layers, scaled on the same side
    assert any(feedforward_flags(ours).values()) and not all(feedforward_flags(ours).values())
    assert {ours_name(n): c for n, c in trainable(theirs).items()} == trainable(ours) == {
        n: t.numel() for n, t in adapter_state_dict(ours).items()}
    torch.testing.assert_close(logits(ours, family), logits(theirs, family))
    assert not torch.allclose(logits(ours, family), logits(base, family))


def test_bert_counts_one_vector_per_key_value_and_both_output_denses():
    _, _, ours = twins("bert", modules_to_save=["classifier"])  # peft's "output.dense" also ends attention.output.dense
    per_layer = 32 + 32 + 32 + 64  # l_k, l_v (out 32); attention.output.dense's input (32); l_ff (intermediate 64)
    assert sum(trainable(ours).values()) == 2 * per_layer + 32 * 3 + 3  # + the classifier, trained in full
    assert ours.bert.encoder.layer[0].output.dense.ia3_l.shape == (1, 64)  # peft's shapes: (1, in) for feed-forward,
    assert ours.bert.encoder.layer[0].attention.self.key.ia3_l.shape == (32, 1)  # (out, 1) for the others


def test_ones_start_the_model_unchanged_and_the_formula_on_linear_and_conv1d():
    base = build("gpt2")
    ours = add_ia3(copy.deepcopy(base))
    torch.testing.assert_close(logits(ours, "gpt2"), logits(base, "gpt2"), rtol=0, atol=0)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4)
    for layer in (nn.Linear(4, 5), Conv1D(5, 4)):  # Conv1D(out, in): W stored (in, out)
        w = layer.weight if isinstance(layer, nn.Linear) else layer.weight.T  # (out, in)
        out, ff = IA3Linear(layer), IA3Linear(layer, is_feedforward=True)
        with torch.no_grad():
            out.ia3_l.uniform_(0.5, 1.5), ff.ia3_l.uniform_(0.5, 1.5)
        torch.testing.assert_close(out(x), (x @ w.T + layer.bias) * out.ia3_l.flatten())  # l ⊙ (W x + b)
        torch.testing.assert_close(ff(x), (x * ff.ia3_l.flatten()) @ w.T + layer.bias)  # W (l_ff ⊙ x) + b
        assert not layer.weight.requires_grad and out.ia3_l.requires_grad


def test_scaling_a_feed_forward_module_s_output_instead_of_its_input_differs_from_peft(monkeypatch):
    # intermediate_size = hidden_size: down_proj is square, so the wrong side's vector has the right length
    _, theirs, ours = twins("llama", overrides={"intermediate_size": 32})
    torch.testing.assert_close(logits(ours, "llama"), logits(theirs, "llama"))
    monkeypatch.setattr(IA3Linear, "forward", lambda self, x: self.base(x) * self.ia3_l.flatten())  # always output
    with pytest.raises(AssertionError):
        torch.testing.assert_close(logits(ours, "llama"), logits(theirs, "llama"))


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=["q_proj", "down_proj", "up_proj"], feedforward_modules=["down_proj", "up_proj"]),
    dict(target_modules="all-linear"),  # feedforward_modules: the family's default
    dict(target_modules=r".*\.(k_proj|o_proj|gate_proj)", feedforward_modules=r".*o_proj"),
    dict(target_modules=["k_proj", "v_proj"], exclude_modules=["model.layers.1.self_attn.v_proj"])])
def test_explicit_targets_match_peft(kwargs):
    _, theirs, ours = twins("llama", **kwargs)
    assert feedforward_flags(ours) == feedforward_flags(theirs)
    assert sum(trainable(ours).values()) == sum(trainable(theirs).values())
    torch.testing.assert_close(logits(ours, "llama"), logits(theirs, "llama"))


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_merge_equals_unmerged_and_peft_s_merge(family):
    _, theirs, ours = twins(family)
    expected, before = logits(ours, family), copy.deepcopy(ours.state_dict())
    merge_ia3(ours, unload=False)
    assert all(m.merged for m in ours.modules() if isinstance(m, IA3Linear))
    torch.testing.assert_close(logits(ours, family), expected)
    unmerge_ia3(ours)
    for n, t in ours.state_dict().items():
        torch.testing.assert_close(t, before[n])
    deployed = merge_ia3(ours)
    assert not any(isinstance(m, IA3Linear) for m in deployed.modules()) and "adapter_config" not in vars(deployed)
    torch.testing.assert_close(deployed.state_dict(), theirs.merge_and_unload().state_dict())
    torch.testing.assert_close(logits(deployed, family), expected)


@pytest.mark.parametrize("family,kwargs", [("gpt2", {}), ("bert", {"modules_to_save": ["classifier"]}),
                                           ("llama", {"target_modules": ["k_proj", "down_proj"],
                                                      "feedforward_modules": ["down_proj"]})])
def test_export_loads_in_peft_and_save_load_round_trip(family, kwargs, tmp_path):
    base, theirs, ours = twins(family, **kwargs)
    if kwargs.get("modules_to_save"):
        with torch.no_grad():
            ours.classifier.weight.add_(1.0), theirs.base_model.model.classifier.modules_to_save.default.weight.add_(1.0)
    export_peft(ours, tmp_path / "peft", "tiny")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(loaded, family), logits(ours, family))
    assert feedforward_flags(loaded) == feedforward_flags(ours)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] == (family == "gpt2")
    theirs.save_pretrained(tmp_path / "theirs")  # peft's own file: the same keys and tensors as ours
    with safe_open(tmp_path / "peft" / "adapter_model.safetensors", "pt") as a, \
            safe_open(tmp_path / "theirs" / "adapter_model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, save_adapter(ours, tmp_path / "a.safetensors")) == ours.adapter_config
    torch.testing.assert_close(logits(fresh, family), logits(ours, family))


def snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()})


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[0] == before[0] and after[1].keys() == before[1].keys() and "adapter_config" not in vars(model)
    assert all(after[1][n][0] == g and torch.equal(after[1][n][1], t) for n, (g, t) in before[1].items())


@pytest.mark.parametrize("family,kwargs,error,match", [
    ("llama", dict(target_modules=["k_proj", "kproj"]), ValueError, r"\['kproj'\] matched no module.*'q_proj'"),
    ("llama", dict(target_modules=["k_proj"], feedforward_modules=["down_proj"]), ValueError, "subset"),
    ("llama", dict(target_modules="all-linear", feedforward_modules=["down_prj"]), ValueError,
     r"\['down_prj'\] mark no wrapped layer.*'down_proj'"),
    ("llama", dict(target_modules="all-linear", feedforward_modules="down_proj"), ValueError,
     r"\['down_proj'\] mark no wrapped layer \(.*a str is a regular expression for whole names"),
    ("llama", dict(target_modules=["embed_tokens"], feedforward_modules=[]), TypeError, "not the embeddings"),
    ("llama", dict(feedforward_modules="(unclosed"), ValueError, "not a valid regular expression"),
    ("llama", dict(feedforward_modules=[3]), TypeError, "feedforward_modules must be"),
    ("albert", {}, ValueError, r"family 'albert'.*'bert'.*'llama'"),
    ("xlnet", dict(target_modules=["layer_1"]), ValueError, r"default feedforward_modules for the family 'xlnet'")])
def test_bad_arguments_are_named_and_leave_the_model(family, kwargs, error, match):
    model = build(family)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        add_ia3(model, **kwargs)
    assert_unchanged(model, before)


def test_a_failed_wrap_leaves_the_model(monkeypatch):
    model, calls = build("gpt2"), []
    before, init = snapshot(model), IA3Linear.__init__

    def fail_on_the_third(self, *args):
        if len(calls.append(1) or calls) == 3:
            raise RuntimeError("boom")
        init(self, *args)
    monkeypatch.setattr(IA3Linear, "__init__", fail_on_the_third)
    with pytest.raises(RuntimeError, match="boom"):
        add_ia3(model)
    assert_unchanged(model, before)


def test_merges_that_cannot_work_change_nothing():
    _, _, ours = twins("llama")
    with torch.no_grad():
        ours.model.layers[0].self_attn.k_proj.ia3_l[3] = 0.0
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj'\] have a zero"):
        merge_ia3(ours, unload=False)  # W scaled by 0 could not be divided back
    with torch.no_grad():
        ours.model.layers[1].mlp.down_proj.ia3_l[0, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        merge_ia3(ours, safe_merge=True)
    assert all(torch.equal(t, before[n]) or n.endswith("down_proj.ia3_l") for n, t in ours.state_dict().items())
    assert not any(m.merged for m in ours.modules() if isinstance(m, IA3Linear))


def test_load_refuses_other_files_and_other_layouts(tmp_path):
    _, _, ours = twins("llama")
    save_adapter(ours, tmp_path / "a.safetensors")
    other = add_ia3(build("llama"), feedforward_modules=[])  # down_proj scaled on its output: (32, 1), not (1, 64)
    before = snapshot(other)
    with pytest.raises(ValueError, match="wrong shapes.*down_proj.ia3_l"):
        load_adapter(other, tmp_path / "a.safetensors")
    assert all(torch.equal(p, before[1][n][1]) for n, p in other.named_parameters())
    adapter_files.save_tensors({"x": torch.zeros(1)}, tmp_path / "lora.safetensors", {"technique": "lora"})
    fresh = build("llama")
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="lora adapter, not ia3"):
        load_adapter(fresh, tmp_path / "lora.safetensors")
    assert_unchanged(fresh, before)
    merge_ia3(ours, unload=False)
    with pytest.raises(ValueError, match="unmerge_ia3"):
        load_adapter(ours, tmp_path / "a.safetensors")


def test_four_bit_base_trains_and_refuses_to_merge():
    from peftkit.qlora import prepare_for_qlora
    model = add_ia3(prepare_for_qlora(build("llama")))
    model(**inputs("llama"), labels=inputs("llama")["input_ids"]).loss.backward()
    assert model.model.layers[0].mlp.down_proj.ia3_l.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="4-bit"):
        merge_ia3(model)

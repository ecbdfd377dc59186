"""LoRA on GPT-2's Conv1D and on nn.Embedding (peftkit.lora_layers), against Hugging Face peft on tiny models."""

import copy
import json

import peft
import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.lora import (LoRALinear, adapter_state_dict, add_lora, export_peft, load_adapter, merge_lora,
                          save_adapter, unmerge_lora)
from peftkit.lora_layers import LoRAEmbedding

from families import build, inputs  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out")  # peft sets it for Conv1D itself


def logits(model, family):
    return model(**inputs(family)).logits


def ours_name(peft_name: str) -> str:
    """peft's parameter name -> peftkit's (peft adds a wrapper prefix, an adapter name and calls base `base_layer`)."""
    name = peft_name.removeprefix("base_model.model.").replace(".default.", ".").removesuffix(".default")
    return name.replace(".base_layer.", ".base.").replace(".modules_to_save.", ".")


def twins(family, targets, seed=5, **kwargs):
    """(base, peft's LoRA model, ours) with the same random LoRA tensors (and trained biases), so that LoRA is no
    identity. ``kwargs`` are add_lora's; peft gets the same through their peft names."""
    base, kwargs = build(family), {"rank": 8, "alpha": 16, **kwargs}  # peftkit's defaults (peft's alpha is 8)
    names = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "rslora": "use_rslora"}
    config = peft.LoraConfig(target_modules=targets, **{names.get(k, k): v for k, v in kwargs.items()})
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ours = add_lora(copy.deepcopy(base), targets, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                ours.get_parameter(ours_name(n)).copy_(p)
    return base, theirs, ours


def trainable(model) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family,targets", [("gpt2", ["c_attn"]), ("gpt2", "all-linear"), ("gpt2", ["wte"]),
                                            ("llama", ["embed_tokens", "q_proj"]), ("bert", ["word_embeddings"])])
def test_same_layers_parameters_and_outputs_as_peft(family, targets):
    base, theirs, ours = twins(family, targets, rank=4, alpha=8)
    wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
               if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == set(ours.adapter_config.target_modules) == {n for n, m in ours.named_modules()
                                                               if isinstance(m, LoRALinear)}
    assert {ours_name(n): c for n, c in trainable(theirs).items()} == trainable(ours) == {
        n: t.numel() for n, t in adapter_state_dict(ours).items()}
    torch.testing.assert_close(logits(ours, family), logits(theirs, family))
    assert not torch.allclose(logits(ours, family), logits(base, family))


def test_conv1d_gets_linear_shaped_factors_and_peft_init():
    base = build("gpt2")
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["c_attn"], r=4))
    torch.manual_seed(3)
    ours = add_lora(copy.deepcopy(base), ["c_attn"], rank=4)
    layer = ours.transformer.h[0].attn.c_attn
    assert isinstance(layer.base, Conv1D) and layer.base.weight.shape == (32, 96) and layer.fan_in_fan_out
    assert layer.lora_A.weight.shape == (4, 32) and layer.lora_B.weight.shape == (96, 4)
    assert layer.delta_weight().shape == (32, 96)  # in the Conv1D's (in, out) layout, ready to add to its weight
    for n, p in theirs.named_parameters():  # same seed, same draws: bit-identical A, zero B
        if p.requires_grad:
            assert torch.equal(p, ours.get_parameter(ours_name(n)))
    assert torch.equal(logits(ours, "gpt2"), logits(base, "gpt2"))


def test_embedding_factors_init_and_gradients():
    base = build("llama")
    ours = add_lora(copy.deepcopy(base), ["embed_tokens"], rank=4, alpha=8)
    layer = ours.model.embed_tokens
    assert isinstance(layer, LoRAEmbedding) and layer.scaling == 2.0
    assert layer.lora_embedding_A.shape == (4, 100) and layer.lora_embedding_B.shape == (32, 4)  # peft's shapes
    assert torch.count_nonzero(layer.lora_embedding_A) == 0 and torch.count_nonzero(layer.lora_embedding_B) > 0
    assert torch.equal(logits(ours, "llama"), logits(base, "llama"))  # A = 0: the model starts unchanged
    ours(**inputs("llama"), labels=inputs("llama")["input_ids"]).loss.backward()
    assert torch.count_nonzero(layer.lora_embedding_A.grad) > 0  # A learns first (B is random)
    assert torch.count_nonzero(layer.lora_embedding_B.grad) == 0
    ids = torch.tensor([[3, 7]])
    expected = layer.base(ids) + layer.delta_weight()[ids]  # the formula: a lookup in W + delta W
    with torch.no_grad():
        layer.lora_embedding_A.normal_()
    torch.testing.assert_close(layer(ids), layer.base(ids) + layer.delta_weight()[ids])
    assert not torch.allclose(layer(ids), expected)


@pytest.mark.parametrize("family,targets", [("gpt2", ["c_attn"]), ("llama", ["embed_tokens", "v_proj"])])
def test_merge_matches_peft_and_unmerge_restores(family, targets):
    _, theirs, ours = twins(family, targets)
    expected, before = logits(ours, family), copy.deepcopy(ours.state_dict())
    merge_lora(ours, unload=False)
    torch.testing.assert_close(logits(ours, family), expected)
    unmerge_lora(ours)
    for n, t in ours.state_dict().items():
        torch.testing.assert_close(t, before[n])
    deployed = merge_lora(ours)
    assert not any(isinstance(m, LoRALinear) for m in deployed.modules())
    torch.testing.assert_close(deployed.state_dict(), theirs.merge_and_unload().state_dict())
    torch.testing.assert_close(logits(deployed, family), expected)


@pytest.mark.parametrize("family,targets", [("gpt2", ["c_attn", "wte"]), ("llama", ["embed_tokens", "q_proj"])])
def test_export_peft_loads_in_peft_and_save_load_round_trip(family, targets, tmp_path):
    base, theirs, ours = twins(family, targets, rank=4, alpha=8)
    export_peft(ours, tmp_path / "peft", "tiny")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(loaded, family), logits(ours, family))
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] == (family == "gpt2")
    theirs.save_pretrained(tmp_path / "theirs", save_embedding_layers=False)  # peft's own file: the same keys and tensors as ours
    with safe_open(tmp_path / "peft" / "adapter_model.safetensors", "pt") as a, \
            safe_open(tmp_path / "theirs" / "adapter_model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys()) and any("lora_embedding_A" in k for k in a.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, save_adapter(ours, tmp_path / "a.safetensors")) == ours.adapter_config
    torch.testing.assert_close(logits(fresh, family), logits(ours, family))


def test_lora_embedding_refuses_what_is_no_embedding_and_bad_rank():
    with pytest.raises(TypeError, match="nn.Embedding, got Linear"):
        LoRAEmbedding(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="rank"):
        LoRAEmbedding(nn.Embedding(5, 3), rank=0)
    with pytest.raises(TypeError, match="Conv1D"):
        LoRALinear(nn.Embedding(5, 3))  # the message lists what LoRALinear wraps


def test_a_failed_add_lora_on_conv1d_and_embedding_leaves_the_model(monkeypatch):
    model = build("gpt2")
    before = ([(n, type(m)) for n, m in model.named_modules()], {n: p.requires_grad for n, p in model.named_parameters()})
    monkeypatch.setattr(LoRAEmbedding, "__init__", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        add_lora(model, ["c_attn", "wte"])  # the embedding's wrapper fails: no layer may stay wrapped
    assert [(n, type(m)) for n, m in model.named_modules()] == before[0]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before[1]
    assert "adapter_config" not in vars(model)


def test_lora_only_bias_on_an_embedding_trains_no_bias():
    from families import build
    model = add_lora(build("gpt2"), ["wte"], bias="lora_only")  # an embedding has no bias to train
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "transformer.wte.lora_embedding_A", "transformer.wte.lora_embedding_B"]

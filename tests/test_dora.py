"""peftkit.dora against Hugging Face peft's DoRA (LoraConfig(use_dora=True)) on tiny BERT, GPT-2 (Conv1D), Llama."""

import copy
import json

import peft
import pytest
import torch
from safetensors import safe_open
from torch import nn

from peftkit import lora
from peftkit.dora import DoRAConfig, DoRALinear, add_dora, export_peft, load_adapter
from peftkit.lora import adapter_state_dict, add_lora, merge_lora, save_adapter, unmerge_lora
from peftkit.nf4 import NF4Linear

from families import QV, build, inputs  # noqa: E402
from test_lora_layers import ours_name, trainable  # noqa: E402
from tiny import assert_unchanged, snapshot  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out")  # peft sets it for Conv1D itself
FAMILIES = ["bert", "gpt2", "llama"]


def dora_name(peft_name: str) -> str:
    """peft's name -> ours: peft's magnitude is a module (``lora_magnitude_vector.default.weight``), ours a tensor."""
    return ours_name(peft_name).replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def logits(model, family):
    return model(**inputs(family)).logits


def assert_same(ours, theirs):  # tolerances on the outputs' scale (tiny BERT's logits are ~0.01)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


def assert_differ(a, b):
    assert (a - b).abs().max() > 1e-2 * b.abs().max(), "DoRA changed nothing"


def twins(family, randomize=True, seed=5, targets=None, dtype=None, **kwargs):
    """(base, peft's DoRA model, ours), drawn from the same seed; with ``randomize``, every trained tensor gets the
    same random values (m = ||W|| + noise), so that DoRA is no identity."""
    base, kwargs, targets = build(family), {"rank": 4, "alpha": 8, **kwargs}, targets or QV[family]
    base = base if dtype is None else base.to(dtype)
    names = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "rslora": "use_rslora"}
    config = peft.LoraConfig(target_modules=targets, use_dora=True, **{names[k]: v for k, v in kwargs.items()})
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(seed)
    ours = add_dora(copy.deepcopy(base), targets, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad and randomize:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            if p.requires_grad:
                ours.get_parameter(dora_name(n)).copy_(p)
    return base, theirs, ours


@pytest.mark.parametrize("family", FAMILIES)
def test_same_initial_factors_magnitude_and_counts_as_peft(family):
    base, theirs, ours = twins(family, randomize=False)
    start = {dora_name(n): p for n, p in theirs.named_parameters() if p.requires_grad}
    assert {dora_name(n): c for n, c in trainable(theirs).items()} == trainable(ours)
    for name, p in ours.named_parameters():
        if p.requires_grad and "magnitude" not in name:  # same seed, same draws: A bit-identical, B zero
            assert torch.equal(p, start[name]), name
    layer = next(m for m in ours.modules() if isinstance(m, DoRALinear))
    w = layer.base.weight.T if layer.fan_in_fan_out else layer.base.weight  # (out, in)
    torch.testing.assert_close(layer.lora_magnitude_vector, w.norm(dim=1))  # m = ||W||_c, one per output
    for name, p in ours.named_parameters():
        if name.endswith("lora_magnitude_vector"):
            torch.testing.assert_close(p, start[name], rtol=0, atol=0)
    assert_same(logits(ours, family), logits(base, family))  # W' = W at the start


@pytest.mark.parametrize("family", FAMILIES)
def test_same_outputs_and_gradients_as_peft(family):
    base, theirs, ours = twins(family)
    out = logits(ours, family)
    assert_same(out, logits(theirs, family))
    assert_differ(out, logits(base, family))
    logits(ours, family).square().sum().backward()
    logits(theirs, family).square().sum().backward()  # gradients equal only if both detach the norm
    for n, p in theirs.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours.get_parameter(dora_name(n)).grad, p.grad, msg=n)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_all_linear_with_rslora_matches_peft(family):
    base, theirs, ours = twins(family, targets="all-linear", rslora=True, rank=2, alpha=3)
    assert {dora_name(n): c for n, c in trainable(theirs).items()} == trainable(ours)
    assert_same(logits(ours, family), logits(theirs, family))


def test_bfloat16_base_keeps_float32_factors_and_magnitude_like_peft():
    base, theirs, ours = twins("llama", dtype=torch.bfloat16)
    layer = ours.model.layers[0].self_attn.q_proj
    assert layer.base.weight.dtype == torch.bfloat16 and layer.lora_magnitude_vector.dtype == torch.float32
    assert_same(logits(ours, "llama").float(), logits(theirs, "llama").float())


def test_a_refused_safe_merge_leaves_the_model_as_it_was():
    _, _, ours = twins("llama")
    with torch.no_grad():
        ours.model.layers[1].self_attn.v_proj.lora_magnitude_vector[0] = float("inf")
    before = snapshot(ours)
    with pytest.raises(ValueError, match="NaN/inf"):
        merge_lora(ours, safe_merge=True)
    assert_unchanged(ours, before)


def test_dropout_in_training_matches_peft():
    _, theirs, ours = twins("bert", dropout=0.3)
    ours.train(), theirs.train()
    torch.manual_seed(11)
    expected = logits(theirs, "bert")
    torch.manual_seed(11)
    assert_same(logits(ours, "bert"), expected)


def test_formula_on_one_layer_and_the_norm_axis():
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(6, 6), rank=2, alpha=4)
    with torch.no_grad():
        for p in (layer.lora_B.weight, layer.lora_magnitude_vector):
            p.add_(torch.randn(p.shape))
    x, s = torch.randn(3, 6), layer.scaling
    v = layer.base.weight + s * layer.lora_B.weight @ layer.lora_A.weight  # (out, in)
    m = layer.lora_magnitude_vector
    torch.testing.assert_close(layer(x), x @ (m[:, None] * v / v.norm(dim=1, keepdim=True)).T + layer.base.bias)
    wrong_axis = x @ (m[:, None] * v / v.norm(dim=0, keepdim=True)).T + layer.base.bias  # a norm per input
    assert not torch.allclose(layer(x), wrong_axis, atol=1e-3)
    layer(x).sum().backward()
    assert layer.lora_magnitude_vector.grad is not None and layer.base.weight.grad is None


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_matches_peft_and_unmerge_restores(family):
    base, theirs, ours = twins(family)
    expected = logits(theirs.merge_and_unload(), family)
    merge_lora(ours, unload=False)
    assert_same(logits(ours, family), expected)
    unmerge_lora(ours)
    for name, layer in ours.named_modules():
        if isinstance(layer, DoRALinear):
            torch.testing.assert_close(layer.base.weight, base.get_parameter(f"{name}.weight"))
    merged = merge_lora(ours)  # unload: plain layers holding W'
    assert not any(isinstance(m, DoRALinear) for m in merged.modules()) and "adapter_config" not in vars(merged)
    assert_same(logits(merged, family), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_peft_loads_in_peft_with_same_outputs(family, tmp_path):
    base, theirs, ours = twins(family)
    export_peft(ours, tmp_path / "ours", "tiny")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert_same(logits(loaded, family), logits(ours, family))
    theirs.save_pretrained(tmp_path / "theirs")
    keys = [safe_open(str(tmp_path / f / "adapter_model.safetensors"), "pt").keys() for f in ("ours", "theirs")]
    assert sorted(keys[0]) == sorted(keys[1])


def test_save_and_load_round_trip_and_refusals(tmp_path):
    _, _, ours = twins("llama")
    save_adapter(ours, tmp_path / "d.safetensors")
    fresh = build("llama")
    config = load_adapter(fresh, tmp_path / "d.safetensors")
    assert isinstance(config, DoRAConfig) and isinstance(fresh.adapter_config, DoRAConfig)
    for name, t in adapter_state_dict(ours).items():
        assert torch.equal(fresh.get_parameter(name), t), name
    assert_same(logits(fresh, "llama"), logits(ours, "llama"))
    with pytest.raises(ValueError, match="holds a dora adapter, not lora"):
        lora.load_adapter(build("llama"), tmp_path / "d.safetensors")
    plain = add_lora(build("llama"), QV["llama"], rank=4, alpha=8)
    before = snapshot(plain)
    with pytest.raises(ValueError, match="plain LoRA layers"):
        load_adapter(plain, tmp_path / "d.safetensors")
    assert_unchanged(plain, before)


@pytest.mark.parametrize("targets,error,match", [
    (["q_proj", "embed_tokens"], ValueError, "embeddings"), (["nope"], ValueError, "matched no module")])
def test_refusals_leave_the_model_as_it_was(targets, error, match):
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(error, match=match):
        add_dora(model, targets, rank=4)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="no DoRA config"):
        export_peft(add_lora(model, ["q_proj"]), "unused", None)


def test_4bit_base_computes_dora_on_the_dequantized_weight():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    quantized = NF4Linear.from_linear(copy.deepcopy(linear))
    with torch.no_grad():
        linear.weight.copy_(quantized.weight.dequantize(torch.float32))
    ours, reference = DoRALinear(quantized, rank=2), DoRALinear(linear, rank=2)
    with torch.no_grad():
        reference.lora_A.weight.copy_(ours.lora_A.weight)
        for layer in (ours, reference):
            layer.lora_B.weight.fill_(0.1)
    x = torch.randn(3, 64)
    torch.testing.assert_close(ours.lora_magnitude_vector, reference.lora_magnitude_vector)
    torch.testing.assert_close(ours(x), reference(x))
    with pytest.raises(TypeError, match="4-bit"):
        merge_lora(nn.Sequential(ours))

"""peftkit.qlora against peft's LoRA on bitsandbytes' Linear4bit (CPU), and on a tiny Llama."""

import copy
import warnings

import bitsandbytes as bnb
import peft
import pytest
import torch
from safetensors import safe_open
from torch import nn

from peftkit.lora import LoRALinear, add_lora, load_adapter, save_adapter
from peftkit.nf4 import NF4Linear, NF4Tensor, quantize_nf4
from peftkit.qlora import (
    merge_into_4bit,
    merge_into_float,
    merged_weight,
    prepare_for_qlora,
    requantized_update_error,
)

from tiny import tiny_llama, wide_llama  # noqa: E402

torch.set_num_threads(1)
IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


def qlora_llama(**prepare):
    model = prepare_for_qlora(wide_llama(eval_mode=False), **prepare)
    torch.manual_seed(1)
    return add_lora(model, "all-linear", rank=4, alpha=8)


def loss(model):
    return model(input_ids=IDS, labels=IDS).loss


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def bnb_twin(model: Tiny, double_quant: bool) -> Tiny:
    """The same model with bitsandbytes Linear4bit (nf4) layers, as peft expects it."""
    twin = copy.deepcopy(model)
    for name in ("up", "down"):
        linear = getattr(model, name)
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, compress_statistics=double_quant,
                                  quant_type="nf4")
        layer.load_state_dict(linear.state_dict())
        setattr(twin, name, layer.to("cpu"))  # quantizes; training mode keeps the plain CPU path
    twin.is_loaded_in_4bit = True  # what makes peft wrap Linear4bit with its bnb LoRA layer
    return twin


def from_bnb(layer) -> NF4Linear:
    """Our layer holding bitsandbytes' own codes (its native 8-bit absmax codes included)."""
    state, packed = layer.weight.quant_state, layer.weight.data.reshape(-1)
    shape = torch.Size(state.shape)
    if state.nested:
        weight = NF4Tensor(packed, None, shape, state.dtype, state.blocksize, state.absmax,
                           state.state2.absmax, state.offset)
    else:
        weight = NF4Tensor(packed, state.absmax, shape, state.dtype, state.blocksize)
    return NF4Linear(weight, layer.bias)


def twins(double_quant: bool):
    """(peftkit QLoRA, peft LoRA on bitsandbytes 4-bit) with the same codes and the same A and B."""
    torch.manual_seed(0)
    model = Tiny()
    reference = peft.get_peft_model(bnb_twin(model, double_quant), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["up", "down"]))
    ours = copy.deepcopy(model)
    for name in ("up", "down"):
        setattr(ours, name, from_bnb(getattr(reference.base_model.model, name).base_layer))
    add_lora(ours, ["up", "down"], rank=4, alpha=8)
    torch.manual_seed(2)
    for name in ("up", "down"):
        theirs, mine = getattr(reference.base_model.model, name), getattr(ours, name)
        nn.init.normal_(theirs.lora_B["default"].weight, std=0.05)
        mine.lora_A.weight.data.copy_(theirs.lora_A["default"].weight)
        mine.lora_B.weight.data.copy_(theirs.lora_B["default"].weight)
    return ours, reference


def test_prepare_for_qlora_quantizes_freezes_and_keeps_norms_in_float32():
    model = prepare_for_qlora(wide_llama(dtype=torch.bfloat16, eval_mode=False))
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, NF4Linear) and isinstance(layer.mlp.down_proj, NF4Linear)
    assert isinstance(model.lm_head, nn.Linear)
    assert not any(p.requires_grad for p in model.parameters())
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert len(norms) == 5 and all(p.dtype == torch.float32 for p in norms)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # as peft: head and embeddings too
    assert layer.self_attn.q_proj.weight.dtype == torch.bfloat16  # what dequantize() gives by default
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS).logits).all()


def test_prepare_for_qlora_refuses_a_quantized_model():
    model = prepare_for_qlora(wide_llama(eval_mode=False))
    with pytest.raises(ValueError, match="already quantized"):
        prepare_for_qlora(model)


def test_gradient_checkpointing_needs_a_hugging_face_model():
    with pytest.raises(TypeError, match="gradient_checkpointing needs a Hugging Face model"):
        prepare_for_qlora(Tiny(), gradient_checkpointing=True)


def test_gradients_reach_only_lora_with_and_without_checkpointing():
    plain, checkpointed = qlora_llama(), qlora_llama(gradient_checkpointing=True)
    assert checkpointed.is_activation_checkpointing and not plain.is_activation_checkpointing
    packed = {n: m.base.weight.packed.clone() for n, m in plain.named_modules() if isinstance(m, LoRALinear)}
    grads = []
    for model in (plain, checkpointed):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        loss(model).backward()
        optimizer.step()
        optimizer.zero_grad()
        loss(model).backward()  # A gets a gradient once B is no longer zero
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        lora = {n for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
        assert with_grad == lora and len(lora) == 2 * 7 * 2
        assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in lora)
        grads.append({n: model.get_parameter(n).grad for n in lora})
    for name, layer in plain.named_modules():
        if isinstance(layer, LoRALinear):
            assert torch.equal(layer.base.weight.packed, packed[name])  # the 4-bit base never moves
    for name in grads[0]:  # recomputing activations changes no gradient
        torch.testing.assert_close(grads[1][name], grads[0][name])


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_matches_peft_lora_on_bitsandbytes_4bit(double_quant):
    ours, reference = twins(double_quant)
    x = torch.randn(3, 5, 64)
    out, expected = ours(x), reference(x)
    assert torch.equal(out, expected)
    out.square().sum().backward(), expected.square().sum().backward()
    for name in ("up", "down"):
        theirs, mine = getattr(reference.base_model.model, name), getattr(ours, name)
        torch.testing.assert_close(mine.lora_A.weight.grad, theirs.lora_A["default"].weight.grad)
        torch.testing.assert_close(mine.lora_B.weight.grad, theirs.lora_B["default"].weight.grad)


@pytest.mark.parametrize("double_quant", [False, True])
def test_merge_into_4bit_matches_peft_merge(double_quant):
    ours, reference = twins(double_quant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that a 4-bit merge rounds
        reference = reference.merge_and_unload()
    merge_into_4bit(ours)
    for name in ("up", "down"):
        mine, theirs = getattr(ours, name), getattr(reference, name)
        assert isinstance(mine, NF4Linear) and mine.weight.double_quant == double_quant
        assert torch.equal(mine.weight.packed, theirs.weight.data.reshape(-1))
        state = theirs.weight.quant_state
        if double_quant:  # bitsandbytes' native 8-bit codes differ now and then (see test_nf4.py)
            assert torch.equal(mine.weight.absmax_offset, state.offset)
            assert torch.equal(mine.weight.absmax_scale, state.state2.absmax)
        else:
            assert torch.equal(mine.weight.absmax, state.absmax)
    if not double_quant:
        x = torch.randn(4, 64)
        with torch.no_grad():
            assert torch.equal(ours(x), reference(x))


def trained_q_proj(std=1e-1):
    """A QLoRA Llama whose first q_proj has a trained (random) B of size ``std``, and that layer."""
    model = qlora_llama()
    layer = model.model.layers[0].self_attn.q_proj
    torch.manual_seed(3)
    nn.init.normal_(layer.lora_B.weight, std=std)
    return model, layer


def test_lora_merge_refuses_a_4bit_base_and_points_to_qlora():
    _, layer = trained_q_proj()
    with pytest.raises(TypeError, match="peftkit.qlora"):
        layer.merge()


def test_a_4bit_merge_loses_most_of_a_small_update():
    # an update far below the 4-bit grid step, then one comparable to W
    errors = [requantized_update_error(trained_q_proj(std)[1]) for std in (1e-4, 1e-1)]
    assert errors[0] > 0.5 > errors[1], errors


def test_a_float_merge_keeps_the_whole_update_and_leaves_the_qlora_model():
    float_model = wide_llama(eval_mode=False)
    model, layer = trained_q_proj()
    delta = layer.delta_weight()
    original = float_model.model.layers[0].self_attn.q_proj.weight.clone()
    assert merge_into_float(model, float_model) is float_model
    torch.testing.assert_close(float_model.model.layers[0].self_attn.q_proj.weight - original, delta,
                               rtol=0, atol=1e-6)
    assert model.model.layers[0].self_attn.q_proj is layer  # the QLoRA model is untouched


def test_merge_into_4bit_requantizes_the_exact_merged_weight():
    model, layer = trained_q_proj()
    exact = merged_weight(layer)
    merge_into_4bit(model)
    requantized = model.model.layers[0].self_attn.q_proj.weight.dequantize()
    assert not torch.equal(requantized, exact)
    assert torch.equal(requantized, quantize_nf4(exact, 64, double_quant=True).dequantize())
    assert not any(isinstance(m, LoRALinear) for m in model.modules()) and "adapter_config" not in vars(model)


def test_merge_into_4bit_needs_qlora_layers():
    with pytest.raises(ValueError, match="no LoRA layer over an NF4Linear"):
        merge_into_4bit(wide_llama(eval_mode=False))


@pytest.mark.parametrize("wrong", ["narrower", "quantized"])
def test_merge_into_float_needs_the_float_original(wrong):
    if wrong == "narrower":
        float_model = tiny_llama(seed=None, eval_mode=False, max_position_embeddings=None)  # 32 wide, not 64
    else:
        float_model = qlora_llama()  # a quantized model is not the float original
    with pytest.raises(ValueError, match="no nn.Linear of the right shape"):
        merge_into_float(qlora_llama(), float_model)


def test_qlora_adapter_saves_only_lora_and_loads_back(tmp_path):
    model = qlora_llama()
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            nn.init.normal_(p, std=0.05)
    path = save_adapter(model, tmp_path / "qlora.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert len(keys) == 28 and all(".lora_A." in k or ".lora_B." in k for k in keys)
    restored = prepare_for_qlora(wide_llama(eval_mode=False))  # the same seed gives the same 4-bit base
    load_adapter(restored, path)
    with torch.no_grad():
        assert torch.equal(restored(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_a_float_merge_includes_lora_on_layers_left_in_float():
    model = add_lora(prepare_for_qlora(wide_llama(eval_mode=False), skip=("lm_head", "o_proj")), ["o_proj"],
                     rank=4, alpha=8)  # LoRA over a float base only
    layer = model.model.layers[0].self_attn.o_proj
    torch.nn.init.normal_(layer.lora_B.weight)
    float_model = wide_llama(eval_mode=False)
    original = float_model.model.layers[0].self_attn.o_proj.weight.clone()
    with pytest.raises(ValueError, match="no LoRA layer over an NF4Linear"):  # no QLoRA layer: nothing to merge
        merge_into_float(model, float_model)
    model = add_lora(prepare_for_qlora(wide_llama(eval_mode=False), skip=("lm_head", "o_proj")), ["q_proj", "o_proj"],
                     rank=4, alpha=8)
    layer = model.model.layers[0].self_attn.o_proj
    torch.nn.init.normal_(layer.lora_B.weight)
    merge_into_float(model, float_model)
    torch.testing.assert_close(float_model.model.layers[0].self_attn.o_proj.weight - original, layer.delta_weight(),
                               rtol=0, atol=1e-6)


def test_quantizing_gpt2_names_its_conv1d_and_the_families_that_work():
    from families import build
    with pytest.raises(ValueError, match=r"\(gpt2\).*Conv1D.*llama"):
        prepare_for_qlora(build("gpt2"))

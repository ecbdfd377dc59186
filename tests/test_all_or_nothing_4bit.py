"""Issue 14, 4-bit part: quantizing is all or nothing, and 4-bit weights live in the state dict.

- quantize_model / prepare_for_qlora / merge_into_4bit / merge_into_float: a failure at any step
  (a NaN weight, an injected error, an interrupt while swapping layers in) leaves the model as it
  was, the error names the layer, and a retry after the fix works.
- NF4Linear's state dict holds its packed codes, scales and double-quantization statistics; they
  load back bit for bit into a quantized skeleton, through safetensors and torch.save; loading a
  float state dict into a 4-bit model (or the reverse) fails instead of reporting success.
- add_adapters works on a quantized Llama.
"""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from peftkit.adapters import AdaptedSublayer, add_adapters, load_adapter, remove_adapters, save_adapter
from peftkit.lora import LoRAConfig, LoRALinear, add_lora
from peftkit.nf4 import PARTS, NF4Linear, quantize_model, quantize_nf4
from peftkit.qlora import merge_into_4bit, merge_into_float, merged_weight, prepare_for_qlora, requantized_update_error

from tiny import assert_unchanged, snapshot, wide_llama  # noqa: E402

torch.set_num_threads(1)
IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


# --- quantize_model: all or nothing ---

BAD = "model.layers.1.mlp.down_proj"  # the last of the 14 linears quantize_model quantizes


def with_a_nan(model):
    with torch.no_grad():
        model.get_submodule(BAD).weight[3, 5] = float("nan")
    return model


def test_a_nan_in_a_later_layer_is_named_and_leaves_the_model_float():
    model = with_a_nan(wide_llama())
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"cannot quantize '{BAD}': quantize_nf4 got 1 NaN/inf.*left unchanged"):
        quantize_model(model)
    assert_unchanged(model, before)


def test_quantizing_again_after_fixing_the_nan_works():
    model, reference = with_a_nan(wide_llama()), wide_llama()
    with pytest.raises(ValueError):
        quantize_model(model)
    with torch.no_grad():  # fix it, then retry: not refused as "already quantized"
        model.get_submodule(BAD).weight[3, 5] = reference.get_submodule(BAD).weight[3, 5]
    quantize_model(model)
    quantize_model(reference)
    assert torch.equal(logits(model), logits(reference))


@pytest.mark.parametrize("fail_at", [0, 5, 13])  # the first, a middle and the last of 14 layers
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failure_while_quantizing_any_layer_changes_nothing(monkeypatch, fail_at, error):
    model = wide_llama()
    before = snapshot(model)
    calls, original = [], NF4Linear.from_linear.__func__

    def failing(cls, *args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at + 1:
            raise error("injected")
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(NF4Linear, "from_linear", classmethod(failing))
    with pytest.raises(error, match="injected"):
        quantize_model(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("fail_at", [0, 7, 13])
def test_an_interrupt_while_swapping_layers_in_puts_every_float_layer_back(monkeypatch, fail_at):
    model = wide_llama()
    before = snapshot(model)
    calls, original = [], nn.Module.set_submodule

    def interrupted(self, target, module, *args, **kwargs):
        calls.append(target)
        if len(calls) == fail_at + 1:
            raise KeyboardInterrupt
        return original(self, target, module, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "set_submodule", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"skip": 3}, TypeError, "skip must be a module name"),
    ({"skip": ["lm_head", None]}, TypeError, "skip must be a module name"),
    ({"double_quant": "yes"}, TypeError, "double_quant must be True or False"),
    ({"blocksize": 63}, ValueError, "positive even int"),
    ({"blocksize": 64.0}, ValueError, "positive even int"),
])
def test_quantize_model_checks_its_arguments_before_touching_the_model(kwargs, error, words):
    model = wide_llama()
    before = snapshot(model)
    with pytest.raises(error, match=words):
        quantize_model(model, **kwargs)
    assert_unchanged(model, before)


@pytest.mark.parametrize("model, words", [
    ([nn.Linear(4, 4)], "needs a model"),
    (nn.Linear(64, 64), "for one layer, NF4Linear.from_linear"),
])
def test_quantize_model_refuses_what_is_not_a_model(model, words):
    with pytest.raises(TypeError, match=words):
        quantize_model(model)


def test_quantize_nf4_names_the_dtypes_it_accepts():
    with pytest.raises(TypeError, match="float32, bfloat16, float16, float64"):
        quantize_nf4(torch.randn(64).to(torch.float8_e4m3fn))


def test_quantize_nf4_refuses_a_double_quant_that_is_not_a_bool():
    with pytest.raises(TypeError, match="double_quant must be True or False"):
        quantize_nf4(torch.randn(64), double_quant=1)


@pytest.mark.parametrize("bias", [torch.zeros(9), [0.0] * 8], ids=["9 values", "a list"])
def test_nf4linear_refuses_a_bias_that_is_not_a_tensor_of_its_width(bias):
    with pytest.raises(TypeError, match=r"bias must be None or a tensor of shape \(8,\)"):
        NF4Linear(quantize_nf4(torch.randn(8, 64)), bias)


@pytest.mark.parametrize("helper", [merged_weight, requantized_update_error])
def test_qlora_helpers_refuse_a_lora_layer_without_a_4bit_base(helper):
    with pytest.raises(TypeError, match="needs a LoRALinear over an NF4Linear"):
        helper(LoRALinear(nn.Linear(8, 8)))


# --- prepare_for_qlora and the merges: all or nothing ---

def test_prepare_for_qlora_rolls_back_when_gradient_checkpointing_fails(monkeypatch):
    model = wide_llama(dtype=torch.bfloat16)
    model.model.embed_tokens.weight.requires_grad_(False)  # restored as it was, not as prepare sets it
    before, use_cache = snapshot(model), model.config.use_cache

    def unsupported(**kwargs):
        for module in model.modules():  # fail half-way, as a model that cannot checkpoint every layer
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = True
                break
        raise ValueError("injected: this model does not support gradient checkpointing")

    # prepare_for_qlora calls transformers 5's activation_checkpointing_enable (4.x: gradient_checkpointing_enable)
    name = "activation_checkpointing_enable" if hasattr(model, "activation_checkpointing_enable") else \
        "gradient_checkpointing_enable"
    monkeypatch.setattr(model, name, lambda *args, **kwargs: unsupported(**kwargs))
    with pytest.raises(ValueError, match="injected"):
        prepare_for_qlora(model, gradient_checkpointing=True)
    assert_unchanged(model, before)  # float linears back, bf16 kept, requires_grad as it was
    assert model.config.use_cache == use_cache
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    monkeypatch.undo()
    prepare_for_qlora(model, gradient_checkpointing=True)  # the retry works
    assert isinstance(model.model.layers[1].mlp.up_proj, NF4Linear)


def test_prepare_for_qlora_checks_its_arguments_before_touching_the_model():
    model = wide_llama()
    before = snapshot(model)
    with pytest.raises(TypeError, match="gradient_checkpointing must be True or False"):
        prepare_for_qlora(model, gradient_checkpointing="no")
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        prepare_for_qlora("model")


def test_prepare_for_qlora_names_a_non_finite_layer_and_changes_nothing():
    model = wide_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("inf")
    before = snapshot(model)
    with pytest.raises(ValueError, match="'model.layers.1.self_attn.v_proj'"):
        prepare_for_qlora(model)
    assert_unchanged(model, before)


def qlora_llama(double_quant=True):
    model = prepare_for_qlora(wide_llama(), double_quant=double_quant)
    torch.manual_seed(1)
    add_lora(model, "all-linear", rank=4, alpha=8)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            nn.init.normal_(p, std=0.05)
    return model


def test_merge_into_4bit_with_a_nan_update_in_a_later_layer_changes_nothing():
    model = qlora_llama()
    bad = "model.layers.1.mlp.down_proj"
    with torch.no_grad():
        model.get_submodule(bad).lora_B.weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"cannot merge '{bad}'.*left unchanged"):
        merge_into_4bit(model)
    assert_unchanged(model, before)
    assert isinstance(model.adapter_config, LoRAConfig)


def test_merge_into_4bit_interrupted_while_swapping_puts_the_lora_layers_back(monkeypatch):
    model = qlora_llama()
    before, original, calls = snapshot(model), nn.Module.set_submodule, []

    def interrupted(self, target, module, *args, **kwargs):
        calls.append(target)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return original(self, target, module, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "set_submodule", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge_into_4bit(model)
    assert_unchanged(model, before)
    assert isinstance(model.adapter_config, LoRAConfig)


def test_merge_into_float_needs_a_module():
    with pytest.raises(TypeError, match="float_model must be"):
        merge_into_float(qlora_llama(), "float_model")


def test_merge_into_float_failing_at_the_last_layer_leaves_the_float_model_alone(monkeypatch):
    model, float_model = qlora_llama(), wide_llama()
    before = snapshot(float_model)
    last = model.model.layers[1].mlp.down_proj
    monkeypatch.setattr(last, "delta_weight", lambda: (_ for _ in ()).throw(RuntimeError("injected")))
    with pytest.raises(RuntimeError, match="injected"):
        merge_into_float(model, float_model)
    assert_unchanged(float_model, before)


def test_merge_into_float_with_a_non_finite_update_names_it_and_changes_nothing():
    model, float_model = qlora_llama(), wide_llama()
    before = snapshot(float_model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.lora_A.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="'model.layers.1.mlp.down_proj' is not finite"):
        merge_into_float(model, float_model)
    assert_unchanged(float_model, before)


# --- the state dict of a 4-bit model ---

@pytest.mark.parametrize("double_quant", [False, True])
def test_the_state_dict_holds_every_4bit_part(double_quant):
    layer = NF4Linear.from_linear(nn.Linear(96, 40), blocksize=32, double_quant=double_quant)
    state = layer.state_dict()
    parts = ["packed", "absmax_codes", "absmax_scale", "absmax_offset"] if double_quant else ["packed", "absmax"]
    assert list(state) == ["bias", "weight_format"] + [f"weight_{p}" for p in parts]
    assert state["weight_format"].tolist() == [40, 96, 32, 0]  # (out, in, blocksize, float32)
    for part in parts:
        assert state[f"weight_{part}"] is getattr(layer.weight, part)


def assert_same_4bit_weights(model, reference, shared=False):
    pairs = [(m, reference.get_submodule(n)) for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert len(pairs) == 14
    for mine, theirs in pairs:
        for part in PARTS[theirs.weight.double_quant]:
            a, b = getattr(mine.weight, part), getattr(theirs.weight, part)
            assert torch.equal(a, b) and a.dtype == b.dtype and (a is b) == shared  # load copies, assign shares
        assert (mine.weight.shape, mine.weight.dtype, mine.weight.blocksize) == (
            theirs.weight.shape, theirs.weight.dtype, theirs.weight.blocksize)


@pytest.mark.parametrize("dtype, double_quant", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("via", ["safetensors", "torch.save", "save_pretrained"])
def test_a_quantized_llama_saved_and_reloaded_gives_identical_outputs(tmp_path, dtype, double_quant, via):
    model = quantize_model(wide_llama(dtype=dtype), double_quant=double_quant)
    skeleton = quantize_model(wide_llama(seed=5, dtype=dtype), double_quant=double_quant)  # other weights
    assert not torch.equal(logits(skeleton), logits(model))
    path = tmp_path / "model.bin"
    if via == "safetensors":
        save_file(model.state_dict(), path)
        state = load_file(path)
    elif via == "torch.save":
        torch.save(model.state_dict(), path)
        state = torch.load(path, weights_only=True)
    else:  # Hugging Face writes the state dict: the 4-bit parts are in the file now
        model.save_pretrained(tmp_path)
        state = load_file(tmp_path / "model.safetensors")
    result = skeleton.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_4bit_weights(skeleton, model)
    assert torch.equal(logits(skeleton), logits(model))


def test_a_qlora_model_state_dict_round_trips():
    model, skeleton = qlora_llama(), qlora_llama()
    with torch.no_grad():
        skeleton.model.layers[0].self_attn.q_proj.base.weight.packed.zero_()
        skeleton.model.layers[0].self_attn.q_proj.lora_B.weight.zero_()
    assert not torch.equal(logits(skeleton), logits(model))
    skeleton.load_state_dict(model.state_dict())
    assert torch.equal(logits(skeleton), logits(model))


def test_load_with_assign_into_a_meta_skeleton():
    model = quantize_model(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)), skip=())
    skeleton = copy.deepcopy(model).to("meta")  # no memory for weights, as from_pretrained builds models
    assert skeleton[0].weight.packed.device.type == "meta"
    skeleton.load_state_dict(model.state_dict(), assign=True)
    for mine, theirs in [(skeleton[0], model[0]), (skeleton[2], model[2])]:
        assert all(getattr(mine.weight, p) is getattr(theirs.weight, p) for p in PARTS[True])  # assigned, not copied
    x = torch.randn(3, 64)
    assert torch.equal(skeleton(x), model(x))


@pytest.mark.parametrize("strict", [True, False])
def test_a_float_state_dict_into_a_4bit_model_fails_clearly_and_keeps_the_4bit_weights(strict):
    model = quantize_model(wide_llama())
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    with pytest.raises(RuntimeError, match=r"model.layers.0.self_attn.q_proj.weight is a float weight, but "
                                           r"this layer is a 4-bit NF4Linear"):
        model.load_state_dict(wide_llama(seed=3).state_dict(), strict=strict)
    assert all(model.get_submodule(n).weight is w for n, w in weights.items())


def test_a_4bit_state_dict_into_a_float_model_fails_clearly():
    state = quantize_model(wide_llama()).state_dict()
    with pytest.raises(RuntimeError, match=r'(?s)Missing key\(s\).*"model.layers.0.self_attn.q_proj.weight".*'
                                           r'Unexpected key\(s\).*"model.layers.0.self_attn.q_proj.weight_packed"'):
        wide_llama().load_state_dict(state, strict=True)


def test_a_state_dict_of_the_other_double_quant_setting_is_refused():
    model = quantize_model(wide_llama())
    with pytest.raises(RuntimeError, match="saved with double_quant=False, but this layer has double_quant=True"):
        model.load_state_dict(quantize_model(wide_llama(), double_quant=False).state_dict())


def test_a_state_dict_of_another_blocksize_is_refused():
    model = quantize_model(wide_llama())
    with pytest.raises(RuntimeError, match=r"weight_format is \[64, 64, 32, 0\], but this layer holds a \(64, 64\) "
                                           r"weight in blocks of 64"):
        model.load_state_dict(quantize_model(wide_llama(), blocksize=32).state_dict())


def test_a_4bit_part_of_the_wrong_dtype_is_refused():
    model, state = quantize_model(wide_llama()), quantize_model(wide_llama()).state_dict()
    state["model.layers.0.mlp.up_proj.weight_packed"] = state["model.layers.0.mlp.up_proj.weight_packed"].float()
    with pytest.raises(RuntimeError, match=r"up_proj.weight_packed must be torch.uint8 of shape \(4096,\), got "
                                           r"torch.float32 of shape \(4096,\)"):
        model.load_state_dict(state)


MISSING = "model.layers.1.self_attn.o_proj.weight_absmax_scale"


def test_a_missing_4bit_part_is_a_missing_key():
    model, state = quantize_model(wide_llama()), quantize_model(wide_llama(seed=4)).state_dict()
    del state[MISSING]
    with pytest.raises(RuntimeError, match=rf'Missing key\(s\) in state_dict: "{MISSING}"'):
        model.load_state_dict(state)


def test_a_missing_4bit_part_is_reported_and_its_layer_kept_when_not_strict():
    model, state = quantize_model(wide_llama()), quantize_model(wide_llama(seed=4)).state_dict()
    del state[MISSING]
    kept = model.model.layers[1].self_attn.o_proj.weight
    result = model.load_state_dict(state, strict=False)  # PyTorch's contract: load what is there, report the rest
    assert result.missing_keys == [MISSING]
    assert model.model.layers[1].self_attn.o_proj.weight is kept


# --- adapters on a 4-bit base ---

def test_add_adapters_works_on_a_quantized_llama():
    model = prepare_for_qlora(wide_llama())
    assert not model.model.layers[0].mlp.down_proj.weight.is_floating_point()  # stored as 4-bit codes
    add_adapters(model)
    wrapped = model.model.layers[0].mlp.down_proj
    assert isinstance(wrapped.base, NF4Linear) and wrapped.adapter.adapter_up.weight.dtype == torch.float32
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".adapter." in n or "norm" in n for n in with_grad)


def test_adapters_on_a_quantized_llama_save_and_load_exactly(tmp_path):
    model = add_adapters(prepare_for_qlora(wide_llama()))
    with torch.no_grad():  # values far from the init, as training would leave them
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    expected = logits(model)
    save_adapter(model, tmp_path / "adapters.safetensors")
    fresh = prepare_for_qlora(wide_llama())
    load_adapter(fresh, tmp_path / "adapters.safetensors")
    assert torch.equal(logits(fresh), expected)


def test_remove_adapters_gives_back_the_4bit_layers():
    model = add_adapters(prepare_for_qlora(wide_llama()))
    remove_adapters(model)
    assert isinstance(model.model.layers[0].mlp.down_proj, NF4Linear)
    assert not any(isinstance(m, AdaptedSublayer) for m in model.modules())

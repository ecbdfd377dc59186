"""peftkit.lora_init against peft 0.21.2: PiSSA's factors and residual, its conversion to plain LoRA, and LoftQ's
factors given the same NF4 quantization (bitsandbytes' own, run on the CPU), on tiny BERT, Llama and GPT-2.

peft's LoftQ (peft.utils.loftq_utils.loftq_init) has no quantizer of its own since peft 0.20: it quantizes with
bitsandbytes' Params4bit and dequantize_4bit, on "cuda" (or "xpu") hard-coded, so on a CPU-only machine it cannot
run as shipped. ``peft_loftq_on_cpu`` maps that device to the CPU and runs bitsandbytes' reference dequantize
(bitsandbytes/backends/default/ops.py; its native CPU kernel can read a wrong scale on AVX-512, see test_nf4.py).
bitsandbytes' CPU quantize_4bit is that reference: Q is then bit for bit peftkit.nf4's, and what is compared is
peft's own LoftQ loop (residual, SVD, factors) against ours.
"""

import copy
import dataclasses
import json

import bitsandbytes as bnb
import peft
import pytest
import torch
from bitsandbytes.backends.default import ops as bnb_default
from peft.utils import loftq_utils
from safetensors.torch import load_file

import families
from peftkit import nf4
from peftkit.lora import add_lora, export_peft, merge_lora, unmerge_lora
from peftkit.lora_init import init_lora, loftq_init_, pissa_init_, pissa_to_lora, quantization_error
from peftkit.qlora import prepare_for_qlora
from tiny import assert_unchanged, snapshot, wide_llama

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:.*(fan_in_fan_out is set|PiSSA changes the base weights).*")


def models(family, peft_init, rank=4, alpha=8, rslora=False, targets=None, base=None, **peft_kwargs):
    """(the base model, peft's model with init_lora_weights=peft_init, ours wrapped by add_lora, not initialised)."""
    base = base if base is not None else families.build(family)
    targets = targets or families.QV[family]
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                             init_lora_weights=peft_init, **peft_kwargs)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    return base, theirs, add_lora(copy.deepcopy(base), targets, rank=rank, alpha=alpha, rslora=rslora)


def peft_name(name):  # ours -> peft's parameter name
    name = name.replace(".base.", ".base_layer.").replace("lora_A.weight", "lora_A.default.weight")
    return "base_model.model." + name.replace("lora_B.weight", "lora_B.default.weight")


def assert_same_parameters(ours, theirs, **tolerance):
    theirs = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():  # every LoRA factor and every base weight, residuals included
        torch.testing.assert_close(p, theirs[peft_name(name)], msg=name, **tolerance)


def logits(model, family="bert"):
    with torch.no_grad():
        return model(**families.inputs(family)).logits


# --- PiSSA ---
FIRST_QUERY = {"bert": "bert.encoder.layer.0.attention.self.query", "llama": "model.layers.0.self_attn.q_proj",
               "gpt2": "transformer.h.0.attn.c_attn"}


@pytest.mark.parametrize("family, alpha, rslora", [("bert", 8, False), ("llama", 16, True), ("gpt2", 4, False)])
def test_pissa_gives_peft_factors_and_residual_and_keeps_the_output(family, alpha, rslora):
    base, theirs, ours = models(family, "pissa", alpha=alpha, rslora=rslora)
    initial = init_lora(ours, "pissa")
    assert_same_parameters(ours, theirs)  # A, B and W_res = W - s B A, exact SVD on both sides
    assert initial.keys() == {n for n, _ in ours.named_parameters() if ".lora_" in n}
    torch.testing.assert_close(logits(ours, family), logits(base, family))  # W_res + s B A = W
    torch.testing.assert_close(logits(ours, family), logits(theirs, family))
    name = FIRST_QUERY[family]
    w = base.get_submodule(name).weight
    w = w.T if family == "gpt2" else w  # (out, in): GPT-2's Conv1D stores (in, out)
    s = torch.linalg.svdvals(w)[:4]  # s B A holds the top singular values of W, whatever alpha is
    torch.testing.assert_close(torch.linalg.svdvals(ours.get_submodule(name).delta_weight())[:4], s, msg=name)


def test_pissa_niter_gives_peft_factors_given_the_same_random_sketch(monkeypatch):
    lowrank = torch.svd_lowrank

    def seeded(*args, **kwargs):  # the same sketch for each layer on both sides, whatever else drew numbers
        torch.manual_seed(7)
        return lowrank(*args, **kwargs)

    monkeypatch.setattr(peft.tuners.lora.layer, "svd_lowrank", seeded)
    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    base, theirs, ours = models("llama", "pissa_niter_2")
    pissa_init_(ours, niter=2)
    assert_same_parameters(ours, theirs)
    torch.testing.assert_close(logits(ours, "llama"), logits(base, "llama"))
    exact = add_lora(copy.deepcopy(base), families.QV["llama"], rank=4, alpha=8)
    pissa_init_(exact)  # the sketch is an approximation: not the exact SVD's factors
    assert not torch.allclose(exact.model.layers[0].self_attn.q_proj.lora_A.weight,
                              ours.model.layers[0].self_attn.q_proj.lora_A.weight, atol=1e-4)


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_to_lora_matches_peft_conversion(tmp_path, rslora):
    base, theirs, ours = models("bert", "pissa", rslora=rslora, modules_to_save=["classifier"])
    ours = add_lora(copy.deepcopy(base), ["query", "value"], rank=4, alpha=8, rslora=rslora,
                    modules_to_save=["classifier"])
    initial = init_lora(ours, "pissa")
    theirs.save_pretrained(tmp_path / "init")  # what peft's docs have users save before training
    torch.manual_seed(3)
    for name, p in ours.named_parameters():  # "training": the same step on both sides
        if p.requires_grad:
            step = torch.randn_like(p) * 0.05
            with torch.no_grad():
                p.add_(step)
                theirs.get_parameter(peft_name(name).replace("classifier.", "classifier.modules_to_save.default.")
                                     if "classifier" in name else peft_name(name)).add_(step)
    tensors, config = pissa_to_lora(ours, initial)
    theirs.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    saved = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    factors = {k: v for k, v in tensors.items() if ".lora_" in k}
    assert {f"base_model.model.{k}" for k in factors} == set(saved)  # peft writes the factors only
    for key, value in factors.items():
        torch.testing.assert_close(value, saved[f"base_model.model.{key}"], msg=key)
    peft_config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (peft_config["r"], peft_config["lora_alpha"]) == (config.rank, pytest.approx(config.alpha))
    # the converted adapter on the original weights computes what the trained PiSSA model computes
    plain = add_lora(copy.deepcopy(base), **dataclasses.asdict(config))
    assert plain.load_state_dict(tensors, strict=False).unexpected_keys == []
    torch.testing.assert_close(logits(plain), logits(ours))
    export_peft(plain, tmp_path / "exported", None)  # and peft loads it onto the original weights
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "exported")
    torch.testing.assert_close(logits(loaded), logits(ours))
    torch.testing.assert_close(logits(merge_lora(plain)), logits(ours))


def test_pissa_to_lora_refuses_what_init_lora_did_not_return():
    _, _, ours = models("bert", "pissa")
    initial = init_lora(ours, "pissa")
    with pytest.raises(ValueError, match="what init_lora returned"):
        pissa_to_lora(ours, {k: v for k, v in list(initial.items())[1:]})
    key = next(iter(initial))
    with pytest.raises(ValueError, match="shape"):
        pissa_to_lora(ours, {**initial, key: initial[key][:2]})


# --- LoftQ ---
@pytest.fixture
def peft_loftq_on_cpu(monkeypatch):
    """peft's loftq_init as shipped, its hard-coded "cuda" mapped to the CPU, bitsandbytes' reference dequantize."""
    def on_cpu(to):
        def moved(self, *args, **kwargs):
            args = tuple("cpu" if a == "cuda" else a for a in args)
            return to(self, *args, **{k: "cpu" if v == "cuda" else v for k, v in kwargs.items()})
        return moved

    monkeypatch.setattr(torch.Tensor, "to", on_cpu(torch.Tensor.to))
    monkeypatch.setattr(bnb.nn.Params4bit, "to", on_cpu(bnb.nn.Params4bit.to))
    compute = getattr(bnb_default._dequantize_4bit_compute, "__wrapped__", bnb_default._dequantize_4bit_compute)
    monkeypatch.setattr(bnb.functional, "dequantize_4bit", lambda packed, state: compute(
        packed.reshape(-1), state.absmax, state.code, state.blocksize, state.shape, state.dtype))
    monkeypatch.setattr(loftq_utils, "clear_device_cache", lambda: None)


def loftq_models(family, iters, alpha=4, rank=4):
    base = wide_llama() if family == "llama" else families.build(family)
    return models(family, "loftq", rank=rank, alpha=alpha, targets="all-linear", base=base,
                  loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=iters))


def test_peft_loftq_quantizes_with_bitsandbytes_as_peftkit_nf4_does(peft_loftq_on_cpu):
    w = wide_llama().model.layers[0].mlp.down_proj.weight.detach()  # (64, 128)
    q, _, _ = loftq_utils.loftq_init(w, num_bits=4, reduced_rank=4, num_iter=1)
    assert torch.equal(q, nf4.quantize_nf4(w).dequantize())  # the same Q, bit for bit


@pytest.mark.parametrize("family, iters", [("llama", 1), ("llama", 3), ("bert", 2)])
def test_loftq_gives_peft_factors_given_the_same_quantization(peft_loftq_on_cpu, family, iters):
    base, theirs, ours = loftq_models(family, iters)  # alpha == rank: peft's factors are for scaling 1
    loftq_init_(ours, iters=iters)
    theirs_ = dict(theirs.named_parameters())
    for name, layer in ours.named_modules():
        if hasattr(layer, "lora_A"):
            assert isinstance(layer.base, nf4.NF4Linear), name
            torch.testing.assert_close(layer.base.weight.dequantize(), theirs_[peft_name(f"{name}.base.weight")],
                                       rtol=0, atol=0, msg=name)  # peft keeps Q dequantized in a float layer
            for x in "AB":
                torch.testing.assert_close(getattr(layer, f"lora_{x}").weight,
                                           theirs_[peft_name(f"{name}.lora_{x}.weight")], msg=name)
    torch.testing.assert_close(logits(ours, family), logits(theirs, family))


def test_peft_loftq_factors_are_for_scaling_one(peft_loftq_on_cpu):
    _, theirs, ours = loftq_models("llama", 1, alpha=16)  # s = 4: peft's B A = SVD_r(W - Q) = s x ours
    loftq_init_(ours)
    q_proj = theirs.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q_proj.lora_A.default.weight, ours.model.layers[0].self_attn.q_proj.lora_A.weight * 2)
    torch.testing.assert_close(q_proj.lora_B.default.weight, ours.model.layers[0].self_attn.q_proj.lora_B.weight * 2)


def test_loftq_error_starts_below_plain_nf4_and_does_not_grow():
    base = wide_llama()
    plain = add_lora(prepare_for_qlora(copy.deepcopy(base), skip=("lm_head",), double_quant=False), "all-linear")
    nf4_error = quantization_error(plain, base)  # B = 0: || W - Q ||
    errors = []
    for iters in (1, 2, 3, 5):
        model = add_lora(copy.deepcopy(base), "all-linear", rank=4, alpha=8)
        loftq_init_(model, iters=iters)
        errors.append(quantization_error(model, base))
    # measured: plain NF4 0.5007; LoftQ 0.4509 (1 iteration), 0.4249 (2), 0.4129 (3), 0.4025 (5)
    assert errors[0] < 0.95 * nf4_error
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:])), errors


def test_loftq_model_trains_only_the_factors():
    model = add_lora(families.build("llama", eval_mode=False), "all-linear", rank=4, alpha=8)
    loftq_init_(model, double_quant=True)
    ids = families.inputs("llama")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".lora_" in n for n in trained)
    assert model.model.layers[0].mlp.up_proj.base.weight.double_quant


# --- refusals: clear, and the model left as it was ---
def refused(model, error, match, *args, **kwargs):
    before = snapshot(model)
    with pytest.raises(error, match=match):
        init_lora(model, *args, **kwargs)
    assert_unchanged(model, before)


def test_refusals_leave_the_model_as_it_was():
    bert = families.build("bert")
    refused(bert, ValueError, "call add_lora", "pissa")
    wrapped = add_lora(copy.deepcopy(bert), ["query", "value"], rank=4)
    refused(wrapped, ValueError, "'pissa', 'pissa_niter_K'", "svd")
    refused(wrapped, ValueError, "'pissa', 'pissa_niter_K'", "pissa_niter_x")
    refused(wrapped, ValueError, "bits must be 4", "loftq", bits=8)
    refused(wrapped, ValueError, "loftq_iter", "loftq", iters=0)
    gpt2 = add_lora(families.build("gpt2"), ["c_attn"], rank=4)
    refused(gpt2, ValueError, "gpt2's .*Conv1D.*llama", "loftq")
    quantized = add_lora(prepare_for_qlora(families.build("llama")), ["q_proj"], rank=4)
    refused(quantized, ValueError, "already 4-bit", "loftq")
    embedded = add_lora(copy.deepcopy(bert), ["query", "word_embeddings"], rank=4)
    refused(embedded, ValueError, "embedding", "pissa")
    too_wide = add_lora(families.build("llama"), ["k_proj"], rank=32)  # k_proj is (16, 32)
    refused(too_wide, ValueError, "rank 32 exceeds min", "pissa")
    merged = merge_lora(add_lora(copy.deepcopy(bert), ["query"], rank=4), unload=False)
    refused(merged, ValueError, "unmerge_lora", "pissa")
    unmerge_lora(merged)
    with torch.no_grad():  # a NaN in the last layer: found before the first layer changes
        merged.bert.encoder.layer[1].attention.self.query.base.weight[0, 0] = float("nan")
    refused(merged, ValueError, "layer.1.*NaN", "pissa")
    refused(merged, ValueError, "layer.1.*NaN", "loftq")

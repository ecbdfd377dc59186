"""peftkit.multi_adapter against peft 0.21.2: disable_adapter() for every technique, several named LoRA adapters.

Tiny models from tests/families.py (BERT, GPT-2, Llama). LoRA is checked on BERT and Llama; GPT-2 where its
technique already works (prompt tuning, P-tuning)."""

import contextlib
import copy
import warnings

import peft
import pytest
import torch

from peftkit import adapter_files
from peftkit.adapters import add_adapters
from peftkit.adapters import save_adapter as save_bottleneck
from peftkit.lora import (LoRALinear, adapter_state_dict, add_lora, export_peft, load_adapter, merge_lora, save_adapter,
                          unmerge_lora)
from peftkit.multi_adapter import (active_adapter, add_named_adapter, delete_adapter, disable_adapter,
                                   list_adapters, load_named_adapter, set_adapter)
from peftkit.p_tuning import PTuningConfig, PTuningModel
from peftkit.prefix_tuning import PrefixTuningModel
from peftkit.prompt_tuning import PromptTuningModel
from peftkit.qlora import prepare_for_qlora

from families import QV, build, inputs  # noqa: E402
from tiny import assert_unchanged, snapshot, wide_llama  # noqa: E402

torch.set_num_threads(1)
TASK = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM"}


def _conv1d_lora() -> bool:  # LoRA on GPT-2's Conv1D and on embeddings come with issue 15's lora.py
    try:
        add_lora(build("gpt2"), ["c_attn", "wte"])
    except (TypeError, ValueError):
        return False
    return True


LORA_FAMILIES = ["bert", "llama"] + ["gpt2"] * _conv1d_lora()
EMBEDDING = {"bert": ["word_embeddings"], "gpt2": ["wte"], "llama": ["embed_tokens"]} if _conv1d_lora() else {}
OTHER = {"bert": ["key", "intermediate.dense"], "gpt2": ["mlp.c_proj"], "llama": ["k_proj", "o_proj"]}
OTHER = {family: targets + EMBEDDING.get(family, []) for family, targets in OTHER.items()}  # a second adapter's


def out(model, family="llama"):
    return model(**inputs(family)).logits


def randomize_(model, seed=3, only=""):
    """Random values for every trainable tensor (whose name contains ``only``): no adapter is an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and only in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's and transformers' notes and deprecations
        return fn(*args, **kwargs)


def peft_lora(base, folders: dict):
    """A PeftModel holding the export_peft'ed adapters in ``folders`` (name -> folder), the first active."""
    (first, path), *rest = folders.items()
    model = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), path, adapter_name=first)
    for name, path in rest:
        quiet(model.load_adapter, path, adapter_name=name)
    return model.eval()


# --- disable_adapter ---
@pytest.mark.parametrize("family", LORA_FAMILIES)
def test_disabled_lora_gives_the_base_output_as_peft_does(family, tmp_path):
    base = build(family)
    reference = out(base, family)
    model = randomize_(add_lora(copy.deepcopy(base), QV[family], rank=4, alpha=8))
    adapted, before = out(model, family), snapshot(model)
    assert not torch.allclose(adapted, reference)
    theirs = peft_lora(base, {"default": export_peft(model, tmp_path, None)})
    with disable_adapter(model) as disabled, theirs.disable_adapter():
        assert disabled is model and not any(isinstance(m, LoRALinear) for m in model.modules())
        assert torch.equal(out(model, family), reference)
        torch.testing.assert_close(out(model, family), out(theirs, family))
    assert_unchanged(model, before)
    assert torch.equal(out(model, family), adapted)
    torch.testing.assert_close(out(theirs, family), adapted)


@pytest.mark.parametrize("family", LORA_FAMILIES)
def test_a_merged_lora_is_unmerged_in_the_block_and_merged_again_bit_for_bit(family, tmp_path):
    base = build(family)
    model = randomize_(add_lora(copy.deepcopy(base), QV[family], rank=4, alpha=8))
    theirs = peft_lora(base, {"default": export_peft(model, tmp_path, None)})
    merge_lora(model, unload=False)
    theirs.merge_adapter()
    merged, before = out(model, family), snapshot(model)
    with disable_adapter(model), theirs.disable_adapter():
        ours = out(model, family)  # W + dW - dW: the base output up to rounding, as peft's
        torch.testing.assert_close(ours, out(base, family), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours, out(theirs, family))
    assert_unchanged(model, before)  # the merged weights bit for bit (peft leaves its layers unmerged)
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    assert not any(getattr(m, "merged", True) for m in theirs.modules() if isinstance(m, peft.tuners.lora.Linear))
    assert torch.equal(out(model, family), merged)


@pytest.mark.parametrize("merged", [False, True])
def test_an_exception_in_the_block_restores_everything(merged):
    model = randomize_(add_lora(build("llama"), QV["llama"], rank=4))
    model.model.layers[0].self_attn.q_proj.lora_A.weight.requires_grad_(False)  # flags come back as they were
    model.train()
    if merged:
        merge_lora(model, unload=False)
    before, adapted = snapshot(model), out(model)
    with pytest.raises(RuntimeError, match="inside"), disable_adapter(model):
        raise RuntimeError("inside the block")
    assert_unchanged(model, before)
    assert torch.equal(out(model), adapted)


def test_disabled_qlora_gives_the_quantized_base_output():
    model = prepare_for_qlora(wide_llama())
    reference = out(model)
    randomize_(add_lora(model, "all-linear", rank=4))
    adapted, before = out(model), snapshot(model)
    with disable_adapter(model):
        assert torch.equal(out(model), reference)
    assert_unchanged(model, before)
    assert not torch.allclose(adapted, reference) and torch.equal(out(model), adapted)


@pytest.mark.parametrize("family,overrides", [("bert", {}), ("bert", {"original_ln_before": True}), ("llama", {})])
def test_disabled_bottleneck_adapters_give_the_base_output(family, overrides):
    model = build(family)
    reference = out(model, family)
    randomize_(add_adapters(model, "pfeiffer", reduction_factor=4, **overrides))
    adapted, before = out(model, family), snapshot(model)
    with disable_adapter(model):
        assert torch.equal(out(model, family), reference)
    assert_unchanged(model, before)
    assert not torch.allclose(adapted, reference) and torch.equal(out(model, family), adapted)


def test_modules_trained_in_place_are_refused_unless_allowed():
    model = randomize_(add_adapters(build("llama"), "houlsby", reduction_factor=4), only="adapter_")
    reference, before = out(build("llama")), snapshot(model)
    with pytest.raises(ValueError, match="norms .*allow_trained_modules=True"), disable_adapter(model):
        pass
    assert_unchanged(model, before)
    with disable_adapter(model, allow_trained_modules=True):  # the norms were not trained: the base output
        assert torch.equal(out(model), reference)
    lora = add_lora(build("bert"), QV["bert"], modules_to_save=["classifier"])
    with pytest.raises(ValueError, match=r"\['classifier'\]"), disable_adapter(lora):
        pass


def prompt_models(technique, family):
    """(ours, peft's) with a trained-looking prompt, for a copy of the same base each; no trained head."""
    base = build(family)
    if technique == "prompt_tuning":
        ours = PromptTuningModel(copy.deepcopy(base), num_virtual_tokens=4, modules_to_save=[])
        config = peft.PromptTuningConfig(task_type=TASK[family], num_virtual_tokens=4)
    elif technique == "p_tuning":
        ours = PTuningModel(copy.deepcopy(base), PTuningConfig(num_virtual_tokens=4, modules_to_save=[]))
        config = peft.PromptEncoderConfig(task_type=TASK[family], num_virtual_tokens=4)
    else:
        ours = PrefixTuningModel(copy.deepcopy(base), num_virtual_tokens=4)
        config = peft.PrefixTuningConfig(task_type=TASK[family], num_virtual_tokens=4)
    return base, randomize_(ours).eval(), quiet(peft.get_peft_model, copy.deepcopy(base), config).eval()


@pytest.mark.parametrize("technique,family", [("prompt_tuning", "bert"), ("prompt_tuning", "gpt2"),
                                              ("prompt_tuning", "llama"), ("p_tuning", "gpt2"),
                                              ("p_tuning", "bert"), ("prefix_tuning", "llama")])
def test_disabled_prompt_wrappers_run_the_wrapped_model_as_peft_does(technique, family):
    base, ours, theirs = prompt_models(technique, family)
    prompted, before = out(ours, family), snapshot(ours)
    if family == "bert":  # peft 0.21.2's disable_adapter fails on a prompt-learning classifier (it patches
        with pytest.raises(UnboundLocalError):  # prepare_inputs_for_generation, which a classifier lacks); its
            with theirs.disable_adapter():  # intent, theirs.forward = theirs.base_model.forward, is compared
                pass
        theirs = theirs.base_model
    with disable_adapter(ours), (theirs.disable_adapter() if family != "bert" else contextlib.nullcontext()):
        assert torch.equal(out(ours, family), out(base, family))
        torch.testing.assert_close(out(ours, family), quiet(out, theirs, family))
    assert_unchanged(ours, before)
    assert "forward" not in vars(ours) and torch.equal(out(ours, family), prompted)


@pytest.mark.parametrize("technique", ["prompt_tuning", "prefix_tuning"])
def test_a_disabled_wrapper_generates_what_the_base_model_generates(technique):
    base, ours, _ = prompt_models(technique, "llama")
    ids = inputs("llama")["input_ids"]
    expected = base.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with disable_adapter(ours):
        assert torch.equal(ours.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0), expected)
    assert "generate" not in vars(ours) and not torch.equal(ours.generate(ids, max_new_tokens=3), expected)


def test_a_prompt_wrapper_with_a_trained_head_needs_allow_trained_modules():
    ours = PromptTuningModel(build("bert"), num_virtual_tokens=4)  # peft's default: the classifier trains too
    with pytest.raises(ValueError, match="classifier"), disable_adapter(ours):
        pass
    with disable_adapter(ours, allow_trained_modules=True):
        assert torch.equal(out(ours, "bert"), out(build("bert"), "bert"))  # the head is untrained here


def test_disable_adapter_refuses_a_model_without_adapter_and_nesting():
    with pytest.raises(ValueError, match="no adapter to disable"), disable_adapter(build("llama")):
        pass
    with pytest.raises(TypeError, match="torch.nn.Module"), disable_adapter("model"):
        pass
    model = add_named_adapter(build("llama"), "a", QV["llama"])
    with disable_adapter(model):
        with pytest.raises(ValueError, match="already disabled"), disable_adapter(model):
            pass
        with pytest.raises(ValueError, match="leave that block"):
            set_adapter(model, "a")
    assert active_adapter(model) == "a"


# --- several named adapters ---
def two_adapters(family):
    """A model with adapters "a" (query/value, rank 4) and "b" (other layers, rank 2, rsLoRA), both random."""
    model = add_named_adapter(build(family), "a", QV[family], rank=4, alpha=8)
    add_named_adapter(model, "b", OTHER[family], rank=2, alpha=4, rslora=True)
    for seed, name in enumerate(["b", "a"]):
        randomize_(set_adapter(model, name), seed)
    return model


@pytest.mark.parametrize("family", LORA_FAMILIES)
def test_named_adapters_match_peft_after_each_switch_and_delete(family, tmp_path):
    model = two_adapters(family)
    folders = {n: export_peft(set_adapter(model, n), tmp_path / n, None) for n in ["a", "b"]}
    theirs = peft_lora(build(family), folders)
    for name in ["a", "b", "a"]:
        set_adapter(model, name), theirs.set_adapter(name)
        assert active_adapter(model) == name and list_adapters(model) == ["a", "b"]
        torch.testing.assert_close(out(model, family), out(theirs, family))
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert len(trainable) == sum(p.requires_grad for p in theirs.parameters())
        peft_keys = peft.get_peft_model_state_dict(theirs, adapter_name=name)
        assert {k.removeprefix("base_model.model.") for k in peft_keys} == set(adapter_state_dict(model))
        assert trainable and all(".lora_" in n for n in trainable)
    with pytest.warns(UserWarning, match="'b' is active now"):
        delete_adapter(model, "a")
    quiet(theirs.delete_adapter, "a")
    theirs.set_adapter("b")  # peft 0.21.2 leaves its PeftModel naming no active adapter after this delete
    assert list_adapters(model) == ["b"] and active_adapter(model) == "b"
    torch.testing.assert_close(out(model, family), out(theirs, family))
    delete_adapter(model, "b")
    quiet(theirs.delete_adapter, "b")
    assert torch.equal(out(model, family), out(build(family), family))
    torch.testing.assert_close(out(model, family), out(theirs.base_model.model, family))
    assert "adapter_config" not in vars(model)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        list_adapters(model)


def test_only_the_active_adapter_trains_and_runs():
    model = two_adapters("llama")
    active = set_adapter(model, "a")
    out_a = out(model)
    inactive = vars(model)["_peftkit_named_adapters"]["adapters"]["b"].layers
    with torch.no_grad():
        for layer in inactive.values():  # an inactive adapter is outside the forward pass
            for n, p in layer.named_parameters():
                if not n.startswith("base."):
                    p.add_(1.0)
    assert torch.equal(out(model), out_a)
    out(active).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in model.named_parameters() if p.requires_grad} and grads
    assert not any(p.requires_grad or p.grad is not None for layer in inactive.values() for p in layer.parameters())


def test_switching_back_is_bit_exact_and_each_adapter_saves_its_own_tensors(tmp_path):
    model = two_adapters("llama")
    out_a = out(set_adapter(model, "a"))
    out_b = randomize_(set_adapter(model, "b"), seed=7)(**inputs("llama")).logits  # "train" b further
    assert torch.equal(out(set_adapter(model, "a")), out_a)
    save_adapter(model, tmp_path / "a.safetensors")
    save_adapter(set_adapter(model, "b"), tmp_path / "b.safetensors")
    for name, expected in [("a", out_a), ("b", out_b)]:
        fresh = build("llama")
        load_adapter(fresh, tmp_path / f"{name}.safetensors")
        assert torch.equal(out(fresh), expected)


def test_load_named_adapter_adds_a_saved_adapter_inactive(tmp_path):
    source = randomize_(add_lora(build("llama"), ["k_proj"], rank=3, alpha=5), seed=9)
    save_adapter(source, tmp_path / "c.safetensors")
    model = two_adapters("llama")
    out_a = out(set_adapter(model, "a"))
    load_named_adapter(model, tmp_path / "c.safetensors", "c")
    assert list_adapters(model) == ["a", "b", "c"] and active_adapter(model) == "a"
    assert torch.equal(out(model), out_a)
    assert torch.equal(out(set_adapter(model, "c")), out(source))
    first = load_named_adapter(build("llama"), tmp_path / "c.safetensors", "only")  # a model's first is active
    assert active_adapter(first) == "only" and torch.equal(out(first), out(source))


def test_deleting_the_active_adapter_activates_the_first_name_in_sorted_order_as_peft():
    model = add_named_adapter(build("llama"), "z", ["q_proj"])
    for name in ["m", "b"]:
        add_named_adapter(model, name, ["k_proj"])
    with pytest.warns(UserWarning, match="'b' is active now"):
        delete_adapter(model, "z")
    assert list_adapters(model) == ["m", "b"] and active_adapter(model) == "b"


def test_an_adapter_switched_in_follows_model_to_and_train():
    model = two_adapters("llama")
    out_b = out(set_adapter(model, "b"))
    set_adapter(model, "a").to(torch.float64).train()  # reaches the base and "a" only
    logits = out(set_adapter(model, "b"))
    assert logits.dtype == torch.float64 and all(m.training for m in model.modules())
    torch.testing.assert_close(logits.float(), out_b)
    set_adapter(model, "a").to("meta")  # a device move, on any machine
    assert {p.device.type for p in set_adapter(model, "b").parameters()} == {"meta"}


def test_adding_an_adapter_keeps_the_flags_a_user_set():
    model = add_named_adapter(build("llama"), "a", ["q_proj"])
    model.model.norm.weight.requires_grad_(True)  # the user trains the final norm too
    add_named_adapter(model, "b", ["k_proj"])  # add_lora freezes the model it gets: put back
    assert model.model.norm.weight.requires_grad


def test_a_plain_lora_model_has_its_adapter_named_default():
    model = randomize_(add_lora(build("llama"), QV["llama"], rank=4))
    plain = out(model)
    assert list_adapters(model) == ["default"] and active_adapter(model) == "default"
    add_named_adapter(model, "b", ["k_proj"])
    assert torch.equal(out(model), plain) and active_adapter(model) == "default"


def state(model):
    """What a refused operation must leave: the model (tiny.snapshot) and its named adapters."""
    registry = vars(model).get("_peftkit_named_adapters")
    names = None if registry is None else (registry["active"], {n: dict(a.layers) for n, a in
                                                                 registry["adapters"].items()})
    return snapshot(model), names, out(model)


def assert_same(model, before):
    assert_unchanged(model, before[0])
    assert state(model)[1] == before[1] and torch.equal(out(model), before[2])


def test_bad_requests_name_what_exists_and_change_nothing(tmp_path):
    model = two_adapters("llama")
    before = state(model)
    with pytest.raises(ValueError, match=r"no adapter named 'c'; the model's adapters are \['a', 'b'\]"):
        set_adapter(model, "c")
    with pytest.raises(ValueError, match=r"no adapter named 'c'.*\['a', 'b'\]"):
        delete_adapter(model, "c")
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        add_named_adapter(model, "b", ["k_proj"])
    with pytest.raises(TypeError, match="non-empty str"):
        add_named_adapter(model, "", ["k_proj"])
    with pytest.raises(ValueError, match="matched no module"):
        add_named_adapter(model, "c", ["nonexistent"])
    with pytest.raises(ValueError, match="rank"):
        add_named_adapter(model, "c", ["k_proj"], rank=0)
    with pytest.raises(ValueError, match="every named adapter would share"):
        add_named_adapter(model, "c", ["k_proj"], modules_to_save=["lm_head"])
    assert_same(model, before)


def test_a_failed_load_leaves_the_adapters_as_they_were(tmp_path, monkeypatch):
    model = two_adapters("llama")
    save_bottleneck(add_adapters(build("llama"), "pfeiffer", reduction_factor=4), tmp_path / "bottleneck.safetensors")
    save_adapter(add_lora(build("llama"), ["k_proj"], modules_to_save=["lm_head"]), tmp_path / "head.safetensors")
    save_adapter(add_lora(build("llama"), ["k_proj"]), tmp_path / "good.safetensors")
    (tmp_path / "truncated.safetensors").write_bytes((tmp_path / "good.safetensors").read_bytes()[:100])
    before = state(model)
    for file, error, message in [("missing", FileNotFoundError, "no adapter file"),
                                 ("truncated", ValueError, "not a complete safetensors file"),
                                 ("bottleneck", ValueError, "holds a bottleneck_adapters adapter"),
                                 ("head", ValueError, r"trains \['lm_head'\].*share")]:  # loaded, then refused
        with pytest.raises(error, match=message):
            load_named_adapter(model, tmp_path / f"{file}.safetensors", "c")
        assert_same(model, before)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(adapter_files, "copy_tensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_named_adapter(model, tmp_path / "good.safetensors", "c")
    assert_same(model, before)
    bare = build("llama")
    bare_before = snapshot(bare)
    with pytest.raises(KeyboardInterrupt):
        load_named_adapter(bare, tmp_path / "good.safetensors", "c")
    assert_unchanged(bare, bare_before) and "_peftkit_named_adapters" not in vars(bare)


def test_lora_layers_changed_behind_the_named_adapters_are_refused():
    model = two_adapters("llama")
    layer = model.model.layers[0].self_attn.q_proj
    model.model.layers[0].self_attn.set_submodule("q_proj", layer.base)
    with pytest.raises(ValueError, match="not those of its active adapter 'a'"):
        set_adapter(model, "b")


def test_a_merged_or_head_training_active_adapter_cannot_be_switched():
    model = merge_lora(two_adapters("llama"), unload=False)
    before = state(model)
    for call in (lambda: set_adapter(model, "b"), lambda: delete_adapter(model, "a"),
                 lambda: add_named_adapter(model, "c", ["k_proj"])):
        with pytest.raises(ValueError, match="merged into the base weights: unmerge_lora"):
            call()
    assert_same(model, before)
    delete_adapter(model, "b")  # an inactive one can go
    assert list_adapters(unmerge_lora(model)) == ["a"]
    head = add_lora(build("bert"), QV["bert"], modules_to_save=["classifier"])
    with pytest.raises(ValueError, match=r"adapter 'default' trains \['classifier'\]"):
        add_named_adapter(head, "b", ["key"])
    delete_adapter(head, "default")  # the only adapter: nothing shares the head
    assert not any(isinstance(m, LoRALinear) for m in head.modules())


def test_merging_and_unloading_drops_every_adapter_as_peft_does():
    model = two_adapters("llama")
    merged = out(model)
    merge_lora(model)
    torch.testing.assert_close(out(model), merged)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        active_adapter(model)
    add_named_adapter(model, "fresh", ["q_proj"])
    assert list_adapters(model) == ["fresh"]
    merge_lora(model)
    add_lora(model, ["v_proj"])  # plain LoRA again, after the named adapters were unloaded
    assert list_adapters(model) == ["default"]

"""Issue 14, LoRA / bottleneck adapters / adapter_files: every load, save and wrap does all it says or
leaves the model and the files exactly as they were; adapter files hold only what the
technique trains; corrupt files and bad arguments get errors that name them."""

import copy
import json
import math
import os
import sys

import pytest
import torch
from safetensors import SafetensorError
from torch import nn

import peftkit.adapters as adapters_module
from peftkit import adapter_files, lora
from peftkit.adapters import AdaptedSublayer, BottleneckAdapter, adapter_state_dict, add_adapters, remove_adapters
from peftkit.lora import LoRALinear, add_lora, export_peft, merge_lora, unmerge_lora
from peftkit.nf4 import quantize_model

from tiny import assert_unchanged, snapshot, tiny_bert, tiny_llama  # noqa: E402

torch.set_num_threads(1)
IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
FROZEN_KEY = "bert.embeddings.word_embeddings.weight"
INTERRUPTS = [OSError("disk went away"), RuntimeError("boom"), KeyboardInterrupt()]


def randomize_(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def trained_lora(tmp_path, **kwargs):
    model = randomize_(add_lora(tiny_bert(), ["query", "value"], rank=4, modules_to_save=["classifier"], **kwargs))
    return model, lora.save_adapter(model, tmp_path / "lora.safetensors")


def resave_with(path, extra=(), drop=()):
    """The same adapter file with some keys added (from a frozen base model) or removed."""
    tensors, config = adapter_files.load_tensors(path)
    base = dict(tiny_bert(seed=9).named_parameters())
    tensors = {**{k: v for k, v in tensors.items() if k not in drop}, **{k: base[k].detach() for k in extra}}
    return adapter_files.save_tensors(tensors, path.with_name("edited.safetensors"), config)


# --- 1. only the technique's trained tensors may be loaded --------------------------------------

@pytest.mark.parametrize("injected", [False, True])
def test_lora_file_with_a_frozen_base_weight_is_refused(tmp_path, injected):
    _, path = trained_lora(tmp_path)
    bad = resave_with(path, extra=[FROZEN_KEY])
    model = tiny_bert(seed=1)
    if injected:
        add_lora(model, ["query", "value"], rank=4, modules_to_save=["classifier"])
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"unexpected keys \['{FROZEN_KEY}'\].*may not overwrite"):
        lora.load_adapter(model, bad)
    assert_unchanged(model, before)


def test_lora_strict_even_when_the_user_unfroze_a_base_weight(tmp_path):
    _, path = trained_lora(tmp_path)
    model = add_lora(tiny_bert(seed=1), ["query", "value"], rank=4, modules_to_save=["classifier"])
    model.get_parameter(FROZEN_KEY).requires_grad_(True)  # trainable now, but not LoRA's
    before = snapshot(model)
    with pytest.raises(ValueError, match="unexpected keys"):
        lora.load_adapter(model, resave_with(path, extra=[FROZEN_KEY]))
    assert_unchanged(model, before)


def test_lora_save_writes_only_loras_tensors_even_when_the_user_unfroze_a_base_weight(tmp_path):
    model = add_lora(tiny_bert(seed=1), ["query", "value"], rank=4, modules_to_save=["classifier"])
    model.get_parameter(FROZEN_KEY).requires_grad_(True)  # trainable now, but not LoRA's
    path = lora.save_adapter(model, tmp_path / "again.safetensors")
    assert FROZEN_KEY not in adapter_files.load_tensors(path)[0]
    lora.load_adapter(model, path)  # so its own files still load into such a model


def test_lora_file_missing_a_key_is_refused(tmp_path):
    _, path = trained_lora(tmp_path)
    model = tiny_bert(seed=1)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"missing keys \['classifier.bias'\], unexpected keys \[\]"):
        lora.load_adapter(model, resave_with(path, drop=["classifier.bias"]))
    assert_unchanged(model, before)


@pytest.mark.parametrize("injected", [False, True])
def test_adapter_file_with_a_frozen_base_weight_is_refused(tmp_path, injected):
    trained = randomize_(add_adapters(tiny_bert(), "houlsby", reduction_factor=4, modules_to_save=["classifier"]))
    path = adapters_module.save_adapter(trained, tmp_path / "adapters.safetensors")
    bad = resave_with(path, extra=[FROZEN_KEY, "bert.pooler.dense.weight"])
    model = tiny_bert(seed=1)
    if injected:
        add_adapters(model, "houlsby", reduction_factor=4, modules_to_save=["classifier"])
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"unexpected keys \['bert.embeddings.word_embeddings.weight', "
                                         r"'bert.pooler.dense.weight'\]"):
        adapters_module.load_adapter(model, bad)
    assert_unchanged(model, before)
    adapters_module.load_adapter(model, path)  # the file as saved loads, bit-exactly
    assert all(torch.equal(model.get_parameter(n), t) for n, t in adapter_state_dict(trained).items())


def test_copy_tensors_refuses_frozen_keys_by_default(tmp_path):
    model = tiny_bert()
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    tensors = {"classifier.weight": torch.ones(3, 32), "classifier.bias": torch.ones(3), FROZEN_KEY: torch.zeros(100, 32)}
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"unexpected keys \['{FROZEN_KEY}'\]"):
        adapter_files.copy_tensors(model, tensors)  # expected: the trainable parameters
    assert_unchanged(model, before)


def test_adapter_state_dict_is_what_the_technique_trains():
    model = add_adapters(tiny_bert(), "pfeiffer", reduction_factor=4, modules_to_save=["classifier"])
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    model.bert.embeddings.requires_grad_(True)  # a user's own unfreezing is not the adapters'
    assert set(adapter_state_dict(model)) == expected


def test_adapter_state_dict_of_a_deep_copy_is_the_copys(tmp_path):
    model = randomize_(add_adapters(tiny_bert(), "houlsby", reduction_factor=4))
    twin = copy.deepcopy(model)
    for name, t in adapter_state_dict(twin).items():  # the twin's own tensors, not the original's
        assert t.data_ptr() == twin.get_parameter(name).data_ptr() != model.get_parameter(name).data_ptr()
    adapters_module.load_adapter(twin, adapters_module.save_adapter(model, tmp_path / "a.safetensors"))
    assert remove_adapters(twin) is twin and not any(isinstance(m, AdaptedSublayer) for m in twin.modules())
    assert any(isinstance(m, AdaptedSublayer) for m in model.modules())


# --- 2. LoRA loads that would be silently wrong --------------------------------------------------

@pytest.mark.parametrize("other", [{"alpha": 8}, {"rslora": True}])
def test_lora_other_scaling_is_refused_naming_both(tmp_path, other):
    _, path = trained_lora(tmp_path)  # alpha=16, rslora=False
    model = add_lora(tiny_bert(seed=1), ["query", "value"], rank=4, modules_to_save=["classifier"], **other)
    before = snapshot(model)
    mine = f"alpha={other.get('alpha', 16)}, rslora={other.get('rslora', False)}"
    with pytest.raises(ValueError, match=rf"alpha=16, rslora=False, but the model.s LoRA has {mine}"):
        lora.load_adapter(model, path)
    assert_unchanged(model, before)


def test_lora_bare_model_gets_the_files_scaling(tmp_path):
    trained, path = trained_lora(tmp_path, alpha=5, rslora=True)
    model = tiny_bert()  # the same frozen base
    config = lora.load_adapter(model, path)
    assert (config.alpha, config.rslora) == (5, True)
    layer = model.bert.encoder.layer[0].attention.self.query
    assert layer.scaling == 5 / math.sqrt(4)
    assert all(torch.equal(model.get_parameter(n), t) for n, t in lora.adapter_state_dict(trained).items())  # bit-exact
    assert torch.equal(model(input_ids=IDS).logits, trained(input_ids=IDS).logits)


def test_lora_other_dropout_loads(tmp_path):
    trained, path = trained_lora(tmp_path)
    model = add_lora(tiny_bert(), ["query", "value"], rank=4, dropout=0.1, modules_to_save=["classifier"])
    lora.load_adapter(model, path)
    model.eval()  # dropout acts in training only
    assert torch.equal(model(input_ids=IDS).logits, trained(input_ids=IDS).logits)


def test_lora_load_into_merged_model_is_refused_and_unmerge_stays_exact(tmp_path):
    _, path = trained_lora(tmp_path)
    model = randomize_(add_lora(tiny_bert(seed=1), ["query", "value"], rank=4, modules_to_save=["classifier"]),
                       seed=7)
    bases = {n: p.clone() for n, p in model.named_parameters() if n.endswith("base.weight")}
    merge_lora(model, unload=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"merged.*unmerge_lora\(model\) before load_adapter"):
        lora.load_adapter(model, path)
    assert_unchanged(model, before)
    unmerge_lora(model)
    torch.testing.assert_close({n: p for n, p in model.named_parameters() if n in bases}, bases)
    lora.load_adapter(model, path)  # unmerged: loads


# --- 3. rollback on any exception; arguments checked first ---------------------------------------

@pytest.mark.parametrize("unload", [True, False])
@pytest.mark.parametrize("error", INTERRUPTS, ids=lambda e: type(e).__name__)
def test_merge_interrupted_at_a_later_layer_leaves_every_weight_unmerged(monkeypatch, unload, error):
    model = randomize_(add_lora(tiny_bert(), ["query", "value"], rank=4), seed=5)
    before = snapshot(model)
    delta, calls = LoRALinear.delta_weight, []

    def fail_on_the_third(self):
        calls.append(self)
        if len(calls) == 3:
            raise error
        return delta(self)
    monkeypatch.setattr(LoRALinear, "delta_weight", fail_on_the_third)
    with pytest.raises(type(error)):
        merge_lora(model, unload=unload)
    assert_unchanged(model, before)
    assert not any(layer.merged for layer in calls)
    monkeypatch.undo()
    logits = model(input_ids=IDS).logits
    torch.testing.assert_close(merge_lora(model, unload=unload)(input_ids=IDS).logits, logits)  # a retry works


@pytest.mark.parametrize("error", INTERRUPTS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("injected", [False, True])
def test_lora_load_interrupted_rolls_back(tmp_path, monkeypatch, error, injected):
    _, path = trained_lora(tmp_path)
    model = tiny_bert(seed=1)
    if injected:
        randomize_(add_lora(model, ["query", "value"], rank=4, modules_to_save=["classifier"]), seed=5)
    before = snapshot(model)

    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(adapter_files, "copy_tensors", fail)
    with pytest.raises(type(error)):
        lora.load_adapter(model, path)
    assert_unchanged(model, before)


@pytest.mark.parametrize("error", INTERRUPTS, ids=lambda e: type(e).__name__)
def test_adapters_load_interrupted_rolls_back(tmp_path, monkeypatch, error):
    path = adapters_module.save_adapter(add_adapters(tiny_bert(), "houlsby", reduction_factor=4),
                                        tmp_path / "a.safetensors")
    model = tiny_bert(seed=1)
    before = snapshot(model)

    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(adapter_files, "copy_tensors", fail)
    with pytest.raises(type(error)):
        adapters_module.load_adapter(model, path)
    assert_unchanged(model, before)


def test_copy_that_fails_halfway_puts_the_earlier_tensors_back():
    model = randomize_(add_lora(tiny_bert(), ["query", "value"], rank=4))
    before = snapshot(model)
    names = sorted(lora.adapter_state_dict(model))
    tensors = {n: torch.full_like(model.get_parameter(n), 7.0) for n in names}
    tensors[names[-1]] = torch.empty(model.get_parameter(names[-1]).shape, device="meta")  # copy_ fails on it
    with pytest.raises((NotImplementedError, RuntimeError)):
        adapter_files.copy_tensors(model, tensors, names)
    assert_unchanged(model, before)


@pytest.mark.parametrize("step", ["building a LoRALinear", "swapping it in"])
@pytest.mark.parametrize("error", INTERRUPTS, ids=lambda e: type(e).__name__)
def test_add_lora_interrupted_at_each_step_rolls_back(monkeypatch, step, error):
    model = tiny_bert()
    model.bert.embeddings.requires_grad_(False)  # the user's own flags must come back too
    before = snapshot(model)
    owner, name = (LoRALinear, "__init__") if step.startswith("building") else (nn.Module, "set_submodule")
    real, calls = getattr(owner, name), []

    def third_call_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise error
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, third_call_fails)
    with pytest.raises(type(error)):
        add_lora(model, ["query", "value"], modules_to_save=["classifier"])
    assert len(calls) >= 3
    assert_unchanged(model, before)


@pytest.mark.parametrize("error", INTERRUPTS, ids=lambda e: type(e).__name__)
def test_add_adapters_interrupted_after_wrapping_rolls_back(monkeypatch, error):
    model = tiny_bert()
    before = snapshot(model)

    def fail(self, requires_grad=True):
        raise error
    monkeypatch.setattr(BottleneckAdapter, "requires_grad_", fail, raising=False)  # after every wrap
    with pytest.raises(type(error)):
        add_adapters(model, "houlsby", reduction_factor=4, modules_to_save=["classifier"])
    assert_unchanged(model, before)
    monkeypatch.undo()
    add_adapters(model, "houlsby", reduction_factor=4)  # and it can be added afterwards
    assert remove_adapters(model) is model


@pytest.mark.parametrize("error", INTERRUPTS, ids=lambda e: type(e).__name__)
def test_add_adapters_interrupted_while_swapping_in_rolls_back(monkeypatch, error):
    model = tiny_bert()
    model.bert.embeddings.requires_grad_(False)  # the user's own flags must come back too
    before = snapshot(model)
    real, calls = nn.Module.set_submodule, []

    def third_call_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise error
        return real(*args, **kwargs)
    monkeypatch.setattr(nn.Module, "set_submodule", third_call_fails)
    with pytest.raises(type(error)):
        add_adapters(model, "houlsby", reduction_factor=4, modules_to_save=["classifier"])
    assert_unchanged(model, before)


def test_add_adapters_failing_while_building_changes_nothing(monkeypatch):
    model = tiny_bert()
    before = snapshot(model)
    real, calls = BottleneckAdapter.__init__, []

    def second_fails(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("out of memory")
        real(self, *args, **kwargs)
    monkeypatch.setattr(adapters_module.BottleneckAdapter, "__init__", second_fails)
    with pytest.raises(MemoryError):
        add_adapters(model, "houlsby", reduction_factor=4)
    assert_unchanged(model, before)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), True])
def test_lora_alpha_must_be_finite(alpha):
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        add_lora(model, ["query"], alpha=alpha)
    assert_unchanged(model, before)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), True])
def test_lora_linear_alpha_must_be_finite(alpha):
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        LoRALinear(nn.Linear(4, 4), alpha=alpha)


def test_lora_saved_nan_alpha_is_refused_before_injecting(tmp_path):
    _, path = trained_lora(tmp_path)
    tensors, config = adapter_files.load_tensors(path)
    bad = adapter_files.save_tensors(tensors, tmp_path / "nan.safetensors", {**config, "alpha": float("nan")})
    model = tiny_bert(seed=1)
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"{bad} holds a lora config that cannot be used.*alpha must be a positive"):
        lora.load_adapter(model, bad)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"target_modules": 3}, TypeError, "target_modules must be a module name or a list"),
    ({"target_modules": ["query", None]}, TypeError, "target_modules"),
    ({"target_modules": ["query"], "modules_to_save": [nn.Linear(1, 1)]}, TypeError, "modules_to_save"),
    ({"target_modules": ["query"], "rslora": "yes"}, TypeError, "rslora must be True or False"),
    ({"target_modules": ["query"], "dropout": "0.1"}, ValueError, "dropout"),
])
def test_add_lora_argument_checks(kwargs, error, message):
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        add_lora(model, **kwargs)
    assert_unchanged(model, before)


def test_add_lora_needs_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        add_lora("bert", ["query"])


def test_entry_points_check_model_and_path_types(tmp_path):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        lora.load_adapter("bert", tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        adapters_module.load_adapter(None, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        lora.load_adapter(tiny_bert(), 42)
    with pytest.raises(TypeError, match="base_model_name_or_path"):
        export_peft(add_lora(tiny_bert(), ["query"]), tmp_path / "out", 42)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        lora.save_adapter(add_lora(tiny_bert(), ["query"]), tmp_path)
    with pytest.raises(TypeError, match="config must hold only JSON"):
        adapter_files.save_tensors({"a": torch.ones(1)}, tmp_path / "a.safetensors", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_add_adapters_on_a_4bit_llama():
    model = quantize_model(tiny_llama())
    add_adapters(model, "houlsby", reduction_factor=4)
    o_proj = model.model.layers[0].self_attn.o_proj
    assert isinstance(o_proj, AdaptedSublayer) and o_proj.adapter.adapter_down.weight.dtype == torch.float32
    model(input_ids=IDS).logits.pow(2).mean().backward()
    assert o_proj.adapter.adapter_up.weight.grad.abs().sum() > 0


# --- 4. a peft export is written whole or not at all ----------------------------------------------

def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def exported(tmp_path):
    out = tmp_path / "export"
    export_peft(randomize_(add_lora(tiny_bert(), ["query", "value"], rank=4, alpha=8)), out, "tiny")
    (out / "README.md").write_text("my notes")  # a file of the user's, kept by every re-export
    return out, folder_bytes(out)


@pytest.mark.parametrize("where", ["weights", "config", "swap"])
@pytest.mark.parametrize("error", INTERRUPTS, ids=lambda e: type(e).__name__)
def test_interrupted_re_export_leaves_the_old_export(tmp_path, monkeypatch, where, error):
    out, old = exported(tmp_path)
    new = randomize_(add_lora(tiny_bert(), ["query", "value"], rank=4, alpha=32), seed=11)

    def fail(*args, **kwargs):
        raise error
    if where == "weights":
        monkeypatch.setattr(adapter_files, "save_file", fail)
    elif where == "config":
        monkeypatch.setattr(type(out), "write_text", fail)
    else:  # the old folder moved aside, the new one not yet in place
        real_rename, calls = os.rename, []

        def second_rename_fails(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                raise error
            real_rename(src, dst)
        monkeypatch.setattr(adapter_files.os, "rename", second_rename_fails)
    with pytest.raises(type(error)):
        export_peft(new, out, "tiny")
    monkeypatch.undo()
    assert folder_bytes(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp files beside it


def test_re_export_replaces_both_files_and_keeps_others(tmp_path):
    out, old = exported(tmp_path)
    export_peft(randomize_(add_lora(tiny_bert(), ["query", "value"], rank=4, alpha=32), seed=11), out, "tiny")
    now = folder_bytes(out)
    assert sorted(now) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert now["README.md"] == b"my notes" and now["adapter_model.safetensors"] != old["adapter_model.safetensors"]
    assert json.loads(now["adapter_config.json"])["lora_alpha"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_into_a_file_or_the_working_folder_is_refused(tmp_path, monkeypatch):
    model = add_lora(tiny_bert(), ["query"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        export_peft(model, tmp_path / "file", None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="working folder"):
        export_peft(model, ".", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_interrupted_save_leaves_the_old_file(tmp_path, monkeypatch):
    model, path = trained_lora(tmp_path)
    old = path.read_bytes()

    def fail(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(adapter_files, "save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        lora.save_adapter(randomize_(model, seed=8), path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


# --- 5. corrupt files name their path ------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
@pytest.mark.parametrize("technique", ["lora", "adapters"])
def test_corrupt_file_error_names_the_path(tmp_path, damage, technique):
    if technique == "lora":
        _, path = trained_lora(tmp_path)
        load = lora.load_adapter
    else:
        path = adapters_module.save_adapter(add_adapters(tiny_bert(), "pfeiffer", reduction_factor=4),
                                            tmp_path / "a.safetensors")
        load = adapters_module.load_adapter
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) - 100], "garbage": b"\x00not a safetensors file" * 50,
                      "empty": b""}[damage])
    model = tiny_bert(seed=1)
    before = snapshot(model)
    with pytest.raises(ValueError, match="not a complete safetensors file") as info:
        load(model, path)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, SafetensorError)
    assert_unchanged(model, before)


def test_file_with_a_broken_config_names_the_path(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "bad.safetensors"
    save_file({"a": torch.ones(2)}, path, metadata={"config": "{not json"})
    with pytest.raises(ValueError, match=f"cannot read {path}") as info:
        adapter_files.load_tensors(path)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


def test_lora_file_whose_config_is_no_object_names_the_path(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "bad.safetensors"
    save_file({"a": torch.ones(2)}, path, metadata={"config": "[1, 2]"})
    with pytest.raises(ValueError, match=f"cannot read {path}.*not a JSON object"):
        lora.load_adapter(tiny_bert(), path)


def copied_lora(folder, *siblings):
    """lora.py copied into ``folder`` (with ``siblings`` from peftkit) and imported from there, outside peftkit."""
    import importlib.util
    import shutil

    for name in siblings:  # lora.py needs only torch; its docstring names the files that add features
        shutil.copy(os.path.join(os.path.dirname(lora.__file__), name), folder)
    spec = importlib.util.spec_from_file_location("lora", shutil.copy(lora.__file__, folder / "lora.py"))
    alone = importlib.util.module_from_spec(spec)
    sys.modules["lora"] = alone  # what a copied sibling's `import lora` finds, as in the project
    spec.loader.exec_module(alone)
    return alone


@pytest.fixture
def forget_copies():
    yield
    for name in ("lora", "targets", "lora_files", "adapter_files"):
        sys.modules.pop(name, None)


def test_copied_lora_file_still_works_alone(tmp_path, forget_copies):
    alone = copied_lora(tmp_path)
    model = alone.add_lora(tiny_bert(), ["query"], alpha=4)
    with pytest.raises(ValueError, match="finite"):
        alone.add_lora(tiny_bert(), ["query"], alpha=float("nan"))
    assert copy.deepcopy(model).adapter_config.alpha == 4


def test_copied_lora_file_saves_only_with_lora_files_and_adapter_files_beside_it(tmp_path, monkeypatch,
                                                                                 forget_copies):
    import importlib
    import shutil

    alone = copied_lora(tmp_path)
    model = randomize_(alone.add_lora(tiny_bert(), ["query"], alpha=4))
    monkeypatch.syspath_prepend(str(tmp_path))  # the project's folder, where `import lora_files` finds the copies
    for missing in ("lora_files", "adapter_files"):
        with pytest.raises(ImportError, match=f"{missing}.py must be beside lora.py"):
            alone.save_adapter(model, tmp_path / "a.safetensors")
        shutil.copy(os.path.join(os.path.dirname(lora.__file__), f"{missing}.py"), tmp_path)
        importlib.invalidate_caches()
    path = alone.save_adapter(model, tmp_path / "a.safetensors")
    fresh = tiny_bert()
    assert alone.load_adapter(fresh, path) == model.adapter_config
    assert torch.equal(fresh(input_ids=IDS).logits, model(input_ids=IDS).logits)

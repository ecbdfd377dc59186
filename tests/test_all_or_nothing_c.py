"""Issue 14, part c: prompt methods validate first and roll back; the SmolLM2 cache is verified and
rebuilt when broken; prefix-tuning shifts caller position ids; data and loader arguments are checked.

Nothing here touches the real model cache: every cache test points PEFTKIT_CACHE at a temporary
folder and replaces the 15 s GGUF conversion with a tiny random Llama and a word-level tokenizer.
"""

import copy
import json
import warnings

import pytest
import torch
import transformers
from peft import PrefixTuningConfig, get_peft_model
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as token_models

from peftkit import adapter_files, data, models, prompt_tuning
from peftkit.data import (CausalLMCollator, ClassificationCollator, data_to_text, generation_batch,
                          topic_classification, topic_splits)
from peftkit.p_tuning import PromptEncoder, PTuningConfig, PTuningModel, load_adapter, save_adapter
from peftkit.prefix_tuning import PrefixTuningModel
from peftkit.prompt_tuning import PromptTuningModel, SoftPrompt

from tiny import assert_unchanged, short_bert, short_llama, snapshot  # noqa: E402

N = 4  # virtual tokens / prefix length


def word_tokenizer():
    """A word-level tokenizer built in memory (no download): unknown words map to <unk>."""
    vocab = {"<unk>": 0, "</s>": 1, "<pad>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(token_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                                pad_token="<pad>")


# --- (3) P-tuning load: checked before the encoder is replaced ----------------------------

def exported_file(tmp_path, hidden_size=32, n=N, export=True):
    model = PTuningModel(short_llama(seed=0, hidden_size=hidden_size), PTuningConfig(n, 16, "lstm"))
    if export:
        model.export_prompt()
    return save_adapter(model, tmp_path / f"prompt-{hidden_size}-{n}.safetensors")


@pytest.mark.parametrize("hidden_size, n, export, match", [
    (48, N, True, r"wrong shapes.*prompt_encoder"),  # a prompt for a wider model: the shapes differ
    (32, N + 1, True, r"its config differs in num_virtual_tokens \(file 5, model 4\)"),
    (48, N, False, r"wrong shapes.*prompt_encoder"),
])
def test_p_tuning_load_of_a_prompt_for_another_model_changes_nothing(tmp_path, hidden_size, n, export, match):
    path = exported_file(tmp_path, hidden_size, n, export)
    model = PTuningModel(short_llama(seed=0, hidden_size=32), PTuningConfig(N, 16, "lstm")).train()
    encoder, before = model.prompt_encoder, snapshot(model)
    with pytest.raises(ValueError, match=r"prompt-.*safetensors does not fit this model: .*" + match):
        load_adapter(model, path)
    assert model.prompt_encoder is encoder and not model.exported
    assert_unchanged(model, before)


@pytest.mark.parametrize("step, error", [("export", OSError), ("copy", KeyboardInterrupt)])
def test_p_tuning_load_rolls_back_a_failure_at_each_step(tmp_path, monkeypatch, step, error):
    path = exported_file(tmp_path)
    model = PTuningModel(short_llama(seed=0, hidden_size=32), PTuningConfig(N, 16, "lstm")).train()
    encoder, config, before = model.prompt_encoder, model.adapter_config, snapshot(model)

    def fail(*args, **kwargs):
        raise error("injected failure")

    if step == "export":
        monkeypatch.setattr(PromptEncoder, "forward", fail)
    else:
        monkeypatch.setattr(adapter_files, "copy_tensors", fail)
    with pytest.raises(error, match="injected"):
        load_adapter(model, path)
    assert model.prompt_encoder is encoder and model.adapter_config is config and not model.exported
    assert_unchanged(model, before)  # the encoder's training mode too (export switches it to eval)


def test_p_tuning_load_of_an_exported_file_succeeds_after_a_rolled_back_failure(tmp_path, monkeypatch):
    path = exported_file(tmp_path)
    model = PTuningModel(short_llama(seed=0, hidden_size=32), PTuningConfig(N, 16, "lstm")).train()

    def fail(self):
        raise OSError("injected failure")

    monkeypatch.setattr(PromptEncoder, "forward", fail)
    with pytest.raises(OSError, match="injected"):
        load_adapter(model, path)
    monkeypatch.undo()
    load_adapter(model, path)  # the same file loads once nothing fails
    assert model.exported


def test_prompt_tuning_load_interrupted_mid_copy_changes_nothing(tmp_path, monkeypatch):
    bert = short_bert(seed=0)
    trained = PromptTuningModel(copy.deepcopy(bert), num_virtual_tokens=N)
    with torch.no_grad():
        for p in prompt_tuning.adapter_state_dict(trained).values():
            p.add_(1.0)  # stands in for training
    path = prompt_tuning.save_adapter(trained, tmp_path / "prompt.safetensors")
    model = PromptTuningModel(copy.deepcopy(bert), num_virtual_tokens=N)
    before, real_copy, calls = snapshot(model), torch.Tensor.copy_, []

    def interrupted_copy(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 2:  # the first tensor is already in: the copy must be undone
            raise KeyboardInterrupt
        return real_copy(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", interrupted_copy)
    with pytest.raises(KeyboardInterrupt):
        prompt_tuning.load_adapter(model, path)
    monkeypatch.undo()
    assert len(calls) > 2  # the values were put back
    assert_unchanged(model, before)


# --- (3) constructors: every argument checked before the base model is frozen ------------

@pytest.mark.parametrize("kwargs", [dict(num_virtual_tokens=0), dict(num_virtual_tokens=-2),
                                    dict(num_virtual_tokens=2.5), dict(encoder_hidden_size=0)])
def test_prefix_tuning_bad_arguments_leave_the_model_trainable(kwargs):
    llama = short_llama(seed=0)
    before = snapshot(llama)
    with pytest.raises(ValueError, match="positive integer"):
        PrefixTuningModel(llama, **kwargs)
    assert_unchanged(llama, before)
    assert all(p.requires_grad for p in llama.parameters())


@pytest.mark.parametrize("shape, match", [((2, 2, 4, 3, 8), r"\(2, 2, 2, 3, 8\)"),  # 4 heads, the model has 2
                                          ((2, 2, 2, 0, 8), "num_virtual_tokens")], ids=["heads", "empty"])
def test_from_prefix_of_the_wrong_shape_leaves_the_model_trainable(shape, match):
    llama = short_llama(seed=0)
    before = snapshot(llama)
    with pytest.raises(ValueError, match=match):
        PrefixTuningModel.from_prefix(llama, torch.zeros(shape))
    assert_unchanged(llama, before)
    assert all(p.requires_grad for p in llama.parameters())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_virtual_tokens=0), ValueError, "positive integer"),
    (dict(num_virtual_tokens=32), ValueError, "max_position_embeddings=32"),
    (dict(init="zeros"), ValueError, "init must be one of"),
    (dict(token_dim=64), ValueError, "token_dim=64"),
    (dict(init="text"), ValueError, "tokenizer"),
    (dict(modules_to_save=["head"]), ValueError, "modules_to_save names 'head'"),
    (dict(modules_to_save="classifier"), TypeError, r"\['classifier'\]"),
    (dict(prompt_encoder=SoftPrompt(N, 16)), ValueError, "token_dim=16"),
])
def test_prompt_tuning_bad_arguments_leave_the_model_trainable(kwargs, error, match):
    bert = short_bert()
    before = snapshot(bert)
    with pytest.raises(error, match=match):
        PromptTuningModel(bert, **{"num_virtual_tokens": N, **kwargs})
    assert_unchanged(bert, before)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
    (dict(encoder_hidden_size=0), "encoder_hidden_size must be a positive integer"),
    (dict(kind="gru"), "kind must be one of"),
    (dict(kind="lstm", dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(kind="lstm", dropout=None), r"dropout must be in \[0, 1\)"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
])
def test_p_tuning_config_refuses_bad_fields_before_any_model_is_touched(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PTuningConfig(**kwargs)


@pytest.mark.parametrize("config, match", [
    (PTuningConfig(num_virtual_tokens=40), "max_position_embeddings=32"),
    (PTuningConfig(modules_to_save=["head"]), "modules_to_save names 'head'"),
])
def test_p_tuning_config_that_does_not_fit_leaves_the_model_trainable(config, match):
    llama = short_llama(seed=0)
    before = snapshot(llama)
    with pytest.raises(ValueError, match=match):
        PTuningModel(llama, config)
    assert_unchanged(llama, before)


# --- (7) prefix-tuning: caller position ids are shifted by the prefix length -------------

def prefix_pair():
    """Our table prefix and peft's, holding the same random table, on one tiny Llama."""
    llama = short_llama(seed=0)
    ours = PrefixTuningModel(copy.deepcopy(llama), num_virtual_tokens=N, projection=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(llama), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    with torch.no_grad():
        ours.prefix_encoder.embedding.weight.normal_()  # a non-trivial prefix
        theirs.prompt_encoder.default.embedding.weight.copy_(ours.prefix_encoder.embedding.weight)
    return ours, theirs


INPUT_IDS = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_caller_position_ids_give_the_default_paths_logits_and_peft_agrees():
    ours, theirs = prefix_pair()
    positions = torch.arange(6).expand(2, -1)  # what the caller passes for unpadded rows
    explicit = ours(input_ids=INPUT_IDS, position_ids=positions).logits
    torch.testing.assert_close(explicit, ours(input_ids=INPUT_IDS).logits, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = theirs(input_ids=INPUT_IDS, position_ids=positions).logits
    torch.testing.assert_close(explicit, reference, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_hugging_face_positions_of_a_left_padded_row_give_the_default_logits():
    ours, _ = prefix_pair()
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    hf_positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as Hugging Face numbers them
    default = ours(input_ids=INPUT_IDS, attention_mask=mask).logits
    explicit = ours(input_ids=INPUT_IDS, attention_mask=mask, position_ids=hf_positions).logits
    torch.testing.assert_close(explicit[mask.bool()], default[mask.bool()], rtol=0, atol=0)


def test_position_ids_of_another_length_are_refused():
    ours, _ = prefix_pair()
    with pytest.raises(ValueError, match=r"position_ids must have one position per input token \(6\)"):
        ours(input_ids=INPUT_IDS, position_ids=torch.arange(5)[None])


# --- (8) prompt-tuning generate with several sequences per input -------------------------

def test_prompt_tuning_generates_several_sampled_sequences_per_input():
    model = PromptTuningModel(short_llama(seed=0), num_virtual_tokens=N)
    input_ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(2))
    out = model.generate(input_ids, do_sample=True, num_return_sequences=2, max_new_tokens=3, pad_token_id=0)
    assert out.shape == (4, 8)
    assert torch.equal(out[:, :5], input_ids.repeat_interleave(2, dim=0))  # HF's order: each input k times
    greedy = model.generate(input_ids, do_sample=False, max_new_tokens=3, pad_token_id=0)
    assert greedy.shape == (2, 8)
    with pytest.raises(ValueError, match="return_dict_in_generate=False"):
        model.generate(input_ids, max_new_tokens=3, return_dict_in_generate=True)


# --- (5) the SmolLM2 cache: verified, rebuilt when broken, written atomically ------------

@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """PEFTKIT_CACHE in a temporary folder; the converter writes a tiny Llama and counts its calls."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    calls = []

    def convert(folder):
        calls.append(folder)
        config = transformers.LlamaConfig(vocab_size=5, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=16, eos_token_id=1, pad_token_id=2)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
        word_tokenizer().save_pretrained(folder)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return tmp_path / models.CAUSAL_LM_CACHE, calls


def load_quietly():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tokenizer = models.load_causal_lm()
    return model, tokenizer, [str(w.message) for w in caught if "SmolLM2 cache" in str(w.message)]


def test_cache_is_built_once_with_a_marker_listing_every_file(fake_cache):
    target, calls = fake_cache
    model, tokenizer, warned = load_quietly()
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.pad_token == "<pad>"
    assert len(calls) == 1 and not warned
    files = json.loads((target / models.MARKER).read_text())["files"]
    on_disk = {p.name: p.stat().st_size for p in target.iterdir() if p.name != models.MARKER}
    assert {name: entry["size"] for name, entry in files.items()} == on_disk
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= on_disk.keys()
    assert [p.name for p in target.parent.iterdir()] == [target.name], "temporary folders were left behind"
    load_quietly()
    assert len(calls) == 1, "a sound cache was converted again"


def test_marker_is_written_last_and_the_folder_renamed_into_place(fake_cache, monkeypatch):
    target, _ = fake_cache
    real = models._write_marker
    seen = []

    def check_then_write(folder):
        seen.append((folder != target, not target.exists(), (folder / "model.safetensors").is_file()))
        real(folder)

    monkeypatch.setattr(models, "_write_marker", check_then_write)
    load_quietly()
    assert seen == [(True, True, True)], "the marker must be written in the temporary folder, after the model"


@pytest.mark.parametrize("where", ["convert", "marker", "rename"])
def test_interrupted_build_leaves_no_cache_and_no_temporary_folder(fake_cache, monkeypatch, where):
    target, _ = fake_cache

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "convert":
        monkeypatch.setattr(models, "_convert_gguf", interrupt)
    elif where == "marker":
        monkeypatch.setattr(models, "_write_marker", interrupt)
    else:
        monkeypatch.setattr(models.Path, "rename", interrupt)
    with pytest.raises(KeyboardInterrupt):
        models.load_causal_lm()
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "marker"])
def test_broken_cache_is_detected_and_rebuilt(fake_cache, damage):
    target, calls = fake_cache
    load_quietly()
    weights = target / "model.safetensors"
    good = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":  # same size, so only the failed load and the hashes find it
        weights.write_bytes(b"\xff" * len(good))
    elif damage == "delete":
        weights.unlink()
    else:
        (target / models.MARKER).write_text("{not json")
    model, _, warned = load_quietly()
    assert len(calls) == 2 and len(warned) == 1 and "rebuilding" in warned[0]
    if damage != "marker":
        assert "model.safetensors" in warned[0]
    assert weights.read_bytes() == good and models._cache_problem(target, hashes=True) is None
    assert [p.name for p in target.parent.iterdir()] == [target.name]


@pytest.mark.parametrize("where", ["convert", "rename"])
def test_interrupted_rebuild_keeps_the_broken_cache_as_it_was(fake_cache, monkeypatch, where):
    target, _ = fake_cache
    load_quietly()
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    def interrupt(folder):
        raise KeyboardInterrupt

    rename = models.Path.rename

    def interrupt_new_folder_only(self, destination):
        if self.name.startswith(f".{target.name}.") and not self.name.endswith(".old"):
            raise KeyboardInterrupt  # the broken cache has just been moved aside
        return rename(self, destination)

    if where == "convert":
        monkeypatch.setattr(models, "_convert_gguf", interrupt)
    else:
        monkeypatch.setattr(models.Path, "rename", interrupt_new_folder_only)
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models.load_causal_lm()
    assert weights.stat().st_size == 100 and [p.name for p in target.parent.iterdir()] == [target.name]


def test_a_cache_from_an_older_peftkit_is_kept_if_it_loads(fake_cache):
    target, calls = fake_cache
    load_quietly()
    (target / models.MARKER).unlink()  # what an older peftkit left: a complete folder, no marker
    _, _, warned = load_quietly()
    assert len(calls) == 1 and not warned
    assert models._cache_problem(target, hashes=True) is None  # its marker is written now
    (target / models.MARKER).unlink()
    (target / "model.safetensors").write_bytes(b"\x00" * 50)  # an older, broken one is rebuilt
    load_quietly()
    assert len(calls) == 2


def test_an_error_that_is_not_the_caches_is_raised_without_a_rebuild(fake_cache, monkeypatch):
    target, calls = fake_cache
    load_quietly()

    def broken_tokenizer(*args, **kwargs):
        raise RuntimeError("tokenizer library failure")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken_tokenizer)
    with pytest.raises(RuntimeError, match="tokenizer library failure"):
        models.load_causal_lm()
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", ["float32", torch.int8, None])
def test_load_causal_lm_checks_dtype_before_touching_the_cache(fake_cache, dtype):
    target, calls = fake_cache
    with pytest.raises(TypeError, match="floating torch.dtype"):
        models.load_causal_lm(dtype=dtype)
    assert not calls and list(target.parent.iterdir()) == []


# --- (8) argument checks of the loaders and the data functions ---------------------------

class Checked(Exception):
    """Raised instead of loading the encoder: the arguments passed every check."""


@pytest.fixture
def checks_only(monkeypatch):
    def stop(dist_name):
        raise Checked

    monkeypatch.setattr(models, "package_dir", stop)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_labels=0), "num_labels must be an int >= 2"),
    (dict(num_labels=1), "num_labels must be an int >= 2"),
    (dict(num_labels=True), "num_labels must be an int >= 2"),
    (dict(num_labels=3.0), "num_labels must be an int >= 2"),
    (dict(num_labels=3, id2label={0: "a", 1: "b"}), r"0..num_labels-1.*\[0, 1\].*num_labels=3"),
    (dict(num_labels=2, id2label={0: "a", 1: "b", 2: "c"}), "0..num_labels-1"),
    (dict(id2label={0: "a", 1: "b"}), "num_labels=None"),
    (dict(num_labels=2, id2label=["a", "b"]), "must be a dict.*list"),
    (dict(num_labels=2, id2label={0: "a", 1: "a"}), "its own name"),
    (dict(num_labels=2, pooling="max"), "pooling must be one of"),
])
def test_load_encoder_rejects_bad_heads_before_loading(checks_only, kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.load_encoder(**kwargs)


def test_load_encoder_accepts_twelve_named_classes(checks_only):
    with pytest.raises(Checked):  # 10 and 11 sort before 2 as text: the check must not compare text order
        models.load_encoder(num_labels=12, id2label={i: f"class {i}" for i in range(12)})


@pytest.mark.parametrize("call, match", [
    (lambda: topic_classification(max_per_topic=0), "max_per_topic must be a positive integer"),
    (lambda: topic_classification(max_per_topic=-5), "max_per_topic must be a positive integer"),
    (lambda: topic_classification(test_size=0.0), r"test_size must be a share in \(0, 1\)"),
    (lambda: topic_classification(test_size=1.0), r"test_size must be a share in \(0, 1\)"),
    (lambda: topic_classification(test_size=-3), r"test_size must be a share in \(0, 1\)"),
    (lambda: topic_classification(topics=()), "at least one topic"),
    (lambda: topic_classification(topics=("ai", "ai")), "each once"),
    (lambda: topic_splits(validation_size=0), r"validation_size.*\(0, 1\)"),
    (lambda: data_to_text(n_train=0), "n_train must be a positive integer"),
    (lambda: data_to_text(n_test=-1), "n_test must be a positive integer"),
    (lambda: data_to_text(n_train=2.5), "n_train must be a positive integer"),
])
def test_data_functions_reject_empty_and_negative_sizes(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_one_topic_may_be_named_by_a_string():
    split = topic_classification(topics="ai", max_per_topic=8)
    assert split["train"].features["label"].names == ["ai"] and len(split["train"]) + len(split["test"]) == 8


def test_collators_reject_sizes_that_leave_nothing():
    tok = word_tokenizer()
    for collator in (CausalLMCollator, ClassificationCollator):
        for bad in (0, -1, 2.0, None):
            with pytest.raises(ValueError, match="max_length must be a positive integer"):
                collator(tok, max_length=bad)
        with pytest.raises(ValueError, match="no examples"):
            collator(tok)([])
    example = {"mr": "name[A] food[B] area[riverside] price[cheap]", "text": "hello world"}
    prompt_tokens = len(tok(data.lm_prompt(example["mr"]), add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match=f"max_length={prompt_tokens} cuts off the whole sentence.*"
                                         f"max_length > {prompt_tokens}"):
        CausalLMCollator(tok, max_length=prompt_tokens)([example])
    batch = CausalLMCollator(tok, max_length=prompt_tokens + 1)([example])
    assert batch["labels"].shape == (1, prompt_tokens + 1) and batch["labels"][0, -1] != -100
    with pytest.raises(ValueError, match="non-empty list"):
        generation_batch(tok, [])

"""Prefix-tuning checked against peft's PrefixEncoder / PeftModelForCausalLM on tiny random models.

Note: with peft 0.21.2 and transformers 5.24, peft's own ``generate`` drops the prefix (its cache
is overridden by the one ``generate`` creates), so generation is checked against greedy decoding
through peft's ``forward``, which does use the prefix.
"""

import copy
import importlib.util
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import transformers
import peft
from torch.testing import assert_close

from peftkit.adapter_files import load_tensors, save_tensors
from peftkit.prefix_tuning import (SUPPORTED_MODEL_TYPES, PrefixEncoder, PrefixTuningConfig, PrefixTuningModel,
                                   adapter_state_dict, load_adapter, save_adapter)
from peftkit.train import generate as generate_text

from families import build  # noqa: E402
from families import inputs as family_inputs  # noqa: E402
from tiny import VOCAB_SIZE, assert_unchanged, snapshot, tiny_bert, tiny_llama  # noqa: E402

P = 4  # prefix length used throughout


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; more only adds contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lm(family="llama", seed=0):
    """A random causal LM with grouped-query attention: 4 query heads share 2 key/value heads."""
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    return tiny_llama(seed, config_class=config_class, model_class=model_class, max_position_embeddings=None)


def peft_prefix(model, task_type="CAUSAL_LM", **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's forward uses the deprecated `past_key_values` name
        return peft.get_peft_model(copy.deepcopy(model), peft.PrefixTuningConfig(task_type=task_type,
                                                                             num_virtual_tokens=P, **kwargs))


def peft_logits(peft_model, **inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft_model(**inputs).logits


def ids(batch=2, length=6, seed=1):
    return torch.randint(0, VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy_by_forward(logits_fn, input_ids, steps):
    """Reference decoder: re-run the full sequence every step, no cache reuse."""
    seq = input_ids
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, logits_fn(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def table_copy_of(reference, base):
    """Our table-only wrapper around a copy of ``base``, holding the same table as peft's ``reference``."""
    ours = PrefixTuningModel(copy.deepcopy(base), num_virtual_tokens=P, projection=False)
    with torch.no_grad():
        ours.prefix_encoder.embedding.weight.copy_(reference.prompt_encoder["default"].embedding.weight)
    return ours


def mlp_prefix(base=None):
    return PrefixTuningModel(base or tiny_lm(), num_virtual_tokens=P, projection=True, encoder_hidden_size=24)


# --- the formula, against peft ---

@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])  # GPT-2 and T5: below, "families"
def test_same_table_gives_peft_logits_and_loss(family):
    base = tiny_lm(family)
    reference = peft_prefix(base)
    ours = table_copy_of(reference, base)
    x, mask = ids(), torch.ones(2, 6, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = reference(input_ids=x, attention_mask=mask, labels=x)
    got = ours(input_ids=x, attention_mask=mask, labels=x)
    assert_close(got.logits, expected.logits, rtol=0, atol=0)
    assert_close(got.loss, expected.loss, rtol=0, atol=0)
    assert not torch.allclose(got.logits, base(input_ids=x).logits, atol=1e-3)  # the prefix does change the output


def test_inputs_embeds_give_peft_s_logits_and_those_of_the_ids():
    base = tiny_lm()
    reference = peft_prefix(base)
    ours = table_copy_of(reference, base)
    x, mask = ids(), torch.ones(2, 6, dtype=torch.long)
    embeds = base.get_input_embeddings()(x)  # (B, T, D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = reference(inputs_embeds=embeds, attention_mask=mask).logits
    got = ours(inputs_embeds=embeds, attention_mask=mask).logits
    assert_close(got, expected, rtol=0, atol=0)
    assert_close(got, ours(input_ids=x, attention_mask=mask).logits, rtol=0, atol=0)


def test_without_an_attention_mask_the_logits_are_peft_s():
    base = tiny_lm()
    reference = peft_prefix(base)
    x = ids()
    assert_close(table_copy_of(reference, base)(input_ids=x).logits, peft_logits(reference, input_ids=x), rtol=0, atol=0)


def test_table_and_mlp_have_peft_s_shapes_with_grouped_query_attention():
    reference = peft_prefix(tiny_lm(), prefix_projection=True, encoder_hidden_size=24)
    enc = mlp_prefix().prefix_encoder
    assert {k: v.shape for k, v in enc.state_dict().items()} == \
        {k: v.shape for k, v in reference.prompt_encoder["default"].state_dict().items()}
    assert enc.embedding.weight.shape == (P, 2 * 8)  # kv_heads * head_dim, not hidden_size (GQA)
    assert enc.transform[2].out_features == 2 * 2 * 2 * 8  # layers * (key, value) * kv_heads * head_dim
    assert enc().shape == (2, 2, 2, P, 8)  # (layers, key/value, kv_heads, P, head_dim)
    table = PrefixEncoder(num_layers=2, num_kv_heads=2, head_dim=8, num_virtual_tokens=P, projection=False)
    assert table.embedding.weight.shape == (P, 2 * 2 * 2 * 8)


def test_mlp_gives_peft_s_keys_values_and_logits():
    base = tiny_lm()
    reference = peft_prefix(base, prefix_projection=True, encoder_hidden_size=24)
    ours = mlp_prefix(copy.deepcopy(base))
    ours.prefix_encoder.load_state_dict(reference.prompt_encoder["default"].state_dict())  # same names and shapes
    x = ids()
    assert_close(ours(input_ids=x).logits, peft_logits(reference, input_ids=x), rtol=0, atol=0)
    with torch.no_grad():  # the keys and values each layer receives are exactly peft's
        peft_cache = reference.get_prompt(batch_size=2)
        our_cache = ours.prefix_cache(batch_size=2)
    for layer in range(2):
        assert our_cache.layers[layer].keys.shape == (2, 2, P, 8)  # (B, kv_heads, P, head_dim)
        assert_close(our_cache.layers[layer].keys, peft_cache.layers[layer].keys, rtol=0, atol=0)
        assert_close(our_cache.layers[layer].values, peft_cache.layers[layer].values, rtol=0, atol=0)


# --- training ---

def test_gradients_reach_only_the_prefix_encoder():
    ours = mlp_prefix()
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in ours.named_parameters() if n.startswith("prefix_encoder.")}
    x = ids(batch=4, length=8)
    ours(input_ids=x, labels=x).loss.backward()
    for name, p in ours.prefix_encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in ours.base_model.parameters())


def test_training_the_prefix_lowers_the_loss():
    ours = mlp_prefix()
    x = ids(batch=4, length=8)
    optimizer = torch.optim.Adam(ours.prefix_encoder.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = ours(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bfloat16_model_gets_a_bfloat16_prefix_and_float32_gradients():
    base = tiny_lm().to(torch.bfloat16)
    reference = peft_prefix(base)
    ours = table_copy_of(reference, base)
    x = ids()
    out = ours(input_ids=x, labels=x)
    assert out.logits.dtype == torch.bfloat16
    assert_close(out.logits, peft_logits(reference, input_ids=x), rtol=0, atol=0)
    out.loss.backward()
    assert ours.prefix_encoder.embedding.weight.grad.dtype == torch.float32


# --- padding, batches and generation ---

def test_generate_equals_step_by_step_greedy_forward():
    base = tiny_lm()
    reference = peft_prefix(base)
    ours = table_copy_of(reference, base)
    x = ids(batch=2, length=5)
    generated = ours.generate(x, max_new_tokens=6)
    assert generated.shape == (2, 11) and torch.equal(generated[:, :5], x)
    assert torch.equal(generated, greedy_by_forward(lambda s: peft_logits(reference, input_ids=s), x, 6))
    assert torch.equal(generated, greedy_by_forward(lambda s: ours(input_ids=s).logits, x, 6))
    # and the prefix matters: the frozen model alone continues differently
    assert not torch.equal(generated, greedy_by_forward(lambda s: base(input_ids=s).logits, x, 6))


class IdTokenizer:
    """What peftkit.train.generate needs of a tokenizer; token ids decode to their numbers."""

    def __init__(self, eos):
        self.eos_token_id = self.pad_token_id = eos

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(str(t) for t in row.tolist() if t != self.eos_token_id) for row in rows]


def test_train_generate_drives_the_prefix_model_and_stops_each_row_at_eos():
    ours = PrefixTuningModel(tiny_lm(), num_virtual_tokens=P, projection=False)
    x = ids(batch=2, length=5)
    free = ours.generate(x, max_new_tokens=6)  # no eos: six new tokens per row
    tokenizer = IdTokenizer(eos=free[0, 5].item())  # row 0's first new token ends row 0 at once
    texts = generate_text(ours, tokenizer, {"input_ids": x, "attention_mask": torch.ones_like(x)}, max_new_tokens=6)
    assert texts[0] == ""
    alone = ours.generate(x[1:], max_new_tokens=6, eos_token_id=tokenizer.eos_token_id)
    assert texts[1] == tokenizer.batch_decode(alone[:, 5:])[0]


def test_left_padded_batch_generates_what_each_row_generates_alone():
    ours = mlp_prefix()
    short, long = ids(1, 3, seed=2), ids(1, 6, seed=3)
    pad = 0
    batch = torch.cat([torch.cat([torch.full((1, 3), pad), short], dim=1), long])  # left padding
    mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()
    # positions count real tokens only, so the padded row reads exactly what it reads alone
    assert_close(ours(input_ids=batch, attention_mask=mask).logits[:1, 3:], ours(input_ids=short).logits)
    together = ours.generate(batch, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(together[0, 3:], ours.generate(short, max_new_tokens=5)[0])
    assert torch.equal(together[1], ours.generate(long, max_new_tokens=5)[0])


def test_the_prefix_is_expanded_to_any_batch():
    ours = mlp_prefix()
    x = ids(batch=3, length=6)
    together = ours(input_ids=x).logits
    for row in range(3):
        assert_close(together[row], ours(input_ids=x[row:row + 1]).logits[0])


def test_right_padding_leaves_the_real_tokens_alone():
    ours = mlp_prefix()
    x = ids(batch=1, length=6)
    padded = torch.cat([x, torch.zeros(1, 2, dtype=torch.long)], dim=1)  # two pad tokens on the right
    mask = torch.tensor([[1] * 6 + [0] * 2])
    assert_close(ours(input_ids=padded, attention_mask=mask).logits[:, :6], ours(input_ids=x).logits)


def test_generation_stops_at_eos_and_pads_finished_rows():
    ours = PrefixTuningModel(tiny_lm(), num_virtual_tokens=P, projection=False)
    x = ids(batch=2, length=4)
    free = ours.generate(x, max_new_tokens=6)
    eos = int(free[0, 5])  # row 0's second new token
    stopped = ours.generate(x, max_new_tokens=6, eos_token_id=eos, pad_token_id=99)
    assert torch.equal(stopped[0, :6], free[0, :6])
    assert (stopped[0, 6:] == 99).all()
    # each row alone, with its own first new token as eos: decoding stops after one step
    rows_alone = [ours.generate(x[i:i + 1], max_new_tokens=6, eos_token_id=int(free[i, 4])) for i in range(2)]
    assert [r.shape[1] for r in rows_alone] == [5, 5]


def test_a_cache_class_can_be_passed_in():
    made = []

    class CountingCache(transformers.DynamicCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    default = PrefixTuningModel(tiny_lm(), num_virtual_tokens=P, projection=False)
    custom = PrefixTuningModel(tiny_lm(), num_virtual_tokens=P, projection=False, cache_class=CountingCache)
    custom.prefix_encoder.load_state_dict(default.prefix_encoder.state_dict())
    x = ids()
    assert torch.equal(custom(input_ids=x).logits, default(input_ids=x).logits)
    assert len(made) == 1 and made[0].get_seq_length() == P + x.shape[1]


# --- exporting ---

def test_exported_prefix_drops_the_mlp_and_gives_the_same_outputs():
    base = tiny_lm()
    trained = mlp_prefix(base)
    prefix = trained.export_prefix()
    assert prefix.shape == (2, 2, 2, P, 8) and not prefix.requires_grad
    deployed = PrefixTuningModel.from_prefix(base, prefix)
    assert not hasattr(deployed.prefix_encoder, "transform")
    x = ids()
    assert torch.equal(deployed(input_ids=x).logits, trained(input_ids=x).logits)
    assert torch.equal(deployed.generate(x, max_new_tokens=4), trained.generate(x, max_new_tokens=4))
    assert torch.equal(deployed.export_prefix(), prefix)


def test_a_saved_exported_prefix_is_smaller_and_loads_into_a_table_wrapper(tmp_path):
    base = tiny_lm()
    trained = mlp_prefix(base)
    deployed = PrefixTuningModel.from_prefix(base, trained.export_prefix())
    full = save_adapter(trained, tmp_path / "trained.safetensors")
    small = save_adapter(deployed, tmp_path / "exported.safetensors")
    assert small.stat().st_size < full.stat().st_size
    reloaded = PrefixTuningModel(base, num_virtual_tokens=P, projection=False)
    load_adapter(reloaded, small)
    assert torch.equal(reloaded.export_prefix(), trained.export_prefix())


# --- the config and saving ---

def test_the_config_records_the_prefix_and_the_model_sizes():
    assert mlp_prefix().adapter_config == PrefixTuningConfig(num_virtual_tokens=P, projection=True,
                                                             encoder_hidden_size=24, num_layers=2, num_kv_heads=2,
                                                             head_dim=8)
    assert PrefixTuningConfig.technique == "prefix_tuning"


def test_without_the_mlp_the_config_has_no_hidden_size():
    wrapped = PrefixTuningModel(tiny_lm(), num_virtual_tokens=P, projection=False, encoder_hidden_size=24)
    assert wrapped.adapter_config.encoder_hidden_size is None


def test_adapter_state_dict_holds_the_prefix_encoder_only():
    ours = mlp_prefix()
    state = adapter_state_dict(ours)
    assert set(state) == {n for n, _ in ours.prefix_encoder.named_parameters(prefix="prefix_encoder")}
    assert all(torch.equal(state[n], p) for n, p in ours.named_parameters() if n in state)


def test_save_writes_the_tensors_and_the_tagged_config(tmp_path):
    ours = mlp_prefix()
    tensors, config = load_tensors(save_adapter(ours, tmp_path / "prefix.safetensors"))
    assert config == {"technique": "prefix_tuning", **asdict(ours.adapter_config)}
    assert tensors.keys() == adapter_state_dict(ours).keys()
    assert all(torch.equal(tensors[k], v) for k, v in adapter_state_dict(ours).items())


def test_save_load_round_trip_is_exact(tmp_path):
    base = tiny_lm()
    trained = mlp_prefix(base)
    path = save_adapter(trained, tmp_path / "prefix.safetensors")
    torch.manual_seed(123)
    fresh = mlp_prefix(base)
    x = ids()
    assert not torch.equal(fresh(input_ids=x).logits, trained(input_ids=x).logits)
    assert load_adapter(fresh, path) == trained.adapter_config
    for (name, a), (_, b) in zip(trained.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(fresh(input_ids=x).logits, trained(input_ids=x).logits)


def test_a_file_of_another_technique_is_refused_naming_both_and_changes_nothing(tmp_path):
    ours = mlp_prefix()
    path = tmp_path / "prompt.safetensors"  # the prefix's own names and shapes, but tagged as prompt tuning
    save_tensors({k: torch.zeros_like(v) for k, v in adapter_state_dict(ours).items()}, path,
                 {"technique": "prompt_tuning", "num_virtual_tokens": P})
    before = snapshot(ours)
    with pytest.raises(ValueError, match=r"prompt_tuning.*prefix_tuning"):
        load_adapter(ours, path)
    assert_unchanged(ours, before)


@pytest.mark.parametrize("other, difference", [
    (dict(num_virtual_tokens=P + 1), "num_virtual_tokens: file 4, model 5"),
    (dict(projection=False), "projection: file True, model False"),
    (dict(encoder_hidden_size=32), "encoder_hidden_size: file 24, model 32"),
    (dict(base=dict(num_key_value_heads=4)), "num_kv_heads: file 2, model 4"),
])
def test_a_prefix_of_another_config_is_refused_naming_the_difference_and_changes_nothing(tmp_path, other, difference):
    path = save_adapter(mlp_prefix(), tmp_path / "prefix.safetensors")
    settings = dict(num_virtual_tokens=P, projection=True, encoder_hidden_size=24)
    settings.update({k: v for k, v in other.items() if k != "base"})
    wrapped = PrefixTuningModel(tiny_llama(**other.get("base", {})), **settings)
    before = snapshot(wrapped)
    with pytest.raises(ValueError, match=difference):
        load_adapter(wrapped, path)
    assert_unchanged(wrapped, before)


def test_an_interrupted_load_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    base = tiny_lm()
    path = save_adapter(mlp_prefix(base), tmp_path / "prefix.safetensors")
    torch.manual_seed(1)
    ours = mlp_prefix(base)  # other values than the file's
    before = snapshot(ours)
    copy_ = torch.Tensor.copy_
    copied = []

    def interrupt_the_second_copy(self, src, *args, **kwargs):
        if isinstance(self, torch.nn.Parameter):
            copied.append(self)
            if len(copied) == 2:
                raise KeyboardInterrupt
        return copy_(self, src, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", interrupt_the_second_copy)
    with pytest.raises(KeyboardInterrupt):
        load_adapter(ours, path)
    monkeypatch.undo()
    assert len(copied) > 2  # the first parameter was copied, then put back
    assert not torch.equal(load_tensors(path)[0]["prefix_encoder.embedding.weight"],
                           before["tensors"]["prefix_encoder.embedding.weight"])  # so a half-done load would show
    assert_unchanged(ours, before)


@pytest.mark.parametrize("call", [lambda m, d: adapter_state_dict(m), lambda m, d: save_adapter(m, d / "a.safetensors"),
                                  lambda m, d: load_adapter(m, d / "a.safetensors")])
def test_saving_and_loading_take_the_wrapper_not_the_language_model(call, tmp_path):
    with pytest.raises(TypeError, match="PrefixTuningModel"):
        call(tiny_lm(), tmp_path)


def test_the_file_works_alone_with_torch_only(tmp_path, monkeypatch):
    for name in ("prefix_tuning.py", "prompt_tuning.py"):  # the file and the sibling its docstring names
        shutil.copy(Path(__file__).parents[1] / "peftkit" / name, tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.spec_from_file_location("prefix_tuning_alone", tmp_path / "prefix_tuning.py")
    alone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(alone)  # outside the package: saving looks for adapter_files.py beside it
    wrapped = alone.PrefixTuningModel(tiny_lm(), num_virtual_tokens=P, projection=False)
    assert wrapped(input_ids=ids()).logits.shape == (2, 6, VOCAB_SIZE)
    with pytest.raises(ImportError, match="adapter_files"):
        alone.save_adapter(wrapped, tmp_path / "a.safetensors")


# --- checks ---

@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True])
@pytest.mark.parametrize("build", [
    lambda n: PrefixTuningConfig(num_virtual_tokens=n),
    lambda n: PrefixEncoder(num_layers=2, num_kv_heads=2, head_dim=8, num_virtual_tokens=n),
    lambda n: PrefixTuningModel(tiny_lm(), num_virtual_tokens=n),
], ids=["config", "encoder", "model"])
def test_prefix_length_must_be_a_positive_integer(bad, build):
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        build(bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(encoder_hidden_size=0), "encoder_hidden_size must be a positive integer"),
    (dict(encoder_hidden_size=None), "encoder_hidden_size must be a positive integer"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
    (dict(num_kv_heads=1.5), "num_kv_heads must be a positive integer"),
    (dict(head_dim=-8), "head_dim must be a positive integer"),
])
def test_the_config_checks_its_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrefixTuningConfig(**kwargs)


@pytest.mark.parametrize("model, match", [
    (lambda: tiny_bert(seed=None, num_labels=None, eval_mode=False), r"llama.*gpt2.*t5.*'bert'.*prompt tuning"),
    (lambda: torch.nn.Linear(2, 2), "model_type None"),
])
def test_unsupported_models_are_refused_with_the_supported_families(model, match):
    with pytest.raises(ValueError, match=match):
        PrefixTuningModel(model())


@pytest.mark.parametrize("misuse, match", [
    (lambda m: m(input_ids=ids(), cache=transformers.DynamicCache()), "takes no cache"),
    (lambda m: m(attention_mask=torch.ones(2, 6)), "input_ids"),
    (lambda m: m.generate(ids(), max_new_tokens=0), "max_new_tokens"),
    (lambda m: m.generate(ids(), do_sample=True), "do_sample=False"),
    # 4 heads, but the model has 2 key/value heads
    (lambda m: PrefixTuningModel.from_prefix(m.base_model, torch.zeros(2, 2, 4, 3, 8)), r"\(2, 2, 2, 3, 8\)"),
    (lambda m: PrefixTuningModel.from_prefix(m.base_model, torch.zeros(3, 8)), "export_prefix"),
])
def test_misuse_gives_a_clear_error(misuse, match):
    with pytest.raises(ValueError, match=match):
        misuse(PrefixTuningModel(tiny_lm(), num_virtual_tokens=P, projection=False))


def test_gradient_checkpointing_is_refused():
    ours = PrefixTuningModel(tiny_lm(), num_virtual_tokens=P, projection=False)
    ours.base_model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        ours(input_ids=ids())


# --- families: GPT-2 and T5 against peft; the families without a cache are refused ---

@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("family, task", [("gpt2", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM")])
def test_gpt2_and_t5_match_peft_with_ids_or_embeddings(family, task, projection):
    model = build(family)
    reference = peft_prefix(model, task_type=task, prefix_projection=projection, encoder_hidden_size=24).eval()
    ours = PrefixTuningModel(copy.deepcopy(model), num_virtual_tokens=P, projection=projection, encoder_hidden_size=24)
    ours.prefix_encoder.load_state_dict(reference.prompt_encoder["default"].state_dict())  # strict: peft's names
    x = family_inputs(family)
    x["labels"] = x.get("decoder_input_ids", x["input_ids"])
    if family == "t5":  # the decoder's mask gets P ones in front, as peft gives it
        x["decoder_attention_mask"] = torch.ones_like(x["labels"])
        x["decoder_attention_mask"][1, -1] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = reference(**x)
    got = ours(**x)
    assert_close(got.logits, expected.logits)
    assert_close(got.loss, expected.loss)
    embedded = {k: v for k, v in x.items() if k != "input_ids"}
    assert_close(ours(inputs_embeds=model.get_input_embeddings()(x["input_ids"]), **embedded).logits, got.logits,
                 rtol=0, atol=0)
    got.loss.backward()
    assert {n for n, p in ours.named_parameters() if p.grad is not None} <= set(adapter_state_dict(ours))
    assert ours.prefix_encoder.embedding.weight.grad.abs().sum() > 0


def test_t5_prefix_is_in_the_decoder_self_attention_only():
    ours = PrefixTuningModel(build("t5"), num_virtual_tokens=P, projection=False)
    cache = ours.prefix_cache(2)
    assert cache.self_attention_cache.get_seq_length() == P and cache.cross_attention_cache.get_seq_length() == 0
    table = ours.export_prefix()  # (L, 2, H, P, D); peft's layout: decoder layer l reads table layer 2l mod L = 0
    assert torch.equal(cache.self_attention_cache.layers[1].keys[0], table[0, 0])


def test_gpt2_generate_equals_step_by_step_greedy_forward():
    ours = PrefixTuningModel(build("gpt2"), num_virtual_tokens=P, projection=False)
    x = family_inputs("gpt2")["input_ids"]
    expected = greedy_by_forward(lambda s: ours(input_ids=s).logits, x, 4)
    assert torch.equal(ours.generate(x, max_new_tokens=4), expected)


@pytest.mark.parametrize("family", ["bert", "roberta", "albert", "electra", "xlnet"])
def test_families_whose_layers_take_no_cache_are_refused_naming_the_family(family):
    model = build(family)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"llama.*gpt2.*t5.*model_type '{family}'"):
        PrefixTuningModel(model, num_virtual_tokens=P)
    assert_unchanged(model, before)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("misuse, match", [
    (lambda m: m(**family_inputs("t5"), position_ids=torch.arange(7)[None]), "pass no position_ids"),
    (lambda m: m.generate(family_inputs("t5")["input_ids"]), "decode step by step"),
])
def test_t5_misuse_gives_a_clear_error(misuse, match):
    with pytest.raises(ValueError, match=match):
        misuse(PrefixTuningModel(build("t5"), num_virtual_tokens=P))


def test_a_t5_whose_sizes_peft_cannot_lay_out_is_refused():
    with pytest.raises(ValueError, match="d_kv=4"):
        PrefixTuningModel(build("t5", d_kv=4), num_virtual_tokens=P)

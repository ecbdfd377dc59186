"""Prefix-tuning checked against peft's PrefixEncoder / PeftModelForCausalLM on tiny random models.

Note: with peft 0.21.2 and transformers 5.24, peft's own ``generate`` drops the prefix (its cache
is overridden by the one ``generate`` creates), so generation is checked against greedy decoding
through peft's ``forward``, which does use the prefix.
"""

import copy
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from peft import PrefixTuningConfig, get_peft_model
from torch.testing import assert_close

from peftkit.io import load_tensors
from peftkit.prefix_tuning import SUPPORTED_MODEL_TYPES, PrefixEncoder, PrefixTuningModel
from peftkit.train import generate as generate_text

from tiny import VOCAB_SIZE, tiny_bert, tiny_llama  # noqa: E402

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


def peft_prefix(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's forward uses the deprecated `past_key_values` name
        return get_peft_model(copy.deepcopy(model), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                                       **kwargs))


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


@pytest.mark.parametrize("family", SUPPORTED_MODEL_TYPES)
def test_same_table_gives_peft_logits_and_loss(family):
    base = tiny_lm(family)
    reference = peft_prefix(base)
    ours = PrefixTuningModel(copy.deepcopy(base), num_virtual_tokens=P, projection=False)
    table = reference.prompt_encoder["default"].embedding.weight
    assert ours.prefix_encoder.embedding.weight.shape == table.shape  # (P, layers * 2 * kv_heads * head_dim)
    with torch.no_grad():
        ours.prefix_encoder.embedding.weight.copy_(table)
    x, mask = ids(), torch.ones(2, 6, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = reference(input_ids=x, attention_mask=mask, labels=x)
    got = ours(input_ids=x, attention_mask=mask, labels=x)
    assert_close(got.logits, expected.logits, rtol=0, atol=0)
    assert_close(got.loss, expected.loss, rtol=0, atol=0)
    assert_close(ours(input_ids=x).logits, peft_logits(reference, input_ids=x), rtol=0, atol=0)  # no mask given
    assert not torch.allclose(got.logits, base(input_ids=x).logits, atol=1e-3)  # the prefix does change the output


def test_projection_matches_peft_mlp_and_shapes():
    base = tiny_lm()
    reference = peft_prefix(base, prefix_projection=True, encoder_hidden_size=24)
    ours = PrefixTuningModel(copy.deepcopy(base), num_virtual_tokens=P, projection=True, encoder_hidden_size=24)
    ours.prefix_encoder.load_state_dict(reference.prompt_encoder["default"].state_dict())  # same names and shapes
    enc = ours.prefix_encoder
    assert enc.embedding.weight.shape == (P, 2 * 8)  # kv_heads * head_dim, not hidden_size (GQA)
    assert enc.transform[2].out_features == 2 * 2 * 2 * 8  # layers * (key, value) * kv_heads * head_dim
    assert ours.export_prefix().shape == (2, 2, 2, P, 8)  # (layers, key/value, kv_heads, P, head_dim)
    x = ids()
    assert_close(ours(input_ids=x).logits, peft_logits(reference, input_ids=x), rtol=0, atol=0)
    with torch.no_grad():  # the keys and values each layer receives are exactly peft's
        peft_cache = reference.get_prompt(batch_size=2)
        our_cache = ours.prefix_cache(batch_size=2)
    for layer in range(2):
        assert our_cache.layers[layer].keys.shape == (2, 2, P, 8)  # (B, kv_heads, P, head_dim)
        assert_close(our_cache.layers[layer].keys, peft_cache.layers[layer].keys, rtol=0, atol=0)
        assert_close(our_cache.layers[layer].values, peft_cache.layers[layer].values, rtol=0, atol=0)


def test_gradients_reach_only_the_prefix_and_training_lowers_the_loss():
    ours = PrefixTuningModel(tiny_lm(), num_virtual_tokens=P, projection=True, encoder_hidden_size=24)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in ours.named_parameters() if n.startswith("prefix_encoder.")}
    x = ids(batch=4, length=8)
    optimizer = torch.optim.Adam(ours.prefix_encoder.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = ours(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            for name, p in ours.prefix_encoder.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert all(p.grad is None for p in ours.base_model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_generate_equals_step_by_step_greedy_forward():
    base = tiny_lm()
    reference = peft_prefix(base)
    ours = PrefixTuningModel(copy.deepcopy(base), num_virtual_tokens=P, projection=False)
    with torch.no_grad():
        ours.prefix_encoder.embedding.weight.copy_(reference.prompt_encoder["default"].embedding.weight)
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
    with pytest.raises(ValueError, match="do_sample=False"):
        ours.generate(x, do_sample=True)


def test_left_padded_batch_generates_what_each_row_generates_alone():
    ours = PrefixTuningModel(tiny_lm(), num_virtual_tokens=P, projection=True, encoder_hidden_size=24)
    short, long = ids(1, 3, seed=2), ids(1, 6, seed=3)
    pad = 0
    batch = torch.cat([torch.cat([torch.full((1, 3), pad), short], dim=1), long])  # left padding
    mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()
    # positions count real tokens only, so the padded row reads exactly what it reads alone
    assert_close(ours(input_ids=batch, attention_mask=mask).logits[:1, 3:], ours(input_ids=short).logits)
    together = ours.generate(batch, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(together[0, 3:], ours.generate(short, max_new_tokens=5)[0])
    assert torch.equal(together[1], ours.generate(long, max_new_tokens=5)[0])


def test_prefix_is_expanded_to_any_batch_and_right_padding_leaves_real_tokens_alone():
    ours = PrefixTuningModel(tiny_lm(), num_virtual_tokens=P, projection=True, encoder_hidden_size=24)
    x = ids(batch=3, length=6)
    together = ours(input_ids=x).logits
    for row in range(3):
        assert_close(together[row], ours(input_ids=x[row:row + 1]).logits[0])
    padded = torch.cat([x[:1], torch.zeros(1, 2, dtype=torch.long)], dim=1)  # two pad tokens on the right
    mask = torch.tensor([[1] * 6 + [0] * 2])
    assert_close(ours(input_ids=padded, attention_mask=mask).logits[:, :6], together[:1])


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


def test_save_load_round_trip_is_exact(tmp_path):
    base = tiny_lm()
    trained = PrefixTuningModel(base, num_virtual_tokens=P, projection=True, encoder_hidden_size=24)
    path = trained.save(tmp_path / "prefix.safetensors")
    tensors, config = load_tensors(path)
    assert set(tensors) == {n for n, _ in trained.prefix_encoder.named_parameters(prefix="prefix_encoder")}
    assert config == trained.prefix_config

    torch.manual_seed(123)
    fresh = PrefixTuningModel(base, num_virtual_tokens=P, projection=True, encoder_hidden_size=24)
    x = ids()
    assert not torch.equal(fresh(input_ids=x).logits, trained(input_ids=x).logits)
    assert fresh.load(path) == trained.prefix_config
    for (name, a), (_, b) in zip(trained.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(fresh(input_ids=x).logits, trained(input_ids=x).logits)

    other = PrefixTuningModel(base, num_virtual_tokens=P + 1, projection=True, encoder_hidden_size=24)
    with pytest.raises(ValueError, match="wrong shapes"):
        other.load(path)


def test_exported_prefix_drops_the_mlp_and_gives_the_same_outputs(tmp_path):
    base = tiny_lm()
    trained = PrefixTuningModel(base, num_virtual_tokens=P, projection=True, encoder_hidden_size=24)
    prefix = trained.export_prefix()
    assert prefix.shape == (2, 2, 2, P, 8) and not prefix.requires_grad
    deployed = PrefixTuningModel.from_prefix(base, prefix)
    assert not hasattr(deployed.prefix_encoder, "transform")
    x = ids()
    assert torch.equal(deployed(input_ids=x).logits, trained(input_ids=x).logits)
    assert torch.equal(deployed.generate(x, max_new_tokens=4), trained.generate(x, max_new_tokens=4))
    assert torch.equal(deployed.export_prefix(), prefix)

    full, small = trained.save(tmp_path / "trained.safetensors"), deployed.save(tmp_path / "exported.safetensors")
    assert small.stat().st_size < full.stat().st_size
    reloaded = PrefixTuningModel(base, num_virtual_tokens=P, projection=False)
    reloaded.load(small)
    assert torch.equal(reloaded.export_prefix(), prefix)


def test_bfloat16_model_gets_a_bfloat16_prefix_and_float32_gradients():
    base = tiny_lm().to(torch.bfloat16)
    reference = peft_prefix(base)
    ours = PrefixTuningModel(copy.deepcopy(base), num_virtual_tokens=P, projection=False)
    with torch.no_grad():
        ours.prefix_encoder.embedding.weight.copy_(reference.prompt_encoder["default"].embedding.weight)
    x = ids()
    out = ours(input_ids=x, labels=x)
    assert out.logits.dtype == torch.bfloat16
    assert_close(out.logits, peft_logits(reference, input_ids=x), rtol=0, atol=0)
    out.loss.backward()
    assert ours.prefix_encoder.embedding.weight.grad.dtype == torch.float32


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


def test_the_file_works_alone_with_torch_only():
    path = Path(__file__).parents[1] / "peftkit" / "prefix_tuning.py"
    spec = importlib.util.spec_from_file_location("prefix_tuning_alone", path)
    alone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(alone)  # outside the package: the relative import of io fails quietly
    wrapped = alone.PrefixTuningModel(tiny_lm(), num_virtual_tokens=P, projection=False)
    assert wrapped(input_ids=ids()).logits.shape == (2, 6, VOCAB_SIZE)
    with pytest.raises(ImportError, match="peftkit.io"):
        wrapped.save("unused.safetensors")


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True])
def test_prefix_length_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixTuningModel(tiny_lm(), num_virtual_tokens=bad)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixEncoder(num_layers=2, num_kv_heads=2, head_dim=8, num_virtual_tokens=bad)


def test_unsupported_models_are_refused_with_the_supported_families():
    bert = tiny_bert(seed=None, num_labels=None, eval_mode=False)
    with pytest.raises(ValueError, match=r"llama.*'bert'.*BERT"):
        PrefixTuningModel(bert)
    with pytest.raises(ValueError, match="decoder-only"):
        PrefixTuningModel(torch.nn.Linear(2, 2))


def test_misuse_gives_clear_errors():
    model = tiny_lm()
    ours = PrefixTuningModel(model, num_virtual_tokens=P, projection=False)
    with pytest.raises(ValueError, match="takes no cache"):
        ours(input_ids=ids(), cache=transformers.DynamicCache())
    with pytest.raises(ValueError, match="input_ids"):
        ours(attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="max_new_tokens"):
        ours.generate(ids(), max_new_tokens=0)
    with pytest.raises(ValueError, match=r"\(2, 2, 2, 3, 8\)"):
        PrefixTuningModel.from_prefix(model, torch.zeros(2, 2, 4, 3, 8))  # 4 heads, but the model has 2 KV heads
    with pytest.raises(ValueError, match="export_prefix"):
        PrefixTuningModel.from_prefix(model, torch.zeros(3, 8))
    model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        ours(input_ids=ids())

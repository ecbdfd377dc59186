"""Tiny BERT and Llama models built from configs (no downloads), shared by the tests.

Every builder takes keyword overrides of its config; an override of None leaves that key to the
config class's own default (max_position_embeddings=None gives LlamaConfig's 2048, num_labels=None
BertConfig's 2). Seeding: a seed calls torch.manual_seed(seed) just before the model is built, and
seed=None leaves the random number generator alone, so the model's weights come from wherever the
caller's random stream stands. Other keywords: model_class (the head, e.g. BertModel),
config_class (Llama-shaped families: MistralConfig, Qwen2Config), dtype (None: no .to()) and
eval_mode (False: the model stays in training mode, as built).
"""

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

VOCAB_SIZE = 100
BERT = dict(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, num_labels=3)
LLAMA = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

# The variants several files share, as overrides of the two configurations above.
SHORT_BERT = dict(max_position_embeddings=32)  # prompt methods and recipes: 32 positions
SHORT_LLAMA = dict(max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
WIDE_LLAMA = dict(hidden_size=64, intermediate_size=128)  # the 4-bit tests (NF4, QLoRA)


def _build(config_class, model_class, config, seed, dtype, eval_mode):
    if seed is not None:
        torch.manual_seed(seed)
    model = model_class(config_class(**{k: v for k, v in config.items() if v is not None}))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval() if eval_mode else model


def tiny_bert(seed=0, *, model_class=BertForSequenceClassification, dtype=None, eval_mode=True, **overrides):
    """A 2-layer, 32-wide BERT (3 labels) from ``BERT`` with ``overrides``; seed 0 and eval mode by default."""
    return _build(BertConfig, model_class, {**BERT, **overrides}, seed, dtype, eval_mode)


def tiny_llama(seed=0, *, config_class=LlamaConfig, model_class=LlamaForCausalLM, dtype=None, eval_mode=True,
               **overrides):
    """A 2-layer, 32-wide Llama (4 query heads, 2 key/value heads) from ``LLAMA`` with ``overrides``;
    seed 0 and eval mode by default."""
    return _build(config_class, model_class, {**LLAMA, **overrides}, seed, dtype, eval_mode)


def short_bert(seed=None, **kwargs):
    """tiny_bert with 32 positions; leaves the random stream alone unless given a seed."""
    return tiny_bert(seed, **{**SHORT_BERT, **kwargs})


def short_llama(seed=None, **kwargs):
    """tiny_llama with 32 positions and pad/bos/eos tokens 0/1/2; leaves the random stream alone
    unless given a seed."""
    return tiny_llama(seed, **{**SHORT_LLAMA, **kwargs})


def wide_llama(seed=0, *, dtype=torch.float32, **kwargs):
    """tiny_llama 64 wide (intermediate 128), cast to ``dtype``; seed 0 by default."""
    return tiny_llama(seed, dtype=dtype, **{**WIDE_LLAMA, **kwargs})


# --- what a refused or interrupted operation must leave exactly as it was ---

def snapshot(model):
    """The module objects by name, every tensor of the state dict (values and dtypes), each parameter's
    requires_grad, each module's training flag, and the technique's config (``adapter_config``)."""
    return {
        "modules": dict(model.named_modules()),
        "tensors": {n: t.clone() for n, t in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "attributes": {k: v for k, v in vars(model).items() if k in ("adapter_config", "_peftkit_adapters")},
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["modules"] == before["modules"]  # the same objects under the same names
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, tensor in before["tensors"].items():  # bit for bit, dtype included (a planted NaN equals itself)
        torch.testing.assert_close(after["tensors"][name], tensor, rtol=0, atol=0, equal_nan=True, msg=name)
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert after["attributes"].keys() == before["attributes"].keys()
    assert after["attributes"].get("adapter_config") == before["attributes"].get("adapter_config")

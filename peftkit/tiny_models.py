"""Tiny models of every family the course names, built from configs (no downloads): notebook 10 and the tests.

Random weights, 2 layers: they show how each technique meets each architecture (names, layouts, equality with
peft), not what it learns; the course trains on its two pretrained models (peftkit.models).

``FAMILIES[name]`` builds a 2-layer model of that family with a small vocabulary (100 tokens, 32 wide unless the
family needs otherwise), seeded, in eval mode: ``build("gpt2")``. Encoders come with a sequence-classification
head (3 labels), decoders with a language-model head, T5 as the encoder-decoder ``T5ForConditionalGeneration``.
``QV[name]`` names the query and value projections as peft's users write them for that family.
"""

import torch
from transformers import (AlbertConfig, AlbertForSequenceClassification, BertConfig, BertForSequenceClassification,
                          ElectraConfig, ElectraForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, RobertaConfig, RobertaForSequenceClassification, T5Config,
                          T5ForConditionalGeneration, XLNetConfig, XLNetForSequenceClassification)

VOCAB_SIZE = 100
_ENCODER = dict(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, num_labels=3, max_position_embeddings=64)

# family -> (config class, model class, config keywords)
SPECS = {
    "bert": (BertConfig, BertForSequenceClassification, _ENCODER),
    "roberta": (RobertaConfig, RobertaForSequenceClassification, dict(_ENCODER, pad_token_id=1)),
    "albert": (AlbertConfig, AlbertForSequenceClassification, dict(_ENCODER, embedding_size=16)),  # one shared layer
    "electra": (ElectraConfig, ElectraForSequenceClassification, dict(_ENCODER, embedding_size=16)),
    "xlnet": (XLNetConfig, XLNetForSequenceClassification,
              dict(vocab_size=VOCAB_SIZE, d_model=32, n_layer=2, n_head=4, d_inner=64, num_labels=3)),
    "t5": (T5Config, T5ForConditionalGeneration,
           dict(vocab_size=VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
    "gpt2": (GPT2Config, GPT2LMHeadModel,
             dict(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                  eos_token_id=2)),
    "llama": (LlamaConfig, LlamaForCausalLM,
              dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)),
}
FAMILIES = list(SPECS)
# the query and value projections, by the names peft's users pass as target_modules
QV = {"bert": ["query", "value"], "roberta": ["query", "value"], "albert": ["query", "value"],
      "electra": ["query", "value"], "xlnet": None,  # XLNet keeps q, k, v as parameters, not linear layers
      "t5": ["q", "v"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


def build(family: str, seed: int = 0, eval_mode: bool = True, **overrides):
    """A tiny model of ``family`` (one of FAMILIES), seeded, in eval mode unless asked otherwise."""
    config_class, model_class, keywords = SPECS[family]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**keywords, **overrides}))
    return model.eval() if eval_mode else model


def inputs(family: str, batch: int = 2, length: int = 7, seed: int = 1) -> dict:
    """Token ids (and decoder ids for T5) for one forward pass of a tiny ``family`` model."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB_SIZE, (batch, length), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family == "t5":
        out["decoder_input_ids"] = torch.randint(3, VOCAB_SIZE, (batch, 5), generator=g)
    return out

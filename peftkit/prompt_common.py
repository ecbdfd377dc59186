"""What the three prompt methods share beyond their core: prompt inits from the vocabulary or a phrase, T5's place
in prefix-tuning, and peft's saved format.

``prompt_tuning.py``, ``p_tuning.py`` and ``prefix_tuning.py`` work without this file and import it when these are
asked for (copy it along then); it needs only torch, and ``adapter_files.py`` (with safetensors) to export.

T5 in prefix-tuning, as peft 0.21.2 does it: the prefix goes to the decoder's self-attention only. peft
builds a table for self- and cross-attention by doubling the L layers' keys and values, splits the
result in fours (self key, self value, cross key, cross value per layer), so decoder layer l reads table
layer 2l mod L; then it empties the cross-attention cache, which reads the encoder's states as usual.

Hugging Face peft saves a trained prompt method as a folder of two files:
    adapter_config.json          peft_type, task_type, num_virtual_tokens, token_dim, ... (inference_mode: true)
    adapter_model.safetensors    "prompt_embeddings": what the prompt encoder outputs, not the encoder itself
                                 (+ a classifier's trained head, under its name: "base_model.classifier.weight")
What the encoder outputs, by method (peft loads each back as a plain table, with no LSTM or MLP):
    prompt tuning    the N x D prompt
    P-tuning         the N x D prompt after its LSTM or MLP (what ``PTuningModel.export_prompt`` keeps)
    prefix-tuning    the P x (L * 2 * H * d) key/value table, after its MLP if it has one
For an encoder-decoder (T5) peft keeps 2N prompt rows (``num_transformer_submodules=2``) and reads
only the first N in front of the encoder's input; the other N are written as zeros.

    export_peft(wrapper, "prompt-out", "google-t5/t5-small")
    peft.PeftModel.from_pretrained(base_model, "prompt-out")    # the same outputs as ``wrapper``
"""

import json
import math

import torch

PEFT_TYPES = {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING"}
# the head names of HF's model classes -> peft's task_type (it picks the PeftModel subclass that loads)
TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
              "ForQuestionAnswering": "QUESTION_ANS"}


def _adapter_files():
    """adapter_files.py (and safetensors) do the saving; the techniques themselves need only torch."""
    try:
        from . import adapter_files
    except ImportError:  # copied into a project, beside adapter_files.py
        import adapter_files
    return adapter_files


# --- prompt tuning's "vocab" and "text" inits ---

def _init_token_ids(init, n, token_dim, word_embeddings, init_text, tokenizer) -> torch.Tensor:
    """The N token ids whose embeddings start the prompt: random ids ("vocab") or a phrase's ("text")."""
    if word_embeddings is None:
        raise ValueError(f"init={init!r} copies rows of the model's embedding table: pass word_embeddings="
                         "model.get_input_embeddings()")
    if word_embeddings.embedding_dim != token_dim:
        raise ValueError(f"token_dim={token_dim} does not match the model's embedding size "
                         f"{word_embeddings.embedding_dim}: use token_dim={word_embeddings.embedding_dim}")
    if init == "vocab":
        return torch.randint(0, word_embeddings.num_embeddings, (n,))
    if tokenizer is None:
        raise ValueError("init='text' needs the model's tokenizer: pass tokenizer=...")
    if not init_text:
        raise ValueError("init='text' needs a phrase to start from: pass init_text='...'")
    ids = tokenizer(init_text)["input_ids"]  # with special tokens, as peft does
    if not ids:
        raise ValueError(f"init_text {init_text!r} tokenizes to no tokens")
    ids = (ids * math.ceil(n / len(ids)))[:n]  # repeat a short phrase, cut a long one
    return torch.tensor(ids, dtype=torch.long)


# --- T5 in prefix-tuning ---

def t5_prefix_cache(kv, batch_size, cache_class):
    """peft's T5 cache: decoder layer l's self-attention reads table layer 2l mod L; no cross-attention prefix."""
    from transformers import DynamicCache, EncoderDecoderCache
    L, self_attention = len(kv), cache_class()
    for layer in range(L):
        keys, values = kv[(2 * layer) % L]  # (H, P, D) each
        self_attention.update(keys.expand(batch_size, -1, -1, -1), values.expand(batch_size, -1, -1, -1), layer)
    return EncoderDecoderCache(self_attention, DynamicCache())  # cross-attention: the encoder's keys, values only


def t5_prefix_forward(wrapper, batch_size, attention_mask, position_ids, kwargs):
    """T5's forward: the encoder and its mask as they are; the decoder's mask gets P ones in front."""
    if position_ids is not None:
        raise ValueError("T5 numbers positions itself (relative attention bias): pass no position_ids")
    if kwargs.get("decoder_attention_mask") is not None:
        mask = kwargs["decoder_attention_mask"]
        ones = mask.new_ones(batch_size, wrapper.adapter_config.num_virtual_tokens)
        kwargs["decoder_attention_mask"] = torch.cat([ones, mask], dim=1)  # (B, P + T_decoder)
    kwargs[wrapper._cache_arg] = wrapper.prefix_cache(batch_size)
    return wrapper.base_model(attention_mask=attention_mask, use_cache=True, **kwargs)


def check_t5_sizes(config, num_heads):
    """peft lays out a T5 prefix with d_model / num_heads per head, for num_layers decoder layers."""
    if config.d_kv * num_heads != config.d_model or config.num_decoder_layers != config.num_layers:
        raise ValueError(f"peft lays out a T5 prefix with head size d_model / num_heads = {config.d_model // num_heads}"
                         f" for num_layers = {config.num_layers} decoder layers; this T5 has d_kv={config.d_kv} and "
                         f"num_decoder_layers={config.num_decoder_layers}: use a T5 where they agree")


# --- peft's format ---

def export_peft(model, path, base_model_name_or_path: str | None):
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in peft's format into the folder ``path``.

    ``model`` is a PromptTuningModel, PTuningModel or PrefixTuningModel; ``peft.PeftModel.from_pretrained(
    base_model, path)`` then gives its outputs. The folder is replaced whole (other files in it are kept):
    an interrupted export leaves an earlier one intact. Returns ``path``."""
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a str or None, got {base_model_name_or_path!r}")
    technique = getattr(getattr(model, "adapter_config", None), "technique", None)
    if technique not in PEFT_TYPES or not hasattr(model, "base_model"):
        raise TypeError(f"export_peft takes a PromptTuningModel, PTuningModel or PrefixTuningModel, got "
                        f"{type(model).__name__} (for LoRA use lora.export_peft)")
    tensors, config = (_prefix_tuning if technique == "prefix_tuning" else _prompt_tuning)(model)
    config = {"peft_type": PEFT_TYPES[technique], "task_type": _task_type(model),
              "base_model_name_or_path": base_model_name_or_path, "num_virtual_tokens": model.adapter_config.num_virtual_tokens, "inference_mode": True, **config}
    with _adapter_files().atomic_folder(path) as folder:
        _adapter_files().save_tensors(tensors, folder / "adapter_model.safetensors", config)
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def _prompt_tuning(model):
    """Prompt tuning and P-tuning: the prompt (the encoder's output) and the trained head."""
    encoder, was_training = model.prompt_encoder, model.prompt_encoder.training
    try:  # no dropout in the prompt we keep; autograd on, as in training (see PTuningModel.export_prompt)
        prompt = encoder.eval()().detach()  # (N, D)
    finally:
        encoder.train(was_training)
    submodules = 2 if model.is_encoder_decoder else 1
    if submodules == 2:  # peft's T5 rows N..2N-1, which its prompt methods never read
        prompt = torch.cat([prompt, torch.zeros_like(prompt)])  # (2N, D)
    tensors = {"prompt_embeddings": prompt}
    tensors.update({n: p.detach() for n, p in model.base_model.named_parameters(prefix="base_model")
                    if p.requires_grad})  # the head, under the names peft gives it
    cfg = model.adapter_config
    config = {"token_dim": prompt.shape[1], "num_transformer_submodules": submodules,
              "modules_to_save": cfg.modules_to_save or None}
    if cfg.technique == "prompt_tuning":
        return tensors, {"prompt_tuning_init": "RANDOM", **config}  # the file's prompt replaces peft's start
    return tensors, {"encoder_reparameterization_type": cfg.kind.upper(),
                     "encoder_hidden_size": cfg.encoder_hidden_size, "encoder_num_layers": cfg.num_layers,
                     "encoder_dropout": cfg.dropout, **config}


def _prefix_tuning(model):
    """Prefix-tuning: the flat key/value table, (P, L * 2 * H * d), after the MLP."""
    with torch.no_grad():
        table = model.prefix_encoder.table().detach()
    cfg = model.adapter_config
    return {"prompt_embeddings": table}, {
        "num_layers": cfg.num_layers, "num_attention_heads": cfg.num_kv_heads,
        "token_dim": cfg.num_kv_heads * cfg.head_dim, "num_transformer_submodules": 2 if model.is_encoder_decoder else 1,
        "prefix_projection": cfg.projection, "encoder_hidden_size": cfg.encoder_hidden_size or cfg.num_kv_heads * cfg.head_dim}


def _task_type(model) -> str:
    """peft's task_type for the wrapped model: the PeftModel subclass that ``from_pretrained`` builds."""
    if model.is_encoder_decoder:
        return "SEQ_2_SEQ_LM"
    if getattr(model, "is_causal_lm", True):  # a PrefixTuningModel wraps a causal LM unless it is T5
        return "CAUSAL_LM"
    name = type(model.base_model).__name__
    return next((t for suffix, t in TASK_TYPES.items() if name.endswith(suffix)), "FEATURE_EXTRACTION")

"""Hugging Face peft's format for the three prompt methods: prompt tuning, P-tuning and prefix-tuning.

peft saves a trained prompt method as a folder of two files:
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

This file needs ``prompt_tuning.py``, ``p_tuning.py``, ``prefix_tuning.py`` and ``adapter_files.py``
beside it (and safetensors installed).
"""

import json

import torch

try:
    from . import adapter_files
    from .p_tuning import PTuningModel
    from .prefix_tuning import PrefixTuningModel
    from .prompt_tuning import PromptTuningModel, adapter_state_dict
except ImportError:  # copied into a project as plain files
    import adapter_files
    from p_tuning import PTuningModel
    from prefix_tuning import PrefixTuningModel
    from prompt_tuning import PromptTuningModel, adapter_state_dict

# the head names of HF's model classes -> peft's task_type (it picks the PeftModel subclass that loads)
TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
              "ForQuestionAnswering": "QUESTION_ANS"}


def export_peft(model, path, base_model_name_or_path: str | None):
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in peft's format into the folder ``path``.

    ``model`` is a PromptTuningModel, PTuningModel or PrefixTuningModel; ``peft.PeftModel.from_pretrained(
    base_model, path)`` then gives its outputs. The folder is replaced whole (other files in it are kept):
    an interrupted export leaves an earlier one intact. Returns ``path``."""
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a str or None, got {base_model_name_or_path!r}")
    if isinstance(model, PrefixTuningModel):
        tensors, config = _prefix_tuning(model)
    elif isinstance(model, PromptTuningModel):
        tensors, config = _prompt_tuning(model)
    else:
        raise TypeError(f"export_peft takes a PromptTuningModel, PTuningModel or PrefixTuningModel, got "
                        f"{type(model).__name__} (for LoRA use lora.export_peft)")
    config = {"task_type": _task_type(model), "base_model_name_or_path": base_model_name_or_path,
              "num_virtual_tokens": model.adapter_config.num_virtual_tokens, "inference_mode": True, **config}
    with adapter_files.atomic_folder(path) as folder:
        adapter_files.save_tensors(tensors, folder / "adapter_model.safetensors", config)
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
    tensors.update({k: v for k, v in adapter_state_dict(model).items() if k.startswith("base_model.")})  # the head
    cfg = model.adapter_config
    config = {"token_dim": prompt.shape[1], "num_transformer_submodules": submodules,
              "modules_to_save": cfg.modules_to_save or None}
    if not isinstance(model, PTuningModel):
        return tensors, {"peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM", **config}  # the file overrides it
    return tensors, {"peft_type": "P_TUNING", "encoder_reparameterization_type": cfg.kind.upper(),
                     "encoder_hidden_size": cfg.encoder_hidden_size, "encoder_num_layers": cfg.num_layers,
                     "encoder_dropout": cfg.dropout, **config}


def _prefix_tuning(model):
    """Prefix-tuning: the flat key/value table, (P, L * 2 * H * d), after the MLP."""
    with torch.no_grad():
        table = model.prefix_encoder.table().detach()
    cfg = model.adapter_config
    return {"prompt_embeddings": table}, {
        "peft_type": "PREFIX_TUNING", "num_layers": cfg.num_layers, "num_attention_heads": cfg.num_kv_heads,
        "token_dim": cfg.num_kv_heads * cfg.head_dim, "num_transformer_submodules": 2 if model.is_encoder_decoder else 1,
        "prefix_projection": cfg.projection, "encoder_hidden_size": cfg.encoder_hidden_size or cfg.head_dim}


def _task_type(model) -> str:
    """peft's task_type for the wrapped model: the PeftModel subclass that ``from_pretrained`` builds."""
    if model.is_encoder_decoder:
        return "SEQ_2_SEQ_LM"
    if getattr(model, "is_causal_lm", True):  # a PrefixTuningModel wraps a causal LM unless it is T5
        return "CAUSAL_LM"
    name = type(model.base_model).__name__
    return next((t for suffix, t in TASK_TYPES.items() if name.endswith(suffix)), "FEATURE_EXTRACTION")

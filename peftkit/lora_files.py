"""Saving, loading and exporting LoRA adapters: the file side of ``lora.py``, which calls this file.

``lora.save_adapter`` writes what LoRA trains (``lora.adapter_state_dict``) and ``model.adapter_config`` to one
safetensors file; ``lora.load_adapter`` reads it back, adding LoRA from the saved config to a model that has none;
``lora.export_peft`` writes Hugging Face peft's two files, so that ``peft.PeftModel.from_pretrained`` rebuilds
the same model. Copy this file beside ``lora.py``, with ``adapter_files.py`` (which needs safetensors).
"""

import json
from dataclasses import asdict

from torch import nn

try:
    from . import lora
except ImportError:  # copied into a project as plain files, beside lora.py
    import lora


def save_adapter(model: nn.Module, path):
    """Write ``adapter_state_dict(model)`` and ``model.adapter_config`` to one safetensors file; returns its path."""
    files = lora._sibling("adapter_files", "saving")
    return files.write_adapter(lora.adapter_state_dict(model), path, lora._lora_config(model, required=True))


def load_adapter(model: nn.Module, path, config_class=None, inject=None):
    """Load what ``save_adapter`` wrote, injecting LoRA from the saved config if ``model`` has none.

    The file must be LoRA's and hold exactly what LoRA trains, in the model's shapes (else a ValueError names the
    keys). LoRA with another alpha or rslora than the file's is refused, and so is a merged model; the model keeps
    its own ``dropout``. On any error the model is left as it came. A field the file predates takes its default."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapter needs a torch.nn.Module, got {type(model).__name__}")
    tensors, config = (files := lora._sibling("adapter_files", "loading")).read_adapter(
        path, config_class or lora.LoRAConfig)
    layers, flags = lora._lora_layers(model), {n: p.requires_grad for n, p in model.named_parameters()}
    if any(layer.merged for _, layer in layers):  # a later unmerge would take out the new B A, not the merged one
        raise ValueError("the model's LoRA is merged into its base weights: unmerge_lora(model) before load_adapter")
    if other := next((m for _, m in layers if (m.alpha, m.rslora) != (config.alpha, config.rslora)), None):
        raise ValueError(f"{path} was trained with alpha={config.alpha}, rslora={config.rslora}, but the model's "
                         f"LoRA has alpha={other.alpha}, rslora={other.rslora}, which would scale its update wrongly. "
                         "Load into a model without LoRA (load_adapter then adds it with the file's config)")
    if not layers:
        (inject or lora.add_lora)(model, **asdict(config))  # changes nothing if it fails
    try:
        files.copy_tensors(model, tensors, lora.adapter_state_dict(model), source=path, config=asdict(config))
    except BaseException:
        if not layers:
            lora._remove_lora(model, flags)  # put the model back as it came
        raise
    return config


def export_peft(model: nn.Module, path, base_model_name_or_path: str | None):
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in Hugging Face peft's format.

    ``peft.PeftModel.from_pretrained(base_model, path)`` then rebuilds the same model. The folder
    is replaced whole (other files in it are kept): an interrupted export leaves an earlier one intact."""
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a str or None, got {base_model_name_or_path!r}")
    wrapped = dict(lora._lora_layers(model))
    peft_name = {f"{n}.base.bias": f"{n}.base_layer.bias" for n in wrapped}  # peft's name for the wrapped base
    tensors = {f"base_model.model.{peft_name.get(k, k)}": v for k, v in lora.adapter_state_dict(model).items()}
    cfg, files = lora._lora_config(model, required=True), lora._sibling("adapter_files", "exporting")
    peft_config = {  # peft fills in its defaults for every field left out
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": cfg.target_modules,  # full names: peft then wraps exactly these layers
        "modules_to_save": cfg.modules_to_save or None, "inference_mode": True,  # and the fields of the same name:
        **{k: getattr(cfg, k) for k in ("bias", "exclude_modules", "layers_to_transform", "layers_pattern")},
        "fan_in_fan_out": any(getattr(m, "fan_in_fan_out", False) for m in wrapped.values())}  # Conv1D (GPT-2)
    with files.atomic_folder(path) as folder:
        files.save_tensors(tensors, folder / "adapter_model.safetensors", peft_config)
        (folder / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    return path

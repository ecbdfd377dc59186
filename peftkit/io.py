"""Saving and loading the trained tensors of any technique, as one safetensors file.

The file holds only the parameters that train (``requires_grad``), plus a small JSON
config in the safetensors metadata. Writes go to a temporary file in the same folder
and are renamed into place, so an interrupted save never leaves a half-written file.
"""

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by their names in ``model``."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_tensors(tensors: dict[str, torch.Tensor], path, config: dict | None = None) -> Path:
    """Write ``tensors`` (and ``config`` as JSON metadata) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"config": json.dumps(config or {})}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_tensors(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read back what :func:`save_tensors` wrote: (tensors, config)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads((f.metadata() or {}).get("config", "{}"))
    return tensors, config


def save_adapter(model: torch.nn.Module, path, config: dict | None = None) -> Path:
    """Save only the trained tensors of ``model`` (those with ``requires_grad``)."""
    tensors = trainable_state_dict(model)
    if not tensors:
        raise ValueError("the model has no trainable parameters: add a technique before saving")
    return save_tensors(tensors, path, config)


def load_adapter(model: torch.nn.Module, path) -> dict:
    """Copy saved tensors into ``model``'s trainable parameters; returns the saved config.

    Every key must match a trainable parameter of the same shape: otherwise a ValueError
    names the missing, unexpected and mis-shaped keys, and the model is left unchanged.
    """
    tensors, config = load_tensors(path)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(expected - tensors.keys())
    unexpected = sorted(tensors.keys() - params.keys())
    shapes = sorted(
        f"{k}: file {tuple(v.shape)} vs model {tuple(params[k].shape)}"
        for k, v in tensors.items()
        if k in params and v.shape != params[k].shape
    )
    if missing or unexpected or shapes:
        raise ValueError(
            f"adapter file {path} does not fit this model: missing keys {missing}, "
            f"unexpected keys {unexpected}, wrong shapes {shapes}. Inject the same technique "
            f"with the same config (saved config: {config}) before loading."
        )
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)
    return config

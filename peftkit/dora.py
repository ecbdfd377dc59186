"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv:2402.09353).

DoRA splits each frozen weight into a magnitude and a direction, lets LoRA update the direction, and learns
the magnitude as a vector of its own (the paper's eq. 5):

    W' = m * (W + s B A) / ||W + s B A||_c        W: (out, in), B: (out, rank), A: (rank, in), s = scaling
    m: (out,), starts at ||W||_c, so W' = W at the start (B = 0)

``||.||_c`` is the norm of each output feature's weights (the paper's columns: its W is (in, out); each row of
torch's (out, in) W), so ``m`` holds one number per output feature (peft's ``lora_magnitude_vector``). The
norm is treated as a constant in backward (section 4.3: "detaching it from the gradient graph"), which saves
memory and changes little. As in peft, forward never builds W' but reuses the base layer's output:

    y = W x + b + (m / n - 1) * W x + (m / n) * s * B A x         n = ||W + s B A||_c, detached
      = (m / n) * (W + s B A) x + b                               (the bias stays outside the scaling)

With dropout in training, peft feeds the dropped input to both extra terms (``W drop(x)`` and
``B A drop(x)``), while ``W x + b`` keeps the whole input; this file does the same.

Trained: ``lora_A``, ``lora_B`` and ``lora_magnitude_vector`` of every wrapped layer (plus ``modules_to_save``).
Frozen: everything else. Everything else is LoRA's (``lora.py``): ``add_dora`` calls ``add_lora`` and turns its
layers into ``DoRALinear``; ``merge_lora``/``unmerge_lora``, ``save_adapter`` and ``adapter_state_dict`` work on
them unchanged; ``load_adapter`` and ``export_peft`` below read and write DoRA's files (``use_dora=True``).

    add_dora(model, ["query", "value"], rank=8, alpha=16)     # nn.Linear, GPT-2's Conv1D, peftkit's 4-bit
    ...train...
    save_adapter(model, "dora.safetensors"); export_peft(model, "out/", "bert-base-uncased")
    merge_lora(model)                                         # W' written into each base weight

This file needs ``lora.py`` beside it, with ``targets.py`` and ``lora_files.py`` (saving, loading, exporting).
"""

import json
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

try:
    from . import lora, targets
    from .lora import LoRAConfig, LoRALinear, adapter_state_dict, merge_lora, save_adapter, unmerge_lora  # noqa: F401
except ImportError:  # copied into a project as plain files, beside lora.py and targets.py
    import lora
    import targets
    from lora import LoRAConfig, LoRALinear, adapter_state_dict, merge_lora, save_adapter, unmerge_lora  # noqa: F401


class DoRALinear(LoRALinear):
    """LoRA's frozen ``base`` and factors A, B, plus a trainable magnitude ``m`` per output feature."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0, rslora: bool = False):
        lora_layer = base if isinstance(base, LoRALinear) else LoRALinear(base, rank, alpha, dropout, rslora)
        if type(lora_layer) is not LoRALinear or lora_layer.merged:
            raise TypeError(f"DoRALinear wraps a linear layer or an unmerged LoRALinear, got {type(base).__name__}"
                            + (" (merged)" if lora_layer.merged else ""))
        nn.Module.__init__(self)  # adopt the LoRA layer's modules and settings: its A was drawn as peft draws it
        self.base, self.lora_A, self.lora_B = lora_layer.base, lora_layer.lora_A, lora_layer.lora_B
        self.lora_dropout, self.scaling, self.merged = lora_layer.lora_dropout, lora_layer.scaling, False
        self.rank, self.alpha, self.rslora = lora_layer.rank, lora_layer.alpha, lora_layer.rslora
        self.fan_in_fan_out = lora_layer.fan_in_fan_out
        self.in_features, self.out_features = lora_layer.in_features, lora_layer.out_features
        with torch.no_grad():  # m = ||W + s B A||_c, which is ||W||_c while B = 0
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm(self.base_weight()))  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)  # (..., out): W x + b
        if self.merged:
            return result
        x = x.to(self.lora_A.weight.dtype)
        weight = self.base_weight()  # (out, in)
        scale = self.lora_magnitude_vector / self.weight_norm(weight).detach()  # (out,): m / n, n a constant
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            x_dropped, direction = x, result if self.base.bias is None else result - self.base.bias  # W x
        else:
            x_dropped = self.lora_dropout(x)
            direction = F.linear(x_dropped, weight)  # (..., out): W drop(x)
        update = self.lora_B(self.lora_A(x_dropped)) * self.scaling  # (..., out): s B A x, no W' built
        return (result + (scale - 1) * direction + scale * update).to(result.dtype)

    def base_weight(self) -> torch.Tensor:
        """W as (out, in) in the factors' dtype (transposed from a Conv1D, dequantized from 4 bits)."""
        dtype = self.lora_A.weight.dtype
        weight = self.base.weight.dequantize(dtype) if targets.layer_kind(self.base) == "4bit" else self.base.weight
        return (weight.T if self.fan_in_fan_out else weight).to(dtype)

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """n = ||W + s B A||_c: one norm per output feature (norm over the inputs), shape (out,)."""
        lora_weight = self.lora_B.weight @ self.lora_A.weight  # (out, rank) @ (rank, in) -> (out, in)
        return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1)

    def merged_weight(self) -> torch.Tensor:
        """W' = (m / n) * (W + delta W) in W's dtype and layout: what merging writes into ``base.weight``.
        Keeps m / n for ``unmerge`` (as peft does): W' alone cannot give n back."""
        if targets.layer_kind(self.base) == "4bit":
            return super().merged_weight()  # refused there, with the reason
        weight = self.base_weight()  # (out, in)
        self.merge_scale = (self.lora_magnitude_vector / self.weight_norm(weight)).detach()  # (out,)
        merged = self.merge_scale[:, None] * (weight + self.scaling * self.lora_B.weight @ self.lora_A.weight)
        return (merged.T if self.fan_in_fan_out else merged).to(self.base.weight.dtype)

    def unmerge(self) -> None:
        """W = W' / (m / n) - delta W, with the m / n of the merge (a no-op when not merged)."""
        if self.merged:
            scale = self.merge_scale[None, :] if self.fan_in_fan_out else self.merge_scale[:, None]
            with torch.no_grad():
                self.base.weight.copy_(self.base.weight / scale - self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


# --- injecting into a model ---
@dataclass
class DoRAConfig(LoRAConfig):
    """What ``add_dora`` did (``model.adapter_config``): LoRA's fields, saved under the tag "dora"."""
    technique: ClassVar[str] = "dora"


def add_dora(model, target_modules, rank=8, alpha=16, dropout=0.0, rslora=False, modules_to_save=(),
             exclude_modules=None, layers_to_transform=None, layers_pattern=None, bias="none"):
    """``add_lora`` with the same arguments (see lora.py), then every LoRA layer made a ``DoRALinear``, in place;
    returns ``model``. Embeddings are refused (peft has a DoRA variant for them; this file does not). All or
    nothing: on any error the model is left as it was."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_dora needs a torch.nn.Module, got {type(model).__name__}")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    lora.add_lora(model, target_modules, rank, alpha, dropout, rslora, modules_to_save, exclude_modules,
                  layers_to_transform, layers_pattern, bias)  # checks everything; changes nothing if it fails
    try:
        layers = lora._lora_layers(model)
        if embeddings := [n for n, m in layers if targets.layer_kind(m.base) == "embedding"]:
            raise ValueError(f"target_modules picked the embeddings {embeddings}: DoRA here wraps linear, Conv1D "
                             f"and 4-bit layers only; leave them out (e.g. exclude_modules={embeddings})")
        for name, layer in layers:
            model.set_submodule(name, DoRALinear(layer))
        model.adapter_config = DoRAConfig(**asdict(model.adapter_config))
    except BaseException:
        lora._remove_lora(model, flags)  # puts back the base layers and the flags, drops the config
        raise
    return model


# --- saving ---
def load_adapter(model: nn.Module, path) -> DoRAConfig:
    """``lora.load_adapter`` for DoRA's files: injects DoRA from the saved config if ``model`` has no LoRA. A model
    with plain LoRA layers, another alpha or rslora, or merged, is refused; on any error it is left as it came."""
    layers = lora._lora_layers(model) if isinstance(model, nn.Module) else []  # lora.load_adapter checks the type
    if plain := [n for n, m in layers if not isinstance(m, DoRALinear)]:
        raise ValueError(f"the model has plain LoRA layers ({plain[0]}, ...), but {path} holds DoRA: load it into "
                         "a model without LoRA (load_adapter adds DoRA from the file's config)")
    return lora.load_adapter(model, path, DoRAConfig, add_dora)


def export_peft(model: nn.Module, path, base_model_name_or_path: str | None):
    """Write DoRA in Hugging Face peft's format: LoRA's export (``lora.export_peft``; m's key is peft's
    ``...lora_magnitude_vector``) with ``use_dora: true`` in the config. ``peft.PeftModel.from_pretrained`` then
    rebuilds the same model. The folder is replaced whole: an interrupted export leaves an earlier one intact."""
    if not isinstance(lora._lora_config(model), DoRAConfig):
        raise ValueError("the model has no DoRA config (model.adapter_config): call add_dora(model, target_modules); "
                         "for plain LoRA use lora.export_peft")
    files = lora._sibling("adapter_files", "exporting DoRA")
    with files.atomic_folder(path) as folder:
        lora.export_peft(model, folder, base_model_name_or_path)
        config = json.loads((folder / "adapter_config.json").read_text()) | {"use_dora": True}
        tensors, _ = files.load_tensors(folder / "adapter_model.safetensors")
        files.save_tensors(tensors, folder / "adapter_model.safetensors", config)
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path

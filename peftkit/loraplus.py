"""LoRA+: Efficient Low Rank Adaptation of Large Models (Hayou et al., 2024, arXiv:2402.12354).

LoRA (``lora.py``) trains ``B A`` with one learning rate. In wide models that is inefficient: ``B`` (out, rank)
starts at zero and should move faster than ``A`` (rank, in). LoRA+ gives B a higher rate:

    lr_B = ratio * lr_A             ratio ~ 16 in the paper (peft's ``loraplus_lr_ratio``)

Nothing in the model changes; only the optimizer's parameter groups. ``loraplus_param_groups`` builds the
four groups of peft's ``create_loraplus_optimizer`` (``peft.optimizers``), in its order and by its rules:

    group           which trainable tensors                                  rate                 decay
    0 "A"           the rest: lora_A, 2-D weights of modules_to_save         lr                   yes
    1 "embedding"   both factors of a LoRA embedding (``lora_layers.py``)    lr_embedding (1e-6)  yes
    2 "B"           lora_B and every other 1-D tensor (DoRA's magnitude)     ratio * lr           yes
    3 "B_no_decay"  biases, and 1-D tensors inside an nn.LayerNorm          ratio * lr           no

"yes" decays by ``weight_decay`` (peft's ``loraplus_weight_decay``, default 0). peft's rule for B is a test on
names and shapes (``"lora_B" in name or param.ndim == 1``), so biases, norms and magnitudes get B's rate too
(a 1-D tensor inside a LayerNorm, or with "bias" in its name, goes to group 3; every other 1-D one to group 2).

    groups = loraplus_param_groups(model, lr=2e-4, ratio=16)
    optimizer = torch.optim.AdamW(groups, lr=2e-4)                # a group's own lr wins over this one

``peftkit.train.fit(..., lr_scale={"lora_B": 16})`` is the short form of the same idea: it multiplies only the
rate of parameters under a module ``lora_B`` and decays everything alike. This file needs only torch.
"""

import math

import torch
from torch import nn

GROUPS = ("A", "embedding", "B", "B_no_decay")  # peft's order


def loraplus_group(name: str, param: torch.Tensor, no_decay: set[str]) -> str:
    """Which of ``GROUPS`` a trainable parameter joins (peft's rules, see the module docstring)."""
    if name.rpartition(".")[2] in ("lora_embedding_A", "lora_embedding_B"):  # peft: all of a LoRA embedding's
        return "embedding"
    if "lora_B" in name or param.ndim == 1:
        return "B_no_decay" if "bias" in name or name in no_decay else "B"
    return "A"


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16, weight_decay: float = 0.0,
                          lr_embedding: float = 1e-6) -> list[dict]:
    """The parameter groups of peft's ``create_loraplus_optimizer(model, optimizer_cls, lr=lr,
    loraplus_lr_ratio=ratio, loraplus_weight_decay=weight_decay, loraplus_lr_embedding=lr_embedding)``,
    for any torch optimizer: four dicts (``params``, ``lr``, ``weight_decay``) in the order of ``GROUPS``; a group
    may be empty, as in peft. Only parameters with ``requires_grad`` are placed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"loraplus_param_groups needs a torch.nn.Module, got {type(model).__name__}")
    for arg, value in (("lr", lr), ("ratio", ratio), ("lr_embedding", lr_embedding)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{arg} must be a positive finite number, got {value!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < 1:
        raise ValueError(f"weight_decay must be a number in [0, 1) such as 0.01, got {weight_decay!r}")
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trained:
        raise ValueError("the model has no trainable parameters: add LoRA first (add_lora), then build the groups")
    # Parameters inside an nn.LayerNorm never decay (transformers' get_parameter_names(model, [nn.LayerNorm])).
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    no_decay = {n for n, _ in trained if any(n.startswith(m + ".") for m in norms)}
    placed = {g: [] for g in GROUPS}
    for name, param in trained:
        placed[loraplus_group(name, param, no_decay)].append(param)
    rates = {"A": lr, "embedding": lr_embedding, "B": lr * ratio, "B_no_decay": lr * ratio}
    return [{"params": placed[g], "lr": rates[g], "weight_decay": 0.0 if g == "B_no_decay" else weight_decay}
            for g in GROUPS]


def loraplus_optimizer(model: nn.Module, lr: float, ratio: float = 16, weight_decay: float = 0.0,
                       lr_embedding: float = 1e-6, optimizer_class=torch.optim.AdamW, **kwargs):
    """``optimizer_class`` over ``loraplus_param_groups`` (peft's ``create_loraplus_optimizer``); ``kwargs`` go to
    the optimizer (betas, eps, ...)."""
    return optimizer_class(loraplus_param_groups(model, lr, ratio, weight_decay, lr_embedding), lr=lr, **kwargs)

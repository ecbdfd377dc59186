"""A doctor for PEFT setups: the mistakes users report most, found before a run is wasted.

    print(*check(model), sep="\n")                    # before training: "[code] what is wrong -> what to do"
    check(model, evaluating=True)                     # before evaluating or generating

Each check only reads the model (the 4-bit one re-quantizes copies of at most three layers):

- ``targets-partial``: LoRA wraps a layer in some blocks but not in others (a full name or
  peft's ``layers_to_transform`` matched fewer layers than meant), or
  ``expected_targets`` names a layer that no LoRA layer wraps.
- ``head-not-trained``: a classifier's new head (``classifier``, ``score``) is frozen while
  something else trains, so it stays random (peft #310, #876, #577).
- ``trained-not-saved``: a parameter trains but the technique's ``save_adapter`` would leave
  it out (e.g. a head unfrozen by hand, not listed in ``modules_to_save``).
- ``no-trainable-parameters``: nothing requires grad, e.g. an adapter loaded for inference
  and then "trained" (peft #282).
- ``checkpointing-without-input-grads``: re-entrant activation checkpointing over frozen
  embeddings with no input hook: the layers' LoRA gets no gradient (transformers #26221, peft #1142).
- ``dropout-on-at-eval``: evaluating a model (or dropout inside it) left in training mode.
- ``4bit-merge-loses-update``: merging a QLoRA adapter into its 4-bit base would round most of
  the update away (peft #2321).

All but ``trained-not-saved`` and the 4-bit check (peftkit's own saving and 4-bit layers) work on
any torch model, peft's included.
"""

import functools
import importlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Finding:
    code: str  # short kebab-case id, e.g. "no-trainable-parameters"
    message: str  # what is wrong, naming the modules involved
    fix: str  # what to do about it, naming the peftkit call

    def __str__(self) -> str:
        return f"[{self.code}] {self.message} -> {self.fix}"


def check(model: nn.Module, *, evaluating: bool = False, expected_targets=None) -> list[Finding]:
    """Every finding for ``model``, in a stable order; an empty list when the setup looks right.

    ``evaluating``: the model is about to be evaluated, not trained (checks for dropout instead
    of trainable parameters). ``expected_targets``: the leaf names meant to carry LoRA, such as
    ``["query", "value"]``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"check needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(evaluating, bool):
        raise TypeError(f"evaluating must be True or False, got {evaluating!r}")
    if expected_targets is not None and (not isinstance(expected_targets, (list, tuple))
                                         or not all(isinstance(t, str) for t in expected_targets)):
        raise TypeError(f"expected_targets must be a list of leaf names such as ['query', 'value'], "
                        f"got {expected_targets!r}")
    findings = [*_targets_partial(model, expected_targets or []), *_head_not_trained(model), *_trained_not_saved(model)]
    if evaluating:  # frozen weights are right for inference, and checkpointing acts only in backward
        findings += _dropout_on(model)
    else:  # dropout is meant to be on in training
        findings += [*_no_trainable_parameters(model), *_checkpointing_without_input_grads(model)]
    return findings + _merge_loses_update(model)


# --- helpers ---

def _few(names: list, shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]


def _inside(name: str, prefixes) -> bool:
    return any(name.startswith(p + ".") for p in prefixes)


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _lora_layers(model: nn.Module) -> list[str]:
    # Duck-typed: peftkit's LoRALinear (lora_A is a Linear) and peft's layers (a ModuleDict) alike.
    return [n for n, m in model.named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.Module) and isinstance(getattr(m, "lora_B", None), nn.Module)]


def _block_pattern(name: str) -> str:
    # Block numbers as "*": the same layer in every block shares one pattern.
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


# --- the checks, in the order check() reports them ---

def _targets_partial(model, expected_targets) -> list[Finding]:
    lora, found = _lora_layers(model), []
    # A number as the leaf is a place in an nn.Sequential, not a layer repeated in blocks.
    patterns = {_block_pattern(n) for n in lora if not _leaf(n).isdigit()}
    missed = [n for n, _ in model.named_modules()
              if _block_pattern(n) in patterns and n not in lora and not _inside(n, lora)]
    if missed:
        leaves = sorted({_leaf(n) for n in missed})
        found.append(Finding(
            "targets-partial", f"LoRA wraps {leaves} in some blocks but not in {_few(missed)}",
            f"target the leaf name, which peftkit.lora.add_lora matches in every block: add_lora(model, {leaves})"))
    absent = [t for t in expected_targets if not any(n == t or n.endswith("." + t) for n in lora)]
    if absent:
        linears = sorted({_leaf(n) for n, m in model.named_modules() if not _inside(n, lora) and (
            n in lora or isinstance(m, nn.Linear) or getattr(type(m), "is_peftkit_4bit", False))})
        found.append(Finding(
            "targets-partial", f"expected_targets {absent} match no LoRA layer; the linear layers are named {linears}",
            "pass every target to one peftkit.lora.add_lora(model, target_modules=[...]) call "
            "(peftkit.lora.merge_lora(model) first to start again)"))
    return found


def _head_not_trained(model) -> list[Finding]:
    from .prompt_tuning import HEAD_NAMES  # the new heads of HF classifiers

    if not _trains(model):
        return []  # nothing trains at all: no-trainable-parameters says so
    heads = {}  # the outermost only: a peft wrapper around a head holds the original and the trained copy
    for name, module in model.named_modules():
        if _leaf(name) in HEAD_NAMES and not _inside(name, heads) and any(True for _ in module.parameters()):
            heads[name] = module
    frozen = [n for n, m in heads.items() if not _trains(m)]
    return [] if not frozen else [Finding(
        "head-not-trained",
        f"the new head {_few(frozen)} is frozen while the adapter trains: it keeps its random weights, "
        "so the predictions stay near chance",
        f"train it with the technique: peftkit.lora.add_lora(..., modules_to_save={sorted(set(map(_leaf, frozen)))}) "
        "(peftkit.adapters.add_adapters takes modules_to_save too; PromptTuningModel trains it by default)")]


def _trained_not_saved(model) -> list[Finding]:
    config = vars(model).get("adapter_config")  # every peftkit technique keeps its config there
    if config is None:
        return []
    technique = importlib.import_module(type(config).__module__)  # the file that defines the technique
    try:
        saved = technique.adapter_state_dict(model)  # what its save_adapter writes
    except ValueError:  # e.g. LoRA merged and unloaded: nothing of the technique left to save
        return []
    lost = [n for n, p in model.named_parameters() if p.requires_grad and n not in saved]
    if not lost:
        return []
    return [Finding(
        "trained-not-saved",
        f"{_few(lost)} train, but peftkit's {technique.__name__.rpartition('.')[2]}.save_adapter would not write "
        "them (not in modules_to_save): a reloaded model gets them back untrained",
        f"list them when adding the technique, peftkit.lora.add_lora(..., modules_to_save="
        f"{sorted({n.rpartition('.')[0] for n in lost})}), rather than unfreezing them by hand")]


def _no_trainable_parameters(model) -> list[Finding]:
    if _trains(model):
        return []
    return [Finding(
        "no-trainable-parameters",
        f"none of the {sum(p.numel() for p in model.parameters()):,} parameters of {type(model).__name__} "
        "requires grad: training would change nothing (an adapter loaded for inference stays frozen)",
        "add a technique, e.g. peftkit.lora.add_lora(model, target_modules) or peftkit.lora.load_adapter(model, "
        "path), which leave LoRA trainable; for a peft model, PeftModel.from_pretrained(..., is_trainable=True)")]


def _input_embeddings(model):
    hf = next((m for m in model.modules() if hasattr(m, "get_input_embeddings")), None)  # inside any wrapper
    try:
        return hf.get_input_embeddings() if hf is not None else None
    except NotImplementedError:
        return None


def _reentrant(module) -> bool:
    func = getattr(module, "_gradient_checkpointing_func", None)  # transformers: partial(checkpoint, **kwargs)
    keywords = func.keywords if isinstance(func, functools.partial) else {}
    return keywords.get("use_reentrant") is not False  # torch.utils.checkpoint's default is True (with a warning)


def _checkpointing_without_input_grads(model) -> list[Finding]:
    flagged = [n for n, m in model.named_modules()
               if getattr(m, "gradient_checkpointing", False) is True and _reentrant(m) and _trains(m)]
    layers = [n for n in flagged if not any(_inside(o, [n]) for o in flagged)]  # the innermost: the blocks
    embeddings = _input_embeddings(model)
    if not layers or embeddings is None or _trains(embeddings):
        return []
    # transformers' enable_input_require_grads keeps the handles of its hooks on the model.
    handles = [h for m in model.modules()
               for h in [getattr(m, "_require_grads_hook", None), *(getattr(m, "_require_grads_hooks", None) or [])]]
    if any(h is not None and h.id in embeddings._forward_hooks for h in handles):
        return []
    return [Finding(
        "checkpointing-without-input-grads",
        f"{_few(layers)} use re-entrant activation checkpointing, but the input embeddings are frozen and no hook "
        "makes their output require grad: the trainable parameters inside those layers get no gradient",
        "peftkit.train.enable_checkpointing(model) (non-reentrant), or keep re-entrant checkpointing and "
        "call model.enable_input_require_grads()")]


def _dropout_on(model) -> list[Finding]:
    # _DropoutNd is the base of every torch dropout module (Dropout, Dropout1d-3d, AlphaDropout).
    on = [n or type(model).__name__ for n, m in model.named_modules()
          if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training]
    if not on and not model.training:
        return []
    what = f"dropout is on in {_few(on)}" if on else f"{type(model).__name__} is in training mode"
    return [Finding(
        "dropout-on-at-eval",
        f"evaluating, but {what}: scores are noisy and lower, and every run differs",
        "call model.eval() before evaluating (peftkit.train.evaluate does), model.train() before training again")]


def _merge_loses_update(model, most: int = 3) -> list[Finding]:
    if not any(getattr(type(m), "is_peftkit_4bit", False) for m in model.modules()):
        return []  # no 4-bit layer: nothing to measure, and no quantizer to import
    from .qlora import LoRALinear, NF4Linear, requantized_update_error

    trained = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)
               and isinstance(m.base, NF4Linear) and m.lora_B.weight.any()][:most]  # B = 0: nothing learned yet
    with torch.no_grad():
        errors = {n: requantized_update_error(m) for n, m in trained}
    lossy = [f"{n} ({e:.2f})" for n, e in errors.items() if e > 0.5]
    return [Finding(
        "4bit-merge-loses-update",
        f"merging into the 4-bit base would lose most of the trained update: relative error of the "
        f"re-quantized update {_few(lossy)} (0 keeps it whole, 1 drops it)",
        "keep the adapter separate, or merge into the original float model with "
        "peftkit.qlora.merge_into_float(model, float_model) -- not peftkit.qlora.merge_into_4bit")] if lossy else []

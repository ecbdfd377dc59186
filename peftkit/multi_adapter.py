"""Turning an adapter off, and several named LoRA adapters on one model, as Hugging Face peft offers them.

``disable_adapter(model)`` is a context manager: inside it the model computes what its base model
computes (a reference output for DPO, a before/after check); on leaving it, even by an exception,
everything is as it was, bit for bit. It takes the adapter out rather than zeroing it:

    LoRA, QLoRA, bottleneck adapters    each wrapper is swapped for the layer it wraps (``set_submodule``)
    a merged LoRA layer                 W + dW - dW for the block (as peft, equal to W up to rounding);
                                        the merged weight is copied back on exit (peft leaves it unmerged)
    prompt/P-/prefix-tuning wrappers    ``forward`` (and ``generate``) are the wrapped model's: no prompt

Several named adapters. peft keeps them inside every LoRA layer, one dict per quantity:
``lora_A = ModuleDict({"a": ..., "b": ...})``, the same for ``lora_B``, ``scaling`` and ``r``, plus the
active name; forward adds the active adapters' updates, and every adapter sits in the ``state_dict``
(``q_proj.lora_A.b.weight``), the inactive ones frozen. peftkit keeps ``lora.py``'s one-adapter
``LoRALinear`` and gives each adapter its own wrappers around the same frozen base layers:

    model._peftkit_named_adapters = {"active": "a", "adapters": {
        "a": NamedAdapter(config, {"...query": LoRALinear(base=query), "...value": LoRALinear(base=value)}),
        "b": NamedAdapter(config, {"...query": LoRALinear(base=query)})}}     # rank, alpha, targets may differ

Only the active adapter's wrappers are in the model; ``set_adapter`` swaps them. So forward, the
optimizer's ``parameters()``, ``state_dict``, ``save_adapter``, ``export_peft`` and ``merge_lora`` see the
active adapter only, under lora.py's names. The cost: ``model.to(...)`` and ``model.train()`` reach only
the active one (``set_adapter`` moves the incoming one to its layers' device and mode).

    add_named_adapter(model, "a", ["query", "value"], rank=8)   # a model without LoRA: "a" is active
    add_named_adapter(model, "b", ["query"], rank=4)            # added inactive, as in peft
    set_adapter(model, "b")                                     # b trains and runs; a waits, frozen
    save_adapter(model, "b.safetensors")                        # lora.py's: the active adapter
    load_named_adapter(model, "c.safetensors", "c"); delete_adapter(model, "a")

This file needs ``lora.py`` and ``adapters.py`` beside it, with the files they use: ``lora_files.py``,
``targets.py``, ``lora_layers.py`` and ``adapter_layouts.py``.
"""

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

try:
    from .adapters import PLACEMENTS, AdaptedSublayer
    from .lora import LoRAConfig, LoRALinear, add_lora, load_adapter
except ImportError:  # copied into a project as plain files, beside lora.py and adapters.py
    from adapters import PLACEMENTS, AdaptedSublayer
    from lora import LoRAConfig, LoRALinear, add_lora, load_adapter

PROMPT_TECHNIQUES = ("prompt_tuning", "p_tuning", "prefix_tuning")  # wrappers that hold the model as .base_model


@contextmanager
def disable_adapter(model: nn.Module, allow_trained_modules: bool = False):
    """Within the block ``model`` computes its base model's outputs; on exit (also by an exception) the
    adapter is back exactly as it was: modules, weights, merged state, requires_grad flags.

    Modules that a technique trains in place (``modules_to_save`` such as a classifier head, "houlsby"'s
    norms) replaced the base model's values, which are kept nowhere, so the base output cannot be given:
    refused, unless ``allow_trained_modules=True`` runs the base model with those trained modules (what
    peft does for prompt methods; for LoRA peft keeps an untouched copy and runs that)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"disable_adapter needs a torch.nn.Module, got {type(model).__name__}")
    if vars(model).get("_peftkit_disabled"):
        raise ValueError("the adapter is already disabled (inside disable_adapter or serving.mixed_batch): "
                         "these blocks do not nest")
    config = vars(model).get("adapter_config")
    wrappers = [(n, m) for n, m in model.named_modules() if n and isinstance(m, (LoRALinear, AdaptedSublayer))]
    prompt = getattr(config, "technique", None) in PROMPT_TECHNIQUES and hasattr(model, "base_model")
    if not wrappers and not prompt:
        raise ValueError(f"{type(model).__name__} has no adapter to disable: no LoRA layer (add_lora), no bottleneck "
                         "adapter (add_adapters), and it is no prompt-tuning, P-tuning or prefix-tuning wrapper")
    if (trained := _trained_in_place(config)) and not allow_trained_modules:
        raise ValueError(f"the adapter trained {trained} in place, so the base model's values are gone and its "
                         "output cannot be given. Pass allow_trained_modules=True to run the base model with those "
                         "trained modules, or take reference outputs from a fresh copy of the base model")
    merged = {n: m.base.weight.detach().clone() for n, m in wrappers if getattr(m, "merged", False)}
    methods = {k: vars(model)[k] for k in ("forward", "generate") if k in vars(model)}  # instance ones, if any
    try:
        for name, wrapper in wrappers:
            if name in merged:
                wrapper.unmerge()  # base.weight = W + dW - dW
            model.set_submodule(name, wrapper.base)
        if prompt:  # instance attributes shadow the wrapper's methods; nn.Module.__call__ finds them
            model.forward = model.base_model.forward
            if hasattr(model.base_model, "generate"):
                model.generate = model.base_model.generate
        model._peftkit_disabled = True
        yield model
    finally:
        for key in ("_peftkit_disabled", "forward", "generate"):
            vars(model).pop(key, None)
        vars(model).update(methods)
        for name, wrapper in wrappers:
            model.set_submodule(name, wrapper)
            if name in merged:
                with torch.no_grad():
                    wrapper.base.weight.copy_(merged[name])  # the merged weight, bit for bit
                wrapper.merged = True


def _trained_in_place(config) -> list[str]:
    """What the technique trains among the model's own modules (its values before training are kept nowhere)."""
    trained = list(getattr(config, "modules_to_save", None) or [])
    if getattr(config, "bias", "none") != "none":
        trained.append(f"the biases (bias={config.bias!r})")
    if PLACEMENTS.get(getattr(config, "placement", None), {}).get("train_norms"):
        trained.append(f"the layers' norms ({config.placement!r})")
    return trained


# --- several named LoRA adapters ---
@dataclass
class NamedAdapter:
    """One named LoRA adapter: what add_lora did, and its wrappers by the full name of the layer each wraps."""
    config: LoRAConfig
    layers: dict[str, LoRALinear]


KEY = "_peftkit_named_adapters"  # the model's attribute holding {"active": name, "adapters": {name: NamedAdapter}}


def _live_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _registry(model: nn.Module, required: bool = True) -> dict | None:
    """The named adapters, checked against the model. A model with LoRA but no names yet (add_lora,
    load_adapter) gets its adapter named "default", as in peft; after ``merge_lora(model)`` unloaded the
    active adapter, every adapter is gone, as after peft's ``merge_and_unload``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module with LoRA, got {type(model).__name__}")
    if vars(model).get("_peftkit_disabled"):
        raise ValueError("the model's adapters are out of the forward pass (inside disable_adapter or "
                         "serving.mixed_batch): leave that block first")
    live, registry = _live_layers(model), vars(model).get(KEY)
    active = registry and registry["adapters"][registry["active"]].layers
    if registry is not None and not any(live.get(n) is layer for n, layer in active.items()):
        del model._peftkit_named_adapters  # merged and unloaded: none of the active adapter's layers is left
        registry = None
    if registry is not None and live != active:
        raise ValueError(f"the model's LoRA layers ({sorted(live)}) are not those of its active adapter "
                         f"{registry['active']!r}: they were changed behind the named adapters' back")
    if registry is None and live:
        if not isinstance(config := vars(model).get("adapter_config"), LoRAConfig):
            raise ValueError("the model has LoRA layers but no LoRA config (model.adapter_config): use add_lora")
        registry = model._peftkit_named_adapters = {"active": "default",
                                                    "adapters": {"default": NamedAdapter(config, live)}}
    if registry is None and required:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter: call add_named_adapter(model, name, "
                         "target_modules) or load_named_adapter(model, path, name) first")
    return registry


def _adapter(registry: dict, name) -> NamedAdapter:
    if name not in registry["adapters"]:
        raise ValueError(f"no adapter named {name!r}; the model's adapters are {list(registry['adapters'])}")
    return registry["adapters"][name]


def _check_unmerged(registry: dict, action: str) -> None:
    """Taking a merged adapter out would leave W + dW in the base layers."""
    if any(layer.merged for layer in registry["adapters"][registry["active"]].layers.values()):
        raise ValueError(f"adapter {registry['active']!r} is merged into the base weights: unmerge_lora(model) "
                         f"before {action}")


def _check_own_tensors(config: LoRAConfig, what: str) -> None:
    if trained := _trained_in_place(config):
        raise ValueError(f"{what} trains {trained}, modules of the model itself that every named adapter would "
                         "share (peft keeps a copy per adapter): named adapters hold LoRA factors only")


def _plug(model: nn.Module, out: NamedAdapter | None, into: NamedAdapter | None) -> None:
    """Take adapter ``out``'s wrappers out of the model (their base layers go back) and put ``into``'s in."""
    for name, layer in (out.layers if out else {}).items():
        model.set_submodule(name, layer.base)
        for factor in _factors(layer):
            factor.requires_grad_(False)  # an inactive adapter is frozen, as in peft
    for name, layer in (into.layers if into else {}).items():
        device = layer.base.weight.device  # model.to(...) moved the base layer, not this adapter
        if any(factor.device != device for factor in _factors(layer)):
            layer.to(device)  # the base is there already
        for factor in _factors(layer):
            factor.requires_grad_(True)
        layer.train(layer.base.training)
        model.set_submodule(name, layer)
    if into:
        model.adapter_config = into.config
    else:
        vars(model).pop("adapter_config", None)


def _factors(layer: LoRALinear) -> list[nn.Parameter]:  # lora_A and lora_B (an embedding's too): not the base's
    return [p for n, p in layer.named_parameters() if not n.startswith("base.")]


def _switch(model: nn.Module, out: NamedAdapter | None, into: NamedAdapter | None) -> None:
    try:
        _plug(model, out, into)
    except BaseException:  # out's wrappers all come out before any of into's go in: undo in reverse
        _plug(model, into, out)
        raise


def _set_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, p.requires_grad))


def _add(model: nn.Module, name, inject) -> nn.Module:
    """Add the adapter that ``inject(bare model)`` builds under ``name``: all or nothing."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"an adapter's name is a non-empty str such as 'default', got {name!r}")
    registry = _registry(model, required=False)
    if registry is not None:
        if name in registry["adapters"]:
            raise ValueError(f"the model already has an adapter named {name!r} (its adapters: "
                             f"{list(registry['adapters'])}): delete_adapter it first, or choose another name")
        _check_unmerged(registry, "adding another adapter")
        _check_own_tensors(registry["adapters"][registry["active"]].config, f"adapter {registry['active']!r}")
    active = registry and registry["adapters"][registry["active"]]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        _plug(model, active, None)  # add_lora and load_adapter then work on the bare model
        inject(model)  # all or nothing itself
        new = NamedAdapter(model.adapter_config, _live_layers(model))
        _check_own_tensors(new.config, f"adapter {name!r}")
        if active:
            _plug(model, new, active)  # added inactive, as in peft
    except BaseException:
        _plug(model, NamedAdapter(None, _live_layers(model)), active)
        _set_flags(model, flags)
        raise
    if active:
        _set_flags(model, flags)  # add_lora froze the whole model
        registry["adapters"][name] = new
    else:
        model._peftkit_named_adapters = {"active": name, "adapters": {name: new}}
    return model


def add_named_adapter(model: nn.Module, name: str, target_modules, **lora_kwargs) -> nn.Module:
    """A new LoRA adapter ``name``: ``add_lora(model, target_modules, **lora_kwargs)`` on the base model.

    The model's first adapter becomes active; later ones are added inactive and frozen (as peft's
    ``add_adapter``): ``set_adapter`` activates them. A model carrying plain LoRA from add_lora has
    it named "default". ``modules_to_save`` and bias training are refused: they train the model's own
    modules, which all adapters share. On any error the model is left as it was."""
    return _add(model, name, lambda bare: add_lora(bare, target_modules, **lora_kwargs))


def load_named_adapter(model: nn.Module, path, name: str) -> nn.Module:
    """Add the adapter of a ``save_adapter`` file as ``name`` (active if it is the model's first).
    A file that fails to load leaves the model and its adapters as they were."""
    return _add(model, name, lambda bare: load_adapter(bare, path))


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make ``name`` the active adapter: the only one in the forward pass and the only one that trains.
    Adapters may differ in rank, alpha and target layers."""
    registry = _registry(model)
    new = _adapter(registry, name)
    if name != registry["active"]:
        _check_unmerged(registry, "set_adapter")
        _switch(model, registry["adapters"][registry["active"]], new)
        registry["active"] = name
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Delete adapter ``name``. Deleting the active one activates the first remaining name in sorted
    order, as peft does (with a warning); deleting the last one leaves the base model, frozen."""
    registry = _registry(model)
    _adapter(registry, name)
    if name == registry["active"]:
        _check_unmerged(registry, "delete_adapter")
        remaining = sorted(n for n in registry["adapters"] if n != name)
        _switch(model, registry["adapters"][name], registry["adapters"][remaining[0]] if remaining else None)
        if remaining:
            warnings.warn(f"adapter {name!r} was active and is deleted; {remaining[0]!r} is active now")
            registry["active"] = remaining[0]
        else:
            del model._peftkit_named_adapters
    del registry["adapters"][name]
    return model


def active_adapter(model: nn.Module) -> str:
    """The name of the adapter in the forward pass."""
    return _registry(model)["active"]


def list_adapters(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were added."""
    return list(_registry(model)["adapters"])

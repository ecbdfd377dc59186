"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685).

A frozen linear layer ``y = W x + b`` learns its update as the product of two thin matrices:

    y = W x + b + scaling * B (A x)        A: (rank, in), B: (out, rank), rank << min(in, out)
    scaling = alpha / rank                 (rsLoRA, Kalajdzievski 2023: alpha / sqrt(rank))

Trained: ``lora_A`` and ``lora_B`` of every wrapped linear, plus any ``modules_to_save``
(e.g. a new classifier head). Frozen: everything else, including ``W`` and ``b``.

``B`` starts at zero, so the wrapped model starts out equal to the base model; ``A`` starts Kaiming-uniform, so the
first gradient reaching ``B`` is not zero. ``merge()`` folds ``delta W = scaling * B A`` into ``W``. Names: peft's.

    add_lora(model, ["query", "value"], rank=8, alpha=16, modules_to_save=["classifier"])
    ...train...                                       # model.adapter_config: what add_lora did
    save_adapter(model, "lora.safetensors"); export_peft(model, "out/", "bert-base-uncased")  # ours; peft's format
    model = merge_lora(model)                         # plain nn.Linear layers again

GPT-2's ``Conv1D`` (W stored as (in, out)) gets the same A and B; merging transposes delta W. This file needs
only torch. Beside it, ``targets.py`` adds peft's regex, exclude and layer rules and target suggestions;
``lora_layers.py`` adapts embeddings; ``lora_files.py`` with ``adapter_files.py`` saves. A missing one is named.
"""

import importlib
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn


class LoRALinear(nn.Module):
    """A frozen linear ``base`` (nn.Linear, GPT-2's Conv1D, 4-bit) plus a trainable low-rank ``scaling * B A``."""
    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if layer_kind(base) not in ("linear", "conv1d", "4bit"):
            raise TypeError(f"LoRALinear wraps an nn.Linear, Conv1D or peftkit 4-bit linear, got {type(base).__name__}")
        LoRAConfig([], rank, alpha, dropout, rslora)  # checks the hyperparameters (LoRAConfig is below)
        self.base, self.rank, self.alpha, self.rslora = base, rank, alpha, rslora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # peft's name: Conv1D stores W as (in, out), so delta W is transposed to merge (forward is the same)
        self.fan_in_fan_out = layer_kind(base) == "conv1d"
        in_features, out_features = base.weight.shape if self.fan_in_fan_out else (base.in_features, base.out_features)
        # float32 factors over any base (float64 stays), as in peft: small updates would vanish in bf16/fp16/4 bits
        dtype = torch.float64 if base.weight.dtype == torch.float64 else torch.float32
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=base.weight.device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=base.weight.device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.in_features, self.out_features, self.merged = in_features, out_features, False
        base.requires_grad_(False)  # last: a failed construction leaves the base as it was

    weight = property(lambda self: self.base.weight)  # the base's, as in peft (T5's feed-forward reads wo.weight)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)  # (..., out)
        return result if self.merged else (result + self.update(x)).to(result.dtype)

    def update(self, x: torch.Tensor) -> torch.Tensor:  # scaling * B (A x): (..., in) -> (..., rank) -> (..., out)
        x = x.to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling  # no delta W is ever built

    def delta_weight(self) -> torch.Tensor:
        """delta W = scaling * B A, in ``base.weight``'s layout: (out, in), or (in, out) for a Conv1D base."""
        delta = self.lora_B.weight @ self.lora_A.weight * self.scaling  # (out, rank) @ (rank, in)
        return delta.T if self.fan_in_fan_out else delta

    def merged_weight(self) -> torch.Tensor:
        """W + delta W in W's dtype and layout: what ``merge()`` writes into ``base.weight``."""
        if layer_kind(self.base) == "4bit":
            raise TypeError("cannot merge LoRA into a 4-bit base: W + delta W would be re-quantized to 4 bits, "
                            "which rounds most of the small update away; to merge a QLoRA adapter, see peftkit.qlora")
        return (self.base.weight + self.delta_weight()).to(self.base.weight.dtype)

    def merge(self, safe_merge: bool = False) -> None:  # base.weight = merged_weight() (a no-op when merged)
        merge_lora(self, unload=False, safe_merge=safe_merge)

    def unmerge(self) -> None:  # take delta W back out of base.weight (a no-op when not merged)
        if self.merged:
            with torch.no_grad():
                self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


# --- injecting into a model ---
@dataclass
class LoRAConfig:
    """What ``add_lora`` did (``model.adapter_config``), saved with the tensors; checks its own fields."""
    technique: ClassVar[str] = "lora"  # the tag saved in adapter files
    target_modules: list[str]  # full names of the wrapped layers
    rank: int = 8  # peft's `r`: inner dimension of B A
    alpha: float = 16  # peft's `lora_alpha`; positive and finite (`not 0 < alpha < inf` refuses NaN too)
    dropout: float = 0.0  # peft's `lora_dropout`, on the LoRA path's input only
    rslora: bool = False  # peft's `use_rslora`: scaling = alpha / sqrt(rank)
    modules_to_save: list[str] = field(default_factory=list)  # full names of modules trained in full
    exclude_modules: list[str] | str | None = None  # as asked (targets.py checks these three, selecting)
    layers_to_transform: list[int] | int | None = None  # as asked; target_modules holds only those layers
    layers_pattern: list[str] | str | None = None  # where layers_to_transform's index is found
    bias: str = "none"  # peft's bias: which biases train too: "none", "all" of them, or "lora_only" (wrapped layers')

    def __post_init__(self):
        for arg in ("target_modules", "modules_to_save"):
            names = [getattr(self, arg)] if isinstance(getattr(self, arg), str) else getattr(self, arg)
            if not isinstance(names, (list, tuple, set)) or not all(isinstance(n, str) for n in names):
                raise TypeError(f"{arg} must be a module name or a list of names, got {names!r}")
            setattr(self, arg, list(names))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"rank (peft's r) must be a positive int such as 8, got {self.rank!r}")
        if isinstance(alpha := self.alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
            raise ValueError(f"alpha must be a positive finite number such as 16 (scaling = alpha/rank), got {alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout is a probability in [0, 1), got {self.dropout!r}")
        if not isinstance(self.rslora, bool):
            raise TypeError(f"rslora must be True or False, got {self.rslora!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only' (peft's choices), got {self.bias!r}")


def _sibling(name: str, needed_for: str):  # peftkit's own, or the copy beside this file; asked for if missing
    try:
        return importlib.import_module(f".{name}", __package__) if __package__ else importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name not in (name, f"{__package__}.{name}"):
            raise
        raise ModuleNotFoundError(f"{name}.py must be beside lora.py for {needed_for}: copy peftkit/{name}.py "
                                  "into this folder", name=name) from err


def _lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:  # LoRAEmbedding too: it subclasses LoRALinear
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _lora_config(model: nn.Module, required: bool = False) -> LoRAConfig | None:  # model.adapter_config if LoRA's
    if not isinstance(config := vars(model).get("adapter_config"), LoRAConfig) and required:
        raise ValueError("the model has no LoRA config (model.adapter_config): call add_lora(model, target_modules)")
    return config if isinstance(config, LoRAConfig) else None


# --- choosing the layers: names, dotted suffixes, "all-linear" (targets.py adds peft's other rules) ---
HEADS = ("lm_head", "classifier", "score", "logits_proj")  # output heads "all-linear" leaves out (logits_proj: XLNet)


def layer_kind(module: nn.Module) -> str | None:  # what LoRA can wrap: linear, conv1d, 4bit, embedding; else None
    conv1d = type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2 and module.weight.shape[1] == getattr(module, "nf", None)  # transformers', by name
    kinds = {"linear": isinstance(module, nn.Linear), "conv1d": conv1d,  # Conv1D: weight (in, out), y = x @ W + b
             "4bit": getattr(type(module), "is_peftkit_4bit", False), "embedding": isinstance(module, nn.Embedding)}
    return next((kind for kind, is_kind in kinds.items() if is_kind), None)


def matches(name: str, targets: list) -> bool:  # peft's rule: a full name or its last dotted components
    return any(name == t or name.endswith("." + t) for t in targets)


def inside(name: str, modules) -> bool:  # name is one of the full names `modules`, or inside one of them
    return any(name == m or name.startswith(m + ".") for m in modules)


def modules_named(model: nn.Module, names) -> list[str]:  # full names of what `names` (names or suffixes) picks
    found = [n for n, _ in model.named_modules() if n and matches(n, names)]
    if missing := [t for t in names if not any(matches(n, [t]) for n in found)]:
        raise ValueError(f"modules_to_save {missing} matched no module; the top-level modules are "
                         f"{[n for n, _ in model.named_children()]}")
    return found


def select(model: nn.Module, target_modules, exclude_modules=None, layers_to_transform=None, layers_pattern=None,
           skip=()) -> list[str]:
    """Full names of the layers ``target_modules`` picks, outside the full names ``skip`` (modules_to_save)."""
    all_linear = isinstance(target_modules, str) and target_modules.lower() == "all-linear"
    if isinstance(target_modules, str) and not all_linear or (exclude_modules, layers_to_transform, layers_pattern) \
            != (None, None, None):  # targets.py applies peft's other rules, then comes back here with full names
        return _sibling("targets", "a str target_modules (a regular expression), exclude_modules or "
                        "layers_to_transform").select(model, target_modules, exclude_modules, layers_to_transform,
                                                      layers_pattern, skip)
    modules = {n: m for n, m in model.named_modules() if n}
    kinds = {n: layer_kind(m) for n, m in modules.items()}
    if not (short := sorted({n.rpartition(".")[2] for n, k in kinds.items() if k})):
        raise ValueError(f"{type(model).__name__} has no nn.Linear, Conv1D, 4-bit linear or nn.Embedding to wrap")
    if all_linear:
        heads = [getattr(model, a, None) for a in HEADS] + [getattr(model, "get_output_embeddings", lambda: None)()]
        heads = [n for n, m in modules.items() if any(m is h for h in heads)]
        found = [n for n, k in kinds.items() if k in ("linear", "conv1d", "4bit") and not inside(n, heads)]
    else:
        unmatched = [t for t in target_modules if not any(matches(n, [t]) for n in modules)]
        if unmatched or not target_modules:
            params = [t for t in unmatched if any(matches(n, [t]) for n, _ in model.named_parameters())]
            family = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
            raise ValueError(f"target_modules {unmatched or list(target_modules)} matched no module"
                             + (f" ({params} are parameters, not layers: {family} stores them so)" if params
                                else "") + f". The adaptable layers are named {short} (e.g. "
                             f"{next(n for n in kinds if kinds[n])!r}); pass such names or 'all-linear'")
        found = [n for n in modules if matches(n, target_modules)]
    if not (found := [n for n in found if not inside(n, skip)]):
        raise ValueError(f"target_modules {target_modules!r} left no layer outside modules_to_save {list(skip)}")
    if wrong := {n: type(modules[n]).__name__ for n in found if not kinds[n]}:
        raise TypeError(f"LoRA wraps nn.Linear, Conv1D, 4-bit linear and nn.Embedding layers, but target_modules "
                        f"matched {wrong}; target the layers inside instead, named {short}")
    return found


def add_lora(model, target_modules, rank=8, alpha=16, dropout=0.0, rslora=False, modules_to_save=(),
             exclude_modules=None, layers_to_transform=None, layers_pattern=None, bias="none"):
    """Wrap the targeted layers of ``model`` in ``LoRALinear`` (``LoRAEmbedding`` for embeddings), in place; freeze the
    rest; return ``model``. ``target_modules``: full names or dotted suffixes (``"query"`` matches ``...self.query``),
    ``"all-linear"`` (every linear but the output head), or a regular expression; ``exclude_modules``,
    ``layers_to_transform``, ``layers_pattern`` narrow it (targets.py). ``modules_to_save``: trained in full, e.g.
    ``["classifier"]``. ``bias``: "none", "all" or "lora_only" (the wrapped layers'). On any error nothing changes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_lora needs a torch.nn.Module, got {type(model).__name__}")
    asked = LoRAConfig([] if isinstance(target_modules, str) else target_modules, rank, alpha, dropout, rslora,
                       modules_to_save, exclude_modules, layers_to_transform, layers_pattern, bias)  # checks them
    if layers := _lora_layers(model):
        raise ValueError(f"the model already has LoRA layers ({layers[0][0]}, ...): call "
                         "add_lora once with every target, or merge_lora(model) first")
    if getattr(vars(model).get("adapter_config"), "technique", LoRAConfig.technique) != LoRAConfig.technique:
        raise ValueError(f"the model already carries {model.adapter_config.technique} (model.adapter_config): "
                         "one technique per model; remove it first")
    modules, saved = dict(model.named_modules()), modules_named(model, asked.modules_to_save)
    chosen = select(model, target_modules if isinstance(target_modules, str) else asked.target_modules,
                    exclude_modules, layers_to_transform, layers_pattern, skip=saved)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        wrappers = {name: (_sibling("lora_layers", "LoRA on an nn.Embedding").LoRAEmbedding
                           if layer_kind(modules[name]) == "embedding" else LoRALinear)(
            modules[name], rank, alpha, dropout, rslora) for name in chosen}
        model.requires_grad_(False)
        for name, wrapper in wrappers.items():
            model.set_submodule(name, wrapper)
        for name in saved:
            modules[name].requires_grad_(True)
        model.adapter_config = LoRAConfig(chosen, rank, alpha, dropout, rslora, saved, exclude_modules,
                                          layers_to_transform, layers_pattern, bias)
        for name in _trained_biases(model):
            model.get_parameter(name).requires_grad_(True)
    except BaseException:
        _remove_lora(model, flags)
        raise
    return model


def _trained_biases(model: nn.Module) -> list[str]:  # peft's bias modes: the biases that train beside A and B
    if (bias := getattr(_lora_config(model), "bias", "none")) == "all":
        return [n for n, _ in model.named_parameters() if n == "bias" or n.endswith(".bias")]
    return [f"{n}.base.bias" for n, m in _lora_layers(model) if bias == "lora_only" and getattr(m.base, "bias", None) is not None]


def _remove_lora(model: nn.Module, flags: dict | None = None) -> None:  # undo add_lora (flags: requires_grad before)
    for name, layer in _lora_layers(model):
        model.set_submodule(name, layer.base)
    for n, p in model.named_parameters():
        p.requires_grad_((flags or {}).get(n, p.requires_grad))
    if _lora_config(model) is not None:
        del model.adapter_config


def merge_lora(model: nn.Module, unload: bool = True, safe_merge: bool = False) -> nn.Module:
    """Fold every LoRA update into its base weight; returns ``model``. ``unload`` (the default) puts back the plain
    merged base layers (and drops ``model.adapter_config``); ``unload=False`` keeps the wrappers for ``unmerge_lora``.
    ``safe_merge`` (peft's) refuses NaN or inf weights: a ValueError names the layers; the model stays as it was."""
    layers = [(name, layer) for name, layer in _lora_layers(model) if not layer.merged]
    with torch.no_grad():  # all or nothing: first every merged weight (one extra copy), the model untouched
        merged = [layer.merged_weight() for _, layer in layers]
        bad = [name or type(layer).__name__ for (name, layer), w in zip(layers, merged) if not w.isfinite().all()]
        if safe_merge and bad:
            raise ValueError(f"merging LoRA into {bad} would write NaN/inf into the base weights: the adapter is "
                             "broken (a diverged training run?); nothing was merged")
        for (_, layer), weight in zip(layers, merged):  # then copy them in: nothing left that can fail halfway
            layer.base.weight.copy_(weight)
            layer.merged = True
    if unload:
        _remove_lora(model)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:  # undo merge_lora(model, unload=False) on every layer
    for _, layer in _lora_layers(model):
        layer.unmerge()
    return model


# --- saving: lora_files.py writes, reads and exports the files (with adapter_files.py) ---
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What LoRA trains, what a file holds: the LoRA factors, ``modules_to_save`` and the ``bias`` mode's biases."""
    if not (layers := _lora_layers(model)):
        raise ValueError("the model has no LoRA layers: call add_lora(model, target_modules) first")
    saved, biases = getattr(_lora_config(model), "modules_to_save", []), set(_trained_biases(model))
    factors = {f"{n}.{p}" if n else p for n, m in layers for p, _ in m.named_parameters() if p.startswith("lora_")}
    return {n: p.detach() for n, p in model.named_parameters()
            if n in factors or n in biases or inside(n.rpartition(".")[0], saved)}


def __getattr__(name: str):  # lora.save_adapter, load_adapter, export_peft: lora_files.py's, found when first used
    if name in ("save_adapter", "load_adapter", "export_peft"):
        return getattr(_sibling("lora_files", "saving, loading and exporting"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

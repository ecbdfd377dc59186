"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685).

A frozen linear layer ``y = W x + b`` learns its update as the product of two thin matrices:

    y = W x + b + scaling * B (A x)        A: (rank, in), B: (out, rank), rank << min(in, out)
    scaling = alpha / rank                 (rsLoRA, Kalajdzievski 2023: alpha / sqrt(rank))

Trained: ``lora_A`` and ``lora_B`` of every wrapped linear, plus any ``modules_to_save``
(e.g. a new classifier head). Frozen: everything else, including ``W`` and ``b``.

``B`` starts at zero, so the wrapped model starts out exactly equal to the base model; ``A``
starts Kaiming-uniform like an ``nn.Linear``, so the very first gradient reaching ``B`` is not
zero. ``merge()`` folds ``delta W = scaling * B A`` into ``W``: inference then costs what the
plain linear costs. The names follow Hugging Face peft (``rank`` is peft's ``r``).

    add_lora(model, ["query", "value"], rank=8, alpha=16, modules_to_save=["classifier"])
    ...train...                                       # model.adapter_config: what add_lora did
    save_adapter(model, "lora.safetensors")           # the trained tensors only; load_adapter reads them
    export_peft(model, "out/", "sentence-transformers/all-MiniLM-L6-v2")  # peft's format
    model = merge_lora(model)                         # plain nn.Linear layers again
"""

import json
import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import nn


class LoRALinear(nn.Module):
    """A frozen linear ``base`` plus a trainable low-rank update ``scaling * B A``."""
    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        _check_layer_args(base, rank, alpha, dropout, rslora)  # the helpful errors, below
        self.base, self.rank, self.alpha, self.rslora = base, rank, alpha, rslora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # float32 factors over any base (float64 stays), as in peft: small updates would vanish in bf16/fp16/4 bits
        dtype = torch.float64 if isinstance(base, nn.Linear) and base.weight.dtype == torch.float64 else torch.float32
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.in_features, self.out_features, self.merged = base.in_features, base.out_features, False
        base.requires_grad_(False)  # last: a failed construction leaves the base as it was

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)  # (..., out)
        if self.merged:
            return result
        x = x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling  # (..., rank) -> (..., out), no delta W
        return (result + update).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """delta W = scaling * B A, shape (out, in): what ``merge()`` adds to ``base.weight``."""
        return self.lora_B.weight @ self.lora_A.weight * self.scaling  # (out, rank) @ (rank, in)

    def merged_weight(self) -> torch.Tensor:
        """W + delta W in W's dtype, shape (out, in): what ``merge()`` writes into ``base.weight``."""
        if not isinstance(self.base, nn.Linear):  # a 4-bit base: __init__ takes nothing else
            raise TypeError("cannot merge LoRA into a 4-bit base: W + delta W would be re-quantized to 4 bits, "
                            "which rounds most of the small update away; to merge a QLoRA adapter, see peftkit.qlora")
        return (self.base.weight + self.delta_weight()).to(self.base.weight.dtype)

    def merge(self) -> None:
        """Fold delta W into ``base.weight``: ``base.weight = merged_weight()`` (a no-op when already merged)."""
        merge_lora(self, unload=False)

    def unmerge(self) -> None:
        """Take delta W back out of ``base.weight`` (a no-op when not merged)."""
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
    target_modules: list[str]  # full names of the wrapped linears
    rank: int = 8  # peft's `r`: inner dimension of B A
    alpha: float = 16  # peft's `lora_alpha`; positive and finite (`not 0 < alpha < inf` refuses NaN too)
    dropout: float = 0.0  # peft's `lora_dropout`, on the LoRA path's input only
    rslora: bool = False  # peft's `use_rslora`: scaling = alpha / sqrt(rank)
    modules_to_save: list[str] = field(default_factory=list)  # full names of modules trained in full

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


def _check_layer_args(base, rank, alpha, dropout, rslora) -> None:  # LoRALinear's checks
    if not _is_linear(base):
        raise TypeError(f"LoRALinear wraps an nn.Linear or a peftkit 4-bit linear, got {type(base).__name__}")
    LoRAConfig([], rank, alpha, dropout, rslora)  # checks the hyperparameters


def _is_linear(module: nn.Module) -> bool:  # a 4-bit linear is duck-typed: this file must work copied alone
    return isinstance(module, nn.Linear) or bool(getattr(type(module), "is_peftkit_4bit", False))


def _matches(name: str, targets) -> bool:  # peft's rule: a target is a full name or its last dotted components
    return any(name == t or name.endswith("." + t) for t in targets)


def _inside(name: str, modules) -> bool:  # name is one of the full names `modules`, or in one of them
    return any(name == m or name.startswith(m + ".") for m in modules)


def _lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _lora_config(model: nn.Module, required: bool = False) -> LoRAConfig | None:  # model.adapter_config if LoRA's
    if not isinstance(config := vars(model).get("adapter_config"), LoRAConfig) and required:
        raise ValueError("the model has no LoRA config (model.adapter_config): call add_lora(model, target_modules)")
    return config if isinstance(config, LoRAConfig) else None


def add_lora(model, target_modules, rank=8, alpha=16, dropout=0.0, rslora=False, modules_to_save=()):
    """Wrap the targeted linears of ``model`` in ``LoRALinear``, in place; freeze the rest; return ``model``.

    ``target_modules``: names matched exactly or as a dotted suffix (``"query"`` matches
    ``bert.encoder.layer.0.attention.self.query``), or ``"all-linear"`` (every linear but the output
    head). ``modules_to_save``: modules trained in full, e.g. ``["classifier"]``. ``model.adapter_config``
    records what was done. Everything is checked first; on any error the model is left as it was."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_lora needs a torch.nn.Module, got {type(model).__name__}")
    all_linear = isinstance(target_modules, str) and target_modules == "all-linear"
    asked = LoRAConfig([] if all_linear else target_modules, rank, alpha, dropout, rslora, modules_to_save)
    if layers := _lora_layers(model):
        raise ValueError(f"the model already has LoRA layers ({layers[0][0]}, ...): call "
                         "add_lora once with every target, or merge_lora(model) first")
    if getattr(vars(model).get("adapter_config"), "technique", LoRAConfig.technique) != LoRAConfig.technique:
        raise ValueError(f"the model already carries {model.adapter_config.technique} (model.adapter_config): "
                         "one technique per model; remove it first")
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if _is_linear(m)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear (or 4-bit linear) layer to wrap")
    saved = [n for n in modules if n and _matches(n, asked.modules_to_save)]
    if missing := [s for s in asked.modules_to_save if not any(_matches(n, [s]) for n in saved)]:
        raise ValueError(f"modules_to_save {missing} matched no module; the top-level modules are "
                         f"{[n for n, _ in model.named_children()]}")
    if all_linear:  # every linear but those in the output head (and in modules_to_save), like peft
        get_output = getattr(model, "get_output_embeddings", lambda: None)
        heads = [getattr(model, a, None) for a in ("lm_head", "classifier", "score")] + [get_output()]
        heads = [n for n, m in modules.items() if any(m is h for h in heads)]
        targets = [n for n in linears if not _inside(n, heads + saved)]
    else:
        short_names = sorted({n.rpartition(".")[2] for n in linears})
        unmatched = [t for t in asked.target_modules if not any(_matches(n, [t]) for n in modules)]
        if unmatched or not asked.target_modules:
            raise ValueError(f"target_modules {unmatched or asked.target_modules} matched no module. The linear "
                             f"layers are named {short_names} (e.g. {linears[0]!r}); pass such names or 'all-linear'")
        targets = [n for n in modules if n and _matches(n, asked.target_modules) and not _inside(n, saved)]
        if wrong := {n: type(modules[n]).__name__ for n in targets if not _is_linear(modules[n])}:
            raise TypeError(f"LoRA wraps linear layers (nn.Linear or a peftkit 4-bit linear), but target_modules "
                            f"matched {wrong}; target the linears inside instead, named {short_names}")
    if not targets:
        raise ValueError(f"target_modules {target_modules!r} left no linear layer outside modules_to_save")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        wrappers = {name: LoRALinear(modules[name], rank, alpha, dropout, rslora) for name in targets}
        model.requires_grad_(False)
        for name, wrapper in wrappers.items():
            model.set_submodule(name, wrapper)
        for name in saved:
            modules[name].requires_grad_(True)
        model.adapter_config = LoRAConfig(targets, rank, alpha, dropout, rslora, saved)
    except BaseException:
        _remove_lora(model, flags)
        raise
    return model


def _remove_lora(model: nn.Module, flags: dict | None = None) -> None:  # undo add_lora (flags: requires_grad before)
    for name, layer in _lora_layers(model):
        model.set_submodule(name, layer.base)
    for n, p in model.named_parameters():
        p.requires_grad_((flags or {}).get(n, p.requires_grad))
    if _lora_config(model) is not None:
        del model.adapter_config


def merge_lora(model: nn.Module, unload: bool = True) -> nn.Module:
    """Fold every LoRA update into its base weight; returns ``model`` (a no-op without LoRA layers).

    With ``unload`` (the default) each ``LoRALinear`` is replaced by its plain merged base linear, ready to
    deploy at the base model's cost (``model.adapter_config`` goes too); ``unload=False`` keeps the wrappers,
    so that ``unmerge_lora`` can take the updates back out."""
    layers = [layer for _, layer in _lora_layers(model) if not layer.merged]
    with torch.no_grad():  # all or nothing: first every merged weight (one extra copy), the model untouched
        merged = [layer.merged_weight() for layer in layers]
        for layer, weight in zip(layers, merged):  # then copy them in: nothing left that can fail halfway
            layer.base.weight.copy_(weight)
            layer.merged = True
    if unload:
        _remove_lora(model)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora(model, unload=False)`` (or ``LoRALinear.merge()``) on every layer."""
    for _, layer in _lora_layers(model):
        layer.unmerge()
    return model


# --- saving ---
def _adapter_files():
    """adapter_files.py (and safetensors) do the saving; the technique itself needs only torch."""
    try:
        from . import adapter_files
    except ImportError:  # this file was copied into a project, beside adapter_files.py
        import adapter_files
    return adapter_files


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What LoRA trains, what a file holds: every ``lora_A``/``lora_B`` weight plus the ``modules_to_save``."""
    if not _lora_layers(model):
        raise ValueError("the model has no LoRA layers: call add_lora(model, target_modules) first")
    saved = getattr(_lora_config(model), "modules_to_save", [])
    return {n: p.detach() for n, p in model.named_parameters()
            if ".lora_A." in n or ".lora_B." in n or _inside(n.rpartition(".")[0], saved)}


def save_adapter(model: nn.Module, path):
    """Write ``adapter_state_dict(model)`` and ``model.adapter_config`` to one safetensors file, atomically."""
    return _adapter_files().write_adapter(adapter_state_dict(model), path, _lora_config(model, required=True))


def load_adapter(model: nn.Module, path) -> LoRAConfig:
    """Load what ``save_adapter`` wrote, injecting LoRA from the saved config if ``model`` has none.

    The file must be LoRA's and hold exactly what LoRA trains, in the model's shapes: another technique's file,
    other keys (a frozen base weight, say) or missing ones are a ValueError naming them. LoRA with another alpha
    or rslora than the file's is refused (not silently run with its own scaling), and so is a merged model; the
    model keeps its own ``dropout`` (it acts in training only). On any error or interruption the model is left
    exactly as it came."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapter needs a torch.nn.Module, got {type(model).__name__}")
    tensors, config = _adapter_files().read_adapter(path, LoRAConfig)
    layers, flags = _lora_layers(model), {n: p.requires_grad for n, p in model.named_parameters()}
    if any(layer.merged for _, layer in layers):  # a later unmerge would take out the new B A, not the merged one
        raise ValueError("the model's LoRA is merged into its base weights: unmerge_lora(model) before load_adapter")
    if other := next((m for _, m in layers if (m.alpha, m.rslora) != (config.alpha, config.rslora)), None):
        raise ValueError(f"{path} was trained with alpha={config.alpha}, rslora={config.rslora}, but the model's "
                         f"LoRA has alpha={other.alpha}, rslora={other.rslora}, which would scale its update wrongly. "
                         "Load into a model without LoRA (load_adapter then adds it with the file's config)")
    if not layers:
        add_lora(model, **asdict(config))  # changes nothing if it fails
    try:
        _adapter_files().copy_tensors(model, tensors, adapter_state_dict(model), source=path, config=asdict(config))
    except BaseException:
        if not layers:
            _remove_lora(model, flags)  # put the model back as it came
        raise
    return config


# --- exporting to peft ---
def export_peft(model: nn.Module, path, base_model_name_or_path: str | None):
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in Hugging Face peft's format.

    ``peft.PeftModel.from_pretrained(base_model, path)`` then rebuilds the same model. The folder
    is replaced whole (other files in it are kept): an interrupted export leaves an earlier one intact."""
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a str or None, got {base_model_name_or_path!r}")
    tensors = {f"base_model.model.{k}": v for k, v in adapter_state_dict(model).items()}
    cfg = _lora_config(model, required=True)
    peft_config = {  # peft fills in its defaults for every field left out
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": cfg.target_modules,  # full names: peft then wraps exactly these layers
        "modules_to_save": cfg.modules_to_save or None, "bias": "none", "inference_mode": True}
    with _adapter_files().atomic_folder(path) as folder:
        _adapter_files().save_tensors(tensors, folder / "adapter_model.safetensors", peft_config)
        (folder / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    return path

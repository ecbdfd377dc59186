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

GPT-2's ``Conv1D`` (W stored as (in, out)) gets the same A and B; merging transposes delta W. Embeddings get
``LoRAEmbedding`` (``lora_layers.py``). Which layers are wrapped is decided by ``targets.py`` (peft's rules).
This file needs ``targets.py`` beside it (and ``lora_layers.py`` to adapt embeddings).
"""

import importlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import nn

try:
    from . import targets
except ImportError:  # this file was copied into a project, beside targets.py
    import targets


class LoRALinear(nn.Module):
    """A frozen linear ``base`` (nn.Linear, GPT-2's Conv1D, 4-bit) plus a trainable low-rank ``scaling * B A``."""
    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if targets.layer_kind(base) not in ("linear", "conv1d", "4bit"):
            raise TypeError(f"LoRALinear wraps an nn.Linear, Conv1D or peftkit 4-bit linear, got {type(base).__name__}")
        LoRAConfig([], rank, alpha, dropout, rslora)  # checks the hyperparameters (LoRAConfig is below)
        self.base, self.rank, self.alpha, self.rslora = base, rank, alpha, rslora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # peft's name: Conv1D stores W as (in, out), so delta W is transposed to merge (forward is the same)
        self.fan_in_fan_out = targets.layer_kind(base) == "conv1d"
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
        if targets.layer_kind(self.base) == "4bit":
            raise TypeError("cannot merge LoRA into a 4-bit base: W + delta W would be re-quantized to 4 bits, "
                            "which rounds most of the small update away; to merge a QLoRA adapter, see peftkit.qlora")
        return (self.base.weight + self.delta_weight()).to(self.base.weight.dtype)

    def merge(self, safe_merge: bool = False) -> None:
        """Fold delta W into ``base.weight``: ``base.weight = merged_weight()`` (a no-op when already merged)."""
        merge_lora(self, unload=False, safe_merge=safe_merge)

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
    target_modules: list[str]  # full names of the wrapped layers
    rank: int = 8  # peft's `r`: inner dimension of B A
    alpha: float = 16  # peft's `lora_alpha`; positive and finite (`not 0 < alpha < inf` refuses NaN too)
    dropout: float = 0.0  # peft's `lora_dropout`, on the LoRA path's input only
    rslora: bool = False  # peft's `use_rslora`: scaling = alpha / sqrt(rank)
    modules_to_save: list[str] = field(default_factory=list)  # full names of modules trained in full
    exclude_modules: list[str] | str | None = None  # as asked (targets.py); target_modules already leaves them out
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
        targets.check_selection(self.target_modules, self.exclude_modules, self.layers_to_transform,
                                self.layers_pattern)


def _sibling(name: str):  # adapter_files.py or lora_layers.py: peftkit's own, or the copy beside this file
    return importlib.import_module(f".{name}", __package__) if __package__ else importlib.import_module(name)


def _lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:  # LoRAEmbedding too: it subclasses LoRALinear
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _lora_config(model: nn.Module, required: bool = False) -> LoRAConfig | None:  # model.adapter_config if LoRA's
    if not isinstance(config := vars(model).get("adapter_config"), LoRAConfig) and required:
        raise ValueError("the model has no LoRA config (model.adapter_config): call add_lora(model, target_modules)")
    return config if isinstance(config, LoRAConfig) else None


def add_lora(model, target_modules, rank=8, alpha=16, dropout=0.0, rslora=False, modules_to_save=(),
             exclude_modules=None, layers_to_transform=None, layers_pattern=None, bias="none"):
    """Wrap the targeted layers of ``model`` in ``LoRALinear`` (``LoRAEmbedding`` for embeddings), in place;
    freeze the rest; return ``model``.

    ``target_modules``: names matched exactly or as a dotted suffix (``"query"`` matches
    ``bert.encoder.layer.0.attention.self.query``), a regular expression (a str), or ``"all-linear"`` (every
    linear but the output head); ``exclude_modules``, ``layers_to_transform`` and ``layers_pattern`` narrow it
    down, as in peft (see ``targets.py``). ``modules_to_save``: modules trained in full, e.g. ``["classifier"]``.
    ``bias``: "none", "all" (every bias trains) or "lora_only" (the wrapped layers' biases). ``model.adapter_config``
    records what was done. Everything is checked first; on any error the model is left as it was."""
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
    modules, saved = dict(model.named_modules()), targets.modules_named(model, asked.modules_to_save)
    chosen = targets.select(model, target_modules if isinstance(target_modules, str) else asked.target_modules,
                            exclude_modules, layers_to_transform, layers_pattern, skip=saved)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        wrappers = {name: (_sibling("lora_layers").LoRAEmbedding if targets.layer_kind(modules[name]) == "embedding"
                           else LoRALinear)(modules[name], rank, alpha, dropout, rslora) for name in chosen}
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
    """Fold every LoRA update into its base weight; returns ``model`` (a no-op without LoRA layers).

    ``unload`` (the default) puts back the plain merged base layers (``model.adapter_config`` goes too);
    ``unload=False`` keeps the wrappers for ``unmerge_lora``. ``safe_merge`` (peft's) refuses weights with NaN or
    inf: a ValueError names the layers, and the model stays as it was."""
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


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora(model, unload=False)`` (or ``LoRALinear.merge()``) on every layer."""
    for _, layer in _lora_layers(model):
        layer.unmerge()
    return model


# --- saving ---
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What LoRA trains, what a file holds: the LoRA factors, ``modules_to_save`` and the ``bias`` mode's biases."""
    if not (layers := _lora_layers(model)):
        raise ValueError("the model has no LoRA layers: call add_lora(model, target_modules) first")
    saved, biases = getattr(_lora_config(model), "modules_to_save", []), set(_trained_biases(model))
    factors = {f"{n}.{p}" if n else p for n, m in layers for p, _ in m.named_parameters() if p.startswith("lora_")}
    return {n: p.detach() for n, p in model.named_parameters()
            if n in factors or n in biases or targets.inside(n.rpartition(".")[0], saved)}


def save_adapter(model: nn.Module, path):
    """Write ``adapter_state_dict(model)`` and ``model.adapter_config`` to one safetensors file (adapter_files.py)."""
    return _sibling("adapter_files").write_adapter(adapter_state_dict(model), path, _lora_config(model, required=True))


def load_adapter(model: nn.Module, path, config_class=LoRAConfig, inject=None) -> LoRAConfig:
    """Load what ``save_adapter`` wrote, injecting LoRA from the saved config if ``model`` has none.

    The file must be LoRA's and hold exactly what LoRA trains, in the model's shapes (else a ValueError names the
    keys). LoRA with another alpha or rslora than the file's is refused, and so is a merged model; the model keeps
    its own ``dropout``. On any error the model is left as it came. A field the file predates takes its default."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapter needs a torch.nn.Module, got {type(model).__name__}")
    tensors, config = (files := _sibling("adapter_files")).read_adapter(path, config_class)
    layers, flags = _lora_layers(model), {n: p.requires_grad for n, p in model.named_parameters()}
    if any(layer.merged for _, layer in layers):  # a later unmerge would take out the new B A, not the merged one
        raise ValueError("the model's LoRA is merged into its base weights: unmerge_lora(model) before load_adapter")
    if other := next((m for _, m in layers if (m.alpha, m.rslora) != (config.alpha, config.rslora)), None):
        raise ValueError(f"{path} was trained with alpha={config.alpha}, rslora={config.rslora}, but the model's "
                         f"LoRA has alpha={other.alpha}, rslora={other.rslora}, which would scale its update wrongly. "
                         "Load into a model without LoRA (load_adapter then adds it with the file's config)")
    if not layers:
        (inject or add_lora)(model, **asdict(config))  # changes nothing if it fails
    try:
        files.copy_tensors(model, tensors, adapter_state_dict(model), source=path, config=asdict(config))
    except BaseException:
        if not layers:
            _remove_lora(model, flags)  # put the model back as it came
        raise
    return config


def export_peft(model: nn.Module, path, base_model_name_or_path: str | None):
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in Hugging Face peft's format.

    ``peft.PeftModel.from_pretrained(base_model, path)`` then rebuilds the same model. The folder
    is replaced whole (other files in it are kept): an interrupted export leaves an earlier one intact."""
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a str or None, got {base_model_name_or_path!r}")
    wrapped = dict(_lora_layers(model))
    peft_name = {f"{n}.base.bias": f"{n}.base_layer.bias" for n in wrapped}  # peft's name for the wrapped base
    tensors = {f"base_model.model.{peft_name.get(k, k)}": v for k, v in adapter_state_dict(model).items()}
    cfg, files = _lora_config(model, required=True), _sibling("adapter_files")
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

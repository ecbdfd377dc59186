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
    ...train...
    save_adapter(model, "lora.safetensors")         # the trained tensors only
    export_peft(model, "out/", "sentence-transformers/all-MiniLM-L6-v2")  # peft's format
    model = merge_lora(model)                         # plain nn.Linear layers again
"""

import json
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn


def _is_4bit(module: nn.Module) -> bool:
    # Duck-typed so that this file never imports peftkit/nf4.py (it must work copied alone).
    return bool(getattr(type(module), "is_peftkit_4bit", False))


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_4bit(module)


def _check_hyperparameters(rank, alpha, dropout, rslora=False) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank (peft's r) must be a positive int such as 8, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:  # NaN too
        raise ValueError(f"alpha must be a positive finite number such as 16 (scaling = alpha/rank), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout is a probability in [0, 1), got {dropout!r}")
    if not isinstance(rslora, bool):
        raise TypeError(f"rslora must be True or False, got {rslora!r}")


@dataclass
class LoRAConfig:
    """What ``add_lora`` did; saved with the adapter so that it can be redone before loading."""

    target_modules: list[str]  # full names of the wrapped linears
    rank: int = 8  # peft's `r`: inner dimension of B A
    alpha: float = 16  # peft's `lora_alpha`
    dropout: float = 0.0  # peft's `lora_dropout`, on the LoRA path's input only
    rslora: bool = False  # peft's `use_rslora`: scaling = alpha / sqrt(rank)
    modules_to_save: list[str] = field(default_factory=list)  # full names of modules trained in full


class LoRALinear(nn.Module):
    """A frozen linear ``base`` plus a trainable low-rank update ``scaling * B A``."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if not _is_linear(base):
            raise TypeError(f"LoRALinear wraps an nn.Linear or a peftkit 4-bit linear, got {type(base).__name__}")
        _check_hyperparameters(rank, alpha, dropout, rslora)
        self.base = base
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base.weight
        # Small updates vanish when rounded to bf16/fp16 (or 4 bits), so the factors stay in
        # float32 whatever the base holds -- as peft does by default.
        dtype = weight.dtype if isinstance(base, nn.Linear) and weight.dtype == torch.float64 else torch.float32
        device = getattr(weight, "device", None)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.merged = False
        base.requires_grad_(False)  # last: a failed construction leaves the base as it was

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)  # (..., out)
        if self.merged:
            return result
        x = x.to(self.lora_A.weight.dtype)
        # x -> (..., rank) -> (..., out): the (out, in) matrix delta W is never built here.
        update = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        return (result + update).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """delta W = scaling * B A, shape (out, in): what ``merge()`` adds to ``base.weight``."""
        return self.lora_B.weight @ self.lora_A.weight * self.scaling  # (out, rank) @ (rank, in)

    def _check_mergeable(self) -> None:
        if _is_4bit(self.base):
            raise TypeError("cannot merge LoRA into a 4-bit base: W + delta W would be re-quantized to 4 bits, "
                            "which rounds most of the small update away; to merge a QLoRA adapter, see peftkit.qlora")

    def merged_weight(self) -> torch.Tensor:
        """W + delta W in W's dtype, shape (out, in): what ``merge()`` writes into ``base.weight``."""
        return (self.base.weight + self.delta_weight()).to(self.base.weight.dtype)

    def merge(self) -> None:
        """Fold delta W into ``base.weight`` (a no-op when already merged)."""
        self._check_mergeable()
        if not self.merged:
            with torch.no_grad():
                self.base.weight.copy_(self.merged_weight())
            self.merged = True

    def unmerge(self) -> None:
        """Take delta W back out of ``base.weight`` (a no-op when not merged)."""
        if self.merged:
            with torch.no_grad():
                self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def _matches(name: str, targets) -> bool:
    """peft's rule: a target is a module's full name or its last dotted components."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head and everything inside it ("all-linear" skips them, like peft)."""
    heads = [getattr(model, a, None) for a in ("lm_head", "classifier", "score")]
    get_output = getattr(model, "get_output_embeddings", None)
    heads.append(get_output() if callable(get_output) else None)
    ids = {id(h) for h in heads if isinstance(h, nn.Module)}
    names = {n for n, m in model.named_modules() if id(m) in ids}
    return {n for n, _ in model.named_modules() if _matches_prefix(n, names)}


def _matches_prefix(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _as_names(arg: str, names) -> list[str]:
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, (list, tuple, set)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{arg} must be a module name or a list of names, got {names!r}")
    return list(names)


def _lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def add_lora(model, target_modules, rank=8, alpha=16, dropout=0.0, rslora=False, modules_to_save=()):
    """Wrap the targeted linears of ``model`` in ``LoRALinear``, in place; freeze the rest.

    ``target_modules``: names matched exactly or as a dotted suffix (``"query"`` matches
    ``bert.encoder.layer.0.attention.self.query``), or ``"all-linear"`` (every linear except the
    output head). ``modules_to_save``: modules trained in full, e.g. ``["classifier"]``.
    Returns ``model``; its ``lora_config`` attribute records what was done. Everything is
    checked before the model changes; on any error the model is left as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_lora needs a torch.nn.Module, got {type(model).__name__}")
    _check_hyperparameters(rank, alpha, dropout, rslora)
    modules_to_save = _as_names("modules_to_save", modules_to_save)
    if target_modules != "all-linear":
        target_modules = _as_names("target_modules", target_modules)
    if _lora_layers(model):
        raise ValueError(f"the model already has LoRA layers ({_lora_layers(model)[0][0]}, ...): call "
                         "add_lora once with every target, or merge_lora(model) first")
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if _is_linear(m)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear (or 4-bit linear) layer to wrap")
    saved = [n for n in modules if n and _matches(n, modules_to_save)]
    missing = [s for s in modules_to_save if not any(_matches(n, [s]) for n in saved)]
    if missing:
        raise ValueError(f"modules_to_save {missing} matched no module; the top-level modules are "
                         f"{[n for n, _ in model.named_children()]}")
    if target_modules == "all-linear":
        skip = _output_head_names(model)
        targets = [n for n in linears if n not in skip and not _matches_prefix(n, saved)]
    else:
        short_names = sorted({n.rpartition(".")[2] for n in linears})
        unmatched = [t for t in target_modules if not any(_matches(n, [t]) for n in modules)]
        if unmatched or not target_modules:
            raise ValueError(f"target_modules {unmatched or target_modules} matched no module. The linear "
                             f"layers are named {short_names} (e.g. {linears[0]!r}); pass such names or 'all-linear'")
        targets = [n for n in modules if n and _matches(n, target_modules) and not _matches_prefix(n, saved)]
        wrong = {n: type(modules[n]).__name__ for n in targets if not _is_linear(modules[n])}
        if wrong:
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
        model.lora_config = LoRAConfig(targets, rank, alpha, dropout, rslora, saved)
    except BaseException:
        _remove_lora(model, flags)
        raise
    return model


def _remove_lora(model: nn.Module, flags: dict[str, bool]) -> None:
    """Undo add_lora: the bases back in place, each parameter's requires_grad as in ``flags``."""
    for name, layer in _lora_layers(model):
        model.set_submodule(name, layer.base)
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, p.requires_grad))
    model.__dict__.pop("lora_config", None)


def merge_lora(model: nn.Module, unload: bool = True) -> nn.Module:
    """Fold every LoRA update into its base weight; returns ``model`` (a no-op without LoRA layers).

    With ``unload`` (the default) each ``LoRALinear`` is replaced by its plain merged base linear,
    ready to deploy at the base model's cost. ``unload=False`` keeps the wrappers, so that
    ``unmerge_lora`` can take the updates back out.
    """
    layers = _lora_layers(model)
    for _, layer in layers:
        layer._check_mergeable()  # all or nothing: refuse before any weight changes
    with torch.no_grad():  # first every merged weight, the model untouched (one extra copy of those weights)
        merged = {name: layer.merged_weight() for name, layer in layers if not layer.merged}
        for name, layer in layers:  # then copy them in: nothing left that can fail halfway
            if name in merged:
                layer.base.weight.copy_(merged[name])
                layer.merged = True
            if unload:
                model.set_submodule(name, layer.base)
    if unload and "lora_config" in vars(model):
        del model.lora_config
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora(model, unload=False)`` (or ``LoRALinear.merge()``) on every layer."""
    for _, layer in _lora_layers(model):
        layer.unmerge()
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors: every ``lora_A``/``lora_B`` weight plus the ``modules_to_save``."""
    if not _lora_layers(model):
        raise ValueError("the model has no LoRA layers: call add_lora(model, target_modules) first")
    saved = model.lora_config.modules_to_save if hasattr(model, "lora_config") else []
    return {n: p.detach() for n, p in model.named_parameters()
            if ".lora_A." in n or ".lora_B." in n or _matches_prefix(n.rpartition(".")[0], saved)}


def _io():
    try:
        from . import io
    except ImportError as err:
        raise ImportError("saving needs peftkit/io.py beside lora.py (or save lora_state_dict yourself)") from err
    return io


def save_adapter(model: nn.Module, path):
    """Write ``lora_state_dict(model)`` and the LoRA config to one safetensors file, atomically."""
    if not hasattr(model, "lora_config"):
        raise ValueError("the model has no LoRA layers: call add_lora(model, target_modules) first")
    config = {"technique": "lora", **asdict(model.lora_config)}
    return _io().save_tensors(lora_state_dict(model), path, config)


def load_adapter(model: nn.Module, path) -> LoRAConfig:
    """Load what ``save_adapter`` wrote, injecting LoRA from the saved config if ``model`` has none.

    The file must hold exactly what LoRA trains (lora_A/lora_B, modules_to_save) in the model's
    shapes: other keys (a frozen base weight, say) or missing ones are a ValueError listing them.
    LoRA with another alpha or rslora than the file's is refused, not silently run with its own
    scaling, and so is a merged model. ``dropout`` acts in training only: the model keeps its
    own. On any error or interruption the model is left exactly as it came.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapter needs a torch.nn.Module, got {type(model).__name__}")
    io = _io()
    tensors, config = io.read_adapter(path, "lora", LoRAConfig, saver="peftkit.lora.save_adapter")
    layers, flags = _lora_layers(model), {n: p.requires_grad for n, p in model.named_parameters()}
    if any(layer.merged for _, layer in layers):  # a later unmerge would take out the new B A, not the merged one
        raise ValueError("the model's LoRA is merged into its base weights: unmerge_lora(model) before load_adapter")
    other = next((m for _, m in layers if (m.alpha, m.rslora) != (config.alpha, config.rslora)), None)
    if other is not None:
        raise ValueError(f"{path} was trained with alpha={config.alpha}, rslora={config.rslora}, but the model's "
                         f"LoRA has alpha={other.alpha}, rslora={other.rslora}, which would scale its update wrongly. "
                         "Load into a model without LoRA (load_adapter then adds it with the file's config)")
    if not layers:
        add_lora(model, **asdict(config))  # checks the saved config; changes nothing if it fails
    try:
        io.copy_tensors(model, tensors, lora_state_dict(model), source=path, config=asdict(config))
    except BaseException:
        if not layers:
            _remove_lora(model, flags)  # put the model back as it came
        raise
    return config


def export_peft(model: nn.Module, path, base_model_name_or_path: str | None):
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in Hugging Face peft's format.

    ``peft.PeftModel.from_pretrained(base_model, path)`` then rebuilds the same model. Both files
    are written into a temporary folder that then replaces ``path`` whole (other files in it are
    kept): an interrupted export leaves an earlier one intact.
    """
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a str or None, got {base_model_name_or_path!r}")
    tensors = {f"base_model.model.{k}": v for k, v in lora_state_dict(model).items()}
    cfg = model.lora_config
    peft_config = {  # peft fills in its defaults for every field left out
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": cfg.target_modules,  # full names: peft then wraps exactly these layers
        "modules_to_save": cfg.modules_to_save or None, "bias": "none", "inference_mode": True,
    }
    io = _io()
    with io.atomic_folder(path) as folder:
        io.save_tensors(tensors, folder / "adapter_model.safetensors", peft_config)
        (folder / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    return path

"""Bottleneck adapters (Houlsby and Pfeiffer), built from scratch.

Papers: Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP" (arXiv:1902.00751): two adapters
per layer, within 0.4% of full fine-tuning on GLUE with about 3.6% of the parameters per task. Pfeiffer et al.
2021, "AdapterFusion" (arXiv:2005.00247): one adapter per layer, after the feed-forward block.

Equation: an adapter maps the output h (size d) of a sublayer to

    adapter(h) = h + W_up f(W_down h + b_down) + b_up

with W_down of shape (m, d), W_up of shape (d, m), bottleneck m = d / reduction_factor and f a
non-linearity. Its own skip connection means that with small weights adapter(h) is close to h,
so training starts from the pre-trained model's behaviour.

Where: "houlsby" after attention and after the feed-forward block of every layer (the layer's
norms train too, as in the paper); "pfeiffer" after the feed-forward block only. A BERT block
with input x and output h computes LN(x + h); the adapter reads h before the block's dropout:
LN(x + adapter(h)) (AdapterHub's default; ``original_ln_before=True``, its other placement, is in
``adapter_layouts.py``). In Llama, "houlsby" trains the RMSNorms in front of each sublayer.
This file needs only torch for BERT-like (BERT, RoBERTa, ELECTRA) and Llama-like layers; beside it,
``adapter_layouts.py`` adds ALBERT, XLNet, T5 and GPT-2, and ``adapter_files.py`` saves (each named if missing).

Trained: the adapters (plus the layers' norms for "houlsby", plus any modules_to_save); frozen: everything else.
Unlike LoRA, an adapter cannot be merged into the base weights (f is non-linear): it costs a little inference time.

    add_adapters(model, "houlsby", reduction_factor=16, modules_to_save=["classifier"])
    ...train...
    save_adapter(model, "adapters.safetensors")        # the trained tensors and model.adapter_config
    load_adapter(fresh_model, "adapters.safetensors")  # adds the adapters first if it has none
    remove_adapters(model)                             # the original projections again
"""

import importlib
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import torch
from torch import nn

NON_LINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "swish": nn.SiLU}


class BottleneckAdapter(nn.Module):
    """h -> h + adapter_up(f(adapter_down(h))), near the identity at initialisation."""
    def __init__(self, hidden_size: int, reduction_factor: float = 16, non_linearity: str = "relu",
                 init_std: float = 1e-3):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        AdapterConfig("houlsby", reduction_factor, non_linearity, init_std)  # the checks and messages of add_adapters
        self.hidden_size = hidden_size
        self.bottleneck_size = bottleneck_size(hidden_size, reduction_factor)
        self.adapter_down = nn.Linear(hidden_size, self.bottleneck_size)
        self.non_linearity = NON_LINEARITIES[non_linearity]()
        self.adapter_up = nn.Linear(self.bottleneck_size, hidden_size)
        # Small weights: the adapter starts near the identity; both non-zero, so both get a gradient at once
        for linear in (self.adapter_down, self.adapter_up):
            nn.init.normal_(linear.weight, std=init_std)
            nn.init.zeros_(linear.bias)

    def forward(self, h: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = h.to(self.adapter_down.weight.dtype)  # the adapter may stay float32 under a 16-bit or 4-bit model
        z = self.adapter_up(self.non_linearity(self.adapter_down(x)))  # (..., d) -> (..., m) -> (..., d)
        return (h if skip is None else skip) + z.to(h.dtype)  # skip: h, unless original_ln_before


class AdaptedSublayer(nn.Module):
    """A frozen sublayer followed by its adapter: forward(x) = adapter(base(x))."""
    def __init__(self, base: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base, self.adapter = base, adapter

    def forward(self, *args, **kwargs):
        return self.adapter(self.base(*args, **kwargs))

    @property
    def weight(self):  # T5's feed-forward reads wo.weight.dtype; peft's layers forward it the same way
        return self.base.weight


def bottleneck_size(hidden_size: int, reduction_factor: float) -> int:
    """m = hidden_size / reduction_factor, which must come out a whole number >= 1."""
    _check_reduction_factor(reduction_factor)
    size = hidden_size / reduction_factor
    if size < 1 or size != int(size):
        divisors = [k for k in range(1, hidden_size + 1) if hidden_size % k == 0]
        raise ValueError(f"reduction_factor={reduction_factor} does not divide hidden_size={hidden_size} into a "
                         f"whole, positive bottleneck (got {size:g}); reduction factors that do: {divisors}")
    return int(size)


# --- injecting into a model ---
@dataclass(frozen=True)
class Layout:  # where a family's transformer layer keeps what adapters need, as paths inside the layer
    attention: str | None    # the projection closing the attention sublayer (None: not a module)
    feed_forward: str        # the projection closing the feed-forward sublayer
    norms: tuple             # the layer's norms, which "houlsby" trains
    output_blocks: bool = False  # BERT: each projection sits in a (dense, dropout, LayerNorm) block


# BERT-like and Llama-like layers (Mistral, Qwen, XLM-RoBERTa too); adapter_layouts.py has the other families.
LAYOUTS = {"bert": Layout("attention.output.dense", "output.dense", ("attention.output.LayerNorm", "output.LayerNorm"),
                          output_blocks=True),
           "llama": Layout("self_attn.o_proj", "mlp.down_proj", ("input_layernorm", "post_attention_layernorm"))}
FAMILIES = {"bert": ("bert",), "roberta": ("bert",), "electra": ("bert",), "llama": ("llama",)}  # model_type: layouts


def _sibling(name: str, needed_for: str | None = None):  # adapter_layouts.py, adapter_files.py, if beside this file
    try:
        return importlib.import_module(f".{name}", __package__) if __package__ else importlib.import_module(name)
    except ModuleNotFoundError as err:  # that file is missing (not one it imports): None, or say which to copy
        if err.name not in (name, f"{__package__}.{name}"):
            raise
        if needed_for:
            raise ModuleNotFoundError(f"{needed_for} needs {name}.py beside adapters.py", name=name) from err


def _family(model: nn.Module) -> str:  # config.model_type, as transformers spells it
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def find_layers(model: nn.Module) -> list[tuple[str, nn.Module, Layout]]:
    """[(name, layer, layout), ...]: the layers adapters can go in, known by structure (all the layout's paths)."""
    others = _sibling("adapter_layouts")  # every family's layouts, if that file is beside this one
    layouts, families = (others.LAYOUTS, others.FAMILIES) if others else (LAYOUTS, FAMILIES)
    found, looked_for = [], []
    for name, layout in layouts.items():
        paths = [p for p in (layout.attention, layout.feed_forward, *layout.norms) if p]
        found += [(n, m, layout) for n, m in model.named_modules() if set(paths) <= {k for k, _ in m.named_modules()}]
        looked_for.append(f"{name}: a layer with {', '.join(paths)}")
    if not found:  # (named_modules lists a shared module once: ALBERT's one layer comes back once)
        more = "" if others else "; albert, gpt2, t5 and xlnet need adapter_layouts.py beside adapters.py"
        raise ValueError(f"cannot place adapters in {type(model).__name__} (family {_family(model)!r}): found no "
                         f"transformer layer of a supported family ({', '.join(sorted(families))}{more}). "
                         f"Looked for {'; '.join(looked_for)}.")
    return found


# Which sublayers of each transformer layer get an adapter, and whether the layer's norms train.
PLACEMENTS = {"houlsby": {"sublayers": ("attention", "feed_forward"), "train_norms": True},
              "pfeiffer": {"sublayers": ("feed_forward",), "train_norms": False}}


@dataclass
class AdapterConfig:
    """What ``add_adapters`` did; saved with the adapters so that it can be redone before loading."""
    technique: ClassVar[str] = "bottleneck_adapters"  # the tag in saved files, checked on load
    placement: str = "houlsby"      # "houlsby": after attention and feed-forward; "pfeiffer": feed-forward only
    reduction_factor: float = 16    # bottleneck size m = hidden_size / reduction_factor
    non_linearity: str = "relu"     # f between the projections, a key of NON_LINEARITIES
    init_std: float = 1e-3          # std of the normal init of both weights (biases start at 0)
    modules_to_save: tuple = ()     # module names (or name endings) that train in full, e.g. ("classifier",)
    original_ln_before: bool = False  # True: after residual + LayerNorm, as AdapterHub's SeqBnConfig (BERT)

    def __post_init__(self):
        _check_choice("adapter config (placement)", self.placement, PLACEMENTS)
        _check_choice("non_linearity", self.non_linearity, NON_LINEARITIES)
        _check_choice("original_ln_before", self.original_ln_before, dict.fromkeys([False, True]))
        _check_reduction_factor(self.reduction_factor)  # whether it divides is checked per hidden size
        if not isinstance(self.init_std, (int, float)) or not self.init_std > 0:
            # 0 would zero both weights: f(0) = 0 for relu, so no gradient could reach them.
            raise ValueError(f"init_std must be a positive number (e.g. 1e-3), got {self.init_std!r}")
        names = self.modules_to_save
        self.modules_to_save = (names,) if isinstance(names, str) else tuple(names)


def _check_reduction_factor(reduction_factor):
    if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, (int, float)) or not reduction_factor > 0:
        raise ValueError(f"reduction_factor must be a positive number (e.g. 16), got {reduction_factor!r}")


def _check_choice(what: str, value, valid: dict):
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid ones: {sorted(valid)}")


def _modules_to_save(model: nn.Module, targets) -> dict[str, nn.Module]:
    """peft's rule: a target names a module by its full dotted name or by its last components."""
    found = {}
    for target in targets:
        hits = {n: m for n, m in model.named_modules() if n == target or n.endswith("." + target)}
        if not hits:
            raise ValueError(f"modules_to_save entry {target!r} matches no module of {type(model).__name__}; "
                             f"its top-level modules are {[n for n, _ in model.named_children()]}")
        found.update(hits)
    return found


def add_adapters(model: nn.Module, config="houlsby", **overrides) -> nn.Module:
    """Wrap the chosen projections of every layer with adapters and freeze the rest, in place. ``config`` is a
    placement name ("houlsby" or "pfeiffer") or an AdapterConfig; keyword arguments (reduction_factor, non_linearity,
    init_std, modules_to_save, original_ln_before) override its fields. It is kept as ``model.adapter_config``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_adapters needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, (str, AdapterConfig)):
        raise TypeError(f"config must be one of {sorted(PLACEMENTS)} or an AdapterConfig, got {config!r}")
    config = AdapterConfig(placement=config, **overrides) if isinstance(config, str) else replace(config, **overrides)
    carried = getattr(vars(model).get("adapter_config"), "technique", None)
    if carried not in (None, AdapterConfig.technique):
        raise ValueError(f"this model already carries {carried} (model.adapter_config): one technique per model")
    if carried or any(isinstance(m, AdaptedSublayer) for m in model.modules()):
        raise ValueError("this model already has adapters: call remove_adapters(model) before adding again")
    layers = find_layers(model)
    if others := _sibling("adapter_layouts"):  # XLNet's attention output is a parameter; original_ln_before: BERT's
        others.check_placement(layers, PLACEMENTS[config.placement]["sublayers"], config, _family(model))
    elif config.original_ln_before:
        _sibling("adapter_layouts", "original_ln_before")
    to_save = _modules_to_save(model, config.modules_to_save)
    # Build every wrapper before touching the model, so a bad reduction factor changes nothing.
    plan = []
    for _, layer, layout in layers:
        for sublayer in PLACEMENTS[config.placement]["sublayers"]:
            path = getattr(layout, sublayer)
            base = layer.get_submodule(path)
            if not isinstance(size := getattr(base, "out_features", getattr(base, "nf", None)), int):  # nf: Conv1D
                raise ValueError(f"{path} is a {type(base).__name__} without an int out_features (the hidden size)")
            adapter = BottleneckAdapter(size, config.reduction_factor, config.non_linearity, config.init_std)
            weight = getattr(base, "weight", None)  # a tensor, or a 4-bit peftkit.nf4.NF4Tensor
            if getattr(weight, "device", None) is not None:  # its device; its dtype unless quantized (then float32)
                floating = isinstance(weight, torch.Tensor) and weight.is_floating_point()
                adapter.to(weight.device, weight.dtype if floating else torch.float32)
            if config.original_ln_before:  # wrap the projection's block: dense, dropout, residual add, LayerNorm
                path = path.rsplit(".", 1)[0]
            kind = others.AdaptedBlockAfterNorm if config.original_ln_before else AdaptedSublayer  # (checked above)
            plan.append((layer, path, kind(layer.get_submodule(path), adapter)))

    trained = [wrapped.adapter for _, _, wrapped in plan] + list(to_save.values())
    if PLACEMENTS[config.placement]["train_norms"]:
        trained += [layer.get_submodule(path) for _, layer, layout in layers for path in layout.norms]
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        model.requires_grad_(False)
        for layer, path, wrapped in plan:
            layer.set_submodule(path, wrapped)
        for module in trained:
            module.requires_grad_(True)
        # Bookkeeping, not config: what trains (for saving) and the flags from before (for removing).
        model._peftkit_adapters = {"requires_grad": requires_grad, "trained": trained}
        model.adapter_config = config
    except BaseException:
        _unwrap(model, requires_grad)  # as it came, whatever went wrong
        raise
    return model


def _unwrap(model: nn.Module, requires_grad: dict) -> None:
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedSublayer)]:
        model.set_submodule(name, module.base)
    for n, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(n, p.requires_grad))
    vars(model).pop("_peftkit_adapters", None)
    if isinstance(vars(model).get("adapter_config"), AdapterConfig):
        del model.adapter_config


def remove_adapters(model: nn.Module) -> nn.Module:
    """Put the original projections back and restore each parameter's requires_grad, in place. Norms ("houlsby")
    and modules_to_save keep their trained values (the model's own modules): save_adapter keeps both versions."""
    if not any(isinstance(m, AdaptedSublayer) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no adapters to remove")
    _unwrap(model, vars(model).get("_peftkit_adapters", {}).get("requires_grad", {}))
    return model


# --- saving ---
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the technique trains, what a file holds: the adapters, the norms ("houlsby") and the modules_to_save."""
    if "_peftkit_adapters" not in vars(model):
        raise ValueError(f"{type(model).__name__} has no adapters: call add_adapters(model) first")
    ids = {id(p) for module in model._peftkit_adapters["trained"] for p in module.parameters()}
    return {n: p.detach() for n, p in model.named_parameters() if id(p) in ids}


def save_adapter(model: nn.Module, path):
    """Write adapter_state_dict(model) and model.adapter_config to one safetensors file; returns its path."""
    return _sibling("adapter_files", "saving").write_adapter(adapter_state_dict(model), path, model.adapter_config)


def load_adapter(model: nn.Module, path) -> AdapterConfig:
    """Load a file written by save_adapter into ``model`` (one without adapters gets them first, with the saved
    config); returns that config. Another technique's file, other keys, shapes or config are a ValueError saying
    what differs; on that or any other error (I/O, an interruption) the model is left as it was."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapter needs a torch.nn.Module, got {type(model).__name__}")
    tensors, saved = (files := _sibling("adapter_files", "loading")).read_adapter(path, AdapterConfig)
    added = "_peftkit_adapters" not in vars(model)
    if added:
        add_adapters(model, saved)
    try:
        ours = model.adapter_config
        keys = ("placement", "reduction_factor", "non_linearity", "modules_to_save", "original_ln_before")
        if diff := {k: (getattr(saved, k), getattr(ours, k)) for k in keys if getattr(saved, k) != getattr(ours, k)}:
            raise ValueError(f"{path} holds adapters with a different config, as (file, model): {diff}; "
                             f"add_adapters with the file's config {saved} before loading")
        files.copy_tensors(model, tensors, adapter_state_dict(model), source=path, config=asdict(saved))
    except BaseException:
        if added:
            remove_adapters(model)
        raise
    return saved

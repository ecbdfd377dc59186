"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", arXiv:2205.05638).

Three learned vectors rescale, element by element, the attention's keys and values and the feed-forward's
intermediate activation; nothing else changes:

    softmax(Q (l_k ⊙ K)^T / sqrt(d)) (l_v ⊙ V)          l_k, l_v: (d_out,)  rescale what k_proj, v_proj output
    (l_ff ⊙ act(W_1 x)) W_2                             l_ff: (d_ff,)       rescales what W_2 (down_proj) takes in

Trained: one vector per wrapped layer (``ia3_l``, initialised to ones, so the model starts out unchanged),
plus any ``modules_to_save``. Frozen: everything else. Since a rescaling is linear, it folds into the weight:
scaling a layer's output scales the rows of W (and b), scaling a feed-forward layer's input scales W's
columns; ``merge_ia3`` does that, and inference then costs what the plain model costs.

As in Hugging Face peft (whose names and defaults this file uses), any linear layer can be wrapped: a layer in
``feedforward_modules`` has its INPUT scaled (``l_ff``), any other its OUTPUT (``l_k``, ``l_v``). Without
``target_modules`` the family's defaults are peft's (``DEFAULTS``: e.g. Llama's k_proj, v_proj, down_proj).

    add_ia3(model)                                     # peft's default layers for the model's family
    add_ia3(model, ["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    ...train...; save_adapter(model, "ia3.safetensors"); export_peft(model, "out/", "HuggingFaceTB/SmolLM2-135M")
    model = merge_ia3(model)                           # plain layers again, the vectors folded into W

GPT-2's ``Conv1D`` (W stored as (in, out)) is wrapped the same way. Which layers are wrapped is decided by
``targets.py`` (peft's rules), which this file needs beside it with the file it builds on, ``lora.py``; saving needs
``adapter_files.py``.
"""

import importlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import nn

try:
    from . import targets
except ImportError:  # this file was copied into a project, beside targets.py and lora.py
    import targets


class IA3Linear(nn.Module):
    """A frozen linear ``base`` (nn.Linear, GPT-2's Conv1D, 4-bit) whose output, or for a feed-forward layer
    whose input, is rescaled by the trainable vector ``ia3_l`` (initialised to ones)."""

    def __init__(self, base: nn.Module, is_feedforward: bool = False):
        super().__init__()
        if (kind := targets.layer_kind(base)) not in ("linear", "conv1d", "4bit"):
            raise TypeError(f"IA3Linear wraps an nn.Linear, Conv1D or peftkit 4-bit linear, got {type(base).__name__}")
        self.base, self.is_feedforward, self.merged = base, bool(is_feedforward), False
        self.fan_in_fan_out = kind == "conv1d"  # peft's name: Conv1D stores W as (in, out)
        in_features, out_features = base.weight.shape if self.fan_in_fan_out else (base.in_features, base.out_features)
        dtype = torch.float64 if base.weight.dtype == torch.float64 else torch.float32  # as LoRA: float32 vectors
        shape = (1, in_features) if is_feedforward else (out_features, 1)  # peft's shapes, in W's (out, in) layout
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base.weight.device, dtype=dtype))
        base.requires_grad_(False)  # last: a failed construction leaves the base as it was

    weight = property(lambda self: self.base.weight)  # the base's (T5's feed-forward reads wo.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        scale = self.ia3_l.flatten()  # (in,) for a feed-forward layer, else (out,)
        if self.is_feedforward:  # l_ff ⊙ x, then W: (..., in) -> (..., out)
            return self.base((x.to(scale.dtype) * scale).to(x.dtype))
        result = self.base(x)  # (..., out)
        return (result * scale).to(result.dtype)  # l ⊙ (W x + b)

    def scaled_weights(self, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, b) with the rescaling by ``scale`` (``ia3_l``'s shape) folded in: W's rows (out) and b, or for a
        feed-forward layer W's columns (in) and b unchanged; in W's dtype and layout ((in, out) for a Conv1D)."""
        if targets.layer_kind(self.base) == "4bit":
            raise TypeError("cannot merge (IA)³ into a 4-bit base: the rescaled W would be re-quantized to 4 bits")
        weight, bias = self.base.weight, self.base.bias
        layout = scale.T if self.fan_in_fan_out else scale  # (out, 1) or (1, in), transposed for W (in, out)
        new_bias = bias if bias is None or self.is_feedforward else (bias * scale.flatten()).to(bias.dtype)
        return (weight * layout).to(weight.dtype), new_bias

    def extra_repr(self) -> str:
        return f"scales={'input' if self.is_feedforward else 'output'}, merged={self.merged}"


# --- injecting into a model ---
DEFAULTS = {  # family (config.model_type) -> (target_modules, feedforward_modules): peft's, peft.utils.constants
    "t5": (["k", "v", "wo"], ["wo"]), "mt5": (["k", "v", "wi_1"], []), "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]), "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]), "gpt_neox": (["query_key_value", "dense_4h_to_h"],
                                                                       ["dense_4h_to_h"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]), "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]), "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]), "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),  # output.dense: attention's and feed-forward's
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    **{f: (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]) for f in ("RefinedWebModel", "RefinedWeb", "falcon")},
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    **{f: (["q_proj", "v_proj", "down_proj"], ["down_proj"])
       for f in ("llama4", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3")},
}


@dataclass
class IA3Config:
    """What ``add_ia3`` did (``model.adapter_config``), saved with the vectors; checks its own fields."""
    technique: ClassVar[str] = "ia3"  # the tag saved in adapter files
    target_modules: list[str] | str  # full names of the wrapped layers (add_ia3 also checks what was asked)
    feedforward_modules: list[str] | str  # full names of those among them whose input is scaled
    modules_to_save: list[str] = field(default_factory=list)  # full names of modules trained in full
    exclude_modules: list[str] | str | None = None  # as asked (targets.py); target_modules already leaves them out

    def __post_init__(self):
        self.modules_to_save = [self.modules_to_save] if isinstance(self.modules_to_save, str) else self.modules_to_save
        for arg in ("target_modules", "feedforward_modules", "modules_to_save"):
            if not isinstance(names := getattr(self, arg), str):
                if not isinstance(names, (list, tuple, set)) or not all(isinstance(n, str) for n in names):
                    raise TypeError(f"{arg} must be a list of module names or a regular expression, got {names!r}")
                setattr(self, arg, list(names))
        targets.check_selection(self.feedforward_modules, None, None, None)  # a str: a valid regular expression
        targets.check_selection(self.target_modules, self.exclude_modules, None, None)
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list) and (
                outside := [n for n in self.feedforward_modules if n not in self.target_modules]):
            raise ValueError(f"feedforward_modules {outside} are not in target_modules {self.target_modules}: as in "
                             "peft, they must be a subset (a feed-forward module is a target whose input is scaled)")


def _ia3_layers(model: nn.Module) -> list[tuple[str, IA3Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Linear)]


def _ia3_config(model: nn.Module) -> IA3Config:
    if not isinstance(config := vars(model).get("adapter_config"), IA3Config):
        raise ValueError("the model has no (IA)³ config (model.adapter_config): call add_ia3(model) first")
    return config


def _is_feedforward(name: str, feedforward_modules) -> bool:  # peft's rule: a regex (str), or a plain suffix
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(f) for f in feedforward_modules)


def add_ia3(model, target_modules=None, feedforward_modules=None, modules_to_save=(), exclude_modules=None):
    """Wrap the targeted layers of ``model`` in ``IA3Linear``, in place; freeze the rest; return ``model``.

    ``target_modules``: names (exact or a dotted suffix), a regular expression (a str) or "all-linear", as in peft
    (``targets.py``); None takes peft's default for the model's family (``DEFAULTS``). ``feedforward_modules``: the
    targets whose input is scaled (names, each ending a wrapped layer's name, or a regular expression); None takes
    the family's default. ``modules_to_save``: modules trained in full, e.g. ``["classifier"]``. Everything is
    checked first; on any error the model is left as it was."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_ia3 needs a torch.nn.Module, got {type(model).__name__}")
    family = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    if (target_modules is None or feedforward_modules is None) and family not in DEFAULTS:
        missing = "target_modules" if target_modules is None else "feedforward_modules"
        raise ValueError(f"peft has no (IA)³ default {missing} for the family {family!r}: pass them (feedforward_modules"
                         f"=[] if no target is a feed-forward layer). Defaults exist for {sorted(DEFAULTS)}")
    asked_feedforward = feedforward_modules
    target_modules = DEFAULTS[family][0] if target_modules is None else target_modules
    feedforward_modules = DEFAULTS[family][1] if feedforward_modules is None else feedforward_modules
    asked = IA3Config(target_modules, [] if asked_feedforward is None else feedforward_modules, modules_to_save,
                      exclude_modules)  # checks them; as peft, a default feedforward_modules need not be a subset
    if _ia3_layers(model):
        raise ValueError("the model already has (IA)³ layers: call add_ia3 once, or merge_ia3(model) first")
    if (other := getattr(vars(model).get("adapter_config"), "technique", "ia3")) != "ia3":
        raise ValueError(f"the model already carries {other} (model.adapter_config): one technique per model")
    modules, saved = dict(model.named_modules()), targets.modules_named(model, asked.modules_to_save)
    chosen = targets.select(model, asked.target_modules, exclude_modules, skip=saved)
    if wrong := {n: type(modules[n]).__name__ for n in chosen if targets.layer_kind(modules[n]) == "embedding"}:
        raise TypeError(f"(IA)³ wraps linear and Conv1D layers (as peft), not the embeddings {wrong}")
    feedforward = [n for n in chosen if _is_feedforward(n, feedforward_modules)]
    regex = isinstance(asked_feedforward, str)  # below: what the caller named must mark some wrapped layer
    if unused := [f for f in ([asked_feedforward] if regex else asked_feedforward or [])
                  if not any(_is_feedforward(n, f if regex else [f]) for n in chosen)]:
        raise ValueError(f"feedforward_modules {unused} mark no wrapped layer (a name must end a layer's name; a str "
                         f"is a regular expression for whole names); the wrapped layers are "
                         f"{sorted({n.rpartition('.')[2] for n in chosen})}")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        wrappers = {name: IA3Linear(modules[name], name in feedforward) for name in chosen}
        model.requires_grad_(False)
        for name, wrapper in wrappers.items():
            model.set_submodule(name, wrapper)
        for name in saved:
            modules[name].requires_grad_(True)
        model.adapter_config = IA3Config(chosen, feedforward, saved, exclude_modules)
    except BaseException:
        _remove_ia3(model, flags)
        raise
    return model


def _remove_ia3(model: nn.Module, flags: dict | None = None) -> None:  # undo add_ia3 (flags: requires_grad before)
    for name, layer in _ia3_layers(model):
        model.set_submodule(name, layer.base)
    for n, p in model.named_parameters():
        p.requires_grad_((flags or {}).get(n, p.requires_grad))
    if isinstance(vars(model).get("adapter_config"), IA3Config):
        del model.adapter_config


def _rescale(model: nn.Module, merge: bool, safe: bool = False, undoable: bool = True) -> None:
    layers = [(n, m) for n, m in _ia3_layers(model) if m.merged != merge]  # all or nothing: check, then write
    if undoable and (zero := [n for n, m in layers if not (m.ia3_l != 0).all()]):
        raise ValueError(f"{zero} have a zero in ia3_l: W scaled by it cannot be divided back, so nothing was "
                         f"{'merged (merge_ia3(model) folds it in for good)' if merge else 'unmerged'}")
    with torch.no_grad():
        new = [m.scaled_weights(m.ia3_l if merge else 1 / m.ia3_l) for _, m in layers]  # every (W, b) first
        if safe and (bad := [n for (n, _), (w, b) in zip(layers, new)
                             if not w.isfinite().all() or (b is not None and not b.isfinite().all())]):
            raise ValueError(f"merging (IA)³ into {bad} would write NaN/inf into the base weights: the adapter is "
                             "broken (a diverged training run?); nothing was merged")
        for (_, layer), (weight, bias) in zip(layers, new):  # then copy them in: nothing left that can fail halfway
            layer.base.weight.copy_(weight)
            if bias is not None:
                layer.base.bias.copy_(bias)
            layer.merged = merge


def merge_ia3(model: nn.Module, unload: bool = True, safe_merge: bool = False) -> nn.Module:
    """Fold every ``ia3_l`` into its base layer: W's rows and b (or W's columns for a feed-forward layer); returns
    ``model``. ``unload`` (the default) puts back the plain layers (``model.adapter_config`` goes too);
    ``unload=False`` keeps the wrappers for ``unmerge_ia3``. ``safe_merge`` (peft's) refuses NaN/inf. On an error
    nothing is merged."""
    _rescale(model, merge=True, safe=safe_merge, undoable=not unload)
    if unload:
        _remove_ia3(model)
    return model


def unmerge_ia3(model: nn.Module) -> nn.Module:
    """Undo ``merge_ia3(model, unload=False)``: divide the vectors back out of W and b (exact up to rounding)."""
    _rescale(model, merge=False)
    return model


# --- saving ---
def _files():  # adapter_files.py (it needs safetensors): peftkit's own, or the copy beside this file
    return importlib.import_module(".adapter_files", __package__) if __package__ else importlib.import_module(
        "adapter_files")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What (IA)³ trains, what a file holds: every ``<layer>.ia3_l`` and the ``modules_to_save``."""
    if not (layers := _ia3_layers(model)):
        raise ValueError("the model has no (IA)³ layers: call add_ia3(model) first")
    vectors, saved = {f"{n}.ia3_l" for n, _ in layers}, _ia3_config(model).modules_to_save
    return {n: p.detach() for n, p in model.named_parameters()
            if n in vectors or targets.inside(n.rpartition(".")[0], saved)}


def save_adapter(model: nn.Module, path):
    """Write ``adapter_state_dict(model)`` and ``model.adapter_config`` to one safetensors file (adapter_files.py)."""
    return _files().write_adapter(adapter_state_dict(model), path, _ia3_config(model))


def load_adapter(model: nn.Module, path) -> IA3Config:
    """Load what ``save_adapter`` wrote, adding (IA)³ from the saved config if ``model`` has none. The file must be
    (IA)³'s and hold exactly what the model's (IA)³ trains, in its shapes (else a ValueError names the keys); a
    merged model is refused. On any error the model is left as it came."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapter needs a torch.nn.Module, got {type(model).__name__}")
    tensors, config = _files().read_adapter(path, IA3Config)
    layers, flags = _ia3_layers(model), {n: p.requires_grad for n, p in model.named_parameters()}
    if any(layer.merged for _, layer in layers):  # unmerging would then divide by the new vectors, not the merged
        raise ValueError("the model's (IA)³ is merged into its base weights: unmerge_ia3(model) before load_adapter")
    if not layers:
        add_ia3(model, **asdict(config))  # changes nothing if it fails
    try:
        _files().copy_tensors(model, tensors, adapter_state_dict(model), source=path, config=asdict(config))
    except BaseException:
        if not layers:
            _remove_ia3(model, flags)
        raise
    return config


def export_peft(model: nn.Module, path, base_model_name_or_path: str | None):
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in Hugging Face peft's format, so that
    ``peft.PeftModel.from_pretrained(base_model, path)`` rebuilds the same model. The folder is replaced whole
    (other files in it are kept)."""
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a str or None, got {base_model_name_or_path!r}")
    tensors = {f"base_model.model.{k}": v for k, v in adapter_state_dict(model).items()}  # peft's names
    cfg, files = _ia3_config(model), _files()
    peft_config = {  # full names: peft wraps exactly these layers and scales the inputs of exactly these
        "peft_type": "IA3", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "target_modules": cfg.target_modules, "feedforward_modules": cfg.feedforward_modules,
        "modules_to_save": cfg.modules_to_save or None, "inference_mode": True, "init_ia3_weights": True,
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in _ia3_layers(model))}  # Conv1D (GPT-2)
    with files.atomic_folder(path) as folder:
        files.save_tensors(tensors, folder / "adapter_model.safetensors", peft_config)
        (folder / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    return path

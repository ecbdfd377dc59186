"""Serving many LoRA adapters from one base model: a batch whose rows use different adapters, and what each costs.

One frozen base model, several small adapters (``multi_adapter.py``'s named adapters, or add_lora's one, which is
named "default"). A request for adapter ``a`` can be served three ways:

    merged       W' = W + scaling B A written into W (merge_lora): the plain model's cost, one adapter at a time
    unmerged     y = W x + scaling * B (A x): the active adapter; another is a set_adapter away (hot-swapping)
    mixed batch  every row of the batch its own adapter, in one forward pass (peft's ``adapter_names``)

The mixed batch is what multi-tenant servers do (Punica, Chen et al., 2023, arXiv:2310.18547; S-LoRA, Sheng et
al., 2023, arXiv:2311.03285), here in peft's plain form (``_mixed_batch_forward`` in peft's tuners/lora/layer.py):

    with mixed_batch(model, ["a", "__base__", "b", "a"]):    # one name per row; "__base__": the base model
        logits = model(**batch).logits                         # or model.generate(**batch), greedy or sampled

Inside the block every layer that any adapter wraps is a ``MixedLoRA``, which routes the rows:

    x: (batch, ..., in)                          rows in the order of adapter_names (ids for an embedding)
    y = W x + b                                  (batch, ..., out): the base layer once, for every row
    for each adapter a, rows r_a = [i for i, name in enumerate(adapter_names) if name == a]:
        y[r_a] += scaling_a * B_a (A_a x[r_a])   (len(r_a), ..., in) -> (len(r_a), ..., rank) -> (len(r_a), ..., out)

An adapter that does not wrap a layer (adapters may differ in rank, alpha and targets) adds nothing there for
its rows, exactly as when it runs alone; "__base__" rows get W x everywhere. So each row gets what its adapter
alone would give it, while the base work is shared: the LoRA work is one adapter's over the whole batch. peft
refuses merged adapters here (W already holds one adapter's update, for every row), and so does this file.
A layer that flattens the batch away before a wrapped linear would break the routing: it is refused by name.

``adapter_bytes`` gives what each adapter costs in memory (or a saved adapter on disk) beside the base model;
``latency`` times the same call served base, unmerged, merged and as a mixed batch (median of ``repeats`` runs).

This file needs ``lora.py`` and ``multi_adapter.py`` beside it, with the files they use: ``lora_files.py``,
``targets.py``, ``lora_layers.py``, ``adapters.py`` and ``adapter_layouts.py``.
"""

import os
import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

try:
    from . import multi_adapter
    from .lora import LoRALinear, merge_lora
except ImportError:  # copied into a project as plain files, beside lora.py and multi_adapter.py
    import multi_adapter
    from lora import LoRALinear, merge_lora

BASE = "__base__"  # peft's name for the rows that get the base model


class MixedLoRA(nn.Module):
    """A base layer run once for the whole batch, plus each adapter's ``scaling * B A`` on its own rows only."""

    def __init__(self, name: str, base: nn.Module, adapters: dict[str, LoRALinear], rows: dict[str, list[int]],
                 batch: int):
        super().__init__()
        self.name, self.base, self.rows, self.batch = name, base, rows, batch
        self.adapters = adapters  # a plain dict, not submodules: model.named_modules() shows no LoRA inside the block
        self.train(base.training)  # the model's mode: eval (a model.train() in the block is refused in forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.batch:
            raise ValueError(f"{self.name} got {x.shape[0]} rows but adapter_names names {self.batch}: give one name "
                             "per row (beam search: repeat each name num_beams times), and serve models that keep the "
                             "batch dimension first up to their LoRA layers")
        if self.training:
            raise ValueError("a mixed batch is for inference: call model.eval() (peft refuses training mode too)")
        result = self.base(x)  # (batch, ..., out): W x for every row
        for name, layer in self.adapters.items():
            rows = self.rows[name]  # the rows that use adapter `name`
            result[rows] += layer.update(x[rows]).to(result.dtype)  # (len(rows), ..., out)
        return result

    def extra_repr(self) -> str:
        return f"rows={ {name: self.rows[name] for name in self.adapters} }"


def _adapters(model: nn.Module) -> dict:
    """The model's named adapters (multi_adapter's registry): {name: NamedAdapter}, checked as set_adapter checks."""
    return multi_adapter._registry(model)["adapters"]


def _check_names(model: nn.Module, adapter_names) -> dict:
    adapters = _adapters(model)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)) or not adapter_names:
        raise TypeError(f"adapter_names is a list of adapter names, one per row of the batch, such as "
                        f"{[*list(adapters)[:2], BASE]}; got {adapter_names!r}")
    if unknown := sorted({str(n) for n in adapter_names} - {*adapters, BASE}):
        raise ValueError(f"no adapter named {', '.join(map(repr, unknown))}: the model's adapters are "
                         f"{list(adapters)}, and {BASE!r} gives a row the base model")
    if merged := [n for n, a in adapters.items() if any(layer.merged for layer in a.layers.values())]:
        raise ValueError(f"adapter {merged[0]!r} is merged into the base weights, so every row would get it: "
                         "unmerge_lora(model) before a mixed batch (peft refuses merged adapters too)")
    if trained := next((t for a in adapters.values() if (t := multi_adapter._trained_in_place(a.config))), None):
        raise ValueError(f"the adapter trains {trained} in place, which every row would share, \"__base__\" rows too: "
                         "a mixed batch serves adapters of LoRA factors only (named adapters are)")
    if model.training:
        raise ValueError("a mixed batch is for inference: call model.eval() first (peft refuses training mode too)")
    return adapters


@contextmanager
def mixed_batch(model: nn.Module, adapter_names):
    """Within the block, row ``i`` of every batch uses adapter ``adapter_names[i]`` ("__base__": none).

    Every layer that any of the model's adapters wraps becomes a ``MixedLoRA`` (see the module docstring); on
    exit (also by an exception) the model's layers are back as they were. Refused: unknown names (the message
    lists the model's adapters), merged adapters, training mode; and, inside the block, set_adapter and the other
    named-adapter calls. Rows are fixed for the block: a batch of another size is refused at the first layer."""
    adapters = _check_names(model, adapter_names)
    rows = {name: [i for i, n in enumerate(adapter_names) if n == name] for name in adapters}
    layers: dict[str, dict[str, LoRALinear]] = {}  # layer name -> {adapter: its wrapper there}
    for name, adapter in adapters.items():
        for layer_name, layer in adapter.layers.items():
            layers.setdefault(layer_name, {})[name] = layer
    originals = {layer_name: model.get_submodule(layer_name) for layer_name in layers}  # active wrapper or base
    try:
        for layer_name, wrappers in layers.items():
            base = next(iter(wrappers.values())).base  # every adapter wraps the same frozen base layer
            used = {a: layer for a, layer in wrappers.items() if rows[a]}
            model.set_submodule(layer_name, MixedLoRA(layer_name, base, used, rows, len(adapter_names)))
        model._peftkit_disabled = True  # multi_adapter refuses set_adapter & co. and disable_adapter meanwhile
        yield model
    finally:
        vars(model).pop("_peftkit_disabled", None)
        for layer_name, original in originals.items():
            model.set_submodule(layer_name, original)


def mixed_forward(model: nn.Module, adapter_names, *args, **kwargs):
    """``model(*args, **kwargs)`` with row ``i`` using adapter ``adapter_names[i]``: peft's ``model(**batch,
    adapter_names=...)``."""
    with mixed_batch(model, adapter_names):
        return model(*args, **kwargs)


def mixed_generate(model: nn.Module, adapter_names, **kwargs):
    """``model.generate(**kwargs)`` with row ``i`` using adapter ``adapter_names[i]`` at every step, as peft's
    ``generate(..., adapter_names=...)``. Beam search needs each name repeated ``num_beams`` times."""
    if (beams := kwargs.get("num_beams") or 1) > 1:
        adapter_names = [name for name in adapter_names for _ in range(beams)]  # each row's beams sit together
    with mixed_batch(model, adapter_names):
        return model.generate(**kwargs)


# --- what each adapter costs ---
def _bytes(tensors) -> dict[str, int]:
    tensors = list(tensors)
    return {"parameters": sum(t.numel() for t in tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors)}


def adapter_bytes(model_or_path) -> dict:
    """What each adapter costs.

    A model: ``{adapter name: {"parameters": n, "bytes": b}}`` for its LoRA factors in memory, and the same under
    "__base__" for the base model's parameters (tied weights once), to compare with. A path: ``{"bytes": b,
    "files": {file name: size}}`` on disk, for a ``save_adapter`` file or a folder (``export_peft``'s or peft's
    ``save_pretrained``'s: every file in it, subfolders of other adapters included)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: pass a save_adapter file or an export_peft folder")
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        sizes = {str(p.relative_to(path)) if p != path else p.name: p.stat().st_size for p in files}
        return {"bytes": sum(sizes.values()), "files": sizes}
    if not isinstance(model_or_path, nn.Module):
        raise TypeError(f"adapter_bytes takes a model with LoRA or a path, got {type(model_or_path).__name__}")
    costs, factors = {}, set()
    for name, adapter in _adapters(model_or_path).items():
        params = {id(p): p for layer in adapter.layers.values() for n, p in layer.named_parameters()
                  if not n.startswith("base.")}  # lora_A and lora_B (an embedding's too)
        costs[name], factors = _bytes(params.values()), factors | set(params)
    costs[BASE] = _bytes(p for p in model_or_path.parameters() if id(p) not in factors)
    return costs


# --- latency: the same call served four ways ---
def _seconds(call, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: wait for it before reading the clock
    return time.perf_counter() - start


@contextmanager
def _merged(model: nn.Module):
    """The active adapter merged into W for the block; W itself is put back after (not W + dW - dW)."""
    active = _adapters(model)[multi_adapter.active_adapter(model)].layers.values()
    weights = [layer.base.weight.clone() for layer in active]
    try:
        merge_lora(model, unload=False)
        yield
    finally:
        for layer, weight in zip(active, weights):
            layer.base.weight.copy_(weight)
            layer.merged = False


def latency(model: nn.Module, adapter_names, call, repeats: int = 20, warmup: int = 2) -> dict[str, float]:
    """Median seconds of ``call()`` (e.g. ``lambda: model(**batch)``) over ``repeats`` rounds after ``warmup``
    rounds, with the model served four ways on the same inputs:

        "base"       disable_adapter: no adapter at all
        "unmerged"   the active adapter, y = W x + scaling * B (A x)
        "merged"     the active adapter merged into W (its weights are put back bit for bit after)
        "mixed"      mixed_batch(model, adapter_names): each row its own adapter

    The four take turns in every round, so that a busy moment on a shared machine slows each of them alike.
    Under ``torch.no_grad()``. The model comes back as it was."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats is a positive int such as 20, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup is an int >= 0 such as 2, got {warmup!r}")
    if not callable(call):
        raise TypeError(f"call is a function of no arguments, such as lambda: model(**batch); got {call!r}")
    _check_names(model, adapter_names)
    device = next(model.parameters()).device
    ways = {"base": lambda: multi_adapter.disable_adapter(model), "unmerged": nullcontext,
            "merged": lambda: _merged(model), "mixed": lambda: mixed_batch(model, adapter_names)}
    times = {way: [] for way in ways}
    with torch.no_grad():
        for round_ in range(warmup + repeats):
            for way, served in ways.items():
                with served():
                    seconds = _seconds(call, device)
                if round_ >= warmup:
                    times[way].append(seconds)
    return {way: statistics.median(t) for way, t in times.items()}

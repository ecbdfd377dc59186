"""Which layers a technique adapts: target selection with Hugging Face peft's rules, for every model family.

``add_lora`` (``lora.py``) asks this file which modules to wrap. The rules are peft's, so a ``target_modules``
written for peft picks the same layers here:

    ["query", "value"]        a full module name, or its last dotted components ("query" matches
                              "bert.encoder.layer.0.attention.self.query")
    ".*\\.(q|v)"              any other str is a regular expression that must match a whole module name
                              (a str that names modules, "query", is taken as that name, where peft finds none)
    "all-linear"              every nn.Linear and GPT-2 Conv1D, but not the output head (lm_head, classifier, ...)
    exclude_modules           names (list, same rule) or a regular expression (str) to leave out
    layers_to_transform=[0]   only layers 0 (an int or a list); the index is the first number in the name that
                              follows a component, or follows ``layers_pattern`` ("layer", "h", "layers", ...)

Names differ per family: ``suggest_targets(model)`` gives the query/value projections (BERT's query/value,
Llama's q_proj/v_proj, GPT-2's fused c_attn, T5's q/v) and ``adaptable_layers(model)`` lists every layer LoRA
can wrap. The plain rules (names, dotted suffixes, "all-linear") and ``layer_kind`` are ``lora.py``'s, which this
file needs beside it and builds on; ``lora.add_lora`` comes here for the others. Both need only torch.
"""

import re

from torch import nn

try:
    from . import lora
    from .lora import HEADS, inside, layer_kind, modules_named  # noqa: F401  (ia3.py and dora.py use them from here)
except ImportError:  # copied into a project as plain files, beside lora.py
    import lora
    from lora import HEADS, inside, layer_kind, modules_named  # noqa: F401

QUERY_VALUE = [["query", "value"], ["q_proj", "v_proj"], ["c_attn"], ["q", "v"]]  # BERT-like, Llama-like, GPT-2, T5


class LayerTable(dict):
    """{name: type name} of the layers LoRA can wrap; ``print()`` shows it as a table."""

    def __str__(self) -> str:
        width = max(map(len, self), default=0)
        return "\n".join([f"{n:<{width}}  {t}" for n, t in self.items()] + [f"({len(self)} adaptable layers)"])


def adaptable_layers(model: nn.Module) -> LayerTable:
    """Every layer of ``model`` that LoRA can wrap (linear, Conv1D, 4-bit linear, embedding), by full name."""
    return LayerTable({n: type(m).__name__ for n, m in model.named_modules() if n and layer_kind(m)})


def _family(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__

def suggest_targets(model: nn.Module) -> list[str]:
    """The query and value projections by the names peft's users pass as ``target_modules`` (the LoRA paper's
    choice): ["query", "value"], ["q_proj", "v_proj"], ["c_attn"] (GPT-2's fused q, k, v) or ["q", "v"]."""
    layers = [n for n, m in model.named_modules() if layer_kind(m) in ("linear", "conv1d", "4bit")]
    for names in QUERY_VALUE:
        if all(any(matches(n, [t]) for n in layers) for t in names):
            return list(names)
    params = [n for n, _ in model.named_parameters()]
    if any(matches(n, ["q", "query"]) for n in params):  # XLNet: q, k, v, o, r are parameters of the attention
        raise ValueError(f"{_family(model)} keeps its attention projections (e.g. "
                         f"{next(n for n in params if matches(n, ['q', 'query']))!r}) as parameters, not "
                         f"linear layers, so LoRA cannot wrap them. Use target_modules='all-linear', which adapts its "
                         f"layers {sorted({n.rpartition('.')[2] for n in select(model, 'all-linear')})}. Query/value "
                         "targets exist for the families bert, roberta, albert, electra, t5, gpt2, llama")
    raise ValueError(f"{_family(model)} has none of the query/value layer names {QUERY_VALUE}; its adaptable layers "
                     f"are {sorted({n.rpartition('.')[2] for n in adaptable_layers(model)})}: pick some, or "
                     "pass target_modules='all-linear'")


def matches(name: str, targets) -> bool:  # peft: a str is a regex on the whole name; a list, names or suffixes
    return re.fullmatch(targets, name) is not None if isinstance(targets, str) else lora.matches(name, targets)


def _layer_index(name: str, layers_pattern) -> int | None:  # peft's rule: the first number after a component
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern or []
    for pattern in patterns or [None]:
        match = re.match(r".*?\.[^.]*\.(\d+)\." if pattern is None else rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
        if match:
            return int(match.group(1))
    return None


def check_selection(target_modules, exclude_modules, layers_to_transform, layers_pattern) -> None:
    """The type checks and peft's rules on how the selection arguments combine (a ValueError/TypeError if not)."""
    for arg, value in (("exclude_modules", exclude_modules), ("layers_pattern", layers_pattern)):
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
            raise TypeError(f"{arg} must be a str or a list of str, got {value!r}")
    for pattern in [p for p in (target_modules, exclude_modules) if isinstance(p, str)]:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{pattern!r} is not a valid regular expression ({err}); a str target or exclusion "
                             "is matched with re.fullmatch against whole module names") from err
    layers = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    if layers is not None and (not isinstance(layers, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
        raise TypeError(f"layers_to_transform must be a layer index or a list of them, got {layers_to_transform!r}")
    if isinstance(target_modules, str) and (layers_to_transform is not None or layers_pattern is not None):
        raise ValueError("layers_to_transform and layers_pattern work with a list of target_modules, not with a str "
                         f"({target_modules!r}), as in peft: pass names such as ['query', 'value']")
    if layers_pattern and layers_to_transform is None:
        raise ValueError("layers_pattern only says where the layer index is: pass layers_to_transform too (as peft)")


def select(model: nn.Module, target_modules, exclude_modules=None, layers_to_transform=None, layers_pattern=None,
           skip=()) -> list[str]:
    """Full names of the modules ``target_modules`` picks (see the module docstring), outside the full names
    ``skip`` (modules_to_save). Checks the arguments first; names and "all-linear" are ``lora.select``'s, with its
    errors (a target that matches nothing names the layers that exist); the other rules narrow its choice."""
    modules = [n for n, _ in model.named_modules() if n]
    if isinstance(target_modules, str) and any(matches(n, [target_modules]) for n in modules):
        target_modules = [target_modules]  # a str naming modules is that name (peft would find nothing)
    check_selection(target_modules, exclude_modules, layers_to_transform, layers_pattern)
    if isinstance(target_modules, str) and target_modules.lower() != "all-linear":
        if not (found := [n for n in modules if matches(n, target_modules)]):
            short = sorted({n.rpartition(".")[2] for n in adaptable_layers(model)})
            raise ValueError(f"the regular expression {target_modules!r} matches no whole module name. The "
                             f"adaptable layers are named {short} (e.g. {next(iter(adaptable_layers(model)), None)!r})")
        found = lora.select(model, found)  # full names now: lora.select refuses a layer it cannot wrap
    else:
        found = lora.select(model, target_modules)
    if layers_to_transform is not None:  # peft: a full name given as such is kept whatever its layer
        keep = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
        index = {n: _layer_index(n, layers_pattern) for n in found}
        if not any(index[n] in keep or n in target_modules for n in found):
            raise ValueError(f"layers_to_transform={layers_to_transform!r} (layers_pattern={layers_pattern!r}) "
                             f"kept none of {target_modules}: their layer indices are "
                             f"{sorted({i for i in index.values() if i is not None})}")
        found = [n for n in found if index[n] in keep or n in target_modules]
    found = [n for n in found if not (exclude_modules and matches(n, exclude_modules)) and not inside(n, skip)]
    if not found:
        raise ValueError(f"target_modules {target_modules!r} left no layer to wrap outside exclude_modules "
                         f"{exclude_modules!r} and modules_to_save {list(skip)}")
    return found

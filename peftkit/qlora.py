"""QLoRA: Efficient Finetuning of Quantized LLMs (Dettmers et al., 2023, arXiv:2305.14314).

QLoRA is LoRA (``peftkit/lora.py``) on a base stored in 4-bit NF4 (``peftkit/nf4.py``):

    y = dequant(W_nf4) x + b + scaling * B (A x)      dequant(W_nf4): rebuilt in x's dtype each call

Trained: ``lora_A`` and ``lora_B`` (kept in float32). Frozen: the 4-bit weights (double
quantized: ~4.127 bits each), biases, embeddings, the float output head and the norms, all
kept in float32. The paper's third part, paged optimizers, only matters on a GPU.

    prepare_for_qlora(model)                                  # quantize, freeze, norms in float32
    add_lora(model, "all-linear", rank=8, alpha=16)           # LoRA accepts NF4Linear targets
    ...train...
    save_adapter(model, "qlora.safetensors")                  # lora.py's: A and B only, as for LoRA
    merge_into_float(model, float_model)                      # deploy: W + delta W, in float

Merging into the 4-bit base is possible but lossy: NF4(W + delta W) is re-rounded to the same
coarse grid, and delta W is usually far smaller than a grid step, so most of it is rounded
away (``requantized_update_error`` measures how much). Merging into the original float
weights keeps the update whole. This file needs ``lora.py`` and ``nf4.py`` beside it (and only torch).
"""

import torch
from torch import nn

try:
    from .lora import LoRAConfig, LoRALinear
    from .nf4 import NF4Linear, quantize_model, quantize_nf4, replace_modules
except ImportError:  # copied into a project as plain files, beside lora.py and nf4.py
    from lora import LoRAConfig, LoRALinear
    from nf4 import NF4Linear, quantize_model, quantize_nf4, replace_modules


def prepare_for_qlora(model: nn.Module, skip=("lm_head", "classifier"), double_quant: bool = True,
                      blocksize: int = 64, gradient_checkpointing: bool = False) -> nn.Module:
    """Quantize every linear but ``skip`` to NF4, freeze everything, keep norms in float32.

    Like peft's ``prepare_model_for_kbit_training``, every float parameter left in 16 bits goes
    to float32: the norms (they divide by small statistics, where 16-bit rounding hurts most),
    and with them the embeddings and the output head, which then read the norms' float32 output.

    ``gradient_checkpointing`` (Hugging Face models) recomputes each layer's activations in
    backward instead of storing them: less memory, about one extra forward of time.
    Then call ``add_lora``. Returns ``model``; a model that is already quantized is refused.
    All or nothing: if any step fails, the float layers, dtypes and flags are put back.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_for_qlora needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(gradient_checkpointing, bool):
        raise TypeError(f"gradient_checkpointing must be True or False, got {gradient_checkpointing!r}")
    if gradient_checkpointing and not hasattr(model, "gradient_checkpointing_enable"):
        raise TypeError(f"gradient_checkpointing needs a Hugging Face model; {type(model).__name__} has no "
                        "gradient_checkpointing_enable()")
    # All or nothing: remember what each step changes, to put it back if a later step fails.
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    params = [(p, p.data, p.requires_grad) for p in model.parameters()]
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    quantize_model(model, skip=skip, double_quant=double_quant, blocksize=blocksize)  # all or nothing itself
    try:
        model.requires_grad_(False)
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
        if gradient_checkpointing:
            # Non-reentrant checkpointing: gradients reach LoRA even though the inputs need none.
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if config is not None:
                config.use_cache = False  # a cache is useless in training and clashes with checkpointing
    except BaseException:
        replace_modules(model, {n: m for n, m in linears.items() if model.get_submodule(n) is not m})
        for param, data, requires_grad in params:
            param.data, param.requires_grad = data, requires_grad
        if gradient_checkpointing and not checkpointing:
            getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
        if use_cache is not None:
            config.use_cache = use_cache
        raise
    return model


def merged_weight(layer: LoRALinear) -> torch.Tensor:
    """The exact float weight the trained layer computes with: dequant(W_nf4) + delta W, (out, in)."""
    _check_layer(layer)
    return layer.base.weight.dequantize(torch.float32) + layer.delta_weight().float()


# --- merging ---
def _check_layer(layer) -> None:
    if not isinstance(layer, LoRALinear) or not isinstance(layer.base, NF4Linear):
        raise TypeError(f"needs a LoRALinear over an NF4Linear (prepare_for_qlora, then add_lora), got {layer!r:.80}")


def _qlora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module with QLoRA layers, got {type(model).__name__}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear) and isinstance(m.base, NF4Linear)]
    if not layers:
        raise ValueError("the model has no LoRA layer over an NF4Linear base: call prepare_for_qlora, then add_lora")
    return layers


def requantized_update_error(layer: LoRALinear) -> float:
    """How much of delta W a 4-bit merge loses: ||realised update - delta W|| / ||delta W||.

    The realised update is NF4(W + delta W) - W. 0 would be a perfect merge; 1 is as bad as
    dropping the update; above 1, the merge adds more rounding noise than update.
    """
    _check_layer(layer)
    w, delta = layer.base.weight, layer.delta_weight().float()
    requantized = quantize_nf4(merged_weight(layer), w.blocksize, w.double_quant).dequantize(torch.float32)
    realised = requantized - w.dequantize(torch.float32)
    return ((realised - delta).norm() / delta.norm()).item()


def merge_into_4bit(model: nn.Module) -> nn.Module:
    """Replace each LoRA layer over a 4-bit base by NF4Linear(NF4(W + delta W)), in place (lossy).

    The same blocksize and double quantization as the base are kept (this is what peft's
    ``merge_and_unload`` does for a bitsandbytes 4-bit base). Returns ``model``.
    """
    merged = {}  # built before any swap: a failure (e.g. a NaN update) leaves the model as it was
    for name, layer in _qlora_layers(model):
        w, base = merged_weight(layer).to(layer.base.weight.dtype), layer.base
        try:
            merged[name] = NF4Linear(quantize_nf4(w, base.weight.blocksize, base.weight.double_quant), base.bias)
        except ValueError as err:
            raise ValueError(f"cannot merge {name!r}: {err}; the model was left unchanged") from err
    replace_modules(model, merged)
    if isinstance(vars(model).get("adapter_config"), LoRAConfig):
        del model.adapter_config  # no LoRA layers left
    return model


def merge_into_float(model: nn.Module, float_model: nn.Module) -> nn.Module:
    """Add each layer's delta W to the matching ``nn.Linear`` of ``float_model``, in place.

    ``float_model`` is the original, unquantized model (e.g. loaded again); the QLoRA
    ``model`` is left as it is. The result is W + delta W with no rounding of the update:
    what the adapter learned, applied to the weights it was meant for. Returns ``float_model``.
    All or nothing: the merged weights are all computed (one extra copy in memory) before any is set.
    """
    if not isinstance(float_model, nn.Module):
        raise TypeError(f"float_model must be the original float torch.nn.Module, got {type(float_model).__name__}")
    layers = _qlora_layers(model)  # and LoRA on layers left in float (a skipped head, say): merged the same way
    layers += [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear) and isinstance(m.base, nn.Linear)]
    targets = dict(float_model.named_modules())
    problems = [n for n, layer in layers if not isinstance(targets.get(n), nn.Linear)
                or targets[n].weight.shape != (layer.out_features, layer.in_features)]
    if problems:
        raise ValueError(f"float_model has no nn.Linear of the right shape at {problems}: pass the "
                         "original model that was quantized (before prepare_for_qlora)")
    new = {}  # W + delta W for every layer first; then swapped in, each at once, with no error left to meet
    with torch.no_grad():
        for name, layer in layers:
            weight = targets[name].weight
            new[name] = weight + layer.delta_weight().to(weight.device, weight.dtype)
            if not torch.isfinite(new[name]).all():
                raise ValueError(f"the merged weight of {name!r} is not finite (NaN/inf); "
                                 "float_model was left unchanged")
    old = {name: targets[name].weight.data for name in new}
    try:
        for name, weight in new.items():
            targets[name].weight.data = weight
    except BaseException:
        for name, weight in old.items():
            targets[name].weight.data = weight
        raise
    return float_model

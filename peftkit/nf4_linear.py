"""The 4-bit linear layer: a frozen ``nn.Linear`` whose weight is stored in NF4 (``nf4.py``).

    y = x dequant(W_nf4)^T + b        dequant(W_nf4): the float weight, rebuilt in x's dtype

Nothing here trains: ``NF4Linear`` rebuilds its float weight at every forward, and again in
backward, so autograd never keeps a float copy of it (that copy would undo the 4-bit saving
during training). Its state dict holds the 4-bit parts, so a quantized model saves and loads
into a model quantized alike. ``quantize_model`` swaps every ``nn.Linear`` of a model, all or
nothing. LoRA wraps an ``NF4Linear`` as it wraps an ``nn.Linear``: that is QLoRA (``qlora.py``).
This file needs ``nf4.py`` beside it.

    layer = NF4Linear.from_linear(linear, blocksize=64, double_quant=True)
    quantize_model(model, skip=("lm_head",))         # every other nn.Linear, in place
"""

import torch
import torch.nn.functional as F
from torch import nn

try:
    from .nf4 import FLOAT_DTYPES, PARTS, NF4Tensor, _check_settings, quantize_nf4
except ImportError:  # copied into a project as plain files, beside nf4.py
    from nf4 import FLOAT_DTYPES, PARTS, NF4Tensor, _check_settings, quantize_nf4


class _NF4Matmul(torch.autograd.Function):
    """x W^T + b with W rebuilt from 4 bits in forward and again in backward, never saved."""

    @staticmethod
    def forward(ctx, x, weight: NF4Tensor, bias):
        ctx.weight = weight
        return F.linear(x, weight.dequantize(x.dtype, reuse=True), bias)  # W is not kept

    @staticmethod
    def backward(ctx, grad_out):
        need_x = ctx.needs_input_grad[0]  # not for the first layer: rebuild W only when needed
        grad_x = grad_out @ ctx.weight.dequantize(grad_out.dtype, reuse=True) if need_x else None  # (..., out) @ (out, in)
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is an NF4Tensor, dequantized to the input's dtype."""

    is_peftkit_4bit = True  # what peftkit.lora looks for, without importing this file

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, NF4Tensor) or len(weight.shape) != 2:
            raise TypeError(f"NF4Linear needs a 2-D NF4Tensor (out, in), got {weight!r}")
        self.out_features, self.in_features = weight.shape
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (self.out_features,)):
            raise TypeError(f"NF4Linear's bias must be None or a tensor of shape ({self.out_features},), got {bias!r}")
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "NF4Linear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear.from_linear needs an nn.Linear, got {type(linear).__name__}")
        return cls(quantize_nf4(linear.weight, blocksize, double_quant), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _NF4Matmul.apply(x, self.weight, bias)

    def _apply(self, fn, recurse=True):
        # model.to(device) moves the codes; dtype casts (model.half()) must not touch them.
        self.weight = self.weight.to(fn(torch.empty(0, device=self.weight.device)).device)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.weight.blocksize}, double_quant={self.weight.double_quant}")

    # --- the state dict holds the 4-bit parts, so that a quantized model saves and loads ---
    # weight_format: int64 (out, in, blocksize, dtype as an index in FLOAT_DTYPES), then weight_<part>
    # for each of PARTS: weight_packed and weight_absmax, or weight_absmax_codes, _scale and _offset.

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        w = self.weight
        destination[prefix + "weight_format"] = torch.tensor([*w.shape, w.blocksize, FLOAT_DTYPES.index(w.dtype)])
        destination.update({prefix + "weight_" + part: getattr(w, part) for part in PARTS[w.double_quant]})

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        own = self.weight
        keys = [prefix + "weight_" + part for part in ("format", *PARTS[own.double_quant])]
        try:
            if prefix + "weight" in state_dict:
                raise ValueError(f"{prefix}weight is a float weight, but this layer is a 4-bit NF4Linear: load "
                                 "float weights into the float model, then quantize_model")
            if prefix + ("weight_absmax" if own.double_quant else "weight_absmax_codes") in state_dict:
                raise ValueError(f"{prefix}weight_* was saved with double_quant={not own.double_quant}, but this "
                                 f"layer has double_quant={own.double_quant}: quantize the model with the saved "
                                 "settings first")
            if all(k in state_dict for k in keys):
                self.weight = self._saved_weight(prefix, [state_dict[k] for k in keys], local_metadata)
            elif strict:
                missing.extend(k for k in keys if k not in state_dict)
        except ValueError as err:
            errors.append(str(err))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        unexpected[:] = [k for k in unexpected if k not in keys]  # the bias loader did not know our keys

    def _saved_weight(self, prefix, tensors, local_metadata) -> NF4Tensor:
        """The NF4Tensor that saved (format, packed, ...) describe, checked against this layer's own parts."""
        (fmt, *parts), own = tensors, self.weight
        if fmt.dtype != torch.int64 or fmt.tolist()[:3] != [*own.shape, own.blocksize] or fmt[3] >= len(FLOAT_DTYPES):
            raise ValueError(f"{prefix}weight_format is {fmt.tolist()}, but this layer holds a {tuple(own.shape)} "
                             f"weight in blocks of {own.blocksize} (int64 [out, in, blocksize, dtype code])")
        mine = {name: getattr(own, name) for name in PARTS[own.double_quant]}  # the dtypes and shapes to expect
        for (name, t), saved in zip(mine.items(), parts):
            if (saved.dtype, saved.shape) != (t.dtype, t.shape):
                raise ValueError(f"{prefix}weight_{name} must be {t.dtype} of shape {tuple(t.shape)}, got "
                                 f"{saved.dtype} of shape {tuple(saved.shape)}")
        # As load_state_dict does: copied onto this layer's device, unless assign=True (or a meta skeleton).
        assign = local_metadata.get("assign_to_params_buffers", False) or own.device.type == "meta"
        saved = {name: t if assign else t.to(own.device, copy=True) for name, t in zip(mine, parts)}
        return NF4Tensor(**{"absmax": None, **saved}, shape=own.shape, dtype=FLOAT_DTYPES[fmt[3]],
                         blocksize=own.blocksize)


# --- injecting into a model ---

def replace_modules(model: nn.Module, new: dict[str, nn.Module]) -> None:
    """Put each new module at its dotted name; on any error, put every old one back (all or nothing)."""
    old = {name: model.get_submodule(name) for name in new}
    try:
        for name, module in new.items():
            model.set_submodule(name, module)
    except BaseException:
        for name, module in old.items():
            model.set_submodule(name, module)
        raise


def quantize_model(model: nn.Module, skip=("lm_head", "classifier"), double_quant: bool = True,
                   blocksize: int = 64) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by an ``NF4Linear``, in place; returns ``model``.

    A linear stays in float when any dotted part of its name is in ``skip`` (the output heads by
    default). Quantizing twice is an error, not a no-op: the second call's settings would be
    silently ignored. LoRA must come after quantization (that is QLoRA), so LoRA layers are refused.
    All or nothing: every layer is quantized before any is swapped in, so an error (a NaN weight,
    named in the message) leaves the model as it was.
    """
    if not isinstance(model, nn.Module) or isinstance(model, nn.Linear):
        raise TypeError(f"quantize_model needs a model (an nn.Module holding nn.Linear layers; for one layer, "
                        f"NF4Linear.from_linear), got {type(model).__name__}")
    skip = (skip,) if isinstance(skip, str) else skip
    if not isinstance(skip, (tuple, list, set)) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"skip must be a module name or a tuple of names (e.g. ('lm_head',)), got {skip!r}")
    _check_settings(blocksize, double_quant)
    modules = dict(model.named_modules())
    done = [n for n, m in modules.items() if getattr(type(m), "is_peftkit_4bit", False)]
    if done:
        raise ValueError(f"the model is already quantized ({len(done)} 4-bit layers, e.g. {done[0]!r}); "
                         "quantize the float model once")
    lora = [n for n, m in modules.items() if hasattr(m, "lora_A")]
    if lora:
        raise ValueError(f"the model already has LoRA layers (e.g. {lora[0]!r}): quantize first, then add_lora")
    targets = [n for n, m in modules.items() if isinstance(m, nn.Linear) and not set(n.split(".")) & set(skip)]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.Linear outside skip={tuple(skip)} to quantize")
    quantized = {}
    for name in targets:
        try:
            quantized[name] = NF4Linear.from_linear(modules[name], blocksize, double_quant)
        except (TypeError, ValueError) as err:
            raise type(err)(f"cannot quantize {name!r}: {err}; the model was left unchanged") from err
    replace_modules(model, quantized)
    return model

"""NF4: 4-bit NormalFloat quantization (Dettmers et al., 2023, QLoRA, arXiv:2305.14314).

Each block of ``blocksize`` consecutive weights (the tensor read flat, row by row) keeps one
float32 scale, its largest magnitude, and one 4-bit code per weight:

    absmax_b = max |w_i| over the block        code_i = index of the NF4_CODE value nearest w_i / absmax_b
    w_i ~= NF4_CODE[code_i] * absmax_b         two codes per byte, the first in the high nibble

The 16 NF4 values are quantiles of a normal distribution, so that normally distributed
weights fill the 16 bins about equally. Double quantization stores the per-block scales in
8 bits too: their mean is subtracted, and the rest is quantized the same way in blocks of
256 with bitsandbytes' signed 8-bit dynamic map. Bits per weight: 4 + 32/64 = 4.5 without,
4 + 8/64 + 32/(64*256) ~= 4.127 with.

Nothing here trains: ``NF4Linear`` is a frozen layer that rebuilds its float weight, in the
input's dtype, at every forward (and again in backward, so autograd never keeps it). Its state
dict holds the 4-bit parts, so a quantized model saves and loads (into a model quantized alike).
The semantics are bitsandbytes' reference ones (``bitsandbytes/backends/default/ops.py``,
v0.50.2): codes, scales and dequantized values agree bit for bit.
"""

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# NF4 as bitsandbytes hard-codes it (get_4bit_type("nf4")). nf4_code_from_quantiles() rebuilds
# exactly these float32 values: 7 negative quantiles, an exact zero, 8 positive quantiles.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # what quantize_nf4 accepts
NF4_ZERO = 7  # the code of 0.0: pads an odd element count to a whole byte, as bitsandbytes does
ABSMAX_BLOCKSIZE = 256  # double quantization: one float32 scale per 256 absmax codes
# The tensors of an NF4Tensor, without (False) and with (True) double quantization: what a state dict holds.
PARTS = {False: ("packed", "absmax"), True: ("packed", "absmax_codes", "absmax_scale", "absmax_offset")}


def nf4_code_from_quantiles(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NF4 values from normal quantiles (bitsandbytes' create_normal_map, without scipy).

    Eight evenly spaced probabilities from ``offset`` down to 0.5 give the positive side and seven
    the negative side (one more positive value, so that 0 is exact); ``offset`` < 1 because the
    quantile of 1 is infinite. Dividing by the largest value maps everything into [-1, 1].
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).float()  # (8,)
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double()).float()  # (7,)
    values = torch.cat([negative, torch.zeros(1), positive]).sort().values
    return values / values.max()


def dynamic_map_8bit() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map()): 256 sorted values in [-1, 1].

    Decade 10^(i-6), i = 0..6, holds 2^i values (the midpoints of 2^i equal steps from 0.1 to 1)
    and their negatives; with 0 and 1 that is 254 + 2 codes, dense near zero like a float.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1)
        midpoints = (edges[:-1] + edges[1:]) / 2
        values += (10 ** (i - 6) * midpoints).tolist() + (-(10 ** (i - 6)) * midpoints).tolist()
    return torch.tensor(sorted(values))


DYNAMIC_CODE = dynamic_map_8bit()


# ---- The readable version (the notebook builds these): one step per line, any size. ----

def quantize_blockwise_readable(w: torch.Tensor, code: torch.Tensor, blocksize: int):
    """Index of the nearest ``code`` value for every element of w / absmax(block) → (codes, absmax)."""
    flat = w.reshape(-1).float()
    pad = -flat.numel() % blocksize
    blocks = F.pad(flat, (0, pad)).view(-1, blocksize)  # (num_blocks, blocksize); zeros leave absmax alone
    absmax = blocks.abs().amax(dim=1)  # (num_blocks,)
    scaled = blocks * (1 / absmax.clamp(min=1e-38))[:, None]  # in [-1, 1]; an all-zero block stays 0
    if pad:  # bitsandbytes treats a partial last block apart: it divides, and keeps the clamped scale
        absmax[-1] = absmax[-1].clamp(min=1e-38)
        scaled[-1] = blocks[-1] / absmax[-1]
    midpoints = (code[:-1] + code[1:]) / 2  # nearest value = how many midpoints lie below
    codes = (scaled.reshape(-1, 1) > midpoints).sum(dim=1)  # (num_blocks * blocksize,)
    return codes[: flat.numel()].to(torch.uint8), absmax


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(n,) codes in 0..15 → (ceil(n/2),) bytes, the first code of each pair in the high nibble."""
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1), value=NF4_ZERO)
    return codes[0::2] << 4 | codes[1::2]


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:numel]  # (numel,)


def dequantize_blockwise_readable(codes, absmax, code, blocksize, shape, dtype):
    """code[codes] * absmax of their block, computed in float32, then cast to ``dtype``."""
    values = code[codes.long()]  # (n,)
    pad = -values.numel() % blocksize
    blocks = F.pad(values, (0, pad)).view(-1, blocksize) * absmax[:, None]  # (num_blocks, blocksize)
    return blocks.reshape(-1)[: values.numel()].view(shape).to(dtype)


# ---- The fast path used by NF4Tensor: the same numbers, fewer passes over memory. ----

def _quantize_blockwise(flat: torch.Tensor, midpoints: torch.Tensor, blocksize: int):
    """Fast quantize_blockwise_readable: (int32 codes padded to an even count, absmax)."""
    n = flat.numel()
    full = n - n % blocksize
    lo, hi = torch.aminmax(flat[:full].view(-1, blocksize), dim=1)  # no |w| copy of the whole tensor
    absmax = torch.maximum(hi, -lo)  # (full // blocksize,)
    scaled = flat.new_empty(n + n % 2)
    scaled[n:] = 0  # a padding 0.0 gets code NF4_ZERO
    torch.mul(flat[:full].view(-1, blocksize), (1 / absmax.clamp(min=1e-38))[:, None],
              out=scaled[:full].view(-1, blocksize))
    if full < n:
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        torch.div(flat[full:], tail_absmax, out=scaled[full:n])
        absmax = torch.cat([absmax, tail_absmax[None]])
    # No clamp to [-1, 1] needed: values past the end midpoints land in the end bins anyway.
    return torch.bucketize(scaled, midpoints.to(flat.device), out_int32=True), absmax


# The lookup in dequantize(): entry b holds the two float32 values of byte b (high nibble first),
# read as one int64, so that one gathered element copies both values. 256 entries, 2 KiB: it stays
# in the fastest cache even between the big matmuls of a training step.
BYTE_TO_PAIR = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], 1).view(torch.int64).view(256)
GATHER_ROW = 64  # bytes per row of the gather: torch spreads the rows over its threads


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values (n,) *= the scale of their block, in place; a partial last block takes the last scale."""
    full = values.numel() - values.numel() % blocksize
    values[:full].view(-1, blocksize).mul_(scales[: full // blocksize, None])
    if full < values.numel():
        values[full:].mul_(scales[-1])
    return values


@dataclass(repr=False)
class NF4Tensor:
    """A tensor stored as packed NF4 codes plus per-block scales (see the module docstring)."""

    packed: torch.Tensor  # (ceil(n/2),) uint8, two codes per byte
    absmax: torch.Tensor | None  # (num_blocks,) float32 scales; None with double quantization
    shape: torch.Size  # the original shape and dtype, restored by dequantize()
    dtype: torch.dtype
    blocksize: int = 64
    absmax_codes: torch.Tensor | None = None  # (num_blocks,) uint8: (absmax - offset) in DYNAMIC_CODE
    absmax_scale: torch.Tensor | None = None  # (ceil(num_blocks/256),) float32 scale of those codes
    absmax_offset: torch.Tensor | None = None  # () float32: the mean absmax

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.shape.numel()

    def block_absmax(self) -> torch.Tensor:
        """The float32 scale of every block (dequantizing the 8-bit ones first)."""
        if not self.double_quant:
            return self.absmax
        values = DYNAMIC_CODE.to(self.device)[self.absmax_codes.long()]  # (num_blocks,)
        return _scale_blocks(values, self.absmax_scale, ABSMAX_BLOCKSIZE).add_(self.absmax_offset)

    def dequantize(self, dtype: torch.dtype | None = None, reuse: bool = False) -> torch.Tensor:
        """NF4_CODE[code] * absmax in float32, cast to ``dtype`` (default: the original dtype).

        ``reuse=True`` writes the result into a buffer shared by every call on this thread
        (``scratch``): nothing is allocated, and the result is valid only until the next such call.
        """
        dtype, n, b, size = dtype or self.dtype, self.numel(), self.blocksize, self.packed.numel()
        rows = -(-size // GATHER_ROW)
        index = scratch("index", rows * GATHER_ROW, torch.int64, self.device)  # gather wants int64
        index[size:] = 0
        index[:size].copy_(self.packed)
        table = BYTE_TO_PAIR.to(self.device).expand(rows, -1)  # (rows, 256), no copy
        # float32 values go in a reused buffer unless they are the result (a fresh buffer costs page faults)
        fresh = not reuse and dtype == torch.float32
        values = torch.empty(rows * GATHER_ROW, dtype=torch.int64, device=self.device) if fresh else \
            scratch("values", rows * GATHER_ROW, torch.int64, self.device)
        values = torch.gather(table, 1, index.view(rows, -1), out=values.view(rows, -1))  # (rows, GATHER_ROW)
        values = values.view(-1).view(torch.float32)[:n]  # (n,) the codes' values, in order
        values = _scale_blocks(values, self.block_absmax(), b).view(self.shape)  # float32, as bitsandbytes computes
        if dtype == torch.float32:
            return values
        return scratch("cast", n, dtype, self.device).view(self.shape).copy_(values) if reuse else values.to(dtype)

    def is_floating_point(self) -> bool:
        """False, as for bitsandbytes' 4-bit weights: the values are stored as 4-bit codes."""
        return False

    @property
    def nbytes(self) -> int:
        parts = (self.packed, self.absmax, self.absmax_codes, self.absmax_scale, self.absmax_offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel()

    def to(self, device) -> "NF4Tensor":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return NF4Tensor(**moved)

    def __repr__(self) -> str:
        quant = "double-quantized scales" if self.double_quant else "float32 scales"
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"{quant}, {self.bits_per_param:.3f} bits/param)")


def _check_settings(blocksize, double_quant) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0 or blocksize % 2:
        raise ValueError(f"blocksize must be a positive even int (bitsandbytes uses 64), got {blocksize!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantize ``w`` (float32, bfloat16, float16 or float64; any shape and size) to an NF4Tensor.

    Refused: non-floating or empty tensors, NaN/inf values, a blocksize that is not a positive
    even int. ``double_quant`` also quantizes the per-block scales (module docstring).
    """
    if not isinstance(w, torch.Tensor) or w.dtype not in FLOAT_DTYPES:
        got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise TypeError(f"quantize_nf4 needs a floating-point tensor (float32, bfloat16, float16, float64), got {got}")
    if w.numel() == 0:
        raise ValueError(f"quantize_nf4 got an empty tensor (shape {tuple(w.shape)}): nothing to quantize")
    _check_settings(blocksize, double_quant)
    flat = w.detach().reshape(-1).float()
    codes, absmax = _quantize_blockwise(flat, (NF4_CODE[:-1] + NF4_CODE[1:]) / 2, blocksize)
    if not torch.isfinite(absmax).all():  # a NaN or inf anywhere reaches its block's max
        bad = (~torch.isfinite(flat)).sum().item()
        raise ValueError(f"quantize_nf4 got {bad} NaN/inf values; every value must be finite")
    codes = codes.to(torch.uint8)
    packed = codes[0::2] << 4 | codes[1::2]
    result = NF4Tensor(packed, absmax, w.shape, w.dtype, blocksize)
    if double_quant:
        offset = absmax.mean()
        codes8, scale = _quantize_blockwise(absmax - offset, (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / 2,
                                            ABSMAX_BLOCKSIZE)
        result.absmax, result.absmax_offset = None, offset
        result.absmax_codes, result.absmax_scale = codes8[: absmax.numel()].to(torch.uint8), scale
    return result


_SCRATCH: dict = {}  # (name, dtype, device, thread) -> a flat buffer, grown to the largest layer seen


def scratch(name: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A reusable (numel,) buffer. A freshly allocated multi-MiB tensor costs page faults on every
    call (the allocator hands big blocks back to the OS); one buffer per layer size avoids that."""
    key = (name, dtype, torch.device(device), threading.get_ident())
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


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
        device = fn(torch.empty(0, device=self.weight.device)).device
        self.weight = self.weight.to(device)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        w = self.weight
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={w.blocksize}, double_quant={w.double_quant}")

    # --- the state dict holds the 4-bit parts, so that a quantized model saves and loads ---
    # weight_format: int64 (out, in, blocksize, dtype as an index in FLOAT_DTYPES), then weight_<part>
    # for each of PARTS: weight_packed and weight_absmax, or weight_absmax_codes, _scale and _offset.

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        w = self.weight
        destination[prefix + "weight_format"] = torch.tensor([*w.shape, w.blocksize, FLOAT_DTYPES.index(w.dtype)])
        destination.update({prefix + "weight_" + part: getattr(w, part) for part in PARTS[w.double_quant]})

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        double, weight = self.weight.double_quant, None
        keys = [prefix + "weight_" + part for part in ("format", *PARTS[double])]
        try:
            if prefix + "weight" in state_dict:
                raise ValueError(f"{prefix}weight is a float weight, but this layer is a 4-bit NF4Linear: load "
                                 "float weights into the float model, then quantize_model")
            if prefix + ("weight_absmax" if double else "weight_absmax_codes") in state_dict:
                raise ValueError(f"{prefix}weight_* was saved with double_quant={not double}, but this layer has "
                                 f"double_quant={double}: quantize the model with the saved settings first")
            if all(k in state_dict for k in keys):
                weight = self._saved_weight(prefix, [state_dict[k] for k in keys], local_metadata)
            elif strict:
                missing.extend(k for k in keys if k not in state_dict)
        except ValueError as err:
            errors.append(str(err))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        unexpected[:] = [k for k in unexpected if k not in keys]  # the bias loader did not know our keys
        if weight is not None:
            self.weight = weight

    def _saved_weight(self, prefix, tensors, local_metadata) -> NF4Tensor:
        """The NF4Tensor that saved (format, packed, ...) describe, checked against this layer's own parts."""
        (fmt, *parts), own, names = tensors, self.weight, PARTS[self.weight.double_quant]
        if fmt.dtype != torch.int64 or fmt.tolist()[:3] != [*own.shape, own.blocksize] or fmt[3] >= len(FLOAT_DTYPES):
            raise ValueError(f"{prefix}weight_format is {fmt.tolist()}, but this layer holds a {tuple(own.shape)} "
                             f"weight in blocks of {own.blocksize} (int64 [out, in, blocksize, dtype code])")
        for name, t in zip(names, parts):  # this layer's own parts have the dtypes and shapes to expect
            if (t.dtype, t.shape) != (getattr(own, name).dtype, getattr(own, name).shape):
                raise ValueError(f"{prefix}weight_{name} must be {getattr(own, name).dtype} of shape "
                                 f"{tuple(getattr(own, name).shape)}, got {t.dtype} of shape {tuple(t.shape)}")
        # As load_state_dict does: copied onto this layer's device, unless assign=True (or a meta skeleton).
        assign = local_metadata.get("assign_to_params_buffers", False) or own.device.type == "meta"
        saved = {n: t if assign else t.to(own.device, copy=True) for n, t in zip(names, parts)}
        return NF4Tensor(**{"absmax": None, **saved}, shape=own.shape, dtype=FLOAT_DTYPES[fmt[3]],
                         blocksize=own.blocksize)


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

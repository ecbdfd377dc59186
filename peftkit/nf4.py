"""NF4: 4-bit NormalFloat quantization (Dettmers et al., 2023, QLoRA, arXiv:2305.14314).

Each block of ``blocksize`` consecutive weights (the tensor read flat, row by row) keeps one
float32 scale, its largest magnitude, and one 4-bit code per weight:

    absmax_b = max |w_i| over the block        code_i = argmin_k |w_i / absmax_b - NF4_CODE[k]|
    w_i ~= NF4_CODE[code_i] * absmax_b         two codes per byte, the first in the high nibble

The 16 NF4 values are quantiles of a normal distribution, so that normally distributed
weights fill the 16 bins about equally. Double quantization stores the per-block scales in
8 bits too: their mean is subtracted, and the rest is quantized the same way in blocks of
256 with bitsandbytes' signed 8-bit dynamic map. Bits per weight: 4 + 32/64 = 4.5 without,
4 + 8/64 + 32/(64*256) ~= 4.127 with.

    q = quantize_nf4(w, blocksize=64, double_quant=True)   # an NF4Tensor, ~4.127 bits per weight
    w_hat = q.dequantize()                                 # float again, in w's dtype
    layer = NF4Linear.from_linear(linear)                  # or quantize_model(model): every linear

Nothing here trains: ``NF4Linear`` is a frozen layer that rebuilds its float weight, in the
input's dtype, at every forward (and again in backward, so autograd never keeps it). Its state
dict holds the 4-bit parts, so a quantized model saves and loads (into a model quantized alike).
``quantize_blockwise``/``dequantize_blockwise`` below are the definition; NF4Tensor uses a fast
path further down that gives the same numbers. Both follow bitsandbytes' reference semantics
(``bitsandbytes/backends/default/ops.py``, v0.50.2): codes, scales and values agree bit for bit.
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
NF4_ZERO = 7  # the code of 0.0: pads an odd element count to a whole byte, as bitsandbytes does


# --- the definition, one step per line (notebook 06 builds it); the fast path below matches it ---

def quantize_blockwise(w: torch.Tensor, code: torch.Tensor = NF4_CODE, blocksize: int = 64):
    """Block by block, the index of the ``code`` value nearest w / absmax -> (codes, absmax).

    codes: (w.numel(),) uint8, w read flat; absmax: (num_blocks,) float32, one per block.
    """
    flat = w.reshape(-1).float()
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % blocksize)).view(-1, blocksize)  # (num_blocks, blocksize); pad zeros
    absmax = blocks.abs().amax(dim=1)  # (num_blocks,)
    scaled = blocks * (1 / absmax.clamp(min=1e-38))[:, None]  # in [-1, 1]; an all-zero block stays 0
    if n % blocksize:  # bitsandbytes divides a partial last block instead, and keeps its clamped absmax
        absmax[-1] = absmax[-1].clamp(min=1e-38)
        scaled[-1] = blocks[-1] / absmax[-1]
    codes = (scaled.reshape(-1, 1) - code).abs().argmin(dim=1)  # (num_blocks * blocksize,) the nearest
    # Ties as bitsandbytes breaks them: x moves up to code[k+1] only when x > the float32 midpoint of
    # code[k] and code[k+1]. That midpoint is rounded: x equal to it can be a hair nearer code[k+1] (for
    # 6 of NF4's 15), yet takes code[k]. Elsewhere argmin agrees (an exact tie: the first, lower code).
    midpoint_below = F.pad((code[:-1] + code[1:]) / 2, (1, 0), value=-float("inf"))  # below code[k]
    codes -= (scaled.reshape(-1) == midpoint_below[codes]).long()
    return codes[:n].to(torch.uint8), absmax


def dequantize_blockwise(codes, absmax, code: torch.Tensor = NF4_CODE, blocksize: int = 64, shape=(-1,)):
    """code[codes] * the absmax of their block, in float32 (cast afterwards) -> ``shape``."""
    values = code[codes.long()]  # (n,)
    blocks = F.pad(values, (0, -values.numel() % blocksize)).view(-1, blocksize)  # (num_blocks, blocksize)
    return (blocks * absmax[:, None]).reshape(-1)[: values.numel()].view(shape)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(n,) codes in 0..15 -> (ceil(n/2),) bytes, the first code of each pair in the high nibble."""
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1), value=NF4_ZERO)
    return codes[0::2] << 4 | codes[1::2]


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:numel]  # (numel,)


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
    edges = [torch.linspace(0.1, 1, 2**i + 1) for i in range(7)]
    positive = torch.cat([10 ** (i - 6) * ((e[:-1] + e[1:]) / 2) for i, e in enumerate(edges)])  # (127,)
    return torch.cat([-positive, torch.tensor([0.0, 1.0]), positive]).sort().values


DYNAMIC_CODE = dynamic_map_8bit()
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # what quantize_nf4 accepts
ABSMAX_BLOCKSIZE = 256  # double quantization: one float32 scale per 256 absmax codes
# The tensors of an NF4Tensor, without (False) and with (True) double quantization: what a state dict holds.
PARTS = {False: ("packed", "absmax"), True: ("packed", "absmax_codes", "absmax_scale", "absmax_offset")}


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
        return dequantize_blockwise(self.absmax_codes, self.absmax_scale, DYNAMIC_CODE.to(self.device),
                                    ABSMAX_BLOCKSIZE) + self.absmax_offset

    def dequantize(self, dtype: torch.dtype | None = None, reuse: bool = False) -> torch.Tensor:
        """dequantize_blockwise's numbers (in float32, then cast to ``dtype``, default the original
        dtype) by the fast path. ``reuse=True`` writes into a buffer shared by every call on this
        thread: nothing is allocated, and the result is valid only until the next such call."""
        return _fast_dequantize(self, dtype or self.dtype, reuse)

    def is_floating_point(self) -> bool:  # False, as for bitsandbytes' 4-bit weights: stored as codes
        return False

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, p).numel() * getattr(self, p).element_size() for p in PARTS[self.double_quant])

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel()

    def to(self, device) -> "NF4Tensor":
        return NF4Tensor(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()})

    def __repr__(self) -> str:
        scales = "double-quantized" if self.double_quant else "float32"
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"{scales} scales, {self.bits_per_param:.3f} bits/param)")


def _check_settings(blocksize, double_quant) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0 or blocksize % 2:
        raise ValueError(f"blocksize must be a positive even int (bitsandbytes uses 64), got {blocksize!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantize ``w`` (float32, bfloat16, float16 or float64; any shape and size) to an NF4Tensor.

    Refused: non-floating or empty tensors, NaN/inf values, a blocksize that is not a positive
    even int. ``double_quant`` also quantizes the per-block scales (module docstring). The
    numbers are quantize_blockwise's and pack_nibbles', computed by the fast path.
    """
    if not isinstance(w, torch.Tensor) or w.dtype not in FLOAT_DTYPES:
        got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise TypeError(f"quantize_nf4 needs a floating-point tensor (float32, bfloat16, float16, float64), got {got}")
    if w.numel() == 0:
        raise ValueError(f"quantize_nf4 got an empty tensor (shape {tuple(w.shape)}): nothing to quantize")
    _check_settings(blocksize, double_quant)
    flat = w.detach().reshape(-1).float()
    codes, absmax = _fast_quantize_blockwise(flat, NF4_CODE, blocksize)
    if not torch.isfinite(absmax).all():  # a NaN or inf anywhere reaches its block's max
        bad = (~torch.isfinite(flat)).sum().item()
        raise ValueError(f"quantize_nf4 got {bad} NaN/inf values; every value must be finite")
    packed = codes[0::2] << 4 | codes[1::2]  # pack_nibbles: the codes are already padded to an even count
    if not double_quant:
        return NF4Tensor(packed, absmax, w.shape, w.dtype, blocksize)
    offset = absmax.mean()
    codes8, scale = _fast_quantize_blockwise(absmax - offset, DYNAMIC_CODE, ABSMAX_BLOCKSIZE)
    return NF4Tensor(packed, None, w.shape, w.dtype, blocksize, codes8[: absmax.numel()].clone(), scale, offset)


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


# --- the fast path: the same numbers, fewer passes over memory (an optimisation) ---
# A training step dequantizes every 4-bit weight in forward and again in backward, so these run
# often. tests/test_nf4.py asserts them equal to quantize_blockwise/dequantize_blockwise bit for bit.

def _fast_quantize_blockwise(flat: torch.Tensor, code: torch.Tensor, blocksize: int):
    """quantize_blockwise(flat, code, blocksize) -> (uint8 codes padded with a 0.0 to an even count, absmax)."""
    n = flat.numel()
    full = n - n % blocksize
    lo, hi = torch.aminmax(flat[:full].view(-1, blocksize), dim=1)  # one read, and no |w| copy of the tensor
    absmax = torch.maximum(hi, -lo).abs_()  # (full // blocksize,); abs_: a block of -0.0 has absmax +0.0
    scaled = flat.new_empty(n + n % 2)  # written in place, block by block: no torch.cat of the tail
    scaled[n:] = 0  # a padding 0.0 gets code NF4_ZERO
    torch.mul(flat[:full].view(-1, blocksize), (1 / absmax.clamp(min=1e-38))[:, None],
              out=scaled[:full].view(-1, blocksize))
    if full < n:  # the partial last block, divided as in quantize_blockwise
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        torch.div(flat[full:], tail_absmax, out=scaled[full:n])
        absmax = torch.cat([absmax, tail_absmax[None]])
    # A binary search among the midpoints (4 comparisons for NF4) instead of 16 distances and an argmin:
    # bitsandbytes' own rule (up only when x > midpoint), so ties need no fixing. No clamp to [-1, 1]
    # either: values past the end midpoints land in the end bins anyway.
    midpoints = ((code[:-1] + code[1:]) / 2).to(flat.device)
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8), absmax


# Entry b holds the two float32 values of byte b (high nibble first), read as one int64: one gathered
# element copies both values, so there is no unpacking pass. 256 entries, 2 KiB: it stays in the
# fastest cache even between the big matmuls of a training step.
BYTE_TO_PAIR = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], 1).view(torch.int64).view(256)
GATHER_ROW = 64  # bytes per row of the gather: torch spreads the rows over its threads


def _fast_dequantize(q: NF4Tensor, dtype: torch.dtype, reuse: bool) -> torch.Tensor:
    """dequantize_blockwise(unpack_nibbles(q.packed), q.block_absmax()) in q's shape, cast to ``dtype``."""
    n, b, size = q.numel(), q.blocksize, q.packed.numel()
    rows = -(-size // GATHER_ROW)
    index = _scratch("index", rows * GATHER_ROW, torch.int64, q.device)  # gather wants int64
    index[size:] = 0
    index[:size].copy_(q.packed)
    table = BYTE_TO_PAIR.to(q.device).expand(rows, -1)  # (rows, 256), no copy
    # float32 values go in a reused buffer unless they are the result (a fresh buffer costs page faults)
    fresh = not reuse and dtype == torch.float32
    values = torch.empty(rows * GATHER_ROW, dtype=torch.int64, device=q.device) if fresh else \
        _scratch("values", rows * GATHER_ROW, torch.int64, q.device)
    torch.gather(table, 1, index.view(rows, -1), out=values.view(rows, -1))  # (rows, GATHER_ROW)
    values = values.view(torch.float32)[:n]  # (n,) the codes' values, in order
    absmax, full = q.block_absmax(), n - n % b
    values[:full].view(-1, b).mul_(absmax[: full // b, None])  # in place: no second n-sized buffer
    values[full:].mul_(absmax[-1])  # a partial last block (empty when there is none)
    values = values.view(q.shape)  # float32, as bitsandbytes computes
    if dtype == torch.float32:
        return values
    return _scratch("cast", n, dtype, q.device).view(q.shape).copy_(values) if reuse else values.to(dtype)


_SCRATCH: dict = {}  # (name, dtype, device, thread) -> a flat buffer, grown to the largest layer seen


def _scratch(name: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A reusable (numel,) buffer. A freshly allocated multi-MiB tensor costs page faults on every
    call (the allocator hands big blocks back to the OS); one buffer per layer size avoids that."""
    key = (name, dtype, torch.device(device), threading.get_ident())
    if key not in _SCRATCH or _SCRATCH[key].numel() < numel:
        _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return _SCRATCH[key][:numel]


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
        conv1d = [n for n, m in modules.items() if type(m).__name__ == "Conv1D"]  # GPT-2 keeps W as (in, out)
        family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"{type(model).__name__} ({family}) has no nn.Linear outside skip={tuple(skip)} to quantize"
                         + (f"; its projections are Conv1D ({conv1d[0]!r}, ...), which peftkit's NF4 does not quantize: "
                            "families with nn.Linear projections (bert, roberta, albert, electra, xlnet, t5, llama) work"
                            if conv1d else ""))
    quantized = {}
    for name in targets:
        try:
            quantized[name] = NF4Linear.from_linear(modules[name], blocksize, double_quant)
        except (TypeError, ValueError) as err:
            raise type(err)(f"cannot quantize {name!r}: {err}; the model was left unchanged") from err
    replace_modules(model, quantized)
    return model

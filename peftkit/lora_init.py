"""PiSSA and LoftQ: LoRA factors that start from the weight itself instead of from zero.

PiSSA (Meng et al., 2024, arXiv:2404.02948): train the principal part of W, freeze the rest. With the SVD
W = U S V^T (singular values largest first), the top ``rank`` of them go into the factors, the rest stays frozen:

    A = sqrt(S_r / s) V_r^T        (rank, in)       s = scaling = alpha / rank (rsLoRA: alpha / sqrt(rank))
    B = U_r sqrt(S_r / s)          (out, rank)      so that s B A = U_r S_r V_r^T
    W_res = W - s B A              written into the base: W_res + s B A = W, the output is unchanged at init

Dividing S_r by s is peft's convention: s B A is the principal part whatever alpha is. ``"pissa_niter_K"``
(peft's name) takes U_r, S_r, V_r from ``torch.svd_lowrank`` with K subspace iterations: fast, random, approximate.
A trained PiSSA adapter only works on W_res. ``pissa_to_lora`` turns it into plain LoRA for the original W:

    delta W = s B A - s B0 A0 = s [B | -B0] [A ; A0]    rank 2r; alpha 2 alpha keeps s (rsLoRA: alpha sqrt 2)

LoftQ (Li et al., 2023, arXiv:2310.08659): quantize W so that LoRA starts by absorbing the quantization error.
Alternate, from B A = 0, for T iterations (peft's ``loftq_iter``, 1 by default):

    Q_t = NF4(W - s B A)           the base: 4-bit NF4 (nf4.py's quantizer, bitsandbytes' numbers)
    s B A = SVD_r(W - Q_t)          the best rank-r fit of what quantization lost, split as in PiSSA
    minimises || W - (Q + s B A) ||_F, which starts below plain NF4's || W - Q ||_F

peft's LoftQ keeps the factors of scaling 1 (B A = SVD_r(W - Q)): equal to ours when alpha == rank; otherwise its
model starts from Q + s SVD_r(W - Q), which is not the fit. Trained afterwards: A and B, as for any LoRA.

    add_lora(model, ["q_proj", "v_proj"], rank=8, alpha=8)
    initial = init_lora(model, "pissa")                  # or "pissa_niter_4", or "loftq" (bases become NF4Linear)
    ...train...
    tensors, config = pissa_to_lora(model, initial)      # a LoRA adapter for the original weights

This file needs ``lora.py`` (with ``targets.py``) and ``nf4.py`` beside it.
"""

import dataclasses
import math

import torch
from torch import nn

try:
    from . import lora, nf4
except ImportError:  # this file was copied into a project, beside lora.py and nf4.py
    import lora
    import nf4


def principal_factors(weight: torch.Tensor, rank: int, scaling: float, niter: int | None = None):
    """(A, B) with s B A the best rank-``rank`` fit of ``weight`` (out, in): A (rank, in), B (out, rank).

    ``niter=None``: the exact SVD; an int: ``torch.svd_lowrank`` with that many subspace iterations (random)."""
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)  # (out, k), (k,), (k, in); k = min(out, in)
    else:
        U, S, V = torch.svd_lowrank(weight, q=rank, niter=niter)  # (out, rank), (rank,), (in, rank)
        Vh = V.T
    root = torch.diag(torch.sqrt(S[:rank] / scaling))  # (rank, rank): sqrt(S_r / s)
    return root @ Vh[:rank], U[:, :rank] @ root  # A = sqrt(S_r/s) V_r^T, B = U_r sqrt(S_r/s)


def pissa_layer(weight: torch.Tensor, rank: int, scaling: float, niter: int | None = None):
    """PiSSA on one weight (out, in), in float32 (float64 stays): returns (A, B, W_res = W - s B A)."""
    w = weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    a, b = principal_factors(w, rank, scaling, niter)
    return a, b, w - scaling * b @ a


def loftq_layer(weight: torch.Tensor, rank: int, scaling: float, iters: int = 1, blocksize: int = 64,
                double_quant: bool = False):
    """LoftQ on one weight (out, in): returns (A, B, Q) with Q an NF4Tensor; W ~ Q + s B A."""
    w = weight.float()
    low_rank = torch.zeros_like(w)  # s B A: zero before the first quantization
    for _ in range(iters):
        q = nf4.quantize_nf4(w - low_rank, blocksize, double_quant)  # Q_t = NF4(W - s B A)
        a, b = principal_factors(w - q.dequantize(torch.float32), rank, scaling)  # SVD_r of what NF4 lost
        low_rank = scaling * b @ a  # (out, rank) @ (rank, in)
    return a, b, dataclasses.replace(q, dtype=weight.dtype)  # dequantizes to W's dtype, as the float base did


def quantization_error(model: nn.Module, original: nn.Module) -> float:
    """sqrt(sum over LoRA layers of || W - (Q + s B A) ||_F^2): W from ``original`` (the float model), Q the
    LoRA layer's base (4-bit or float). Without LoRA factors (B A = 0) it is plain NF4's || W - Q ||."""
    weights, total = dict(original.named_modules()), 0.0
    for name, layer in _layers(model):
        w = weights[name].weight.float()
        q = layer.base.weight.dequantize(torch.float32) if isinstance(layer.base.weight, nf4.NF4Tensor) \
            else layer.base.weight.float()
        total += (w - q - layer.delta_weight().float()).square().sum().item()
    return math.sqrt(total)


# --- initialising a model's LoRA layers ---
def init_lora(model: nn.Module, method: str = "pissa", *, iters: int = 1, bits: int = 4, blocksize: int = 64,
              double_quant: bool = False) -> dict[str, torch.Tensor]:
    """Re-initialise every LoRA layer of ``model`` (wrapped by ``lora.add_lora``) in place with ``method``:
    ``"pissa"``, ``"pissa_niter_K"`` or ``"loftq"`` (peft's ``init_lora_weights`` values).

    PiSSA writes W_res into each float base; LoftQ replaces each base by an ``NF4Linear`` holding Q (``iters``,
    ``bits``, ``blocksize`` and ``double_quant`` are LoftQ's: peft's ``loftq_iter``, ``loftq_bits``, and
    bitsandbytes' 64 without double quantization as peft uses). Returns the initial factors, keyed as
    ``lora.adapter_state_dict``: what ``pissa_to_lora`` needs after training. All or nothing: every layer is
    computed before any is changed, so an error leaves the model as it was."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"init_lora needs a torch.nn.Module, got {type(model).__name__}")
    niter = _pissa_niter(method)
    if method != "loftq" and niter is False:
        raise ValueError(f"method must be 'pissa', 'pissa_niter_K' (K >= 0 an int, e.g. 'pissa_niter_4') or "
                         f"'loftq' (peft's init_lora_weights names), got {method!r}")
    if method == "loftq" and bits != 4:
        raise ValueError(f"LoftQ here quantizes to 4-bit NF4 (nf4.py): bits must be 4, got {bits!r}")
    if method == "loftq" and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 1):
        raise ValueError(f"iters (peft's loftq_iter) must be an int >= 1, got {iters!r}")
    layers = _checked_layers(model, method)
    new = {}
    with torch.no_grad():
        for name, layer in layers:
            w = layer.base.weight.T if layer.fan_in_fan_out else layer.base.weight  # (out, in)
            try:
                new[name] = (pissa_layer(w, layer.rank, layer.scaling, niter) if method != "loftq" else
                             loftq_layer(w, layer.rank, layer.scaling, iters, blocksize, double_quant))
            except (TypeError, ValueError) as err:
                raise type(err)(f"cannot initialise {name!r} with {method}: {err}; the model was left unchanged") \
                    from err
        for name, layer in layers:  # nothing below can fail halfway
            a, b, base = new[name]
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
            if method == "loftq":
                layer.base = nf4.NF4Linear(base, layer.base.bias)
            else:
                layer.base.weight.copy_((base.T if layer.fan_in_fan_out else base).to(layer.base.weight.dtype))
    return {f"{n}.lora_{x}.weight": getattr(m, f"lora_{x}").weight.detach().clone() for n, m in layers for x in "AB"}


def pissa_init_(model: nn.Module, niter: int | None = None) -> dict[str, torch.Tensor]:
    """PiSSA on every LoRA layer of ``model`` (exact SVD, or ``svd_lowrank`` with ``niter`` iterations)."""
    return init_lora(model, "pissa" if niter is None else f"pissa_niter_{niter}")


def loftq_init_(model: nn.Module, iters: int = 1, **quantization) -> dict[str, torch.Tensor]:
    """LoftQ on every LoRA layer of ``model``: ``iters`` alternations of NF4 and SVD (see ``init_lora``)."""
    return init_lora(model, "loftq", iters=iters, **quantization)


def _pissa_niter(method) -> int | None | bool:  # None: exact SVD; K: svd_lowrank; False: not a PiSSA name
    if method == "pissa":
        return None
    k = method.removeprefix("pissa_niter_") if isinstance(method, str) and method.startswith("pissa_niter_") else ""
    return int(k) if k.isdigit() else False


def _layers(model: nn.Module):
    return [(n, m) for n, m in lora._lora_layers(model) if hasattr(m, "lora_A")]


def _checked_layers(model: nn.Module, method: str):
    everything = lora._lora_layers(model)
    if not everything:
        raise ValueError(f"the model has no LoRA layers: call add_lora(model, target_modules) before init_lora "
                         f"(the SVD of {method} needs the wrapped weights)")
    family = lora._sibling("targets", "PiSSA and LoftQ")._family(model)
    for name, layer in everything:
        kind = lora.layer_kind(layer.base)
        if not hasattr(layer, "lora_A"):
            raise ValueError(f"{name!r} is an embedding with LoRA: {method} initialises linear layers only; "
                             "leave embeddings out of target_modules")
        if layer.merged:
            raise ValueError(f"{name!r} has its LoRA merged into the base: unmerge_lora(model) before init_lora")
        if kind == "4bit":
            raise ValueError(f"{name!r} is already 4-bit: {method} needs the float weights W; call add_lora on "
                             "the float model (LoftQ then quantizes it itself; PiSSA's W_res can be quantized after)")
        if method == "loftq" and kind == "conv1d":
            raise ValueError(f"LoftQ quantizes nn.Linear layers to NF4Linear; {family}'s {name!r} is a Conv1D (W "
                             "stored as (in, out)): families with nn.Linear projections (bert, roberta, albert, "
                             "electra, xlnet, t5, llama) work")
        if not layer.base.weight.is_floating_point():
            raise TypeError(f"{name!r} has a {layer.base.weight.dtype} weight: {method} needs a float weight")
        if not torch.isfinite(layer.base.weight).all():
            raise ValueError(f"{name!r} has NaN/inf weights: {method} needs finite W (a diverged training run?)")
        if layer.rank > min(layer.in_features, layer.out_features):
            raise ValueError(f"{name!r}: rank {layer.rank} exceeds min(out, in) = "
                             f"{min(layer.in_features, layer.out_features)}, the most singular values W has")
    return everything


# --- exporting: a trained PiSSA adapter as plain LoRA for the original weights ---
def pissa_to_lora(model: nn.Module, initial: dict[str, torch.Tensor]):
    """(tensors, config): the trained PiSSA adapter as a LoRA adapter for the *original* base weights, as peft's
    ``save_pretrained(..., path_initial_model_for_weight_conversion=...)`` converts it: A' = [A ; A0] (2r, in),
    B' = [B | -B0] (out, 2r), rank 2r, alpha 2 alpha (rsLoRA: alpha sqrt 2), so s' B' A' = s (B A - B0 A0).

    ``initial``: what ``init_lora`` returned. The other trained tensors (``modules_to_save``, biases) are kept
    as they are (peft's conversion writes the LoRA factors only). Load the result with ``add_lora(original,
    **dataclasses.asdict(config))`` and ``original.load_state_dict(tensors, strict=False)``; ``lora.export_peft``
    then writes it for peft."""
    config, state = lora._lora_config(model, required=True), lora.adapter_state_dict(model)
    factors = [k for k in state if k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if not isinstance(initial, dict) or sorted(initial) != sorted(factors):
        got = sorted(initial) if isinstance(initial, dict) else type(initial).__name__
        raise ValueError(f"initial must be what init_lora returned, the factors {sorted(factors)[:2]}..., got {got}")
    for key in factors:
        if initial[key].shape != state[key].shape:
            raise ValueError(f"initial[{key!r}] has shape {tuple(initial[key].shape)}, the model's is "
                             f"{tuple(state[key].shape)}: not this model's initial factors")
    tensors = {k: v.clone() for k, v in state.items() if k not in factors}
    for key in factors:
        if key.endswith("lora_A.weight"):
            tensors[key] = torch.cat([state[key], initial[key].to(state[key])], dim=0)  # (2r, in)
        else:
            tensors[key] = torch.cat([state[key], -initial[key].to(state[key])], dim=1)  # (out, 2r)
    alpha = config.alpha * (math.sqrt(2) if config.rslora else 2)
    return tensors, dataclasses.replace(config, rank=2 * config.rank, alpha=alpha)

# %% [markdown]
# # 06 · NF4: 4-bit NormalFloat quantization, from scratch
#
# QLoRA (Dettmers et al., 2023) fine-tunes a model whose frozen base weights are stored in **4 bits**.
# This notebook builds that storage format, NF4, step by step:
#
# - why 4 bits, and why *these* 16 values (int4 vs FP4 vs NF4),
# - the code table derived from normal quantiles,
# - blockwise absmax scaling, packing two codes per byte, double quantization,
# - bit-exact agreement with `bitsandbytes` on the CPU,
# - SmolLM2 quantized: memory and held-out perplexity before/after, and a generation.
#
# Nothing trains here: notebook 07 puts LoRA on top of this 4-bit base.

# %%
import bitsandbytes
import bitsandbytes.functional as BF
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from peftkit import nf4
from peftkit.data import CausalLMCollator, data_to_text, generation_batch
from peftkit.models import load_causal_lm, load_encoder, quiet
from peftkit.train import evaluate_loss, generate

quiet()
torch.manual_seed(0)
print("bitsandbytes", bitsandbytes.__version__)

# %% [markdown]
# ## Why 4 bits
#
# - Weights dominate the memory of a frozen model: bytes $= N_\text{params} \times \text{bits}/8$.
# - float32 → 32 bits, bfloat16 → 16, NF4 → 4 (+ a little for scales).
# - SmolLM2-135M is small, but the arithmetic is the same for a 65B model: 260 GB → ~33 GB.

# %%
# NBVAL_CHECK_OUTPUT
lm, tok = load_causal_lm()
n_params = sum(p.numel() for p in lm.parameters())
print(f"SmolLM2 parameters: {n_params / 1e6:.1f}M")
for name, bits in [("float32", 32), ("bfloat16", 16), ("int8", 8), ("4-bit", 4)]:
    print(f"  {name:<9} {n_params * bits / 8 / 2**20:7.1f} MiB")

# %% [markdown]
# ## Quantization = nearest value in a code table
#
# With a table $c_0 < \dots < c_{15}$ in $[-1, 1]$ and a scale $s = \max_i |w_i|$:
#
# $$q_i = \arg\min_k \left| \frac{w_i}{s} - c_k \right|, \qquad \hat w_i = c_{q_i}\, s$$
#
# - Only the **16 values** of the table decide the error. Three candidates:
#   - **int4**: 16 evenly spaced values,
#   - **FP4**: a tiny float (sign, 2 exponent bits, 1 mantissa bit), from bitsandbytes,
#   - **NF4**: quantiles of a normal distribution (next section).

# %%
# NBVAL_CHECK_OUTPUT
int4_code = torch.linspace(-1, 1, 16)
fp4_code = BF.get_4bit_type("fp4", device="cpu")
nf4_code = BF.get_4bit_type("nf4", device="cpu")
for name, code in [("int4", int4_code), ("fp4", fp4_code), ("nf4", nf4_code)]:
    print(f"{name:<5}", " ".join(f"{v:+.2f}" for v in code.tolist()))

# %% [markdown]
# The nearest value is the number of midpoints below $w/s$ — one comparison per midpoint:

# %%
def nearest_code(x, code):
    code = code.sort().values
    midpoints = (code[:-1] + code[1:]) / 2
    return code, (x.reshape(-1, 1) > midpoints).sum(dim=1)

def roundtrip(x, code):
    code, idx = nearest_code(x, code)
    return code[idx].view(x.shape)

# %% [markdown]
# Trained weights are roughly **normally distributed**. Take blocks of 64 normal values, scale each by
# its absmax, and quantize with each table:

# %%
torch.manual_seed(0)
w = torch.randn(4096, 64)
scaled = w / w.abs().amax(dim=1, keepdim=True)  # every block in [-1, 1]
errors = {}
for name, code in [("int4", int4_code), ("fp4", fp4_code), ("nf4", nf4_code)]:
    errors[name] = (roundtrip(scaled, code) - scaled).abs().mean().item()
    print(f"{name:<5} mean |error| {errors[name]:.4f}")
assert errors["nf4"] < errors["int4"] and errors["nf4"] < errors["fp4"]

# %%
fig, ax = plt.subplots(figsize=(8, 3), dpi=80)
ax.hist(scaled.flatten().numpy(), bins=200, density=True, color="lightgray")
for name, code, y in [("int4", int4_code, 0.9), ("fp4", fp4_code, 0.6), ("nf4", nf4_code, 0.3)]:
    ax.plot(code.numpy(), [y] * 16, "|", markersize=14, label=name)
ax.set_xlabel("weight / block absmax"); ax.set_ylabel("density"); ax.legend()
fig.tight_layout()

# %% [markdown]
# - The scaled weights crowd around 0; int4 spends as many values on the sparse tails as on the center.
# - FP4 is dense near 0 but *too* dense; NF4 puts values where the weights are.

# %% [markdown]
# ## Deriving NF4 from normal quantiles
#
# - Give each code an equal share of probability: value $k$ is the quantile $\Phi^{-1}(p_k)$.
# - $\Phi^{-1}(1) = \infty$, so the outermost probability is $\delta = 0.9677$, not 1.
# - 8 positive, 7 negative values and an exact **0** (padding and zero weights stay exact); divide by the max.
#
# $$c^+_k = \Phi^{-1}\!\big(\delta - k\tfrac{\delta - 0.5}{8}\big),\ k=0..7 \qquad
#   c^-_k = -\Phi^{-1}\!\big(\delta - k\tfrac{\delta - 0.5}{7}\big),\ k=0..6$$

# %%
offset = 0.9677083
positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).float()
negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double()).float()
values = torch.cat([negative, torch.zeros(1), positive]).sort().values
my_nf4 = values / values.max()
print(my_nf4)

# %% [markdown]
# The same numbers as bitsandbytes' hard-coded table, bit for bit, and as `peftkit.nf4`:

# %%
torch.testing.assert_close(my_nf4, nf4_code, rtol=0, atol=0)
torch.testing.assert_close(nf4.nf4_code_from_quantiles(), nf4.NF4_CODE, rtol=0, atol=0)
torch.testing.assert_close(nf4.NF4_CODE, nf4_code, rtol=0, atol=0)

# %% [markdown]
# ## Blockwise absmax
#
# - One scale for a whole matrix: a single outlier stretches $s$ and squeezes everyone else into few codes.
# - So the flat tensor is cut into **blocks** of $B$ weights (bitsandbytes: $B=64$), one float32 absmax each:
#
# $$s_b = \max_{i \in b} |w_i|, \qquad \hat w_i = c_{q_i}\, s_{b(i)}$$

# %%
def quantize_blockwise(w, code, blocksize):
    flat = w.reshape(-1).float()
    blocks = F.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp(min=1e-38)[:, None]
    midpoints = (code[:-1] + code[1:]) / 2
    codes = (scaled.reshape(-1, 1) > midpoints).sum(dim=1)
    return codes[: flat.numel()].to(torch.uint8), absmax

def dequantize_blockwise(codes, absmax, code, blocksize, shape):
    values = F.pad(code[codes.long()], (0, -codes.numel() % blocksize))
    return (values.view(-1, blocksize) * absmax[:, None]).reshape(-1)[: codes.numel()].view(shape)

# %% [markdown]
# Try it on a real weight: SmolLM2's first attention query projection.

# %%
# NBVAL_CHECK_OUTPUT
W = lm.model.layers[0].self_attn.q_proj.weight.detach()
codes, absmax = quantize_blockwise(W, nf4_code, 64)
print(tuple(W.shape), "->", codes.numel(), "codes,", absmax.numel(), "block scales")

# %% [markdown]
# It matches the package's readable version (which also handles partial last blocks as bitsandbytes does):

# %%
ref_codes, ref_absmax = nf4.quantize_blockwise_readable(W, nf4.NF4_CODE, 64)
torch.testing.assert_close(codes, ref_codes, rtol=0, atol=0)
torch.testing.assert_close(absmax, ref_absmax, rtol=0, atol=0)
W_hat = dequantize_blockwise(codes, absmax, nf4_code, 64, W.shape)
torch.testing.assert_close(W_hat, nf4.dequantize_blockwise_readable(
    ref_codes, ref_absmax, nf4.NF4_CODE, 64, W.shape, torch.float32), rtol=0, atol=0)

# %% [markdown]
# **Why the block size matters**: smaller blocks follow the local scale better but cost more scales
# ($32/B$ bits per weight).

# %%
sizes = [16, 32, 64, 128, 256, 1024, 4096, W.numel()]
block_errors = []
for b in sizes:
    c, s = quantize_blockwise(W, nf4_code, b)
    block_errors.append((dequantize_blockwise(c, s, nf4_code, b, W.shape) - W).abs().mean().item())
for b, e in zip(sizes, block_errors):
    print(f"block {b:>6}: mean |error| {e:.5f}, scale overhead {32 / b:.3f} bits/weight")
assert block_errors[2] < block_errors[-1]  # block 64 beats one scale for the whole matrix

# %%
fig, ax = plt.subplots(figsize=(8, 3), dpi=80)
ax.plot(sizes, block_errors, "o-")
ax.set_xscale("log", base=2); ax.set_xlabel("block size (weights per absmax)")
ax.set_ylabel("mean |W - Ŵ|"); ax.set_title("SmolLM2 layer 0 q_proj, NF4")
fig.tight_layout()

# %% [markdown]
# ## Two codes per byte
#
# - A code is 4 bits, a byte holds 8: the first code goes in the **high nibble** (as bitsandbytes).
# - byte $= 16\,q_{2j} + q_{2j+1}$; an odd count is padded with the code of 0.0 (index 7).

# %%
def pack(codes):
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1), value=7)
    return codes[0::2] << 4 | codes[1::2]

def unpack(packed, numel):
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:numel]

# %%
# NBVAL_CHECK_OUTPUT
example = torch.tensor([3, 12, 15, 0, 9], dtype=torch.uint8)
print([f"{b:08b}" for b in pack(example).tolist()])
packed = pack(codes)
assert torch.equal(unpack(packed, codes.numel()), codes)
assert torch.equal(packed, nf4.pack_nibbles(codes))
print(f"{W.numel() * 4} bytes in float32 -> {packed.numel() + 4 * absmax.numel()} bytes (codes + scales)")

# %% [markdown]
# ## Bit-exact with bitsandbytes
#
# - `bitsandbytes.functional.quantize_4bit(w, quant_type="nf4", blocksize=64)` returns packed bytes and
#   a state with the absmax. On the CPU it runs bitsandbytes' reference PyTorch code.
# - Our inline bytes, our scales and the package's fast `quantize_nf4` all agree with it **bit for bit**:

# %%
bnb_packed, bnb_state = BF.quantize_4bit(W, blocksize=64, quant_type="nf4")
torch.testing.assert_close(packed, bnb_packed.reshape(-1), rtol=0, atol=0)
torch.testing.assert_close(absmax, bnb_state.absmax, rtol=0, atol=0)
fast = nf4.quantize_nf4(W, blocksize=64)
assert torch.equal(fast.packed, bnb_packed.reshape(-1)) and torch.equal(fast.absmax, bnb_state.absmax)
assert torch.equal(fast.dequantize(), W_hat)
print(fast)

# %% [markdown]
# The native CPU **dequantize** kernel gives the same numbers for this matrix (rows of 576 = 9 blocks):

# %%
bnb_W_hat = BF.dequantize_4bit(bnb_packed, bnb_state, quant_type="nf4")
assert torch.equal(bnb_W_hat.reshape(-1), W_hat.reshape(-1))

# %% [markdown]
# Where bitsandbytes' **native** CPU kernels (0.50.2) diverge from its own reference semantics — measured
# and documented in `tests/test_nf4.py`; `peftkit` follows the reference:
#
# - `dequantize_4bit` on an AVX-512 CPU read the wrong block scale when a row's length is not a multiple of
#   the block size (128×96, block 64: mean error 0.159 instead of 0.072); on AVX2 it agreed everywhere.
# - native 8-bit double quantization uses a 65,536-bin lookup table for "nearest code": 123 of 65,536 absmax
#   codes (0.19%) of a 2048×2048 weight land 1–3 codes away; the reference always picks a code at least as near.

# %% [markdown]
# ## Double quantization
#
# - 64 weights share one float32 scale: $32/64 = 0.5$ extra bits per weight → **4.5 bits**.
# - QLoRA quantizes the scales too: subtract their mean, store them in **8 bits** (bitsandbytes' dynamic
#   map) in blocks of 256, with one float32 scale per 256 scales:
#
# $$4 + \frac{8}{64} + \frac{32}{64 \cdot 256} \approx 4.127 \text{ bits per weight}$$

# %%
# NBVAL_CHECK_OUTPUT
print(f"theory: {4 + 32 / 64:.3f} bits -> {4 + 8 / 64 + 32 / (64 * 256):.4f} bits")
dq = nf4.quantize_nf4(W, blocksize=64, double_quant=True)
print(dq)
print("scale error added by double quantization:",
      f"{(dq.block_absmax() - fast.absmax).abs().max().item():.1e} (max), scales are ~{fast.absmax.mean().item():.2f}")

# %% [markdown]
# Measured over **every** linear weight of the two course models (their heads aside):

# %%
# NBVAL_CHECK_OUTPUT
encoder, _ = load_encoder()
def linear_weights(model):
    return [m.weight.detach() for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]

for name, model in [("MiniLM", encoder), ("SmolLM2", lm)]:
    weights = linear_weights(model)
    numel = sum(w.numel() for w in weights)
    plain = sum(nf4.quantize_nf4(w).nbytes for w in weights)
    double = sum(nf4.quantize_nf4(w, double_quant=True).nbytes for w in weights)
    print(f"{name:<8} {len(weights):3d} linears, {numel / 1e6:5.1f}M weights: "
          f"{8 * plain / numel:.3f} -> {8 * double / numel:.3f} bits/param")

# %% [markdown]
# - Slightly above 4.127 where a matrix has a partial block of scales (each matrix keeps its own).

# %% [markdown]
# ## Quantize SmolLM2
#
# - `quantize_model` swaps every `nn.Linear` for an `NF4Linear` (frozen, double-quantized), except `lm_head`.
# - `NF4Linear.forward` dequantizes to the input's dtype and runs an ordinary matmul.
# - First the float32 reference: held-out loss on the data-to-text test set, and a generation.

# %%
d2t = data_to_text()
collate = CausalLMCollator(tok)
loss_fp32 = evaluate_loss(lm, d2t["test"], collate)
mrs = d2t["test"]["mr"][:2]
before = generate(lm, tok, generation_batch(tok, mrs), max_new_tokens=24)
print(f"float32: loss {loss_fp32:.3f}, perplexity {torch.tensor(loss_fp32).exp().item():.2f}")
print(mrs[0], "->", before[0])

# %%
# NBVAL_CHECK_OUTPUT
def linear_weight_mib(model):
    total = 0
    for m in model.modules():
        if isinstance(m, nf4.NF4Linear):
            total += m.weight.nbytes
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total / 2**20

mib_fp32 = linear_weight_mib(lm)
nf4.quantize_model(lm, skip=("lm_head",), double_quant=True)
mib_nf4 = linear_weight_mib(lm)
print(lm.model.layers[0].self_attn.q_proj)
print(f"linear weights: {mib_fp32:.1f} MiB float32 -> {mib_nf4:.1f} MiB NF4 ({mib_fp32 / mib_nf4:.1f}x smaller)")

# %% [markdown]
# - Only 3.2× overall: `lm_head` (tied to the token embedding, 49,152 × 576) stays float32 — 108 MiB of the 160.
# - The 210 decoder linears (106.2M weights, measured above at 4.127 bits) go from 405 MiB to 52 MiB: **~7.8×**.

# %%
loss_nf4 = evaluate_loss(lm, d2t["test"], collate)
after = generate(lm, tok, generation_batch(tok, mrs), max_new_tokens=24)
print(f"float32 loss {loss_fp32:.3f} (ppl {torch.tensor(loss_fp32).exp().item():.2f}) -> "
      f"NF4 loss {loss_nf4:.3f} (ppl {torch.tensor(loss_nf4).exp().item():.2f})")
for mr, a, b in zip(mrs, before, after):
    print(f"\n{mr}\n  float32: {a}\n  NF4:     {b}")
assert loss_fp32 < loss_nf4 < 1.6 * loss_fp32  # a real but bounded cost

# %% [markdown]
# - The held-out perplexity rises noticeably: a 135M model has little redundancy, and its weights were
#   already rounded once (it ships as a 4-bit GGUF file). Larger models lose far less.
# - The sentences stay fluent: a usable *frozen* base, and the LoRA adapters of 07 train on top of it.
# - The price is compute: every forward rebuilds each float weight from its codes.

# %% [markdown]
# ## Summary
#
# - NF4 = 16 values at normal quantiles, scaled per block of 64 by the absmax: lower error than int4 or FP4
#   on normally distributed weights.
# - Smaller blocks → lower error, more scale overhead; 64 is the QLoRA choice.
# - Two codes per byte (high nibble first) + float32 scales = 4.5 bits; double quantization of the scales
#   → ~4.127 bits, measured on MiniLM and SmolLM2.
# - Our inline build, `peftkit.nf4` and `bitsandbytes.quantize_4bit` agree bit for bit on the CPU.
# - SmolLM2's linears shrink ~7.8×; held-out perplexity rises (measured above), the text stays fluent.
#
# Next: **07 · QLoRA** trains LoRA adapters on top of this frozen 4-bit model.

# %% [markdown]
# ## Exercises
#
# 1. **Blockwise int4.** Quantize `W` with `int4_code` in blocks of 64 using `quantize_blockwise` and
#    `dequantize_blockwise`. Is its mean error above NF4's `block_errors[2]`? The cell checks.
# 2. **An outlier.** Set one weight of `W` to 50× its absmax and compare the error with block 64 against
#    one block for the whole matrix.
# 3. **Double quantization by hand.** Rebuild `dq.block_absmax()` from `dq.absmax_codes`, `dq.absmax_scale`,
#    `dq.absmax_offset` and `nf4.DYNAMIC_CODE` with `dequantize_blockwise`.

# %%
c, s = quantize_blockwise(W, int4_code, 64)  # exercise 1: try it with another code table too
int4_error = (dequantize_blockwise(c, s, int4_code, 64, W.shape) - W).abs().mean().item()
print(f"int4 {int4_error:.5f} vs nf4 {block_errors[2]:.5f}")
assert int4_error > block_errors[2]

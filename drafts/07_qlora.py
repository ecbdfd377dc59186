# %% [markdown]
# # 07 · QLoRA: LoRA on a 4-bit base
#
# - LoRA (notebook 04) shrinks what we *train*; the frozen base still sits in memory in 16 or 32 bits.
# - NF4 (notebook 06) stores weights in ~4.127 bits each.
# - **QLoRA** (Dettmers et al., 2023) = LoRA adapters in float32 on top of a frozen NF4 base.
# - Here: SmolLM2-135M on the data-to-text task, trained on a laptop CPU.

# %% [markdown]
# ## The equation
#
# $$y = \mathrm{dequant}(W_{\text{NF4}})\,x + b + \frac{\alpha}{r}\, B A x$$
#
# - $W_{\text{NF4}}$: frozen, 4-bit codes + double-quantized block scales, rebuilt to float in every forward and backward.
# - $A \in \mathbb{R}^{r \times d_{in}}$, $B \in \mathbb{R}^{d_{out} \times r}$: trained, float32, $B = 0$ at the start.
# - Gradients flow *through* $\mathrm{dequant}(W)$ to $x$, never *into* $W$.

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.testing import assert_close

from peftkit.data import CausalLMCollator, data_to_text, generation_batch, slot_error_rate
from peftkit.lora import LoRALinear, add_lora, save_adapter
from peftkit.models import load_causal_lm, quiet
from peftkit.nf4 import NF4Linear, quantize_nf4
from peftkit.qlora import (merge_into_4bit, merge_into_float, merged_weight, prepare_for_qlora,
                           requantized_update_error)
from peftkit.train import count_parameters, fit, generate, peak_memory_mb

quiet()
torch.manual_seed(0)

# %% [markdown]
# ## Build it inline
#
# - A QLoRA layer is just the composition of two things we already have.
# - Base: `NF4Linear` (4-bit weight, dequantized in forward). Adapter: the LoRA update, added on top.

# %%
class TinyQLoRA(nn.Module):
    def __init__(self, linear, rank=8, alpha=16):
        super().__init__()
        self.base = NF4Linear(quantize_nf4(linear.weight, 64, double_quant=True), linear.bias)
        self.A = nn.Parameter(torch.empty(rank, linear.in_features))
        self.B = nn.Parameter(torch.zeros(linear.out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=5 ** 0.5)
        self.scaling = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scaling

# %% [markdown]
# - Check it against peftkit's version: `LoRALinear` wrapping an `NF4Linear`.
# - Copy the factors across, and give $B$ non-zero values so the update actually matters.

# %%
torch.manual_seed(0)
linear = nn.Linear(576, 192)
ours = TinyQLoRA(linear)
theirs = LoRALinear(NF4Linear.from_linear(linear), rank=8, alpha=16)
with torch.no_grad():
    ours.B.normal_(std=0.02)
    theirs.lora_A.weight.copy_(ours.A)
    theirs.lora_B.weight.copy_(ours.B)
x = torch.randn(4, 576)
assert_close(ours(x), theirs(x))
print("inline QLoRA layer == peftkit LoRALinear(NF4Linear)")

# %% [markdown]
# - Gradients reach $A$ and $B$; the 4-bit weight is not a `Parameter` at all, so nothing can update it.

# %%
theirs(x).sum().backward()
print("grad on A:", theirs.lora_A.weight.grad is not None, "| grad on B:", theirs.lora_B.weight.grad is not None)
print("trainable tensors:", [n for n, p in theirs.named_parameters() if p.requires_grad])

# %% [markdown]
# ## Inject into SmolLM2
#
# - `prepare_for_qlora`: quantize every linear except `lm_head` to NF4 (double quantization), freeze, keep norms in float32.
# - `add_lora(..., "all-linear")`: an adapter on all 7 projections of every one of the 30 layers.

# %%
base_model, tok = load_causal_lm()
n_base = sum(p.numel() for p in base_model.parameters())
torch.manual_seed(0)
model, _ = load_causal_lm()
prepare_for_qlora(model, skip=("lm_head",), double_quant=True)
add_lora(model, "all-linear", rank=8, alpha=16)
print(model.model.layers[0].self_attn.q_proj)

# %% [markdown]
# - `count_parameters` only sees `Parameter`s: the 4-bit weights are plain tensors, so they drop out of the total.

# %%
# NBVAL_CHECK_OUTPUT
stats = count_parameters(model, "SmolLM2 + QLoRA")
nf4 = [m.weight for m in model.modules() if isinstance(m, NF4Linear)]
print(f"{len(nf4)} NF4 linears, {sum(w.numel() for w in nf4):,} quantized weights")

# %% [markdown]
# ## Memory, from tensor sizes
#
# Three ways to fine-tune the same model, bytes per part:
#
# | | weights | trainable + grads | AdamW state |
# |---|---|---|---|
# | full fine-tuning (16-bit) | $2N$ | $2N$ | $8N$ (two float32 moments) |
# | LoRA, 16-bit base | $2N$ | $4L + 4L$ | $8L$ |
# | QLoRA | NF4 bytes + 16-bit rest | $4L + 4L$ | $8L$ |
#
# - $N$: base parameters, $L$: LoRA parameters (float32).
# - NF4 bytes come straight from `NF4Tensor.nbytes`; embeddings stay unquantized.

# %%
# NBVAL_CHECK_OUTPUT
MB = 2**20
lora_params = stats["trainable"]
nf4_bytes = sum(w.nbytes for w in nf4)
rest = n_base - sum(w.numel() for w in nf4)  # embeddings (tied with lm_head) and norms
rows = {
    "full FT (16-bit)": (2 * n_base, 2 * n_base, 8 * n_base),
    "LoRA, 16-bit base": (2 * n_base, 8 * lora_params, 8 * lora_params),
    "QLoRA (NF4 base)": (nf4_bytes + 2 * rest, 8 * lora_params, 8 * lora_params),
}
print(f"{'':20}{'weights':>10}{'train+grad':>12}{'AdamW':>10}{'total MB':>10}")
for name, parts in rows.items():
    print(f"{name:20}" + "".join(f"{p / MB:>10.1f}" for p in parts[:1]) + f"{parts[1] / MB:>12.1f}"
          + f"{parts[2] / MB:>10.1f}{sum(parts) / MB:>10.1f}")
print(f"NF4 linears: {8 * nf4_bytes / sum(w.numel() for w in nf4):.3f} bits per weight")

# %% [markdown]
# - The 4-bit base is ~3.9× smaller than 16 bits for the linears; the embedding table (28M of the 135M params) stays in 16 bits.
# - Full fine-tuning's optimizer state alone is bigger than the whole QLoRA model.
# - For this small model the vocabulary embedding is a big share; for a 7B model the linears dominate and the saving approaches 4×.

# %% [markdown]
# ## Activations: measured
#
# - Activations scale with batch × sequence × hidden × layers and are the same for all three methods.
# - Measure one training step (forward + backward) of QLoRA at batch 8: the extra resident memory it needs.

# %%
d2t = data_to_text()
collate = CausalLMCollator(tok)
batch = collate([d2t["train"][i] for i in range(8)])
print({k: tuple(v.shape) for k, v in batch.items()})

# %%
def one_step():
    loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()

_, step_mb = peak_memory_mb(one_step)
print(f"one QLoRA training step at batch {batch['input_ids'].shape}: ~{step_mb:.0f} MB extra (activations + grads)")

# %% [markdown]
# - Each NF4 layer saves only its input for backward and rebuilds $W$ on the fly: no float copy of the weights is kept.
# - For long sequences activations dominate: that is when gradient checkpointing (`prepare_for_qlora(..., gradient_checkpointing=True)`) pays off.

# %% [markdown]
# ## Before training
#
# - 8 held-out meaning representations; the test set's (name, food) pairs never occur in training.
# - Slot error rate: share of attribute values the sentence fails to mention.

# %%
N_EVAL, NEW_TOKENS = 8, 30
test_mrs = d2t["test"]["mr"][:N_EVAL]
before = generate(model, tok, generation_batch(tok, test_mrs), max_new_tokens=NEW_TOKENS)
ser_before = slot_error_rate(before, test_mrs)
print(f"QLoRA model before training (B = 0): slot error rate {ser_before:.2f}")

# %% [markdown]
# ## Train
#
# - Only $A$ and $B$ are in the optimizer; 30 steps at batch 8.

# %%
STEPS = 30
hist = fit(model, d2t["train"], collate, epochs=1, batch_size=8, lr=2e-3, max_steps=STEPS, seed=0, desc="QLoRA")

# %%
fig, ax = plt.subplots(figsize=(8, 3), dpi=80)
ax.plot(hist.train_loss)
ax.set_xlabel("step")
ax.set_ylabel("train loss")
ax.set_title("QLoRA on SmolLM2-135M, data-to-text")
fig.tight_layout()

# %%
assert sum(hist.train_loss[-5:]) / 5 < hist.train_loss[0] / 2, hist.train_loss
print(f"loss: first step {hist.train_loss[0]:.2f}, mean of last 5 {sum(hist.train_loss[-5:]) / 5:.2f}")

# %% [markdown]
# ## After training

# %%
after = generate(model, tok, generation_batch(tok, test_mrs), max_new_tokens=NEW_TOKENS)
ser_after = slot_error_rate(after, test_mrs)
print(f"slot error rate: before {ser_before:.2f} -> after {ser_after:.2f}")
for mr, b, a in list(zip(test_mrs, before, after))[:3]:
    print(f"\n{mr}\n  before: {b!r}\n  after:  {a!r}")
assert ser_after < ser_before - 0.2

# %% [markdown]
# ## The merge pitfall
#
# - LoRA merges by $W \leftarrow W + \Delta W$. With a 4-bit base the sum must be re-quantized:
#
# $$W' = \mathrm{NF4}\big(\mathrm{dequant}(W_{\text{NF4}}) + \Delta W\big)$$
#
# - $\Delta W$ is usually far smaller than one NF4 grid step, so most of it is rounded away (or replaced by noise).
# - Measure: $\lVert (W' - W) - \Delta W \rVert / \lVert \Delta W \rVert$ (0 = perfect, 1 = update lost).

# %%
errors = [requantized_update_error(m) for m in model.modules()
          if isinstance(m, LoRALinear)]
q = model.model.layers[0].self_attn.q_proj
step = (merged_weight(q) - q.base.weight.dequantize(torch.float32)).abs().mean()
print(f"mean |delta W| in layer 0 q_proj: {step:.2e}")
print(f"requantized update error over {len(errors)} layers: min {min(errors):.2f}, "
      f"median {sorted(errors)[len(errors) // 2]:.2f}, max {max(errors):.2f}")
assert sorted(errors)[len(errors) // 2] > 0.5

# %% [markdown]
# - Compare the next-token logits of three models on the same batch:
#   - the trained QLoRA model (unmerged: the reference),
#   - `merge_into_4bit` (re-quantized, lossy),
#   - `merge_into_float` into a fresh float32 SmolLM2 (keeps $\Delta W$ whole).

# %%
probe = generation_batch(tok, test_mrs)
with torch.no_grad():
    ref = model(**probe).logits[:, -1].float()
fresh, _ = load_causal_lm()
float_merged = merge_into_float(model, fresh)
with torch.no_grad():
    out_float = float_merged(**probe).logits[:, -1].float()
del fresh, float_merged

# %% [markdown]
# - Now merge into 4 bits (this replaces the layers in place, so it comes last).

# %%
merge_into_4bit(model)
with torch.no_grad():
    out_4bit = model(**probe).logits[:, -1].float()
with torch.no_grad():
    out_base = base_model(**probe).logits[:, -1].float()

def gap(a):
    return ((a - ref).norm() / ref.norm()).item()

print(f"relative logit gap to the trained QLoRA model:\n  merge into 4-bit: {gap(out_4bit):.3f}"
      f"\n  merge into float: {gap(out_float):.3f}\n  (untouched float base: {gap(out_base):.3f})")

# %% [markdown]
# - Merging into float is not exact either: it drops the 4-bit rounding the adapter was trained around.
# - Merging into 4-bit re-rounds everything and loses most of the update.
# - Judge each by the task, not just logits:

# %%
ser_4bit = slot_error_rate(generate(model, tok, generation_batch(tok, test_mrs), max_new_tokens=NEW_TOKENS), test_mrs)
print(f"slot error rate: QLoRA unmerged {ser_after:.2f}, merged into 4-bit {ser_4bit:.2f}")

# %% [markdown]
# - Best practice: keep the adapter separate at inference on the 4-bit base, or merge into the original float weights
#   (then quantize the *merged* model afresh if you need it small).

# %% [markdown]
# ## Save the adapter
#
# - Only $A$ and $B$ go to disk. Re-build a fresh QLoRA model to save it (ours was merged above).

# %%
torch.manual_seed(0)
fresh_q, _ = load_causal_lm()
prepare_for_qlora(fresh_q, skip=("lm_head",))
add_lora(fresh_q, "all-linear", rank=8, alpha=16)
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "qlora_adapter.safetensors"
    save_adapter(fresh_q, path)
    adapter_mb = path.stat().st_size / MB
nf4_mb = sum(m.weight.nbytes for m in fresh_q.modules() if isinstance(m, NF4Linear)) / MB

# %%
# NBVAL_CHECK_OUTPUT
print(f"adapter file: {adapter_mb:.2f} MB ({lora_params:,} float32 params)")
print(f"4-bit linears: {nf4_mb:.1f} MB; float32 model: {4 * n_base / MB:.0f} MB")

# %% [markdown]
# ## Summary
#
# - QLoRA = `NF4Linear` base + `LoRALinear` adapter: $y = \mathrm{dequant}(W_{\text{NF4}})x + \frac{\alpha}{r}BAx$.
# - Memory: the base shrinks ~4× for its linears, the optimizer only tracks $A, B$; full fine-tuning needs ~12 bytes/param.
# - Training works as with LoRA: the slot error rate drops within 30 CPU steps.
# - Merging into 4 bits re-rounds $W + \Delta W$ and loses most of $\Delta W$; merge into the float weights or keep the adapter separate.
# - The adapter is a few MB, independent of how the base is stored.

# %% [markdown]
# ## Exercises
#
# 1. Use `double_quant=False` in `quantize_nf4` for one `q_proj` weight and compare `bits_per_param` (expect 4.5 vs ~4.127).
# 2. Re-run training with `target_modules=["q_proj", "v_proj"]` only: how many trainable parameters, and what slot error rate?
# 3. Try a larger learning rate and measure `requantized_update_error` again: does a bigger $\Delta W$ survive 4-bit merging better?

# %%
# Exercise 1 starter: check your answer
w = base_model.model.layers[0].self_attn.q_proj.weight
single, double = quantize_nf4(w, 64), quantize_nf4(w, 64, double_quant=True)
assert abs(single.bits_per_param - 4.5) < 0.01 and double.bits_per_param < 4.2
print(f"{single.bits_per_param:.3f} vs {double.bits_per_param:.3f} bits per parameter")

# %% [markdown]
# # 02 · LoRA: low-rank adaptation, from scratch
#
# Full fine-tuning trains every weight; a **linear probe** trains only a new head and leaves the encoder
# as it was. LoRA (Hu et al., 2021) sits in between: it keeps every pretrained weight frozen and learns a
# **small low-rank update** to a few of them.
#
# In this notebook we
#
# - write a LoRA layer in a dozen lines and check it against `peftkit.lora`,
# - put it into MiniLM for topic classification and into SmolLM2 for data-to-text,
# - look at what rank it needs and at what it learned, then
# - merge it away (zero extra inference cost) or save it as a file of a few hundred kilobytes.

# %%
import copy
import os
import statistics
import time

import matplotlib.pyplot as plt
import torch
from torch import nn

from peftkit.data import (ClassificationCollator, CausalLMCollator, data_to_text, generation_batch,
                          slot_error_rate, topic_classification)
from peftkit.models import load_causal_lm, load_encoder, quiet
from peftkit.train import accuracy, count_parameters, fit, generate

quiet()
torch.manual_seed(0)

# %% [markdown]
# ## The idea: updates have low intrinsic rank
#
# Fine-tuning changes a weight matrix $W \in \mathbb{R}^{d_\text{out} \times d_\text{in}}$ into
# $W + \Delta W$.
# Aghajanyan et al. (2020) found that fine-tuning works even when the update is confined to
# a tiny random subspace: the task has a **low intrinsic dimension**.

# %% [markdown]
# Hu et al. bet that **$\Delta W$ itself has low rank** and write it as a product of two thin matrices:
#
# $$h = W x + \Delta W x = W x + \frac{\alpha}{r}\, B A x, \qquad
#   A \in \mathbb{R}^{r \times d_\text{in}},\; B \in \mathbb{R}^{d_\text{out} \times r},\; r \ll d$$
#
# - $W$ is frozen; only $A$ and $B$ train: $r(d_\text{in} + d_\text{out})$ numbers instead of $d_\text{in} d_\text{out}$.
# - $BAx$ is computed as $B(Ax)$: the $d_\text{out} \times d_\text{in}$ matrix $\Delta W$ is never built.
#
# For one 384 × 384 attention projection of MiniLM:

# %%
# NBVAL_CHECK_OUTPUT
d_in = d_out = 384
print(f"{'rank':>6}{'LoRA params':>13}{'% of W':>9}")
for r in [1, 4, 8, 16, 64]:
    n = r * (d_in + d_out)
    print(f"{r:>6}{n:>13,}{100 * n / (d_in * d_out):>8.1f}%")

# %% [markdown]
# ## Building a LoRA layer
#
# Three choices make LoRA work:
#
# - **$B$ starts at zero**, so $\Delta W = BA = 0$: the wrapped model starts out *exactly* as the pretrained
#   model, and training begins from where pretraining left off.
# - **$A$ starts random** (Kaiming-uniform, like any `nn.Linear`). If both started at zero, neither would
#   ever get a gradient: with $g = \partial L / \partial h$,
#   $\;\partial L / \partial B \propto g\,(Ax)^\top$ and $\partial L / \partial A \propto B^\top g\, x^\top$.
# - **The scaling $\alpha / r$** multiplies the update. The paper sets $\alpha$ once and leaves it: changing
#   $r$ then needs no new learning rate (rsLoRA, below, refines the rule).

# %%
class MyLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)  # W and b: frozen
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)  # A: (r, d_in)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)  # B: (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling

# %% [markdown]
# Wrap a random 384 → 384 linear layer and check the first promise: at initialisation the output is the
# base layer's output, bit for bit.

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
base = nn.Linear(384, 384)
mine = MyLoRALinear(base, rank=8, alpha=16)
x = torch.randn(2, 5, 384)  # (batch, tokens, features)
assert torch.equal(mine(x), base(x))
print("trainable:", [(n, tuple(p.shape)) for n, p in mine.named_parameters() if p.requires_grad])

# %% [markdown]
# The second promise: with $B = 0$ the first gradient reaches $B$ but not $A$; after one step $B \neq 0$
# and both train.

# %%
mine(x).pow(2).mean().backward()
print(f"|grad A| = {mine.lora_A.weight.grad.norm():.4f}   |grad B| = {mine.lora_B.weight.grad.norm():.4f}")
assert mine.lora_A.weight.grad.abs().max() == 0 and mine.lora_B.weight.grad.abs().max() > 0
mine.zero_grad()

# %% [markdown]
# ## The same layer from `peftkit`
#
# `peftkit.lora.LoRALinear` is this layer plus dropout on the LoRA input, rsLoRA scaling, `merge()` and
# support for 4-bit bases. Give it our $A$ and a non-zero $B$, and it must compute exactly what ours does.

# %%
# NBVAL_CHECK_OUTPUT
from peftkit.lora import LoRALinear, add_lora, export_peft, load_adapter, merge_lora, save_adapter

torch.manual_seed(1)
with torch.no_grad():
    mine.lora_B.weight.normal_(std=0.02)  # pretend it has trained
theirs = LoRALinear(copy.deepcopy(base), rank=8, alpha=16)
theirs.load_state_dict(mine.state_dict())
torch.testing.assert_close(theirs(x), mine(x))
print(theirs)

# %% [markdown]
# ## Merging: $W' = W + \frac{\alpha}{r} BA$
#
# After training, $\Delta W$ can be added into $W$ once. The merged layer is a plain `nn.Linear` of the
# original shape: **no extra latency** at inference.

# %%
# NBVAL_CHECK_OUTPUT
merged_weight = base.weight + mine.lora_B.weight @ mine.lora_A.weight * mine.scaling  # (384, r) @ (r, 384)
torch.testing.assert_close(nn.functional.linear(x, merged_weight, base.bias), mine(x))
torch.testing.assert_close(theirs.delta_weight(), merged_weight - base.weight)
print("rank of delta W:", torch.linalg.matrix_rank(theirs.delta_weight()).item())

# %% [markdown]
# ## $\alpha / r$ and rsLoRA
#
# With $\alpha$ fixed, a larger rank gets a smaller scaling. Kalajdzievski (2023) showed that $\alpha/r$
# shrinks the update too much at high rank and proposed **rsLoRA**: $\alpha/\sqrt{r}$ (`rslora=True`).

# %%
# NBVAL_CHECK_OUTPUT
print(f"{'rank':>6}{'alpha/r':>10}{'alpha/sqrt(r)':>15}   (alpha = 16)")
for r in [1, 4, 8, 16, 64]:
    print(f"{r:>6}{LoRALinear(base, r, 16).scaling:>10.3f}{LoRALinear(base, r, 16, rslora=True).scaling:>15.3f}")

# %% [markdown]
# ## LoRA in MiniLM, on the topic task
#
# The shared topic-classification task: 8 topics, real utterances, a validation split carved from training.
# The median utterance is 9 tokens long; we cut the few long ones at 32 tokens (instead of 64) so that every
# batch costs half as much — every run in this notebook uses the same cut.

# %%
# NBVAL_CHECK_OUTPUT
topics = topic_classification()
names = topics["train"].features["label"].names
split = topics["train"].train_test_split(test_size=0.1, seed=0, stratify_by_column="label")
train_set, val_set, test_set = split["train"], split["test"], topics["test"]
print(len(train_set), "train,", len(val_set), "validation,", len(test_set), "test;", len(names), "topics")

# %% [markdown]
# **The floor: a linear probe.** The encoder frozen, only the new classifier head trained (as in
# `00_baselines`, re-run here so that we compare like with like). Full fine-tuning, the ceiling, is in
# `00_baselines`.

# %%
torch.manual_seed(0)
probe, tokenizer = load_encoder(num_labels=len(names))
for name, p in probe.named_parameters():
    p.requires_grad = name.startswith("classifier")
collate = ClassificationCollator(tokenizer, max_length=32)
fit(probe, train_set, collate, val_set, epochs=10, batch_size=32, lr=1e-2, desc="probe")
probe_acc = accuracy(probe, test_set, collate)
print(f"linear probe: test accuracy {probe_acc:.3f}")

# %% [markdown]
# **Inject.** `add_lora` replaces every linear whose name ends in `query` or `value` by a `LoRALinear`,
# freezes everything else, and keeps the new `classifier` head trainable (`modules_to_save`) — a new head
# must train in full, since it starts random.

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
model, _ = load_encoder(num_labels=len(names))
add_lora(model, ["query", "value"], rank=8, alpha=16, modules_to_save=["classifier"])
print(model.bert.encoder.layer[0].attention.self)

# %% [markdown]
# ## Trainable parameters
#
# 12 wrapped layers × 8 × (384 + 384), plus the head's 384 × 8 + 8:

# %%
# NBVAL_CHECK_OUTPUT
lora_params = count_parameters(model, "LoRA r=8 query/value")
assert lora_params["trainable"] == 12 * 8 * (384 + 384) + 384 * 8 + 8

# %% [markdown]
# ## Training
#
# Three epochs (45 steps). The update $BA$ starts at zero and must grow from there, so LoRA wants a far
# larger learning rate than full fine-tuning: $10^{-2}$ here, against $10^{-4}$ for full fine-tuning in
# `00_baselines`.

# %%
EPOCHS, LR = 3, 1e-2
history = fit(model, train_set, collate, val_set, epochs=EPOCHS, batch_size=32, lr=LR, desc="LoRA q/v")
lora_acc = accuracy(model, test_set, collate)
print(f"LoRA query/value r=8: test accuracy {lora_acc:.3f} (linear probe {probe_acc:.3f})")
assert lora_acc > probe_acc

# %% [markdown]
# Training loss per step and validation loss per epoch:

# %%
def plot_history(h, title):
    fig, ax = plt.subplots(figsize=(8, 3), dpi=80)
    per_epoch = len(h.train_loss) // len(h.val_loss)
    ax.plot(range(1, len(h.train_loss) + 1), h.train_loss, alpha=0.7, label="train (per step)")
    ax.plot([per_epoch * (i + 1) for i in range(len(h.val_loss))], h.val_loss, "o-", label="validation")
    ax.set(title=title, xlabel="step", ylabel="cross-entropy")
    ax.legend()
    fig.tight_layout()

plot_history(history, "LoRA r=8 on query/value")

# %% [markdown]
# ## All linear layers
#
# The LoRA paper adapted only $W_q$ and $W_v$; later work (QLoRA) found that adapting **every linear
# layer** — attention and MLP — matters more than the rank. `"all-linear"` wraps all of them except the
# output head.
#
# - Three times as many wrapped layers now change at once: at the learning rate of $10^{-2}$ this run
#   collapses to predicting a single class, so we halve it.

# %%
torch.manual_seed(0)
model_all, _ = load_encoder(num_labels=len(names))
add_lora(model_all, "all-linear", rank=8, alpha=16, modules_to_save=["classifier"])
all_params = count_parameters(model_all, "LoRA r=8 all-linear")
history_all = fit(model_all, train_set, collate, val_set, epochs=EPOCHS, batch_size=32, lr=LR / 2, desc="all-linear")
all_acc = accuracy(model_all, test_set, collate)
print(f"LoRA all-linear r=8: test accuracy {all_acc:.3f}")
assert all_acc > probe_acc

# %% [markdown]
# ## How much rank does it need?
#
# The same run on query/value with $r = 1, 4, 16$ (and the $r = 8$ run from above). We keep $\alpha = 2r$,
# so the scaling is 2 at every rank and only the number of directions changes.

# %%
results = {8: (lora_params["trainable"], lora_acc)}
for r in [1, 4, 16]:
    torch.manual_seed(0)
    m, _ = load_encoder(num_labels=len(names))
    add_lora(m, ["query", "value"], rank=r, alpha=2 * r, modules_to_save=["classifier"])
    fit(m, train_set, collate, val_set, epochs=EPOCHS, batch_size=32, lr=LR, desc=f"rank {r}")
    results[r] = (count_parameters(m, show=False)["trainable"], accuracy(m, test_set, collate))
    if r == 16:
        model_r16 = m
for r, (n, acc) in sorted(results.items()):
    print(f"rank {r:>2}: {n:>7,} trainable, test accuracy {acc:.3f}")

# %% [markdown]
# Trainable parameters grow linearly with $r$; accuracy does not follow them:

# %%
ranks = sorted(results)
fig, ax = plt.subplots(figsize=(8, 3), dpi=80)
ax.plot(ranks, [results[r][1] for r in ranks], "o-", label="LoRA query/value")
ax.axhline(probe_acc, color="gray", ls="--", label="linear probe")
ax.set(xscale="log", xticks=ranks, xticklabels=ranks, xlabel="rank r", ylabel="test accuracy")
ax.legend()
fig.tight_layout()

# %% [markdown]
# ## What did it learn? The spectrum of $\Delta W$
#
# $\Delta W = \frac{\alpha}{r} BA$ has at most $r$ non-zero singular values. How many of them does training
# actually use? Compare the learned update of one query projection (rank 16) with the pretrained $W$ it
# modifies.

# %%
layer = model_r16.bert.encoder.layer[3].attention.self.query
with torch.no_grad():
    s_delta = torch.linalg.svdvals(layer.delta_weight())
    s_w = torch.linalg.svdvals(layer.base.weight)
energy = s_delta.pow(2).cumsum(0) / s_delta.pow(2).sum()
print(f"delta W: {(s_delta > 1e-4 * s_delta[0]).sum().item()} non-zero singular values out of {len(s_delta)}; "
      f"the top 4 hold {energy[3]:.0%} of its energy")
print(f"|delta W| / |W| = {layer.delta_weight().norm() / layer.base.weight.norm():.3f}")
assert (s_delta > 1e-4 * s_delta[0]).sum() <= 16

fig, ax = plt.subplots(figsize=(8, 3), dpi=80)
ax.semilogy(range(1, 33), (s_w / s_w[0])[:32].detach(), "o-", label="pretrained W")
ax.semilogy(range(1, 17), (s_delta / s_delta[0])[:16].detach(), "o-", label="learned ΔW (r = 16)")
ax.set(xlabel="singular value index", ylabel="σ_i / σ_1", title="layer 3 query projection")
ax.legend()
fig.tight_layout()

# %% [markdown]
# - $W$'s spectrum is flat: it is full rank, every direction matters.
# - $\Delta W$'s falls fast: most of the update lives in a handful of directions — the low-intrinsic-rank
#   hypothesis, seen in our own run.

# %% [markdown]
# ## Merge: same outputs, base-model latency
#
# `merge_lora` adds $\Delta W$ into every wrapped weight and puts the plain `nn.Linear` back. It returns the
# merged model (keep the return value). We merge a copy, so that the LoRA model stays around for comparison.

# %%
merged = merge_lora(copy.deepcopy(model))
batch = collate([test_set[i] for i in range(32)])
inputs = {k: v for k, v in batch.items() if k != "labels"}
with torch.no_grad():
    torch.testing.assert_close(merged(**inputs).logits, model.eval()(**inputs).logits, atol=1e-4, rtol=1e-4)
print(type(merged.bert.encoder.layer[0].attention.self.query).__name__,
      "- logits unchanged, test accuracy", f"{accuracy(merged, test_set, collate):.3f}")

# %% [markdown]
# The merged model has exactly the base model's modules and shapes, so it costs what the base costs. The
# LoRA model before merging pays for two extra small matmuls per wrapped layer.

# %%
def forward_ms(models, repeats=15):
    """Median forward time of each model, taking turns so that a busy machine slows all alike."""
    times = {k: [] for k in models}
    with torch.no_grad():
        for _ in range(repeats):
            for k, m in models.items():
                start = time.perf_counter()
                m(**inputs)
                times[k].append(1000 * (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in times.items()}

torch.manual_seed(0)
plain, _ = load_encoder(num_labels=len(names))
latency = forward_ms({"base model": plain.eval(), "LoRA (unmerged)": model, "LoRA merged": merged})
for k, v in latency.items():
    print(f"{k:<16}{v:7.1f} ms  {v / latency['base model']:.2f}x")
assert [type(m) for m in merged.modules()] == [type(m) for m in plain.modules()]
assert [p.shape for p in merged.parameters()] == [p.shape for p in plain.parameters()]

# %% [markdown]
# ## Save the adapter, not the model
#
# Without merging, the only new information is $A$, $B$ and the head. `save_adapter` writes just those
# tensors (safetensors, plus the LoRA config); `load_adapter` on a fresh MiniLM re-injects LoRA from the
# saved config and loads them.

# %%
# NBVAL_CHECK_OUTPUT
os.makedirs("outputs", exist_ok=True)
save_adapter(model, "outputs/lora_minilm.safetensors")
adapter_kb = os.path.getsize("outputs/lora_minilm.safetensors") / 1024
full_mb = sum(p.numel() * p.element_size() for p in plain.parameters()) / 2**20
print(f"adapter file {adapter_kb:.0f} KB  vs  full model weights {full_mb:.1f} MB "
      f"({100 * adapter_kb / 1024 / full_mb:.2f}%)")

# %% [markdown]
# Load it into a fresh MiniLM, whose head starts from a different seed: everything that differs from the
# pretrained model must come from the file.

# %%
torch.manual_seed(123)
fresh, _ = load_encoder(num_labels=len(names))
load_adapter(fresh, "outputs/lora_minilm.safetensors")
with torch.no_grad():
    torch.testing.assert_close(fresh.eval()(**inputs).logits, model(**inputs).logits)
print("reloaded adapter reproduces the trained model")

# %% [markdown]
# `export_peft` writes the same tensors in Hugging Face peft's format (`adapter_config.json` +
# `adapter_model.safetensors`), so the adapter also loads with `peft.PeftModel.from_pretrained`.
#
# ## LoRA on a decoder: SmolLM2 on data-to-text
#
# The same `add_lora`, on a 135M-parameter Llama-family model. We wrap `q_proj` and `v_proj` in all 30
# layers and train on prompts like `Describe the restaurant: name[...] food[...] ...` → a sentence
# (the loss counts the sentence only).

# %%
# NBVAL_CHECK_OUTPUT
d2t = data_to_text()
torch.manual_seed(0)
lm, lm_tok = load_causal_lm()
add_lora(lm, ["q_proj", "v_proj"], rank=8, alpha=16)
lm_params = count_parameters(lm, "SmolLM2 LoRA r=8 q/v")

# %% [markdown]
# Before training: LoRA is the identity at initialisation, so these are the base model's own
# continuations for held-out meaning representations (restaurant/food pairs never seen in training).

# %%
test_mrs = d2t["test"]["mr"][:8]
gen_batch = generation_batch(lm_tok, test_mrs)
before = generate(lm, lm_tok, gen_batch, max_new_tokens=24)
ser_before = slot_error_rate(before, test_mrs)
print(test_mrs[0], "\n  ->", repr(before[0]))
print(f"slot error rate before: {ser_before:.2f}")

# %% [markdown]
# Thirty steps of batch 8 — 240 of the 400 training examples, seen once:

# %%
lm_history = fit(lm, d2t["train"], CausalLMCollator(lm_tok, max_length=64), epochs=1, batch_size=8,
                 lr=2e-3, max_steps=30, desc="SmolLM2 LoRA")
fig, ax = plt.subplots(figsize=(8, 3), dpi=80)
ax.plot(range(1, len(lm_history.train_loss) + 1), lm_history.train_loss)
ax.set(title="SmolLM2 + LoRA on data-to-text", xlabel="step", ylabel="cross-entropy (sentence tokens)")
fig.tight_layout()

# %% [markdown]
# The same held-out meaning representations, after training:

# %%
after = generate(lm, lm_tok, gen_batch, max_new_tokens=24)
ser_after = slot_error_rate(after, test_mrs)
for mr, b, a in list(zip(test_mrs, before, after))[:3]:
    print(f"{mr}\n  before: {b!r}\n  after:  {a!r}")
print(f"slot error rate: {ser_before:.2f} -> {ser_after:.2f}")
assert ser_after < ser_before

# %% [markdown]
# ## Aside: LoRA as a parametrization
#
# `torch.nn.utils.parametrize` (the approach of minLoRA) leaves the model's modules alone and instead makes
# `weight` a computed attribute: every access returns $W + \frac{\alpha}{r}BA$.

# %%
import torch.nn.utils.parametrize as parametrize

class LoRAParametrization(nn.Module):
    def __init__(self, A, B, scaling):
        super().__init__()
        self.A, self.B, self.scaling = nn.Parameter(A.clone()), nn.Parameter(B.clone()), scaling

    def forward(self, W):
        return W + self.B @ self.A * self.scaling  # builds the full (out, in) delta W on every call

p_layer = copy.deepcopy(base)
parametrize.register_parametrization(p_layer, "weight", LoRAParametrization(
    mine.lora_A.weight.detach(), mine.lora_B.weight.detach(), mine.scaling))
torch.testing.assert_close(p_layer(x), mine(x))
print(type(p_layer).__name__, "- merging is one call: parametrize.remove_parametrizations(layer, 'weight')")

# %% [markdown]
# Short, it works for any layer with a weight (linear, embedding, convolution), and merging is one call
# — but:
#
# - it **builds the full $\Delta W$** ($d_\text{out} \times d_\text{in}$) on every forward, and again in the
#   backward pass: for a few tokens through a big layer that costs far more than $B(Ax)$;
# - it needs a float `weight` to add to, so it has no path for a 4-bit base (QLoRA).
#
# On a 2048 × 2048 layer with 4 tokens (a few steps of generation):

# %%
big = nn.Linear(2048, 2048).requires_grad_(False)
wrapped = LoRALinear(copy.deepcopy(big), rank=8, alpha=16)
parametrize.register_parametrization(big, "weight", LoRAParametrization(
    wrapped.lora_A.weight.detach(), torch.zeros(2048, 8), wrapped.scaling))
big.parametrizations.weight.original.requires_grad_(False)  # W frozen in both
tokens = torch.randn(4, 2048)
for name, layer in [("wrapper  B(Ax)", wrapped), ("parametrize W+BA", big)]:
    start = time.perf_counter()
    for _ in range(10):
        layer(tokens).sum().backward()
    print(f"{name:<18}{(time.perf_counter() - start) / 10 * 1000:6.1f} ms per forward+backward")

# %% [markdown]
# ## Summary
#
# - LoRA freezes $W$ and learns $\Delta W = \frac{\alpha}{r} BA$ with $r \ll d$: $r(d_\text{in}+d_\text{out})$
#   parameters per layer instead of $d_\text{in} d_\text{out}$.
# - $B = 0$ at start makes the adapted model equal the pretrained one; a random $A$ lets gradients flow.
# - On MiniLM, rank 8 on query/value trains well under 1% of the parameters and clearly beats the linear
#   probe; all-linear does better again. Rank 1 already does most of the job.
# - A learned $\Delta W$ concentrates in a few directions, while $W$ is full rank.
# - Merging folds $\Delta W$ into $W$: same outputs, base-model latency. Unmerged, the adapter is a file of
#   a few hundred KB.
# - The same code adapts a decoder: 40 steps teach SmolLM2 the data-to-text format.
#
# ## Exercises
#
# 1. Train query/value LoRA with `rslora=True` at ranks 4 and 64 with the same `alpha`. Does rsLoRA make
#    the high rank behave better?
# 2. Wrap only `value`, or only the MLP (`intermediate.dense`, `output.dense`). Which matters more here?
# 3. Take the rank-16 $\Delta W$ above, truncate it to its top 4 singular directions with `torch.linalg.svd`,
#    put it back and measure the accuracy. How much is lost?
# 4. How many trainable parameters does LoRA r=8 on `q_proj` and `v_proj` add to SmolLM2? Work it out from
#    the shapes (hidden 576; 3 key/value heads of 64 dimensions) and check it in the cell below.

# %%
my_answer = 30 * 8 * ((576 + 576) + (576 + 192))  # replace with your own arithmetic
assert my_answer == lm_params["trainable"], (my_answer, lm_params["trainable"])
print(f"{my_answer:,} trainable parameters")

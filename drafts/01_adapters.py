# %% [markdown]
# # 01 · Bottleneck adapters (Houlsby and Pfeiffer)
#
# The first parameter-efficient technique of the course, and the oldest one for transformers.
#
# - **Idea:** freeze the pretrained model; insert a few tiny trainable layers, the *adapters*, inside it.
# - **Cost:** one small file per task instead of one copy of the whole model per task.
# - In this notebook we build an adapter by hand, check it against `peftkit.adapters`, place it in
#   all-MiniLM-L6-v2, and train it on the topic task from `00_baselines`.

# %% [markdown]
# ## A little history
#
# - **2017**, vision: Rebuffi et al. add small "residual adapter" modules to a frozen ResNet, one set per
#   visual domain.
# - **2019**, NLP: Houlsby et al., *Parameter-Efficient Transfer Learning for NLP*
#   ([arXiv:1902.00751](https://arxiv.org/abs/1902.00751)). Two bottleneck adapters per BERT layer; on
#   GLUE they come **within 0.4% of full fine-tuning while training about 3.6% of the parameters per task**.
# - **2020–21**: AdapterHub and Pfeiffer et al.'s *AdapterFusion*
#   ([arXiv:2005.00247](https://arxiv.org/abs/2005.00247)) find that **one adapter per layer**, after the
#   feed-forward block, works about as well and runs faster.
# - Adapters made "one frozen model + many small task files" practical, the pattern LoRA and
#   prompt tuning (next notebooks) also follow.

# %%
import copy
import os

import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.testing import assert_close

from peftkit.data import ClassificationCollator, topic_classification
from peftkit.models import load_causal_lm, load_encoder, quiet
from peftkit.train import accuracy, count_parameters, fit

quiet()
torch.manual_seed(0)

# %% [markdown]
# ## The equation
#
# An adapter takes the output $h \in \mathbb{R}^d$ of a sublayer and returns
#
# $$\text{adapter}(h) = h + W_{\text{up}}\, f(W_{\text{down}}\, h + b_{\text{down}}) + b_{\text{up}}$$
#
# - $W_{\text{down}}$: $m \times d$ projects **down** to a bottleneck of size $m = d / r$ ($r$ is the
#   *reduction factor*); $f$ is a non-linearity (ReLU here); $W_{\text{up}}$: $d \times m$ projects back **up**.
# - Parameters per adapter: $2dm + m + d$. For MiniLM, $d = 384$ and $r = 16$ give $m = 24$: 18,840 numbers.
# - The **skip connection** ($h + \dots$) is the key: with small weights the adapter is nearly the identity,
#   so training starts from exactly what the pretrained model computes.

# %% [markdown]
# ## Where adapters sit
#
# A BERT layer has two sublayers; each ends with `dense → dropout → (+ residual) → LayerNorm`.
# The adapter goes right after `dense`, **before** the residual add and the LayerNorm:
#
# ```
#                 Houlsby (2 per layer)                 Pfeiffer (1 per layer)
#
#   x ─► self-attention ─► dense ─► ADAPTER      x ─► self-attention ─► dense
#          ─► dropout ─► (+ x) ─► LayerNorm*            ─► dropout ─► (+ x) ─► LayerNorm
#   a ─► intermediate+GELU ─► dense ─► ADAPTER   a ─► intermediate+GELU ─► dense ─► ADAPTER
#          ─► dropout ─► (+ a) ─► LayerNorm*            ─► dropout ─► (+ a) ─► LayerNorm
#
#                           * trained too (Houlsby et al. train the layer norms)
# ```
#
# Inside one adapter (MiniLM, $r = 16$):
#
# ```
#   h (384) ──┬──► adapter_down (384→24) ─► ReLU ─► adapter_up (24→384) ──┐
#             └──────────────────────────── skip ───────────────────────── + ──► adapter(h)
# ```

# %% [markdown]
# ## Build it: the adapter module
#
# Two `nn.Linear` layers and a ReLU. Both weight matrices start from a normal with a tiny standard
# deviation ($10^{-3}$) and the biases at zero.

# %%
class Adapter(nn.Module):
    """h -> h + W_up f(W_down h + b_down) + b_up, near the identity at initialisation."""

    def __init__(self, hidden_size, reduction_factor=16, init_std=1e-3):
        super().__init__()
        bottleneck = hidden_size // reduction_factor
        self.adapter_down = nn.Linear(hidden_size, bottleneck)
        self.non_linearity = nn.ReLU()
        self.adapter_up = nn.Linear(bottleneck, hidden_size)
        for linear in (self.adapter_down, self.adapter_up):
            nn.init.normal_(linear.weight, std=init_std)
            nn.init.zeros_(linear.bias)

    def forward(self, h):
        return h + self.adapter_up(self.non_linearity(self.adapter_down(h)))  # (..., d) → (..., m) → (..., d)

# %% [markdown]
# The shapes and the parameter count $2dm + m + d$:

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
adapter = Adapter(384, reduction_factor=16)
for name, p in adapter.named_parameters():
    print(f"{name:<20}{str(tuple(p.shape)):>12}")
d, m = 384, 24
n_adapter = sum(p.numel() for p in adapter.parameters())
print(f"parameters: {n_adapter:,} = 2·d·m + m + d = {2 * d * m + m + d:,}")

# %% [markdown]
# ### Near the identity at initialisation
#
# - With weights of size $\sigma = 10^{-3}$, the extra term $W_{\text{up}} f(W_{\text{down}} h)$ is of order
#   $\sigma^2 \sqrt{dm}\,\lVert h \rVert$: about $10^{-4}$ of $h$.
# - Why not start both matrices at exactly zero? Then $f(0) = 0$ and **neither** matrix gets a gradient.
#   (Houlsby et al. use a near-zero init; other libraries zero only $W_{\text{up}}$.)

# %%
h = torch.randn(4, 9, 384)  # (batch, tokens, hidden): stand-in hidden states
with torch.no_grad():
    change = ((adapter(h) - h).norm() / h.norm()).item()
print(f"relative change |adapter(h) - h| / |h| = {change:.1e}")
assert change < 1e-3

# %% [markdown]
# ## The same module in `peftkit`
#
# `peftkit.adapters.BottleneckAdapter` is this module (plus input checks and a dtype guard). Built from
# the same seed it has the same weights under the same names; after moving the weights far from their
# init, as training would, the two still compute the same function.

# %%
from peftkit.adapters import BottleneckAdapter

torch.manual_seed(0)
reference = BottleneckAdapter(384, reduction_factor=16)
assert_close(reference.state_dict(), adapter.state_dict())  # same names, same seeded init
with torch.no_grad():
    for p in adapter.parameters():
        p.normal_(0, 0.3)
reference.load_state_dict(adapter.state_dict())
assert_close(reference(h), adapter(h))
print(reference)

# %% [markdown]
# ## Wrapping a sublayer
#
# To put an adapter after a layer we **wrap** the layer: the frozen original becomes `base`, and the
# wrapper returns `adapter(base(x))`. The wrapper shows up in `print(model)`, and its parameter names
# (`...dense.base.weight`, `...dense.adapter.adapter_up.weight`) say where everything lives.

# %%
class Adapted(nn.Module):
    """A frozen sublayer followed by its adapter: forward(x) = adapter(base(x))."""

    def __init__(self, base, adapter):
        super().__init__()
        self.base, self.adapter = base, adapter

    def forward(self, x):
        return self.adapter(self.base(x))

# %% [markdown]
# ## The real model and the task
#
# MiniLM with a fresh 8-way classifier head, and the topic task split as in `00_baselines`. These are the
# two `dense` layers we will wrap in every one of the 6 layers: the attention output (`BertSelfOutput`)
# and the feed-forward output (`BertOutput`).

# %%
# NBVAL_CHECK_OUTPUT
topics = topic_classification()
names = topics["train"].features["label"].names
split = topics["train"].train_test_split(test_size=0.1, seed=0, stratify_by_column="label")
train_set, val_set, test_set = split["train"], split["test"], topics["test"]
print(len(train_set), "train,", len(val_set), "validation,", len(test_set), "test;", len(names), "topics")
torch.manual_seed(0)
base, tok = load_encoder(num_labels=len(names), id2label=dict(enumerate(names)))
layer = base.bert.encoder.layer[0]
print(layer.attention.output)
print(layer.output)

# %% [markdown]
# ## Inject by hand
#
# Freeze everything, wrap the `dense` layer(s) of each block, and unfreeze what the placement trains:
# the adapters, the LayerNorms for Houlsby, and always the new classifier head.

# %%
def inject(model, placement="houlsby", reduction_factor=16):
    """Wrap the dense layer(s) of every BERT layer with an adapter; freeze the rest."""
    model.requires_grad_(False)
    for layer in model.bert.encoder.layer:
        blocks = [layer.attention.output, layer.output] if placement == "houlsby" else [layer.output]
        for block in blocks:  # each block computes LayerNorm(dropout(dense(x)) + x)
            block.dense = Adapted(block.dense, Adapter(block.dense.out_features, reduction_factor))
            if placement == "houlsby":
                block.LayerNorm.requires_grad_(True)
    model.classifier.requires_grad_(True)  # the new task head always trains
    return model

# %% [markdown]
# ## …and with `peftkit.adapters.add_adapters`
#
# `add_adapters(model, "houlsby" | "pfeiffer", reduction_factor=..., modules_to_save=[...])` does the same
# for any BERT- or Llama-family model (it looks up the layers by their parts). Check that it trains the
# same tensors, starts from the same values, and computes the same logits once the adapters have moved:

# %%
from peftkit.adapters import add_adapters


def trainable_names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


collate = ClassificationCollator(tok, max_length=32)
batch = collate(test_set.select(range(8)))
for placement in ("houlsby", "pfeiffer"):
    torch.manual_seed(0)
    ours = inject(copy.deepcopy(base), placement).eval()
    torch.manual_seed(0)
    theirs = add_adapters(copy.deepcopy(base), placement, modules_to_save=["classifier"]).eval()
    assert trainable_names(ours) == trainable_names(theirs)
    assert_close(ours.state_dict(), theirs.state_dict())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".adapter." in name:
                p.normal_(0, 0.1)
    theirs.load_state_dict(ours.state_dict())
    assert_close(ours(**batch).logits, theirs(**batch).logits)
print("inline injection == peftkit.adapters.add_adapters, for houlsby and pfeiffer")

# %% [markdown]
# ## Identity at initialisation, on the real model
#
# Freshly added adapters should leave MiniLM's hidden states (and so its predictions) untouched:

# %%
inputs = {k: v for k, v in batch.items() if k != "labels"}
torch.manual_seed(0)
adapted = add_adapters(copy.deepcopy(base), "houlsby", modules_to_save=["classifier"]).eval()
with torch.no_grad():
    before = base.eval().bert(**inputs).last_hidden_state  # (8, tokens, 384)
    after = adapted.bert(**inputs).last_hidden_state
relative = ((after - before).abs().max() / before.abs().max()).item()
print(f"largest change of a hidden value, relative to the largest value: {relative:.1e}")
assert relative < 2e-3

# %% [markdown]
# ## What trains
#
# - **Houlsby:** 12 adapters × 18,840 + 12 LayerNorms × 768 + head 3,080 = 238,376.
# - **Pfeiffer:** 6 adapters × 18,840 + head 3,080 = 116,120.
# - For comparison the two baselines of `00_baselines`: the linear probe (head only) and full fine-tuning.

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
houlsby = add_adapters(copy.deepcopy(base), "houlsby", modules_to_save=["classifier"])
torch.manual_seed(0)
pfeiffer = add_adapters(copy.deepcopy(base), "pfeiffer", modules_to_save=["classifier"])
probe = copy.deepcopy(base).requires_grad_(False)
probe.classifier.requires_grad_(True)
counts = {name: count_parameters(model, name, show=False)
          for name, model in [("linear probe", probe), ("houlsby", houlsby), ("pfeiffer", pfeiffer)]}
counts["full fine-tuning"] = count_parameters(base, "full fine-tuning", show=False)
print(f"{'':<18}{'trainable':>12}{'total':>14}{'% trained':>11}")
for name, row in counts.items():
    print(f"{name:<18}{row['trainable']:>12,}{row['total']:>14,}{row['percent']:>10.2f}%")

# %% [markdown]
# About **1%** of the model for Houlsby and **0.5%** for Pfeiffer. (Houlsby et al.'s 3.6% is for BERT-large
# with bottlenecks of up to 256 and 24 layers.)
#
# ## Training
#
# One recipe for every run, sized to take seconds per epoch on a laptop CPU:
#
# - batch 8, 3 epochs (171 steps), AdamW at learning rate $10^{-2}$ (adapters start tiny and tolerate a
#   high rate), linear warm-up and decay, all from `peftkit.train.fit`;
# - sequences truncated to 32 tokens (90% of the utterances are shorter than 30).
#
# First the floor: the **linear probe** with exactly this recipe.

# %%
RECIPE = dict(epochs=3, batch_size=8, lr=1e-2, seed=0)
probe_hist = fit(probe, train_set, collate, val_set, desc="probe", **RECIPE)
probe_acc = accuracy(probe, test_set, collate)
print(f"linear probe: test accuracy {probe_acc:.3f}, validation loss {probe_hist.val_loss[-1]:.3f}")

# %% [markdown]
# ### Houlsby: two adapters per layer, LayerNorms trained

# %%
houlsby_hist = fit(houlsby, train_set, collate, val_set, desc="houlsby", **RECIPE)

# %% [markdown]
# ### Pfeiffer: one adapter per layer

# %%
pfeiffer_hist = fit(pfeiffer, train_set, collate, val_set, desc="pfeiffer", **RECIPE)

# %% [markdown]
# ### Loss curves
#
# Training loss per step (smoothed over 20 steps) and validation loss after each epoch.

# %%
def smooth(values, k=20):
    return [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


hists = {"linear probe": probe_hist, "houlsby": houlsby_hist, "pfeiffer": pfeiffer_hist}
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3), dpi=80)
for name, hist in hists.items():
    ax1.plot(smooth(hist.train_loss), label=name)
    ax2.plot(range(1, len(hist.val_loss) + 1), hist.val_loss, "o-", label=name)
ax1.set(xlabel="step", ylabel="training loss")
ax2.set(xlabel="epoch", ylabel="validation loss", xticks=[1, 2, 3])
ax2.legend()
fig.tight_layout()

# %% [markdown]
# ## Evaluate
#
# Test accuracy, the trainable parameters, and the median time of one training step (forward, backward,
# update) on this machine:

# %%
results = {}
for name, model, hist in [("linear probe", probe, probe_hist), ("houlsby", houlsby, houlsby_hist),
                          ("pfeiffer", pfeiffer, pfeiffer_hist)]:
    results[name] = accuracy(model, test_set, collate)
    print(f"{name:<14}{counts[name]['trainable']:>9,} trained   test accuracy {results[name]:.3f}   "
          f"val loss {hist.val_loss[-1]:.3f}   step {1000 * hist.median_step_seconds:4.0f} ms")
majority = max(test_set["label"].count(i) for i in range(len(names))) / len(test_set)
assert results["linear probe"] > majority + 0.2
for name in ("houlsby", "pfeiffer"):
    assert results[name] > probe_acc + 0.03, name
    assert hists[name].val_loss[-1] < probe_hist.val_loss[-1] - 0.3, name

# %% [markdown]
# Reading the table:
#
# - Both adapter placements beat the linear probe clearly, in accuracy and even more in validation loss:
#   changing the frozen representations a little, in every layer, helps more than any head on top of them.
# - Compare with full fine-tuning in `00_baselines`, which trains all 22.7M parameters: the adapters
#   train 1% (Houlsby) and 0.5% (Pfeiffer) of that.
# - Pfeiffer trains half of Houlsby's parameters, and its step is a little cheaper (half the adapters, no
#   LayerNorm gradients). Pfeiffer et al. found one adapter per layer as good as two on GLUE; on our task
#   with this recipe it was at least as good too.
# - 168 test examples: one example is 0.6 points of accuracy, so a few points between two runs is noise;
#   the gap to the probe is not.

# %% [markdown]
# ## How big should the bottleneck be?
#
# The bottleneck $m$ sets the capacity: $2dm + m + d$ parameters per adapter.
#
# - Too small, and the adapter cannot express the change the task needs: **underfitting**.
# - Too large, and on 405 training examples it can memorise them: **overfitting** (training loss
#   keeps falling, validation loss does not).
#
# We train Pfeiffer adapters with $m = 1$ (a single number per token per layer!) and $m = 384 = d$ (no
# bottleneck at all) with the same recipe, next to the $m = 24$ run above. (Three points keep the notebook
# fast; exercise 4 adds more.)

# %%
SWEEP = [384, 16, 1]  # reduction factors: m = 384 / r = 1, 24, 384
sweep = {}
for r in SWEEP:
    if r == 16:
        model, hist = pfeiffer, pfeiffer_hist
    else:
        torch.manual_seed(0)
        model = add_adapters(copy.deepcopy(base), "pfeiffer", reduction_factor=r, modules_to_save=["classifier"])
        hist = fit(model, train_set, collate, val_set, progress=False, **RECIPE)
    m = 384 // r
    last_epoch = hist.train_loss[-len(hist.train_loss) // RECIPE["epochs"]:]
    sweep[m] = dict(trained=count_parameters(model, show=False)["trainable"], acc=accuracy(model, test_set, collate),
                    train_loss=sum(last_epoch) / len(last_epoch), val_loss=hist.val_loss[-1])
    print(f"m = {m:>3}: {sweep[m]['trained']:>8,} trained   test accuracy {sweep[m]['acc']:.3f}   "
          f"train loss {sweep[m]['train_loss']:.3f}   val loss {sweep[m]['val_loss']:.3f}")

# %%
sizes = sorted(sweep)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3), dpi=80)
ax1.plot(sizes, [sweep[m]["acc"] for m in sizes], "o-", label="pfeiffer")
ax1.axhline(probe_acc, color="gray", ls="--", label="linear probe")
ax1.set(xscale="log", xlabel="bottleneck size m", ylabel="test accuracy", xticks=sizes, xticklabels=sizes)
ax1.legend()
ax2.plot(sizes, [sweep[m]["train_loss"] for m in sizes], "o-", label="train (last epoch)")
ax2.plot(sizes, [sweep[m]["val_loss"] for m in sizes], "o-", label="validation")
ax2.set(xscale="log", xlabel="bottleneck size m", ylabel="loss", xticks=sizes, xticklabels=sizes)
ax2.legend()
fig.tight_layout()

# %% [markdown]
# What our short run shows, honestly:
#
# - **Small is enough.** $m = 1$, about 10k trained numbers, lands close to $m = 24$ and far above the probe:
#   this task needs only a small change in each layer.
# - **Large is worse, but not by overfitting**: the *training* loss rises with $m$ as well. AdamW moves every
#   weight by about the learning rate per step, so at a fixed rate the adapter's output moves faster the
#   larger $m$ is; at $10^{-2}$ the big adapters overshoot and cannot even fit the training set. They need
#   a smaller learning rate (exercise 4).
# - Overfitting proper (training loss down, validation loss up) would need a longer run than our 3 epochs.

# %%
assert sweep[1]["acc"] > probe_acc + 0.03  # a 1-dimensional bottleneck already beats the probe
assert sweep[384]["train_loss"] > sweep[24]["train_loss"] + 0.2  # the largest one trains worse, not better

# %% [markdown]
# ## Save the adapter
#
# The adapter file holds only what trained, plus the config (`peftkit.io` writes one safetensors file,
# atomically). Everything else is the frozen MiniLM, which every task shares.

# %%
# NBVAL_CHECK_OUTPUT
from peftkit.adapters import load_adapters, remove_adapters, save_adapters

path = save_adapters(houlsby, "outputs/01_houlsby_topics.safetensors")
size_kib = os.path.getsize(path) / 1024
full_mib = counts["full fine-tuning"]["total"] * 4 / 2**20
print(f"adapter file: {size_kib:.0f} KiB; a fine-tuned copy of MiniLM in float32: {full_mib:.1f} MiB "
      f"({1024 * full_mib / size_kib:.0f}× larger)")

# %% [markdown]
# Loading it into a fresh copy of the frozen model adds the adapters with the saved config and copies the
# tensors in; the restored model computes the same logits:

# %%
# NBVAL_CHECK_OUTPUT
restored = copy.deepcopy(base)
config = load_adapters(restored, path)
print(config)
with torch.no_grad():
    assert_close(restored.eval()(**batch).logits, houlsby.eval()(**batch).logits)

# %% [markdown]
# ## No merging; removing
#
# - LoRA (next notebook) can fold its update into the frozen weight after training. An adapter cannot:
#   $f$ is non-linear, so $W_{\text{up}} f(W_{\text{down}} h)$ is not a matrix times $h$. Adapters cost a little
#   extra compute at inference, in every layer.
# - `remove_adapters` puts the original `dense` layers back. For Pfeiffer that restores the frozen encoder
#   exactly; Houlsby's trained LayerNorms are the model's own modules, so they keep their new values
#   (keep the saved file to go back and forth).

# %%
with torch.no_grad():
    frozen = base.eval().bert(**inputs).last_hidden_state
    for name, model in [("pfeiffer", copy.deepcopy(pfeiffer)), ("houlsby", restored)]:
        remove_adapters(model)
        diff = (model.eval().bert(**inputs).last_hidden_state - frozen).abs().max().item()
        print(f"{name:<9} after remove_adapters, largest difference from the frozen encoder: {diff:.3f}")
        assert (diff == 0) == (name == "pfeiffer")

# %% [markdown]
# ## Aside: a forward hook instead of a wrapper
#
# PyTorch can also change a module's output with `register_forward_hook`, without touching the model's
# structure. It computes the same thing, but the adapters become **invisible**: not in `print(model)`, not in
# `model.parameters()` (so not in the optimizer or in `state_dict` unless you track them yourself), and
# a hook does not say which adapter it runs. That is why `peftkit` wraps.

# %%
def run_adapter(adapter):
    def hook(module, args, output):
        return adapter(output)  # a forward hook that returns a value replaces the module's output
    return hook


hooked = copy.deepcopy(base).eval()
hooked.classifier.load_state_dict(pfeiffer.classifier.state_dict())
for layer, trained in zip(hooked.bert.encoder.layer, pfeiffer.bert.encoder.layer):
    layer.output.dense.register_forward_hook(run_adapter(trained.output.dense.adapter))
with torch.no_grad():
    assert_close(hooked(**batch).logits, pfeiffer.eval()(**batch).logits)
print(f"parameters the hooked model reports: {sum(p.numel() for p in hooked.parameters()):,} "
      f"(the wrapped one: {sum(p.numel() for p in pfeiffer.parameters()):,})")

# %% [markdown]
# ## The same call on a decoder: SmolLM2-135M
#
# `add_adapters` recognises Llama-family layers too: there the adapters follow `self_attn.o_proj` and
# `mlp.down_proj`, before each residual add, and Houlsby trains the RMSNorms in front of the sublayers.
# Pfeiffer adapters on all 30 layers ($d = 576$, $m = 36$):

# %%
# NBVAL_CHECK_OUTPUT
lm, lm_tok = load_causal_lm()
prompt = lm_tok(["Adapters are small"], return_tensors="pt")
with torch.no_grad():
    lm_before = lm(**prompt).logits  # (1, tokens, vocabulary)
torch.manual_seed(0)
add_adapters(lm, "pfeiffer")
print(lm.model.layers[0].mlp)
count_parameters(lm, "SmolLM2 + pfeiffer");

# %%
with torch.no_grad():
    lm_after = lm(**prompt).logits
relative = ((lm_after - lm_before).abs().max() / lm_before.abs().max()).item()
print(f"largest logit change, relative to the largest logit: {relative:.1e}")
assert relative < 2e-3
assert torch.equal(lm_after.argmax(-1), lm_before.argmax(-1))  # same next-token predictions
del lm

# %% [markdown]
# ## Summary
#
# - An adapter is a bottleneck MLP with a skip connection, $h + W_{\text{up}} f(W_{\text{down}} h)$, placed
#   after a frozen sublayer and before its residual add.
# - Initialised near zero, it starts as the identity: the adapted model starts as the pretrained one.
# - **Houlsby**: 2 adapters per layer + LayerNorms (~1% of MiniLM). **Pfeiffer**: 1 per layer (~0.5%).
#   On the topic task both beat the linear probe by a wide margin with the same short recipe.
# - The bottleneck size trades capacity against overfitting; on this small task even tiny bottlenecks
#   are enough.
# - The saved task is a file of about a megabyte; the frozen model is shared. Adapters cannot be merged, so
#   they add a little inference cost.
#
# ## Exercises
#
# 1. Predict, by hand, how many parameters Houlsby adapters with reduction factor 8 train on MiniLM
#    (adapters, LayerNorms and the head); the cell below checks your formula against `add_adapters`.
# 2. Rebuild the identity check with `init_std=0.1` and with `init_std=1.0` (an argument of
#    `add_adapters`). How far from the pretrained model does training then start? Train it: does it matter?
# 3. Wrap only the top 3 layers (`model.bert.encoder.layer[3:]`) with your `Adapted`. The step gets faster:
#    why? (Hint: where can backpropagation stop?) What happens to the accuracy?
# 4. Add $m = 4$ and $m = 96$ to the sweep. Then train the $m = 384$ adapters with `lr=1e-3`: does the
#    training loss now fall below the $m = 24$ run's? For 10 epochs: does validation loss rise (overfitting)?
# 5. Try `non_linearity="gelu"` or `"tanh"`. Any difference on this task?

# %%
my_count = 6 * (2 * (2 * 384 * 48 + 48 + 384) + 2 * 2 * 384) + 384 * 8 + 8  # replace with your own formula
torch.manual_seed(0)
model = add_adapters(copy.deepcopy(base), "houlsby", reduction_factor=8, modules_to_save=["classifier"])
assert my_count == count_parameters(model, show=False)["trainable"], my_count
print(f"{my_count:,} trainable parameters: correct")

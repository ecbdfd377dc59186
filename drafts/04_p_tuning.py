# %% [markdown]
# # 04 · P-tuning: a prompt made by a small network
#
# - In notebook `03_prompt_tuning` the prompt $P$ was N free vectors, each trained on its own.
# - **P-tuning** trains a small network, the *prompt encoder*, that outputs $P$. Same place in the
#   model, same size at the end; only the path the optimiser takes to get there changes.
# - After training, the encoder is run once and thrown away: what ships is the $N \times D$ prompt.
# - Paper: Liu, Zheng, Du, Ding, Qian, Yang & Tang, *GPT Understands, Too* (2021).
#
# Plan: why reparameterise → the equations → build both encoders inline → check against `peftkit`
# → plain prompt vs MLP vs LSTM encoder on the topic task, same start and budget → export the prompt.

# %%
import copy
import tempfile
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers.modeling_outputs import SequenceClassifierOutput

from peftkit.models import load_encoder, quiet

warnings.filterwarnings("ignore", message="IProgress not found")  # no widgets: tqdm's text bar is fine
quiet()
from peftkit.data import ClassificationCollator, topic_classification  # noqa: E402
from peftkit.train import accuracy, count_parameters, evaluate_loss, fit  # noqa: E402

# %% [markdown]
# ## Why reparameterise?
#
# - Plain prompt tuning: $P \in \mathbb{R}^{N \times D}$ is the parameter. The gradient of row $p_i$
#   comes only from position $i$; the N rows move independently.
# - P-tuning: $P = f_\theta(E)$, with a free table $E \in \mathbb{R}^{N \times D}$ and an encoder $f_\theta$.
#   The gradient reaches the **shared** weights $\theta$, so every update moves all N rows together.
# - The paper's argument: free prompt vectors are hard to optimise (they start far from anything the
#   model has seen, and each one drifts on its own); tying them through a network made training faster
#   and less sensitive to the learning rate and the initialisation.
# - The price: during training the encoder has far more parameters than $P$. It is thrown away afterwards.

# %% [markdown]
# ## The equations
#
# Two encoders, with hidden size $H$ (peft's `encoder_hidden_size`, by default $H = D$):
#
# $$\textbf{MLP:}\quad p_i = W_3\,\mathrm{ReLU}(W_2\,\mathrm{ReLU}(W_1 e_i))
# \qquad W_1 \in \mathbb{R}^{H \times D},\ W_2 \in \mathbb{R}^{H \times H},\ W_3 \in \mathbb{R}^{D \times H}$$
#
# $$\textbf{LSTM:}\quad [h_1, \dots, h_N] = \mathrm{BiLSTM}(e_1, \dots, e_N) \in \mathbb{R}^{N \times 2H},
# \qquad p_i = W_5\,\mathrm{ReLU}(W_4 h_i)$$
#
# - Both then do exactly what prompt tuning does: $\text{inputs\_embeds} = [\,p_1, \dots, p_N,\; \mathrm{embed}(x)\,]$.
# - MLP: each $p_i$ depends on $e_i$ only, but all rows share $W_1, W_2, W_3$.
# - LSTM (the paper's choice): each $h_i$ has read the whole table, forwards and backwards, so each
#   $p_i$ depends on every $e_j$: neighbouring prompt tokens are tied together.

# %% [markdown]
# ## Build it inline
#
# - Sizes of MiniLM: $D = 384$. We use $N = 10$ virtual tokens and peft's default $H = D$.
# - The free table $E$ is an `nn.Embedding` with N rows, initialised $\mathcal{N}(0, 1)$ as in peft.

# %%
# NBVAL_CHECK_OUTPUT
N, D = 10, 384  # virtual tokens, MiniLM's embedding width
H = D  # encoder_hidden_size: peft's default is the model's width
table = nn.Embedding(N, D)  # E: one free row per virtual token
print("E:", tuple(table.weight.shape))

# %% [markdown]
# - The MLP head: two hidden layers of width H, back to D at the end.

# %%
def mlp_head(d, h):
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))


# %% [markdown]
# - The LSTM head: a 2-layer bidirectional LSTM reads E as a sequence of N tokens; its output has
#   width 2H (forward and backward states side by side), and a small MLP maps it back to D.

# %%
def lstm_heads(d, h, num_layers=2):
    lstm = nn.LSTM(d, h, num_layers=num_layers, bidirectional=True, batch_first=True)
    mlp = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
    return lstm, mlp


# %% [markdown]
# - The encoder: no input at all. Its forward reads its own table and returns the (N, D) prompt.
# - The attribute names (`embedding`, `lstm_head`, `mlp_head`) are peft's, so weights copy across.

# %%
class InlinePromptEncoder(nn.Module):
    def __init__(self, n, d, h, kind="mlp"):
        super().__init__()
        self.kind = kind
        self.embedding = nn.Embedding(n, d)  # E
        if kind == "lstm":
            self.lstm_head, self.mlp_head = lstm_heads(d, h)
        else:
            self.mlp_head = mlp_head(d, h)

    def forward(self):
        x = self.embedding.weight.unsqueeze(0)  # (1, N, D): the N rows as one sequence
        if self.kind == "lstm":
            x = self.lstm_head(x)[0]  # (1, N, 2H)
        return self.mlp_head(x)[0]  # (N, D)


# %%
# NBVAL_CHECK_OUTPUT
inline = {}
for kind in ("mlp", "lstm"):
    torch.manual_seed(0)
    inline[kind] = InlinePromptEncoder(N, D, H, kind)
    n_params = sum(p.numel() for p in inline[kind].parameters())
    print(f"{kind:>4}: prompt {tuple(inline[kind]().shape)}, encoder parameters {n_params:>9,}"
          f"  (the prompt itself: {N * D:,})")

# %% [markdown]
# - The LSTM encoder has 6.8M parameters: 30% of MiniLM itself, to produce 3,840 numbers.
#   Training pays for them (gradients, two Adam moments); the deployed model never sees them.

# %% [markdown]
# ## Two ways the rows are tied, checked
#
# **In the forward pass.** Change $e_1$ (the first row of the table) and see which rows of $P$ change.
# Plain prompt tuning, as in notebook 03, is the table itself: $P = E$.

# %%
class PlainPrompt(nn.Module):  # prompt tuning: the prompt is the table
    def __init__(self, n, d):
        super().__init__()
        self.embedding = nn.Embedding(n, d)

    def forward(self):
        return self.embedding.weight  # (N, D)


torch.manual_seed(0)
encoders = {"plain": PlainPrompt(N, D), **inline}

# %%
# NBVAL_CHECK_OUTPUT
def rows_that_depend_on_e1(encoder):
    encoder = copy.deepcopy(encoder)
    with torch.no_grad():
        before = encoder().clone()
        encoder.embedding.weight[0] += 1.0  # nudge e_1 only
        changed = (encoder() - before).abs().amax(dim=1) > 1e-6  # (N,)
    return int(changed.sum())


for name, encoder in encoders.items():
    print(f"{name:>5}: {rows_that_depend_on_e1(encoder)} of {N} prompt rows depend on e_1")

# %% [markdown]
# **In the update.** Give only $p_1$ a gradient (loss $= \sum p_1$), take one SGD step, and count the
# rows of $P$ that moved. Plain: one row. Either encoder: all of them, because the step changed shared weights.

# %%
# NBVAL_CHECK_OUTPUT
def rows_moved_by_one_step(encoder, lr=0.01):
    encoder = copy.deepcopy(encoder)
    before = encoder().detach().clone()
    encoder()[0].sum().backward()  # a gradient at p_1 only
    with torch.no_grad():
        for p in encoder.parameters():
            p -= lr * p.grad
    return int(((encoder().detach() - before).abs().amax(dim=1) > 0).sum())


for name, encoder in encoders.items():
    print(f"{name:>5}: one step on p_1 moved {rows_moved_by_one_step(encoder)} of {N} prompt rows")

# %% [markdown]
# ## The same thing from `peftkit`
#
# - `peftkit.p_tuning.PromptEncoder(num_virtual_tokens, token_dim, encoder_hidden_size, kind)` is this
#   encoder; `tests/test_p_tuning.py` checks it against peft's `PromptEncoder` (LSTM and MLP).
# - Copy the inline weights in (same names, so `load_state_dict` is strict) and assert equal prompts.

# %%
# NBVAL_CHECK_OUTPUT
from peftkit.p_tuning import PromptEncoder, PTuningConfig, PTuningModel  # noqa: E402
from peftkit.prompt_tuning import PromptTuningModel  # noqa: E402

for kind, mine in inline.items():
    theirs = PromptEncoder(N, D, H, kind=kind)
    theirs.load_state_dict(mine.state_dict())  # strict: every name and shape must match
    torch.testing.assert_close(theirs(), mine(), rtol=0, atol=0)
    print(f"{kind}: peftkit PromptEncoder == inline encoder")

# %% [markdown]
# - How this differs from the paper: Liu et al. put prompt vectors *inside* a template, between the
#   input's words (e.g. `[P1..P3] x [P4..P6] [MASK]`), and keep some real "anchor" tokens such as "?".
#   peft and `peftkit` put all N vectors in front of the input, with no anchors.

# %% [markdown]
# ## The task, the model and a reference head
#
# - The topic task (8 topics), MiniLM with a fresh classifier head, utterances cut to 32 tokens.
# - BERT has learned absolute positions: the prompt takes positions 0..N-1 and the input moves
#   to N..N+T-1, as in peft.

# %%
# NBVAL_CHECK_OUTPUT
ds = topic_classification()
split = ds["train"].train_test_split(test_size=0.1, seed=0, stratify_by_column="label")
train, val, test = split["train"], split["test"], ds["test"]
topics = ds["train"].features["label"].names
torch.manual_seed(0)
pristine, tokenizer = load_encoder(num_labels=len(topics), id2label=dict(enumerate(topics)))
collate = ClassificationCollator(tokenizer, max_length=32)
assert pristine.get_input_embeddings().embedding_dim == D
print(f"train {len(train)}, validation {len(val)}, test {len(test)}; {len(topics)} topics")

# %% [markdown]
# - The question of this notebook is *how to train a prompt*, so we hold the head fixed: first train
#   the **linear probe** (the head alone, as in `00_baselines`), then freeze it and train only prompts
#   (`modules_to_save=[]`). Whatever a prompt adds is then on top of the probe.
# - The probe is logistic regression on the frozen model's pooled sentence vector: compute those
#   vectors once and train the head on them. Same result as a full forward per step (minus
#   dropout), in a fraction of the time.

# %%
@torch.no_grad()
def pooled_features(model, data):
    """What the classifier head reads: BERT's pooled [CLS] vector, (384,) per example."""
    model.eval()
    rows = []
    for batch in DataLoader(data, batch_size=64, collate_fn=collate):
        labels = batch.pop("labels")
        pooled = model.bert(**batch).pooler_output  # (B, D)
        rows += [{"features": f, "labels": y} for f, y in zip(pooled, labels)]
    return rows


# %%
class HeadOnly(nn.Module):
    """The classifier head on precomputed features, returning what `fit` and `accuracy` read."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, features, labels):
        logits = self.head(features)  # (B, labels)
        return SequenceClassifierOutput(loss=F.cross_entropy(logits, labels), logits=logits)


stack = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731

# %%
probe_model = copy.deepcopy(pristine)
features = {name: pooled_features(probe_model, data) for name, data in [("train", train), ("val", val)]}
probe = HeadOnly(probe_model.classifier)  # trains the head inside probe_model
probe_history = fit(probe, features["train"], stack, features["val"], epochs=10, batch_size=32, lr=1e-2,
                    seed=0, desc="probe")
probe_acc = accuracy(probe_model, test, collate)  # the real model with its trained head
probe_val = evaluate_loss(probe_model, val, collate)
print(f"linear probe: test accuracy {probe_acc:.3f}, validation loss {probe_val:.3f}")

# %% [markdown]
# ## Inject: the prompt in front of the real model
#
# - `PTuningModel(model, PTuningConfig(...), modules_to_save=[])` freezes the model (here with the
#   probe's head) and builds `inputs_embeds = [P; embed(x)]`, with N ones in front of the attention mask.
# - Check it against the same thing by hand, with the inline pieces.

# %%
def with_probe_head():
    model = copy.deepcopy(pristine)
    model.classifier.load_state_dict(probe_model.classifier.state_dict())
    return model


# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
mlp_model = PTuningModel(with_probe_head(), PTuningConfig(N, kind="mlp"), modules_to_save=[]).eval()
print(mlp_model.prompt_encoder)

# %%
batch = collate([test[i] for i in range(4)])
bert = mlp_model.base_model
with torch.no_grad():
    prompt = mlp_model.prompt_encoder()  # (N, D)
    embeds = bert.get_input_embeddings()(batch["input_ids"])  # (B, T, D)
    inputs_embeds = torch.cat([prompt.expand(4, -1, -1), embeds], dim=1)  # (B, N+T, D)
    mask = torch.cat([torch.ones(4, N, dtype=torch.long), batch["attention_mask"]], dim=1)  # (B, N+T)
    segments = torch.cat([torch.zeros(4, N, dtype=torch.long), batch["token_type_ids"]], dim=1)
    by_hand = bert(inputs_embeds=inputs_embeds, attention_mask=mask, token_type_ids=segments).logits
    torch.testing.assert_close(mlp_model(**batch).logits, by_hand)
print("PTuningModel == [P; embed(x)] by hand:", tuple(inputs_embeds.shape))

# %% [markdown]
# ## Three prompts, one start, one budget
#
# - **plain**: prompt tuning (`PromptTuningModel`), its N × D table set to the MLP encoder's initial
#   output, so both start from the *same* prompt and only the parameterisation differs.
# - **MLP** and **LSTM**: P-tuning with each encoder. The LSTM's initial output is a different prompt.
# - peft's plain prompt starts at $\mathcal{N}(0, 1)$ instead: rows of norm ≈ 20 where words have
#   norm ≈ 1 (notebook 03). We only measure its starting loss.

# %%
torch.manual_seed(0)
runs = {"MLP": {"model": mlp_model}}
runs["LSTM"] = {"model": PTuningModel(with_probe_head(), PTuningConfig(N, kind="lstm"), modules_to_save=[])}
plain = PromptTuningModel(with_probe_head(), num_virtual_tokens=N, modules_to_save=[])
with torch.no_grad():
    plain.prompt_encoder.embedding.weight.copy_(mlp_model.prompt_encoder())  # the MLP's starting prompt
runs = {"plain": {"model": plain}, **runs}

# %% [markdown]
# ## Trainable parameters

# %%
# NBVAL_CHECK_OUTPUT
print(f"{'':<16}{'trainable':>12}{'total':>14}{'%':>9}{'deployed':>10}")
for name, r in runs.items():
    row = count_parameters(r["model"], name, show=False)
    print(f"{name + ' prompt':<16}{row['trainable']:>12,}{row['total']:>14,}{row['percent']:>8.3f}%{N * D:>10,}")
print(f"(the probe's head, trained before and frozen now: {sum(p.numel() for p in probe.parameters()):,})")

# %% [markdown]
# - Training cost differs by 1,800×; the deployed prompt is the same 3,840 numbers for all three.

# %% [markdown]
# ## Where each prompt starts
#
# Validation loss before any training, against the probe alone (no prompt):

# %%
torch.manual_seed(0)
peft_random = PromptTuningModel(with_probe_head(), num_virtual_tokens=N, modules_to_save=[])  # N(0, 1)
start_losses = {name: evaluate_loss(r["model"], val, collate) for name, r in runs.items()}
print(f"{'no prompt (probe)':<22}{probe_val:.3f}")
print(f"{'plain, peft random':<22}{evaluate_loss(peft_random, val, collate):.3f}")
for name, loss in start_losses.items():
    print(f"{name + ' (start)':<22}{loss:.3f}")

# %% [markdown]
# - Any prompt in front of the input changes what the frozen model computes, so each run begins
#   *above* the probe and must first win that back.
# - The MLP's outputs start small (entries ≈ 0.1), so it disturbs the model less than the LSTM's
#   prompt or peft's $\mathcal{N}(0, 1)$ one.

# %% [markdown]
# ## Train
#
# - Same budget for all three: 2 epochs at batch 15 (450 = 30 × 15: 60 equal steps), the same batches
#   (`seed=0`), `lr=1e-2`.
# - Only the prompt (or its encoder) trains; the model and the probe's head are frozen.

# %%
EPOCHS, BATCH, LR = 2, 15, 1e-2
for name, r in runs.items():
    r["history"] = fit(r["model"], train, collate, val, epochs=EPOCHS, batch_size=BATCH, lr=LR, seed=0, desc=name)

# %% [markdown]
# ## Loss curves, side by side

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3), dpi=80)
for name, r in runs.items():
    loss = torch.tensor(r["history"].train_loss)
    smooth = F.avg_pool1d(loss[None], 8, stride=1)[0]  # moving average over 8 steps
    axes[0].plot(range(8, len(loss) + 1), smooth, label=name)
    axes[1].plot(range(EPOCHS + 1), [start_losses[name]] + r["history"].val_loss, "o-", label=name)
axes[1].axhline(probe_val, color="gray", ls="--", label="probe alone")
axes[0].set(xlabel="step", ylabel="training loss (8-step mean)", title="training")
axes[1].set(xlabel="epoch", ylabel="cross-entropy", title="validation", xticks=range(EPOCHS + 1))
for ax in axes:
    ax.legend()
fig.tight_layout()

# %% [markdown]
# ## Evaluate

# %%
probe_test = evaluate_loss(probe_model, test, collate)
print(f"{'':<18}{'val loss':>10}{'test loss':>10}{'test acc':>10}")
print(f"{'probe alone':<18}{probe_val:>10.3f}{probe_test:>10.3f}{probe_acc:>10.3f}")
for name, r in runs.items():
    r["val"] = r["history"].val_loss[-1]
    r["test_loss"] = evaluate_loss(r["model"], test, collate)
    r["acc"] = accuracy(r["model"], test, collate)
    print(f"{name + ' prompt':<18}{r['val']:>10.3f}{r['test_loss']:>10.3f}{r['acc']:>10.3f}")

# %%
for name, r in runs.items():
    assert r["val"] < start_losses[name] - 0.1, name  # every prompt learned something
    assert abs(r["acc"] - probe_acc) < 0.1, name  # accuracy: within a few test examples of the probe
assert runs["LSTM"]["val"] < min(runs["plain"]["val"], runs["MLP"]["val"]) - 0.15  # the LSTM got furthest
assert runs["LSTM"]["test_loss"] < probe_test - 0.15  # ...and adds to the probe on held-out data

# %% [markdown]
# - The LSTM-encoded prompt started highest and ends with clearly the lowest loss, on validation and
#   test data: same budget, same batches, same learning rate.
# - The MLP encoder, started from exactly the plain prompt's values, stays close to it. Sharing
#   weights alone changed little here; tying the rows in the forward pass (the LSTM) is what helped.
#   peft defaults to the MLP; the paper used the LSTM.
# - Test accuracy moves much less than the loss: 168 test examples, and a prompt on a 22.7M-parameter
#   encoder adds little over a trained head (notebook 03 found the same for plain prompts).
#   Full fine-tuning, in `00_baselines`, remains far above.

# %% [markdown]
# ## Export: keep the prompt, drop the encoder
#
# - `export_prompt()` runs the encoder once and replaces it by a plain table holding $P = f_\theta(E)$,
#   which is what peft saves for P-tuning. The model's outputs do not change.
# - Save before and after: the checkpoint shrinks from the encoder's size to $N \cdot D \cdot 4$ bytes.

# %%
lstm = runs["LSTM"]["model"].eval()
scratch = tempfile.TemporaryDirectory()  # its name is never printed
outputs = Path(scratch.name)
with torch.no_grad():
    before = lstm(**batch).logits
encoder_file = lstm.save(outputs / "lstm_encoder.safetensors")
prompt = lstm.export_prompt()  # (N, D)
prompt_file = lstm.save(outputs / "lstm_prompt.safetensors")
with torch.no_grad():
    torch.testing.assert_close(lstm(**batch).logits, before)
print("exported:", lstm.exported, tuple(prompt.shape), "— logits unchanged")

# %%
# NBVAL_CHECK_OUTPUT
for name, r in runs.items():
    if name != "LSTM":
        r["model"].save(outputs / f"{name}.safetensors")
files = {"plain prompt": outputs / "plain.safetensors", "MLP encoder": outputs / "MLP.safetensors",
         "LSTM encoder": encoder_file, "LSTM, exported": prompt_file}
for name, path in files.items():
    print(f"{name:<16}{path.stat().st_size / 1024:>10,.1f} KiB")
print(f"N·D·4 bytes = {N * D * 4 / 1024:.1f} KiB, plus a small header")

# %% [markdown]
# - The encoder checkpoint is what you would save to *resume training*; the exported prompt is what you
#   ship: the same size as plain prompt tuning's, about 1,800× smaller than the LSTM encoder.
# - Loading it into a fresh model (with the probe's head) reproduces the trained model exactly:

# %%
fresh = PTuningModel(with_probe_head(), PTuningConfig(N, kind="lstm"), modules_to_save=[])
config = fresh.load(prompt_file)  # an exported file turns the fresh encoder into a table first
print("saved config:", {k: config[k] for k in ("technique", "kind", "num_virtual_tokens", "exported")})
assert fresh.exported and accuracy(fresh, test, collate) == accuracy(lstm, test, collate)
scratch.cleanup()

# %% [markdown]
# ## Summary
#
# - **P-tuning** trains a prompt encoder $f_\theta$ and uses $P = f_\theta(E)$ as the soft prompt; the model
#   and (here) its head stay frozen.
# - **MLP encoder**: each row through a shared 3-layer MLP. **LSTM encoder** (the paper's): a
#   bidirectional LSTM ties every row to every other, then a small MLP.
# - Why: with a free prompt each row moves alone; through shared weights every update moves all rows.
#   On our task and budget the LSTM encoder reached a clearly lower loss than the free prompt; the MLP
#   encoder, from the same start as the free prompt, stayed close to it.
# - The cost is during training only (447K and 6.8M parameters here); `export_prompt()` keeps $N \times D$
#   numbers, the same artifact as prompt tuning.
# - Honest scale note: on a 22.7M-parameter encoder, any prompt adds little accuracy over a trained
#   linear head; full fine-tuning (`00_baselines`) stays well ahead.
#
# ## Exercises
#
# 1. **Learning-rate sensitivity.** Re-run the plain and LSTM prompts at `lr=3e-3` and `lr=3e-2`. Which
#    one's final validation loss changes more? Can a larger learning rate let the plain prompt catch up?
# 2. **Start matters.** Train `peft_random` (peft's $\mathcal{N}(0, 1)$ start) with the same budget.
#    How much of the gap to the MLP run comes from the start rather than the encoder?
# 3. **Count the MLP encoder.** Write its parameter count as a formula in N, D and H (weights and
#    biases of three linear layers, plus the table), and check it for a small encoder, H = 64:

# %%
n, d, h = N, D, 64
my_count = n * d + (d * h + h) + (h * h + h) + (h * d + d)  # replace with your own formula
assert my_count == sum(p.numel() for p in PromptEncoder(n, d, h, kind="mlp").parameters()), my_count
print(f"MLP encoder with H=64: {my_count:,} parameters, for a prompt of {n * d:,}")

# %% [markdown]
# 4. **Count the LSTM.** One LSTM direction of one layer has $4H(\text{in} + H) + 8H$ parameters (four
#    gates; two bias vectors). Layer 1 reads D, layer 2 reads 2H. Check your total against
#    `PromptEncoder(N, D, 64, kind="lstm")`, then explain why H = D makes it 6.8M.
# 5. **A smaller encoder.** Train the LSTM with `PTuningConfig(N, encoder_hidden_size=64, kind="lstm")`.
#    Does the exported file change size? Does the validation loss?

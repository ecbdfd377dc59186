# %% [markdown]
# # 03 · Prompt tuning: learn the prompt, freeze the model
#
# - A **hard prompt** is words you write in front of the input ("What is the topic of this question?").
# - A **soft prompt** is the same slot filled with free vectors, found by gradient descent.
# - Everything else stays frozen: the trained artifact is an N × D matrix, a few thousand numbers.
# - Paper: Lester, Al-Rfou & Constant, *The Power of Scale for Parameter-Efficient Prompt Tuning* (EMNLP 2021).
#
# Plan: hard vs soft → build it inline → check against `peftkit` → three initialisations on the topic
# task (MiniLM) → what the learned vectors "mean" → SmolLM2 writes the label → the honest finding about scale.

# %%
import copy
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from peftkit.models import load_causal_lm, load_encoder, quiet

quiet()
from peftkit.data import ClassificationCollator, topic_classification  # noqa: E402
from peftkit.train import accuracy, count_parameters, fit, generate  # noqa: E402

# %% [markdown]
# ## The data and the model
#
# - The topic task: short utterances, 8 topics. We carve a validation split from train.
# - MiniLM (all-MiniLM-L6-v2): a 22.7M-parameter BERT encoder with a fresh 8-way classifier head.
# - Utterances are cut to 24 tokens (9 in 10 fit): short sequences keep every run quick.

# %%
# NBVAL_CHECK_OUTPUT
ds = topic_classification()
split = ds["train"].train_test_split(test_size=0.1, seed=0, stratify_by_column="label")
train, val, test = split["train"], split["test"], ds["test"]
topics = ds["train"].features["label"].names
id2label = dict(enumerate(topics))
print(f"train {len(train)}, validation {len(val)}, test {len(test)}; topics: {topics}")

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
pristine, tokenizer = load_encoder(num_labels=len(topics), id2label=id2label)  # one head init for every run
model = copy.deepcopy(pristine).eval()
collate = ClassificationCollator(tokenizer, max_length=24)
embedding_table = model.get_input_embeddings().weight  # (V, D): the model's word embeddings E
print(f"E: {tuple(embedding_table.shape)}  (vocabulary × width)")

# %% [markdown]
# ## Hard prompt vs soft prompt
#
# - A model never sees words: it sees rows of its embedding table $E \in \mathbb{R}^{V \times D}$.
# - A hard prompt of N tokens with ids $t_1..t_N$ is the matrix $P = [E_{t_1}; \dots; E_{t_N}] \in \mathbb{R}^{N \times D}$:
#   N points from a finite set of V.
# - A soft prompt drops that restriction: $P$ is any $N \times D$ matrix, trained by gradient descent.
#
# $$\text{inputs\_embeds} = [\,p_1, \dots, p_N,\; E_{x_1}, \dots, E_{x_T}\,] \in \mathbb{R}^{(N+T) \times D}, \qquad
# y = f_{\text{frozen}}(\text{inputs\_embeds})$$
#
# - The attention mask gets N ones in front: every input token may attend to the prompt.
# - Trained: $P$ ($N \cdot D$ numbers) and, for a classifier, its fresh head. Frozen: everything else.

# %% [markdown]
# ## Build it inline
#
# - Our hard prompt: a question about the task. The soft prompt is one `nn.Parameter` of shape (N, D),
#   started from the hard prompt's rows, so that before training the two must give the same outputs.

# %%
# NBVAL_CHECK_OUTPUT
INIT_TEXT = "what is the topic of this question?"
hard_ids = tokenizer(INIT_TEXT)["input_ids"]
N = len(hard_ids)  # the prompt length: one virtual token per token of the hard prompt
print(N, tokenizer.convert_ids_to_tokens(hard_ids))
prompt = nn.Parameter(embedding_table[hard_ids].detach().clone())  # (N, D)
print(tuple(prompt.shape), f"= {prompt.numel():,} trainable numbers")

# %% [markdown]
# - Prepending is the whole technique: embed the input, concatenate the prompt in front, extend the mask.

# %%
def prepend_prompt(prompt, input_ids, attention_mask):
    embeds = embedding_table[input_ids]  # (B, T, D)
    batch = input_ids.shape[0]
    inputs_embeds = torch.cat([prompt.expand(batch, -1, -1), embeds], dim=1)  # (B, N+T, D)
    ones = attention_mask.new_ones(batch, prompt.shape[0])  # (B, N)
    return inputs_embeds, torch.cat([ones, attention_mask], dim=1)  # (B, N+T)


# %%
# NBVAL_CHECK_OUTPUT
batch = collate([test[i] for i in range(4)])
inputs_embeds, mask = prepend_prompt(prompt, batch["input_ids"], batch["attention_mask"])
print("input ids", tuple(batch["input_ids"].shape), "→ inputs_embeds", tuple(inputs_embeds.shape),
      "mask", tuple(mask.shape))
with torch.no_grad():
    soft_logits = model(inputs_embeds=inputs_embeds, attention_mask=mask).logits  # (B, labels)
print("logits", tuple(soft_logits.shape))

# %% [markdown]
# - The hard prompt, the usual way: put its token ids in front of the input ids.
# - Same vectors at the same positions → the same logits. A soft prompt *is* a hard prompt that
#   is allowed to leave the vocabulary.

# %%
hard_batch = torch.cat([torch.tensor(hard_ids).expand(4, -1), batch["input_ids"]], dim=1)  # (B, N+T)
with torch.no_grad():
    hard_logits = model(input_ids=hard_batch, attention_mask=mask).logits
torch.testing.assert_close(soft_logits, hard_logits)
print("soft prompt initialised from the text == hard prompt: OK")

# %% [markdown]
# ## The same thing from `peftkit`
#
# - `PromptTuningModel(model, num_virtual_tokens=N, init="text", init_text=..., tokenizer=...)` wraps the
#   frozen model; `forward(input_ids, attention_mask, labels)` does what `prepend_prompt` did.
# - Its prompt lives in `prompt_encoder.embedding.weight`, peft's name (`PromptEmbedding`).
# - Assert it agrees with the inline build, so the notebook and the package cannot drift apart.

# %%
from peftkit.prompt_tuning import PromptTuningModel, SoftPrompt  # noqa: E402

wrapped = PromptTuningModel(model, num_virtual_tokens=N, init="text", init_text=INIT_TEXT, tokenizer=tokenizer)
torch.testing.assert_close(wrapped.prompt_encoder(), prompt)
with torch.no_grad():
    torch.testing.assert_close(wrapped.eval()(**batch).logits, soft_logits)
print("peftkit PromptTuningModel == inline prompt: OK")

# %% [markdown]
# ## Three ways to start the prompt
#
# Lester et al. (section 3) compare three initialisations of $P$:
# - **random**: $p_i \sim \mathcal{N}(0, I)$, what peft does by default;
# - **vocab**: rows of $E$ for random token ids;
# - **text**: rows of $E$ for a phrase about the task (repeated or cut to N tokens).
#
# A real embedding row is small: $\lVert E_t \rVert \approx 1$ in MiniLM. A random $p_i$ has
# $\lVert p_i \rVert \approx \sqrt{D} = \sqrt{384} \approx 19.6$, far outside where any word lives.

# %%
# NBVAL_CHECK_OUTPUT
INITS = ("random", "vocab", "text")
word_embeddings = model.get_input_embeddings()
starts = {}
for init in INITS:
    torch.manual_seed(0)
    starts[init] = SoftPrompt(N, 384, init, word_embeddings, INIT_TEXT, tokenizer)().detach()
vocab_norms = embedding_table.detach().norm(dim=-1)  # (V,)
print(f"vocabulary rows: median norm {vocab_norms.median():.2f}, max {vocab_norms.max():.2f}")
for init, p in starts.items():
    print(f"{init:>7}: median prompt-row norm {p.norm(dim=-1).median():.2f}")

# %%
fig, ax = plt.subplots(figsize=(8, 3), dpi=80)
ax.hist(vocab_norms.numpy(), bins=100, color="lightgray", label="vocabulary rows of E")
for init, color in zip(INITS, ("C3", "C0", "C2")):
    for k, norm in enumerate(starts[init].norm(dim=-1)):
        ax.axvline(norm, color=color, alpha=0.6, label=f"{init} prompt rows" if k == 0 else None)
ax.set_xscale("log")
ax.set(xlabel="row norm ‖·‖ (log scale)", ylabel="tokens", title="Where each initialisation starts")
ax.legend()
fig.tight_layout()

# %% [markdown]
# - In BERT-style encoders the embedding LayerNorm rescales every position, which softens the size
#   mismatch; in a pre-norm decoder (Llama, SmolLM2) the big vectors enter the residual stream as they are.
# - Adam moves each number by about `lr` per step, whatever its scale: with `lr=0.1`, a vocab/text
#   prompt (entries ~0.06) is rewritten within a few steps, a random one (entries ~1) only nudged.

# %% [markdown]
# ## What trains: the prompt and the head
#
# - For a classifier, peft also trains the fresh head (`modules_to_save`): the prompt alone would have
#   to steer the model towards a head that was never trained. `peftkit` does the same by default.
# - Trainable: $N \cdot D = 10 \cdot 384$ prompt numbers, plus the head's $8 \cdot 384 + 8$.

# %%
# NBVAL_CHECK_OUTPUT
count_parameters(wrapped, "prompt + head")
print(sorted((name, tuple(t.shape)) for name, t in wrapped.prompt_state_dict().items()))

# %% [markdown]
# ## The reference: the head alone (linear probe)
#
# - Freeze everything but `classifier`: the probe of notebook `00_baselines`.
# - Same head initialisation and budget as the prompt runs below (2 epochs, `lr=0.1`): the only
  difference is the prompt. (Notebook `00_baselines` trains its probe longer, at `lr=0.01`.)

# %%
EPOCHS, LR = 2, 0.1
probe = copy.deepcopy(pristine)
probe.requires_grad_(False)
probe.classifier.requires_grad_(True)
probe_history = fit(probe, train, collate, val, epochs=EPOCHS, batch_size=32, lr=LR, seed=0, desc="probe")
probe_acc = accuracy(probe, test, collate)
print(f"probe: test accuracy {probe_acc:.3f}, validation loss {probe_history.val_loss[-1]:.3f}")

# %% [markdown]
# ## Train the three prompts
#
# - Same model, data, seed and budget; only the prompt's starting point differs.
# - Soft prompts need a large learning rate (Lester et al. use 0.3); 0.1 works here for prompt and head.

# %%
runs = {}
for init in INITS:
    torch.manual_seed(0)
    pt = PromptTuningModel(copy.deepcopy(pristine), num_virtual_tokens=N, init=init, init_text=INIT_TEXT,
                           tokenizer=tokenizer)
    start = pt.prompt_encoder().detach().clone()
    torch.testing.assert_close(start, starts[init])  # the same starts as in the plot above
    history = fit(pt, train, collate, val, epochs=EPOCHS, batch_size=32, lr=LR, seed=0, desc=init)
    runs[init] = {"model": pt, "start": start, "history": history, "acc": accuracy(pt, test, collate)}

# %%
fig, ax = plt.subplots(figsize=(8, 3), dpi=80)
steps_per_epoch = len(probe_history.train_loss) / EPOCHS
for name, history in [("probe (head only)", probe_history)] + [(k, r["history"]) for k, r in runs.items()]:
    epochs = [(s + 1) / steps_per_epoch for s in range(len(history.train_loss))]
    ax.plot(epochs, history.train_loss, label=name, ls="--" if name.startswith("probe") else "-")
ax.set(xlabel="epoch", ylabel="training loss", title="MiniLM on the topic task: prompt + head vs head alone")
ax.legend()
fig.tight_layout()

# %%
print(f"{'':<18}{'trainable':>10}{'val loss':>10}{'test acc':>10}")
print(f"{'probe (head only)':<18}{count_parameters(probe, show=False)['trainable']:>10,}"
      f"{probe_history.val_loss[-1]:>10.3f}{probe_acc:>10.3f}")
for init, r in runs.items():
    trainable = count_parameters(r["model"], show=False)["trainable"]
    print(f"{'prompt ' + init:<18}{trainable:>10,}{r['history'].val_loss[-1]:>10.3f}{r['acc']:>10.3f}")
chance = 1 / len(topics)
assert all(r["acc"] > 2 * chance for r in runs.values())  # every start learns the task...
assert max(r["acc"] for r in runs.values()) < probe_acc + 0.15  # ...but none gets far beyond the head alone

# %% [markdown]
# - All three starts learn the task and end close together: with `lr=0.1` and Adam, the start matters
#   less than in Lester et al., where small models were sensitive to it.
# - The head alone, with the same budget, gets about as far. On a 22.7M-parameter encoder, 3,840 prompt
#   numbers in front of the input add little over a trained linear head.
# - Full fine-tuning (notebook `00_baselines`) is well above both.

# %% [markdown]
# ## The prompt alone
#
# - `modules_to_save=[]` trains only $P$: the head stays as initialised (random).
# - Now the prompt must move the frozen model's sentence vector into the regions a random head
#   happens to map to each topic.

# %%
alone = PromptTuningModel(copy.deepcopy(pristine), num_virtual_tokens=N, init="text", init_text=INIT_TEXT,
                          tokenizer=tokenizer, modules_to_save=[])
count_parameters(alone, "prompt alone")
alone_history = fit(alone, train, collate, val, epochs=EPOCHS, batch_size=32, lr=LR, seed=0, desc="alone")
alone_acc = accuracy(alone, test, collate)
print(f"prompt alone: test accuracy {alone_acc:.3f} (chance {chance:.3f})")
assert alone_acc < probe_acc - 0.2  # far below anything with a trained head

# %% [markdown]
# ## What did the prompt learn? Nearest vocabulary tokens
#
# - For each learned vector $p_i$, find the token whose embedding is closest in cosine similarity:
#   $\text{nearest}(p_i) = \arg\max_t \cos(p_i, E_t)$.
# - Lester et al. found learned prompts often sit near words related to the task (and to the labels).

# %%
# NBVAL_CHECK_OUTPUT
def nearest_tokens(vectors, table, tokenizer):
    """For each row of `vectors` (N, D): the closest row of `table` (V, D) by cosine → (tokens, cosines)."""
    cos = F.normalize(vectors, dim=-1) @ F.normalize(table, dim=-1).T  # (N, V)
    best = cos.max(dim=-1)
    return tokenizer.convert_ids_to_tokens(best.indices.tolist()), best.values


tokens, cos = nearest_tokens(starts["text"], embedding_table.detach(), tokenizer)
print("text start :", tokens)  # the init itself: each row *is* a token
assert tokens == tokenizer.convert_ids_to_tokens(hard_ids) and torch.allclose(cos, torch.ones(N))

# %%
for init, r in runs.items():
    learned = r["model"].prompt_encoder().detach()
    tokens, cos = nearest_tokens(learned, embedding_table.detach(), tokenizer)
    r["moved"] = F.cosine_similarity(learned, r["start"], dim=-1).mean()  # 1: still where it started
    print(f"{init:>6}: cos(start, learned) {r['moved']:.2f}; nearest (cos {cos.mean():.2f}): {tokens}")
    assert cos.max() < 0.9, init  # no learned vector is (close to) a real token any more
assert runs["random"]["moved"] > 0.8 > 0.6 > runs["text"]["moved"]  # same lr: a nudge vs a rewrite

# %% [markdown]
# - The learned vectors are no longer words: the nearest tokens have low cosine similarity and read
#   as noise. That is the soft prompt's advantage (a continuous search space) and its cost (you can't
#   read it, and it only means something to this exact frozen model).
# - A random start stays a random-looking vector: its nearest "tokens" are arbitrary.

# %% [markdown]
# ## A generative model: SmolLM2 writes the label
#
# - Lester et al. tune prompts for a text-to-text model: the answer is a *word*, there is no head to
#   train. That is prompt tuning in its pure form: only $P$ trains.
# - SmolLM2-135M-Instruct (a Llama decoder, 30 layers, D = 576) on four of the topics.
#   Each topic name is a single token, so "generate the label" is one step of greedy decoding.

# %%
# NBVAL_CHECK_OUTPUT
LM_TOPICS = ("coding", "emotion", "science", "sports")
lm_ds = topic_classification(topics=LM_TOPICS)
lm, lm_tokenizer = load_causal_lm()
lm.eval()
print(f"train {len(lm_ds['train'])}, test {len(lm_ds['test'])}; topic → token ids:",
      {t: lm_tokenizer(" " + t, add_special_tokens=False)["input_ids"] for t in LM_TOPICS})

# %% [markdown]
# - Input: `Text: <first 12 words>\nTopic:`; target: ` <topic>` and the end-of-sequence token.
# - Labels are -100 on the input and the padding, so the loss counts only the answer.
# - The hard prompt is an instruction in front; the soft prompt takes its place.

# %%
INSTRUCTION = "Which topic: coding, emotion, science or sports?"


def lm_query(text, hard_prompt=False):
    text = " ".join(text.split()[:12])  # enough words for the topic, short enough to train fast
    return (INSTRUCTION + "\n" if hard_prompt else "") + f"Text: {text}\nTopic:"


def lm_collate(examples):
    rows = []
    for e in examples:
        query = lm_tokenizer(lm_query(e["text"]), add_special_tokens=False)["input_ids"]
        answer = lm_tokenizer(" " + LM_TOPICS[e["label"]], add_special_tokens=False)["input_ids"]
        answer = answer + [lm_tokenizer.eos_token_id]
        rows.append((query + answer, [-100] * len(query) + answer))
    width = max(len(ids) for ids, _ in rows)
    pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    return {"input_ids": torch.tensor([pad(ids, lm_tokenizer.pad_token_id) for ids, _ in rows]),
            "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _ in rows]),
            "labels": torch.tensor([pad(labels, -100) for _, labels in rows])}


# %% [markdown]
# - Evaluation: left-pad the test queries (each row must end at its last token), greedily generate one
#   token, and count it right if it is the topic word.

# %%
def label_accuracy(model, hard_prompt=False):
    side, lm_tokenizer.padding_side = lm_tokenizer.padding_side, "left"
    queries = [lm_query(t, hard_prompt) for t in lm_ds["test"]["text"]]
    batch = dict(lm_tokenizer(queries, padding=True, add_special_tokens=False, return_tensors="pt"))
    lm_tokenizer.padding_side = side
    answers = [a.lower() for a in generate(model, lm_tokenizer, batch, max_new_tokens=1)]
    right = [a == LM_TOPICS[y] for a, y in zip(answers, lm_ds["test"]["label"])]
    return sum(right) / len(right), answers


hard_acc, hard_answers = label_accuracy(lm, hard_prompt=True)
print(f"hard prompt, zero-shot: accuracy {hard_acc:.3f} (chance {1 / len(LM_TOPICS):.2f})")
print("first answers:", hard_answers[:8])

# %% [markdown]
# - The soft prompt: one virtual token per token of the instruction, so `init="text"` starts exactly
#   at the hard prompt.
# - The only trainable tensor is $N \times 576$. No head: the frozen LM head already maps to the topic words.

# %%
# NBVAL_CHECK_OUTPUT
LM_N = len(lm_tokenizer(INSTRUCTION)["input_ids"])
lm_table = lm.get_input_embeddings().weight.detach()
torch.manual_seed(0)
lm_pt = PromptTuningModel(lm, num_virtual_tokens=LM_N, init="text", init_text=INSTRUCTION, tokenizer=lm_tokenizer)
count_parameters(lm_pt, "SmolLM2 soft prompt")
print(f"word rows: median norm {lm_table.norm(dim=-1).median():.2f}; a random N(0, 1) row: ~{576 ** 0.5:.0f}")

# %% [markdown]
# - The three starts, before any training: the loss on the same 16 training examples.
# - SmolLM2 is a pre-norm decoder: no LayerNorm right after the embeddings, so a random row of norm 24
#   enters the residual stream ~8× larger than any word.

# %%
first_batch = lm_collate([lm_ds["train"][i] for i in range(16)])
start_loss = {}
for init in ("text", "vocab", "random"):
    torch.manual_seed(0)
    pt = PromptTuningModel(lm, num_virtual_tokens=LM_N, init=init, init_text=INSTRUCTION, tokenizer=lm_tokenizer)
    with torch.no_grad():
        start_loss[init] = pt.eval()(**first_batch).loss.item()
    print(f"{init:>6} start: loss {start_loss[init]:.2f}")
assert start_loss["random"] > start_loss["text"] + 2  # random vectors are nothing the model has seen

# %% [markdown]
# - Train the text start (the instruction) for 16 steps of 8 examples: about half an epoch.

# %%
LM_STEPS = 16
torch.manual_seed(0)
lm_pt = PromptTuningModel(lm, num_virtual_tokens=LM_N, init="text", init_text=INSTRUCTION, tokenizer=lm_tokenizer)
lm_history = fit(lm_pt, lm_ds["train"], lm_collate, epochs=1, batch_size=8, lr=LR, max_steps=LM_STEPS, seed=0,
                 desc="SmolLM2 prompt")
soft_acc, soft_answers = label_accuracy(lm_pt)
print(f"soft prompt: accuracy {soft_acc:.3f} (hard prompt {hard_acc:.3f}); first answers {soft_answers[:6]}")
assert soft_acc > hard_acc + 0.2  # the learned prompt beats the words it started from

# %%
fig, ax = plt.subplots(figsize=(8, 3), dpi=80)
ax.plot(range(1, LM_STEPS + 1), lm_history.train_loss, "o-", color="C2", label="text start, training")
for init, color in [("vocab", "C0"), ("random", "C3")]:
    ax.axhline(start_loss[init], color=color, ls="--", label=f"{init} start, before training")
ax.set(xlabel="step", ylabel="loss", title="SmolLM2: only the soft prompt trains")
ax.legend()
fig.tight_layout()

# %% [markdown]
# - From the instruction, a few steps are enough to make the frozen model answer with a topic word.
# - The vocab and random starts would begin well above where the text start begins, and have to spend
#   their budget getting back (exercise 3). On small models initialisation matters, as in Lester et al.

# %%
learned = lm_pt.prompt_encoder().detach()
tokens, cos = nearest_tokens(learned, lm_table, lm_tokenizer)
print("instruction :", lm_tokenizer.convert_ids_to_tokens(lm_tokenizer(INSTRUCTION)["input_ids"]))
print("learned ≈   :", tokens)
print("cosine      :", [round(c, 2) for c in cos.tolist()])

# %% [markdown]
# - On SmolLM2 the learned prompt stays close to its instruction: most vectors are still nearest to the
#   word they started from. (Adam's step of ~0.1 is about one standard deviation of SmolLM2's
#   embedding entries, against two for MiniLM's, and there were fewer steps.)

# %% [markdown]
# ## The honest finding about scale
#
# - Lester et al. (Figure 1, SuperGLUE): prompt tuning trails full fine-tuning by a wide margin for
#   T5-Small and T5-Base, and closes the gap only around 10 billion parameters (T5-XXL).
# - Our models have 22.7M and 135M parameters: two to three orders of magnitude below that.
# - What we measured fits that picture:
#   - MiniLM: prompt + head ≈ the head alone, below full fine-tuning in `00_baselines`;
#     the prompt alone, with a frozen head, stays near chance.
#   - SmolLM2: with the task phrased as "write the next word", the prompt alone does work and beats the
#     hand-written instruction, but it needs the right start; a random start lags behind.
# - Why scale helps (the paper's reading): a large model already has many behaviours, and a few vectors
#   in its context can select one. A small model has fewer to choose from: it has to be changed, which is
#   what adapters and LoRA (notebooks 01 and 02) do.

# %% [markdown]
# ## Save: the whole result is a few kilobytes
#
# - `save(path)` writes only the trained tensors (prompt, and head if trained) plus the config,
#   as one safetensors file. Sizes below are the exact file sizes.

# %%
# NBVAL_CHECK_OUTPUT
best = runs["text"]["model"]
with tempfile.TemporaryDirectory() as folder:
    path = best.save(Path(folder) / "minilm_prompt.safetensors")
    lm_path = lm_pt.save(Path(folder) / "smollm2_prompt.safetensors")
    print(f"MiniLM prompt + head: {path.stat().st_size:,} bytes; SmolLM2 prompt: {lm_path.stat().st_size:,} bytes")
    sizes = [4 * sum(p.numel() for p in m.parameters()) / 1e6 for m in (pristine, lm)]
    print(f"the frozen models they steer: {sizes[0]:.0f} MB and {sizes[1]:.0f} MB (float32)")
    torch.manual_seed(1)
    fresh = PromptTuningModel(copy.deepcopy(pristine), num_virtual_tokens=N)  # untrained until loaded
    config = fresh.load(path)
print(config)
with torch.no_grad():
    torch.testing.assert_close(fresh.eval()(**batch).logits, best.eval()(**batch).logits)
print("reloaded prompt gives the same logits: OK")

# %% [markdown]
# ## Summary
#
# - A soft prompt is a hard prompt allowed to leave the vocabulary: $N$ free vectors prepended to
#   the input embeddings of a frozen model. Started from a phrase's rows, it reproduces that phrase exactly.
# - The whole build is ~10 lines: embed, concatenate, extend the mask (and pad labels with -100 for an LM).
# - Trainable: $N \cdot D$ numbers (3,840 for MiniLM, a few thousand for SmolLM2); saved in kilobytes.
# - Initialisation: random N(0, 1) starts ~20× larger than any word; vocab and text start on real words.
#   With Adam at a large learning rate all three ended close together here.
# - Learned vectors drift away from every word: nearest tokens are not a readable prompt.
# - Scale matters: on 22.7M and 135M models, prompt tuning is a weak fine-tuner (≈ a linear probe on
#   MiniLM; better than a hand-written prompt on SmolLM2). Lester et al. close the gap only near 10B.

# %% [markdown]
# ## Exercises
#
# 1. **Prompt length.** Train MiniLM's prompt with `num_virtual_tokens` 1, 5 and 30. Check first that the
#    number of trainable parameters is what you expect (cell below), then compare the validation loss.
# 2. **Learning rate vs embedding scale.** Train the `text` init with `lr` 0.01, 0.03 and 0.3. Which
#    rates keep the learned vectors close to their tokens (nearest-token cosine)? Why does the answer
#    depend on the size of the entries of $E$?
# 3. **Random init on the decoder.** Train SmolLM2's prompt from `init="vocab"` and `init="random"` with
#    the same 16 steps. How far behind the text start do they end?
# 4. **Is the prompt doing anything?** For the trained MiniLM model, replace the prompt by zeros (keep the
#    head) and measure the accuracy again.
# 5. **A better hard prompt.** Give SmolLM2 its chat template (`lm_tokenizer.apply_chat_template`) or two
#    solved examples per topic in front of the query. How close does the best hand-written prompt get
#    to the soft one, and how many more tokens does it cost per query?

# %%
def trainable_numbers(num_virtual_tokens, width=384, labels=8, head=True):
    return num_virtual_tokens * width + (labels * width + labels if head else 0)


exercise = PromptTuningModel(copy.deepcopy(pristine), num_virtual_tokens=5)
assert count_parameters(exercise, show=False)["trainable"] == trainable_numbers(5)
print("exercise 1 check: OK")

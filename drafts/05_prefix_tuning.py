# %% [markdown]
# # 05 · Prefix-tuning: learned keys and values in every layer
#
# Prompt tuning (notebook 03) learns a few vectors that are glued to the **input** of a frozen model. Everything
# the model later does with them is computed by its frozen weights.
#
# Li & Liang's **prefix-tuning** (ACL 2021) goes further: in **every attention layer** it prepends learned
# **keys and values**, as if the model had already read P "virtual" tokens. It was designed for **generation**
# (table-to-text, summarisation), so we teach it on the causal LM and the data-to-text task:
#
# - build the prefix, its reparameterisation MLP and the cache that carries it, inline;
# - check the inline build against `peftkit.prefix_tuning`;
# - train SmolLM2-135M with and without the MLP, compare slot error rates and generations;
# - look at how much attention goes to the prefix, and export it: ~0.1% of the model.

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto: no widgets here, we use text bars

import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.testing import assert_close
from transformers import DynamicCache

from peftkit.data import CausalLMCollator, data_to_text, generation_batch, slot_error_rate
from peftkit.models import load_causal_lm, quiet
from peftkit.train import count_parameters, fit, generate

quiet()

# %% [markdown]
# ## From prompt tuning to prefixes
#
# - **Prompt tuning** changes one thing: the input sequence.
#   $h^{(0)} = [\,p_1,\dots,p_N,\;E(x_1),\dots,E(x_T)\,]$. Layer $l$ then sees keys and values
#   *computed* from the prompt by frozen weights: the prompt's influence must survive 30 frozen layers.
# - **Prefix-tuning** gives every layer $l$ its own $P$ learned keys and values, concatenated along the sequence:
#
# $$K^{(l)} = [\,P_K^{(l)}\,;\;X^{(l)} W_K^{(l)}\,] \qquad V^{(l)} = [\,P_V^{(l)}\,;\;X^{(l)} W_V^{(l)}\,] \qquad
# \mathrm{head} = \mathrm{softmax}\!\left(\frac{Q K^{(l)\top}}{\sqrt{d}}\right) V^{(l)}$$
#
# - The prefix positions have **no queries and no hidden states**: nothing is computed *for* them, they are only
#   attended *to*. Each layer's prefix is free, so it can steer attention at all depths.

# %% [markdown]
# ```
#          prompt tuning                                 prefix-tuning
#   (learned vectors enter at the bottom)         (learned keys/values in every layer)
#
#   layer 30   k,v of p  │ h  h  h  h              layer 30   [Pk,Pv]₃₀ │ h  h  h  h
#     ...      (computed │                           ...                │
#   layer 1     by frozen│ h  h  h  h              layer 1    [Pk,Pv]₁  │ h  h  h  h
#   input       weights) │                         input                │
#              p  p  p   │ x1 x2 x3 x4                                  │ x1 x2 x3 x4
#              ▲ learned: N × 576                             ▲ learned: P × 30 layers × (K, V)
# ```
#
# The right-hand side is exactly what a decoder's **key/value cache** holds after it has read $P$ tokens. So the
# prefix can be handed to the model *as a cache*: the model thinks it already read P tokens, and our real tokens
# continue at positions $P, P{+}1, \dots$

# %% [markdown]
# ## The model and the shapes
#
# SmolLM2 uses **grouped-query attention**: 9 query heads share 3 key/value heads. The cache (and so the prefix)
# only stores the 3 key/value heads.

# %%
# NBVAL_CHECK_OUTPUT
lm, tok = load_causal_lm()
cfg = lm.config
L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
print(f"{L} layers, {cfg.num_attention_heads} query heads, {H} key/value heads, head_dim {D}")
model_params = sum(p.numel() for p in lm.parameters())
print(f"{model_params:,} parameters")

# %% [markdown]
# With $P = 10$ prefix positions, one position of one layer needs $H \cdot d$ numbers for its keys and as many for
# its values. Stacking all layers gives one flat row per prefix position:
#
# $$\text{trained numbers} = P \times L \times 2 \times H \times d$$

# %%
# NBVAL_CHECK_OUTPUT
P = 10
token_dim = H * D  # one layer's keys (or values) at one prefix position
table_dim = L * 2 * token_dim  # keys and values of every layer at one prefix position
print(f"token_dim = {H} x {D} = {token_dim}")
print(f"table_dim = {L} x 2 x {token_dim} = {table_dim:,}")
print(f"table: ({P}, {table_dim:,}) = {P * table_dim:,} numbers = {100 * P * table_dim / model_params:.3f}% of the model")

# %% [markdown]
# ## Build it inline · 1. the table
#
# The simplest prefix is the table itself as a parameter: an `nn.Embedding` with one row per prefix position
# (peft's default, and P-tuning v2's "deep prompts"). A `view` and a `permute` turn a row-per-position table into
# the cache layout: per layer, keys then values, each `(heads, P, head_dim)`.

# %%
def to_layers(flat):
    kv = flat.view(P, L, 2, H, D)  # (P, L, 2, H, D): 2 = key, value
    return kv.permute(1, 2, 3, 0, 4)  # (L, 2, H, P, D): the cache layout, minus the batch

torch.manual_seed(0)
table = nn.Embedding(P, table_dim)  # (P, L * 2 * H * D)

# %% [markdown]
# Check the layout: one row of the table, viewed as (layers, key/value, heads, head_dim), must land at the same
# place in the per-layer tensor.

# %%
# NBVAL_CHECK_OUTPUT
kv = to_layers(table.weight)
print("table", tuple(table.weight.shape), "-> per layer", tuple(kv.shape))
print("layer 0 keys", tuple(kv[0, 0].shape), "values", tuple(kv[0, 1].shape))
assert torch.equal(kv[3, 1, 2, 7], table.weight[7].view(L, 2, H, D)[3, 1, 2])  # layer 3, value, head 2, position 7

# %% [markdown]
# ## Build it inline · 2. the reparameterisation MLP
#
# Li & Liang found that optimising the table directly is unstable and sensitive to the learning rate. They
# produce it instead from a small embedding $E$ (P × 192) through an MLP:
#
# $$[\,P_K\,;\,P_V\,]_{\text{all layers}} = W_2\,\tanh(W_1 E + b_1) + b_2$$
#
# After training the MLP is run **once** and thrown away: only its output, the table, is needed to generate.

# %%
class InlinePrefixMLP(nn.Module):
    def __init__(self, hidden=512):
        super().__init__()
        self.embedding = nn.Embedding(P, token_dim)  # E: (P, 192)
        self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, table_dim))

    def forward(self):
        return to_layers(self.transform(self.embedding.weight))  # (P, table_dim) -> (L, 2, H, P, D)

# %% [markdown]
# The same `(L, 2, H, P, D)` tensor comes out, but now it is a function of far more parameters:

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
mlp = InlinePrefixMLP()
print("MLP output", tuple(mlp().shape))
print(f"MLP parameters {sum(p.numel() for p in mlp.parameters()):,} vs table {P * table_dim:,}")

# %% [markdown]
# The MLP has **52× more parameters** than the table it produces: it is a *training device*. The paper's
# argument is that the shared hidden layer couples the rows, so gradient steps move the prefix smoothly.
#
# ## Build it inline · 3. the prefix as a cache
#
# A `DynamicCache` holds one (keys, values) pair per layer, each `(batch, heads, positions, head_dim)`. We fill it
# with the prefix, the same for every sequence in the batch (`expand` shares memory, no copy).

# %%
def inline_cache(kv, batch_size):
    cache = DynamicCache()
    for layer, (keys, values) in enumerate(kv):  # keys, values: (H, P, D)
        cache.update(keys.expand(batch_size, -1, -1, -1), values.expand(batch_size, -1, -1, -1), layer)
    return cache

# %% [markdown]
# Two more things change in the forward pass:
#
# - the **attention mask** gets $P$ ones in front: every token may look at the whole prefix;
# - the **positions** start at $P$, counting real tokens only (so padding does not shift them):
#   $\text{pos}_t = P + \sum_{s \le t} \text{mask}_s - 1$. SmolLM2 rotates queries and keys by their position
#   (RoPE); the cached prefix keys are used as they are, like keys cached earlier.

# %%
def inline_forward(kv, input_ids, attention_mask, **kwargs):
    B = input_ids.shape[0]
    positions = P + attention_mask.cumsum(-1) - 1  # (B, T): real tokens take positions P, P+1, ...
    mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)  # (B, P + T)
    return lm(input_ids=input_ids, attention_mask=mask, position_ids=positions,
              cache=inline_cache(kv, B), use_cache=True, **kwargs)

# %% [markdown]
# ## The data
#
# The data-to-text task from notebook 00: a meaning representation in, a sentence out. The collator puts the
# prompt and the sentence in one sequence and sets the labels of the prompt to -100, so only the sentence is
# scored. The test set's (name, food) pairs never occur in training.

# %%
# NBVAL_CHECK_OUTPUT
d2t = data_to_text()
collate = CausalLMCollator(tok)
ex = d2t["train"][0]
print(ex["mr"], "->", ex["text"])
batch = collate([d2t["train"][i] for i in range(4)])
print({k: tuple(v.shape) for k, v in batch.items()})

# %% [markdown]
# One forward pass of the frozen model with the (untrained) MLP prefix. The cache comes back longer: the model
# appended the keys and values of our $T$ tokens after the $P$ prefix positions.

# %%
# NBVAL_CHECK_OUTPUT
with torch.no_grad():
    out = inline_forward(mlp(), **batch)
print("logits", tuple(out.logits.shape), "(batch, T, vocab): no outputs for the prefix positions")
print("cache after the forward:", tuple(out.past_key_values.layers[0].keys.shape), "= (B, H, P + T, D)")

# %% [markdown]
# ## A prefix is a cache: check with real words
#
# Any $P$ real tokens give a valid prefix: run the model on them and keep its cache. Then the model with that
# prefix must give the **same logits** as the model reading those words in front of the input. Prefix-tuning
# searches the continuous space that these real-word caches are points of.

# %%
# NBVAL_CHECK_OUTPUT
words = tok("Write one sentence about a restaurant from its data:", return_tensors="pt").input_ids
print(tok.convert_ids_to_tokens(words[0]))
assert words.shape[1] == P
with torch.no_grad():
    cache = lm(input_ids=words, use_cache=True).past_key_values
    word_prefix = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
print("word prefix", tuple(word_prefix.shape), "= (L, 2, H, P, D)")

# %% [markdown]
# Now feed 20 tokens both ways: after the word prefix in the cache, and after the words themselves.

# %%
x = batch["input_ids"][:1, :20]  # one unpadded sequence
with torch.no_grad():
    with_prefix = inline_forward(word_prefix, x, torch.ones_like(x)).logits
    with_words = lm(input_ids=torch.cat([words, x], dim=1)).logits[:, P:]
assert_close(with_prefix, with_words, rtol=1e-4, atol=1e-4)
print("prefix from real words == reading the words: max diff", f"{(with_prefix - with_words).abs().max():.1e}")

# %% [markdown]
# ## Import the same thing from `peftkit` and check
#
# `peftkit.prefix_tuning` holds the same three pieces: `PrefixEncoder` (table or MLP, parameter names as in
# peft), and `PrefixTuningModel`, which freezes the model, builds the cache and fixes mask and positions.
# Copy our inline weights in: keys, values and logits must agree.

# %%
from peftkit.prefix_tuning import PrefixEncoder, PrefixTuningModel

for inline, projection in [(mlp, True), (table, False)]:
    encoder = PrefixEncoder(L, H, D, P, projection=projection, encoder_hidden_size=512)
    encoder.load_state_dict(inline.state_dict() if projection else {"embedding.weight": table.weight})
    expected = inline() if projection else to_layers(table.weight)
    assert_close(encoder(), expected, rtol=0, atol=0)  # same parameters, same arithmetic: bit-exact
print("PrefixEncoder == inline table and inline MLP")

# %% [markdown]
# And the whole wrapper: the same MLP weights inside `PrefixTuningModel` must give our inline forward's logits and
# loss on the padded batch.

# %%
wrapped = PrefixTuningModel(lm, num_virtual_tokens=P, projection=True)
wrapped.prefix_encoder.load_state_dict(mlp.state_dict())
with torch.no_grad():
    ours, theirs = inline_forward(mlp(), **batch), wrapped(**batch)
assert_close(theirs.logits, ours.logits)
assert_close(theirs.loss, ours.loss)
print(f"PrefixTuningModel == inline forward; loss {theirs.loss:.3f}")

# %% [markdown]
# ## Inject into SmolLM2: two prefixes to train
#
# `PrefixTuningModel(lm, ...)` freezes every weight of the LM; only the prefix encoder trains. We compare:
#
# - **MLP**: Li & Liang's reparameterisation, hidden size 512, from a fresh random init;
# - **table**: the keys and values trained directly, initialised from the **real-word prefix** above (Li &
#   Liang found real-word activations a better start than random ones, most of all with little data).
#
# Why not a random table, peft's default? Compare the loss **before any training** on our 4 examples:

# %%
torch.manual_seed(0)
random_table = PrefixTuningModel(lm, num_virtual_tokens=P, projection=False)  # N(0, 1), like peft
with torch.no_grad():
    start = {"no prefix": lm(**batch).loss,
             "random N(0, 1) table": random_table(**batch).loss,
             "MLP, fresh init": theirs.loss,  # the wrapped inline MLP from the check above
             "table from real words": inline_forward(word_prefix, **batch).loss}
for name, loss in start.items():
    print(f"{name:<24}{loss:6.2f}")
assert start["random N(0, 1) table"] > 2 * start["table from real words"]

# %% [markdown]
# Random keys and values of size ~1 in every layer scramble what the model attends to: the loss starts several
# times higher than with no prefix at all. The MLP's output starts small (small initial weights), the word prefix
# starts as a sensible hard prompt. Both are good starting points.

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
mlp_model = PrefixTuningModel(lm, num_virtual_tokens=P, projection=True, encoder_hidden_size=512)
table_model = PrefixTuningModel.from_prefix(lm, word_prefix)  # projection=False, table = the word prefix
mlp_row = count_parameters(mlp_model, "prefix + MLP")
table_row = count_parameters(table_model, "prefix table", show=False)
print(f"{'prefix table':<24}{table_row['trainable']:>12,}{table_row['total']:>14,}{table_row['percent']:>8.3f}%")
assert not any(p.requires_grad for p in lm.parameters())

# %% [markdown]
# ## Before training
#
# The frozen instruction-tuned model does not know our format. We generate greedily for 12 held-out meaning
# representations and measure the **slot error rate** (share of slot values the sentence misses).

# %%
N_EVAL, NEW_TOKENS = 12, 30
test_mrs = d2t["test"]["mr"][:N_EVAL]
before = generate(lm, tok, generation_batch(tok, test_mrs), max_new_tokens=NEW_TOKENS)
ser_before = slot_error_rate(before, test_mrs)
print(f"frozen SmolLM2: slot error rate {ser_before:.2f}")
for mr, text in list(zip(test_mrs, before))[:2]:
    print(f"  {mr}\n   -> {text!r}")

# %% [markdown]
# ## Train
#
# A short run each: 20 steps of 8 examples (160 examples, 0.4 epoch), AdamW with warm-up and linear decay.
# Adam moves every parameter by about the learning rate per step; the MLP's output layer adds up 512 such moves
# for each prefix number, so the MLP takes a **30× smaller learning rate** than the table.

# %%
STEPS, MLP_LR, TABLE_LR = 20, 1e-3, 3e-2
mlp_hist = fit(mlp_model, d2t["train"], collate, epochs=1, batch_size=8, lr=MLP_LR, max_steps=STEPS, seed=0,
               desc="prefix + MLP")

# %% [markdown]
# The same 20 steps for the table, started from the real-word prefix:

# %%
table_hist = fit(table_model, d2t["train"], collate, epochs=1, batch_size=8, lr=TABLE_LR, max_steps=STEPS, seed=0,
                 desc="prefix table")
for h in (mlp_hist, table_hist):
    assert sum(h.train_loss[-5:]) / 5 < h.train_loss[0] / 3, h.train_loss

# %% [markdown]
# ## Loss curves

# %%
fig, ax = plt.subplots(figsize=(8, 3), dpi=80)
ax.plot(range(1, STEPS + 1), mlp_hist.train_loss, label=f"prefix + MLP (lr {MLP_LR})")
ax.plot(range(1, STEPS + 1), table_hist.train_loss, label=f"prefix table, word init (lr {TABLE_LR})")
ax.set(xlabel="step", ylabel="training cross-entropy", title="prefix-tuning SmolLM2-135M on data-to-text")
ax.legend()
fig.tight_layout()

# %% [markdown]
# ## Evaluate: held-out slot error rate
#
# `PrefixTuningModel.generate` is a plain greedy loop: it reads the prompt once (after the prefix in the cache),
# then feeds one token at a time. It takes no `do_sample` argument, so instead of `peftkit.train.generate` we
# call it directly and decode the new tokens ourselves.

# %%
def prefix_generate(model, mrs):
    batch = generation_batch(tok, mrs)  # left-padded prompts
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    new_tokens = out[:, batch["input_ids"].shape[1]:]
    return [text.strip() for text in tok.batch_decode(new_tokens, skip_special_tokens=True)]

# %% [markdown]
# Both trained prefixes on the same 12 held-out meaning representations (their (name, food) pairs were never seen
# in training):

# %%
after = {name: prefix_generate(model, test_mrs) for name, model in [("MLP", mlp_model), ("table", table_model)]}
ser = {name: slot_error_rate(texts, test_mrs) for name, texts in after.items()}
print(f"slot error rate: frozen {ser_before:.2f}, prefix + MLP {ser['MLP']:.2f}, prefix table {ser['table']:.2f}")
assert max(ser.values()) < ser_before - 0.2

# %% [markdown]
# Before and after, side by side:

# %%
for i in range(3):
    print(test_mrs[i])
    print(f"  frozen: {before[i]!r}")
    print(f"  MLP:    {after['MLP'][i]!r}")
    print(f"  table:  {after['table'][i]!r}")

# %% [markdown]
# ## Where does the attention go?
#
# For each layer $l$, the share of attention that real tokens give to the $P$ prefix positions, averaged over the
# heads $h$ and the query positions $i$:
#
# $$m^{(l)} = \operatorname{mean}_{h,\,i} \sum_{j=1}^{P} a^{(l)}_{h,i,j}$$
#
# Attention weights are only returned by the "eager" (plain PyTorch) attention, so we switch to it.

# %%
lm.set_attn_implementation("eager")

@torch.no_grad()
def prefix_attention_mass(model, batch):
    attentions = model(**batch, output_attentions=True).attentions  # L x (B, heads, T, P + T)
    real = batch["attention_mask"].bool()  # (B, T): average over real query positions only
    return torch.stack([a[..., :P].sum(-1).mean(1)[real].mean() for a in attentions])  # (L,)

eval_batch = collate([d2t["test"][i] for i in range(4)])
word_model = PrefixTuningModel.from_prefix(lm, word_prefix)  # untrained: the 10 words as a hard prompt
compare = {"MLP": mlp_model, "table": table_model, "words, untrained": word_model}
mass = {name: prefix_attention_mass(model, eval_batch) for name, model in compare.items()}

# %%
fig, ax = plt.subplots(figsize=(8, 3), dpi=80)
for name, m in mass.items():
    ax.plot(range(1, L + 1), m, "--" if "untrained" in name else "o-", label=f"prefix {name}")
ax.set(xlabel="layer", ylabel="attention on the prefix", title=f"share of attention on the {P} prefix positions")
ax.legend()
fig.tight_layout()
for name, m in mass.items():
    print(f"{name:<18} all layers {m.mean():.2f}   layers 1-10 {m[:10].mean():.2f}   layers 11-30 {m[10:].mean():.2f}")

# %% [markdown]
# - The **word-initialised table** keeps the profile of the untrained word prefix (dashed): a language model parks
#   spare attention on the first tokens it has read (the "attention sink"), and the prefix *is* those first tokens.
#   Training raised its share a little, mostly in the lower layers.
# - The **MLP prefix** started small and never became a sink: it gets almost no attention in layers 1-10 and
#   a sizeable share in the upper layers, where it steers what is written.
# - Both give the same held-out slot error rate: how much attention a prefix receives is not how much it matters.

# %% [markdown]
# ## Export: keep the keys and values, drop the MLP
#
# `export_prefix()` runs the encoder once and returns the `(L, 2, H, P, D)` tensor; `from_prefix` wraps a frozen
# model with it. The deployed model has no MLP, yet must give exactly the trained model's outputs.

# %%
lm.set_attn_implementation("sdpa")
prefix = mlp_model.export_prefix()
deployed = PrefixTuningModel.from_prefix(lm, prefix)
with torch.no_grad():
    assert_close(deployed(**eval_batch).logits, mlp_model(**eval_batch).logits)
print("exported prefix", tuple(prefix.shape), "gives the trained model's logits")

# %% [markdown]
# What goes on disk: `save` writes the trainable tensors (for the MLP model, the embedding and the MLP); the
# deployed model's only trainable tensor is the prefix table.

# %%
# NBVAL_CHECK_OUTPUT
with tempfile.TemporaryDirectory() as folder:
    training_form = mlp_model.save(Path(folder) / "prefix_mlp.safetensors").stat().st_size
    deployed_form = deployed.save(Path(folder) / "prefix.safetensors").stat().st_size
print(f"with the MLP (training form): {training_form / 2**20:6.2f} MB")
print(f"exported prefix:              {deployed_form / 2**20:6.2f} MB  ({prefix.numel():,} numbers)")
print(f"SmolLM2 itself (float32):     {model_params * 4 / 2**20:6.1f} MB")
print(f"prefix / model: {100 * prefix.numel() / model_params:.3f}%  (the paper: ~0.1%)")

# %% [markdown]
# ## Summary
#
# - **Prefix-tuning** prepends $P$ learned keys and values to the attention of **every layer**; prompt tuning
#   only changes the input. The prefix positions are attended to, never computed.
# - A prefix **is a key/value cache**: it is passed to a frozen model as one, with $P$ ones in front of the
#   attention mask and positions starting at $P$. A cache computed from real words is a valid prefix.
# - Trained: $P \times L \times 2 \times H_{kv} \times d$ numbers (115,200 for SmolLM2 with $P = 10$, ~0.09%).
#   Grouped-query attention keeps it small: only the key/value heads count.
# - The **reparameterisation MLP** (Li & Liang) is a training device 52× larger than the prefix; it is run once
#   and dropped at export. Training the table directly works when it starts from real words.
# - After 20 steps (160 examples) both prefixes write sentences in the task's format and mention the slot values of
#   held-out meaning representations that the frozen model mostly missed. The MLP takes a ~30× smaller learning
#   rate; the table needs a good starting point (real words), since a random one starts far off.
#
# ## Exercises
#
# 1. Train `random_table` (peft's N(0, 1) start) with the table's learning rate. Does it reach the
#    word-initialised table's loss in 20 steps? Try scaling the random init down by 100 first.
# 2. Vary the prefix length $P$ (1, 5, 20). How do the parameter count and the slot error rate change?
# 3. Initialise the table from a different phrase of 10 tokens (or from 10 random vocabulary words). Does the
#    starting loss, and the loss after 20 steps, depend on the words?
# 4. Llama-2-7B has 32 layers, 32 key/value heads (no grouped-query attention) and head_dim 128. How many numbers
#    does a prefix of $P = 10$ train there, and what fraction of its 6.74B parameters is that? The cell below
#    checks your count.

# %%
my_numbers = 10 * 32 * 2 * 32 * 128  # replace with your own arithmetic
assert my_numbers == 2_621_440, my_numbers
print(f"{my_numbers:,} numbers, {100 * my_numbers / 6.74e9:.3f}% of Llama-2-7B")

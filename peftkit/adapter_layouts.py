"""Where bottleneck adapters go in each model family: the layer layouts ``adapters.py`` reads.

A transformer layer ends each sublayer (attention, feed-forward) with a projection back to the
hidden size d; an adapter follows that projection. Families name these modules differently, and
a few have quirks that change what an adapter means:

- BERT, RoBERTa, ELECTRA share one layout: LN(x + dense(h)) closes each sublayer.
- ALBERT has ONE layer whose weights every pass reuses (12 passes in albert-base). So it gets one
  set of adapters, shared by every pass, as its weights are: a tiny ALBERT with 2 passes trains
  the adapters of one layer, not two (AdapterHub does the same).
- XLNet's attention projections are parameters (``rel_attn.q``, ``k``, ``v``, ``o`` used in
  einsums), not modules: nothing to wrap after attention, so "houlsby" is refused; "pfeiffer"
  (after the feed-forward block's ``ff.layer_2``) works.
- T5 is an encoder-decoder: an encoder block has self-attention and feed-forward, a decoder block
  self-attention, cross-attention and feed-forward. As AdapterHub does (its ``cross_adapter`` is
  off in both configs), adapters follow self-attention and feed-forward, in both stacks. As for BERT, the
  adapter reads the projection's output before the sublayer's dropout (AdapterHub: after; equal in eval).
- GPT-2 stores its projections as transformers' ``Conv1D`` (weight transposed, out size ``nf``).
T5, GPT-2 and Llama normalise before each sublayer, so "houlsby" trains those norms there.

A layer is recognised by structure (all of its layout's paths exist), so related models (Mistral
and Qwen use Llama's names, XLM-RoBERTa BERT's) work too; errors name ``config.model_type``.
"""

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Layout:
    attention: str | None    # the projection closing the attention sublayer (None: not a module)
    feed_forward: str        # the projection closing the feed-forward sublayer
    norms: tuple             # the layer's norms, which "houlsby" trains
    output_blocks: bool = False  # BERT: each projection sits in a (dense, dropout, LayerNorm) block


LAYOUTS = {
    "bert": Layout("attention.output.dense", "output.dense", ("attention.output.LayerNorm", "output.LayerNorm"),
                   output_blocks=True),
    "albert": Layout("attention.dense", "ffn_output", ("attention.LayerNorm", "full_layer_layer_norm")),
    "xlnet": Layout(None, "ff.layer_2", ("rel_attn.layer_norm", "ff.layer_norm")),
    "t5-encoder": Layout("layer.0.SelfAttention.o", "layer.1.DenseReluDense.wo",
                         ("layer.0.layer_norm", "layer.1.layer_norm")),
    "t5-decoder": Layout("layer.0.SelfAttention.o", "layer.2.DenseReluDense.wo",
                         ("layer.0.layer_norm", "layer.1.layer_norm", "layer.2.layer_norm")),
    "gpt2": Layout("attn.c_proj", "mlp.c_proj", ("ln_1", "ln_2")),
    "llama": Layout("self_attn.o_proj", "mlp.down_proj", ("input_layernorm", "post_attention_layernorm")),
}
# The families checked in tests/test_matrix.py (config.model_type -> its layouts).
FAMILIES = {"bert": ("bert",), "roberta": ("bert",), "electra": ("bert",), "albert": ("albert",),
            "xlnet": ("xlnet",), "t5": ("t5-encoder", "t5-decoder"), "gpt2": ("gpt2",), "llama": ("llama",)}


def model_type(model: nn.Module) -> str:
    """The family's name as transformers spells it (config.model_type), else the class name."""
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def supporting(sublayer: str) -> list[str]:
    """The families whose layers all have a module closing ``sublayer``."""
    return sorted(f for f, names in FAMILIES.items() if all(getattr(LAYOUTS[n], sublayer) for n in names))


def hidden_size(projection: nn.Module) -> int | None:
    """The output size of a projection: ``out_features`` (nn.Linear, NF4Linear) or ``nf`` (GPT-2's Conv1D)."""
    size = getattr(projection, "out_features", getattr(projection, "nf", None))
    return size if isinstance(size, int) else None


def find_layers(model: nn.Module) -> list[tuple[str, nn.Module, Layout]]:
    """[(name, layer, layout), ...]: the transformer layers adapters can be placed in.

    ``named_modules`` lists a shared module once, so ALBERT's one layer comes back once."""
    found, looked_for = [], []
    for name, layout in LAYOUTS.items():
        paths = [p for p in (layout.attention, layout.feed_forward, *layout.norms) if p]
        found += [(n, m, layout) for n, m in model.named_modules() if set(paths) <= {k for k, _ in m.named_modules()}]
        looked_for.append(f"{name}: a layer with {', '.join(paths)}")
    if not found:
        raise ValueError(f"cannot place adapters in {type(model).__name__} (family {model_type(model)!r}): found no "
                         f"transformer layer of a supported family ({', '.join(sorted(FAMILIES))}). "
                         f"Looked for {'; '.join(looked_for)}.")
    return found

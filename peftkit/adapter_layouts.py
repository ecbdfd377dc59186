"""Where bottleneck adapters go in the families beyond BERT and Llama, and AdapterHub's other placement.

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

AdapterHub's ``original_ln_before`` (BERT only: Llama has no norm after its residual add) places the adapter:
- False (the default; AdapterHub's DoubleSeqBnConfig, Houlsby): LN(x + adapter(h)), h taken before the block's
  dropout (AdapterHub: after; the same at evaluation).
- True (AdapterHub's SeqBnConfig, Pfeiffer): the adapter reads y = LN(x + h), skips from h, and the same LN
  follows again: LN(x + h + W_up f(W_down y + b_down) + b_up) (``AdaptedBlockAfterNorm`` below). The course's
  "pfeiffer" recipe keeps the default, with which its numbers were recorded; benchmarks/adapter_placement.py
  measures this one.

``adapters.py`` holds BERT's and Llama's layouts and reads this file when it is beside it; this file needs
``adapters.py`` beside it (for ``Layout`` and ``AdaptedSublayer``).
"""

try:
    from . import adapters
    from .adapters import AdaptedSublayer, Layout
except ImportError:  # copied into a project as plain files, beside adapters.py
    import adapters
    from adapters import AdaptedSublayer, Layout

LAYOUTS = {
    **adapters.LAYOUTS,  # bert, llama
    "albert": Layout("attention.dense", "ffn_output", ("attention.LayerNorm", "full_layer_layer_norm")),
    "xlnet": Layout(None, "ff.layer_2", ("rel_attn.layer_norm", "ff.layer_norm")),
    "t5-encoder": Layout("layer.0.SelfAttention.o", "layer.1.DenseReluDense.wo",
                         ("layer.0.layer_norm", "layer.1.layer_norm")),
    "t5-decoder": Layout("layer.0.SelfAttention.o", "layer.2.DenseReluDense.wo",
                         ("layer.0.layer_norm", "layer.1.layer_norm", "layer.2.layer_norm")),
    "gpt2": Layout("attn.c_proj", "mlp.c_proj", ("ln_1", "ln_2")),
}
# The families checked in tests/test_matrix.py (config.model_type -> its layouts).
FAMILIES = {**adapters.FAMILIES, "albert": ("albert",), "xlnet": ("xlnet",), "t5": ("t5-encoder", "t5-decoder"),
            "gpt2": ("gpt2",)}


class AdaptedBlockAfterNorm(AdaptedSublayer):
    """original_ln_before=True: a BERT block LN(input + dropout(dense(x))) with the adapter after its LN."""
    def forward(self, hidden_states, input_tensor):
        h = self.base.dropout(self.base.dense(hidden_states))
        y = self.base.LayerNorm(h + input_tensor)  # the block's usual output, read by the adapter
        return self.base.LayerNorm(self.adapter(y, skip=h) + input_tensor)


def supporting(sublayer: str) -> list[str]:
    """The families whose layers all have a module closing ``sublayer``."""
    return sorted(f for f, names in FAMILIES.items() if all(getattr(LAYOUTS[n], sublayer) for n in names))


def check_placement(layers, sublayers, config, family: str) -> None:
    """Refuse an adapter after a sublayer that ``layers`` keep as a parameter (XLNet's attention output), and
    ``original_ln_before`` where no (dense, dropout, LayerNorm) block closes a sublayer."""
    for sublayer in sublayers:
        if any(getattr(layout, sublayer) is None for _, _, layout in layers):
            raise ValueError(f"{config.placement!r} places an adapter after the {sublayer} output projection, which "
                             f"{family} keeps as a parameter, not a module; families it supports: "
                             f"{supporting(sublayer)}; 'pfeiffer' (feed-forward only) works on it")
    if config.original_ln_before and not all(layout.output_blocks for _, _, layout in layers):
        raise ValueError(f"original_ln_before=True needs a LayerNorm after the residual add: {family} has none in "
                         f"a (dense, dropout, LayerNorm) block; families that do: bert, electra, roberta")

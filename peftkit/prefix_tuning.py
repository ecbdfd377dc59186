"""Prefix-tuning: learned keys and values prepended in every attention layer.

Paper: Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (ACL 2021).
Without the MLP this is also P-tuning v2's "deep prompt" (Liu et al., 2022), and peft's default.

Equation, for every layer l and head h, with P learned prefix positions:
    K_l = [Pk_l ; x W_k]      V_l = [Pv_l ; x W_v]      (concatenated along the sequence)
    head = softmax(q K_l^T / sqrt(d)) V_l
Prompt tuning only prepends vectors to the input; here every layer gets its own keys and values,
so the prefix steers attention at all depths. The prefix is handed to the model as an already
filled key/value cache (what the model would have cached after reading P tokens), so the input
tokens take positions P, P+1, ... just as they would after a real P-token prompt.

Reparameterisation (Li & Liang, section 4.3): training the table [Pk; Pv] directly is unstable,
so it is produced by an MLP from a small embedding:
    [Pk_l ; Pv_l] for all l = W2 tanh(W1 E + b1) + b2,     E of shape (P, num_kv_heads * head_dim)
After training, the MLP is run once and only its output, the key/value table, is kept.

Trained: the prefix encoder (the embedding, and the MLP when ``projection=True``).
Frozen: every weight of the language model. T5: the decoder's self-attention gets the prefix, as in peft
(``prompt_common.py`` lays it out; encoders and XLNet take no cache). This file needs ``prompt_tuning.py`` beside it.

    model = PrefixTuningModel(causal_lm, num_virtual_tokens=10)  # freezes causal_lm
    model(input_ids=ids, labels=ids).loss.backward()  # gradients reach model.prefix_encoder only
    save_adapter(model, "prefix.safetensors")  # the prefix encoder's tensors and model.adapter_config
    load_adapter(PrefixTuningModel(causal_lm, num_virtual_tokens=10), "prefix.safetensors")
    export_peft(model, "prefix-peft", "HuggingFaceTB/SmolLM2-135M")  # peft.PeftModel.from_pretrained loads it
"""

import inspect
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

try:  # prompt tuning's checks and sibling finder; export_peft (peft's format, prompt_common.py's)
    from .prompt_tuning import _positive_int, _sibling, export_peft  # noqa: F401
except ImportError:  # copied into a project as a plain file, beside prompt_tuning.py
    from prompt_tuning import _positive_int, _sibling, export_peft  # noqa: F401


class PrefixEncoder(nn.Module):
    """Produces the prefix keys and values of every layer: one (key, value) pair per layer.

    ``projection=True``: embedding -> Linear -> Tanh -> Linear (Li & Liang's MLP).
    ``projection=False``: the key/value table itself is the parameter (peft's default).
    Parameter names and layout follow peft's ``PrefixEncoder``, so weights copy across.
    With grouped-query attention the prefix has ``num_kv_heads`` heads, not the query heads.
    """

    def __init__(self, num_layers, num_kv_heads, head_dim, num_virtual_tokens, projection=True,
                 encoder_hidden_size=512):
        super().__init__()
        c = PrefixTuningConfig(num_virtual_tokens, projection, encoder_hidden_size, num_layers, num_kv_heads, head_dim)
        self.num_layers, self.num_kv_heads, self.head_dim = c.num_layers, c.num_kv_heads, c.head_dim  # all checked
        self.num_virtual_tokens, self.projection = c.num_virtual_tokens, c.projection
        token_dim = num_kv_heads * head_dim  # one layer's keys (or values) for one position
        table_dim = num_layers * 2 * token_dim  # keys and values of all layers for one position
        if self.projection:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(encoder_hidden_size, table_dim))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, table_dim)

    def table(self) -> torch.Tensor:
        """The flat key/value table, (P, num_layers * 2 * num_kv_heads * head_dim)."""
        if self.projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def forward(self) -> torch.Tensor:
        """Keys and values of every layer: (num_layers, 2, num_kv_heads, P, head_dim)."""
        P, L, H, D = self.num_virtual_tokens, self.num_layers, self.num_kv_heads, self.head_dim
        kv = self.table().view(P, L, 2, H, D)  # (P, L, 2, H, D), 2 = key then value
        return kv.permute(1, 2, 3, 0, 4)  # (L, 2, H, P, D): the cache layout, minus the batch


@dataclass
class PrefixTuningConfig:
    technique: ClassVar[str] = "prefix_tuning"  # the tag saved in adapter files
    num_virtual_tokens: int = 10  # P, the prefix length (peft's num_virtual_tokens)
    projection: bool = True  # produce the table with Li & Liang's MLP (peft's prefix_projection)
    encoder_hidden_size: int | None = 512  # the MLP's hidden width; None without the MLP
    # the model's sizes, read from it by PrefixTuningModel: a saved prefix loads only into a model of this shape
    num_layers: int | None = None  # decoder layers, each with its own prefix
    num_kv_heads: int | None = None  # key/value heads (fewer than the query heads with grouped-query attention)
    head_dim: int | None = None  # the size of one head's key (and value)

    def __post_init__(self):
        _positive_int("num_virtual_tokens (the prefix length)", self.num_virtual_tokens)
        self.projection = bool(self.projection)
        if self.projection:
            _positive_int("encoder_hidden_size", self.encoder_hidden_size)
        else:
            self.encoder_hidden_size = None  # no MLP, so no hidden size
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))


# --- injecting into a model ---

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2", "t5")  # their layers read one cache; checked vs peft


class PrefixTuningModel(nn.Module):
    """A frozen causal LM (or T5's decoder) whose attention layers all see a learned prefix.

    ``forward`` takes the model's usual arguments (``input_ids``, ``attention_mask``, ``labels``,
    ...) and returns its output; ``generate`` decodes greedily. ``position_ids`` given by the
    caller number the input from 0, as without a prefix; they are shifted by P, as peft does.
    ``cache_class`` is the model's cache class (default: ``transformers.DynamicCache``, imported
    when first needed). The prefix's config is ``adapter_config``, a ``PrefixTuningConfig``.
    """

    def __init__(self, model, num_virtual_tokens=10, projection=True, encoder_hidden_size=512, cache_class=None):
        super().__init__()
        cache_arg = _cache_argument(model)  # refuses the families this file does not support
        config = PrefixTuningConfig(num_virtual_tokens, projection, encoder_hidden_size,
                                    *_kv_sizes(model.config))  # checks the prefix length and sizes
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        prefix_encoder = PrefixEncoder(**asdict(config)).to(next(model.parameters()).device)
        model.requires_grad_(False)  # everything is checked: only now is the model frozen
        self.base_model, self.prefix_encoder, self.adapter_config = model, prefix_encoder, config
        self._cache_arg, self.cache_class = cache_arg, cache_class

    def prefix_cache(self, batch_size: int):
        """A cache holding the prefix keys and values of every layer, for ``batch_size`` sequences."""
        if self.cache_class is None:
            from transformers import DynamicCache
            self.cache_class = DynamicCache
        kv = self.prefix_encoder().to(next(self.base_model.parameters()).dtype)  # (L, 2, H, P, D), the model's dtype
        if self.is_encoder_decoder:  # T5: the decoder's self-attention only, laid out as peft does
            return _sibling("prompt_common", "T5").t5_prefix_cache(kv, batch_size, self.cache_class)
        cache = self.cache_class()
        for layer, (keys, values) in enumerate(kv):
            # the same prefix for every sequence in the batch: (H, P, D) -> (B, H, P, D)
            cache.update(keys.expand(batch_size, -1, -1, -1), values.expand(batch_size, -1, -1, -1), layer)
        return cache

    def _prefix_inputs(self, batch_size, seq_len, attention_mask, device):
        """Attention mask with the prefix positions always visible, and the matching position ids."""
        P = self.adapter_config.num_virtual_tokens
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long, device=device)
        # positions count real tokens only (left padding shifts nothing), from P: the prefix is P cached tokens
        position_ids = P + attention_mask.long().cumsum(-1) - 1  # (B, T)
        prefix_mask = torch.ones(batch_size, P, dtype=attention_mask.dtype, device=device)
        return torch.cat([prefix_mask, attention_mask], dim=1), position_ids  # (B, P + T), (B, T)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, position_ids=None, **kwargs):
        self._check_usable(kwargs)
        x = input_ids if input_ids is not None else inputs_embeds
        if x is None:
            raise ValueError("pass input_ids (B, T) or inputs_embeds (B, T, hidden_size)")
        batch_size, seq_len = x.shape[:2]
        if self.is_encoder_decoder:  # T5: the encoder and its mask as they are; the decoder's mask gets P ones
            kwargs.update(input_ids=input_ids, inputs_embeds=inputs_embeds)
            common = _sibling("prompt_common", "T5")  # peft's T5 layout
            return common.t5_prefix_forward(self, batch_size, attention_mask, position_ids, kwargs)
        attention_mask, default_positions = self._prefix_inputs(batch_size, seq_len, attention_mask, x.device)
        if position_ids is None:
            position_ids = default_positions
        else:  # the caller numbers the input from 0; after the prefix it starts at P (peft shifts them too)
            if position_ids.shape[-1] != seq_len:
                raise ValueError(f"position_ids must have one position per input token ({seq_len}), "
                                 f"got shape {tuple(position_ids.shape)}")
            position_ids = position_ids + self.adapter_config.num_virtual_tokens
        kwargs[self._cache_arg] = self.prefix_cache(batch_size)
        return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=True, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=20, eos_token_id=None, pad_token_id=None,
                 do_sample=False):
        """Greedy decoding; returns the prompt followed by the new tokens, (B, T + new).

        Batches should be left-padded (with ``attention_mask``). Once a sequence has produced
        ``eos_token_id`` it is filled with ``pad_token_id`` (default: the eos id).
        """
        self._check_usable({})
        if self.is_encoder_decoder:
            raise ValueError("generate decodes decoder-only models: for T5, decode step by step with forward()")
        if do_sample:
            raise ValueError("PrefixTuningModel.generate decodes greedily only (got do_sample=True): "
                             "pass do_sample=False")
        max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        batch_size, seq_len = input_ids.shape
        mask, positions = self._prefix_inputs(batch_size, seq_len, attention_mask, input_ids.device)
        cache = self.prefix_cache(batch_size)  # grows in place as tokens are read
        tokens, step_input = input_ids, input_ids
        finished = torch.zeros(batch_size, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self.base_model(input_ids=step_input, attention_mask=mask, position_ids=positions,
                                     use_cache=True, **{self._cache_arg: cache}).logits
            next_token = logits[:, -1].argmax(-1)  # (B,)
            if eos_token_id is not None:
                pad = eos_token_id if pad_token_id is None else pad_token_id
                next_token = next_token.masked_fill(finished, pad)
                finished |= next_token == eos_token_id
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)  # (B, T + steps)
            if finished.all():
                break
            step_input = next_token[:, None]  # (B, 1): the rest is already in the cache
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(batch_size, 1)], dim=1)
        return tokens

    def export_prefix(self) -> torch.Tensor:
        """Run the encoder (and its MLP) once: the keys and values, (num_layers, 2, num_kv_heads, P, head_dim).
        This tensor is all that deployment needs; see ``from_prefix``."""
        with torch.no_grad():
            return self.prefix_encoder().detach().clone()

    @classmethod
    def from_prefix(cls, model, prefix: torch.Tensor, cache_class=None) -> "PrefixTuningModel":
        """Wrap ``model`` with a fixed exported prefix (no MLP): the deployment form."""
        if not isinstance(prefix, torch.Tensor) or prefix.dim() != 5:
            raise ValueError("prefix must be the tensor export_prefix() returns: (num_layers, 2, num_kv_heads, P, "
                             f"head_dim), got {getattr(prefix, 'shape', type(prefix).__name__)}")
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES:  # else cls() below explains
            num_layers, num_kv_heads, head_dim = _kv_sizes(config)
            expected = (num_layers, 2, num_kv_heads, prefix.shape[3], head_dim)
            if tuple(prefix.shape) != expected:  # checked before cls() freezes the model
                raise ValueError(f"this model needs a prefix of shape (num_layers, 2, num_kv_heads, P, head_dim) = "
                                 f"{expected}, got {tuple(prefix.shape)}")
        wrapped = cls(model, num_virtual_tokens=prefix.shape[3], projection=False, cache_class=cache_class)
        e = wrapped.prefix_encoder
        with torch.no_grad():  # undo the permute in PrefixEncoder.forward: back to (P, L * 2 * H * D)
            e.embedding.weight.copy_(prefix.permute(3, 0, 1, 2, 4).reshape(e.num_virtual_tokens, -1))
        return wrapped

    def _check_usable(self, kwargs):
        if any(getattr(m, "gradient_checkpointing", False) for m in self.base_model.modules()):
            raise ValueError("prefix-tuning does not work with gradient checkpointing: the checkpointed layers drop "
                             "the cache that carries the prefix. Turn activation (gradient) checkpointing off.")
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("the prefix is passed as the cache, so forward takes no cache; use generate() to decode")


def _cache_argument(model) -> str:
    """The name under which ``model.forward`` takes its key/value cache; refuses unsupported models."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"prefix-tuning supports these families (model_type): {SUPPORTED_MODEL_TYPES}; got "
                         f"{type(model).__name__} with model_type {model_type!r}. It hands the prefix over as a "
                         "key/value cache, and BERT-like encoders (bert, roberta, albert, electra) and xlnet take "
                         "none in transformers 5 (peft refuses them too): use prompt tuning or P-tuning for them.")
    signature = inspect.signature(model.forward).parameters
    # transformers 5.x renamed `past_key_values` to `cache`; accept whichever this model takes
    name = next((a for a in ("cache", "past_key_values") if a in signature), None)
    if name is None:
        raise ValueError(f"{type(model).__name__}.forward takes no key/value cache, so it cannot take a prefix")
    return name


def _kv_sizes(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a decoder's config: the prefix's sizes."""
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    if getattr(config, "model_type", None) == "t5":  # T5's sizes must fit peft's layout
        _sibling("prompt_common", "T5").check_t5_sizes(config, num_heads)
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or num_heads, head_dim


# --- saving ---

def adapter_state_dict(model: PrefixTuningModel) -> dict[str, torch.Tensor]:
    """The tensors prefix-tuning trains, by their names in the wrapper: the prefix encoder's."""
    if not isinstance(model, PrefixTuningModel):  # the prefix lives in the wrapper, not in the language model
        raise TypeError(f"prefix-tuning saves and loads through the PrefixTuningModel that carries the prefix, got "
                        f"{type(model).__name__}: wrap it first, e.g. PrefixTuningModel(model, num_virtual_tokens=10)")
    return {name: p.detach() for name, p in model.prefix_encoder.named_parameters(prefix="prefix_encoder")}


def save_adapter(model: PrefixTuningModel, path):
    """Write the prefix encoder's tensors and ``model.adapter_config`` to one safetensors file."""
    return _sibling("adapter_files", "saving").write_adapter(adapter_state_dict(model), path, model.adapter_config)


def load_adapter(model: PrefixTuningModel, path) -> PrefixTuningConfig:
    """Load a prefix written by ``save_adapter`` into ``model``; returns the file's config.

    The file must be a prefix-tuning file whose config is ``model.adapter_config`` (same prefix
    length, MLP or not, and a model of the same sizes). On any error the wrapper is left unchanged.
    """
    expected = adapter_state_dict(model).keys()
    tensors, config = (files := _sibling("adapter_files", "loading")).read_adapter(path, PrefixTuningConfig)
    saved, ours = asdict(config), asdict(model.adapter_config)
    differences = [f"{name}: file {v!r}, model {ours[name]!r}" for name, v in saved.items() if v != ours[name]]
    if differences:
        raise ValueError(f"{path} holds a prefix this PrefixTuningModel cannot take ({'; '.join(differences)}). "
                         "Wrap the model it was trained on as PrefixTuningModel(model, num_virtual_tokens="
                         f"{config.num_virtual_tokens}, projection={config.projection}, "
                         f"encoder_hidden_size={config.encoder_hidden_size})")
    files.copy_tensors(model, tensors, expected, source=path, config=saved)
    return config

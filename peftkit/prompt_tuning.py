"""Prompt tuning: a few learned vectors prepended to the input embeddings of a frozen model.

Paper: Lester, Al-Rfou & Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning"
(EMNLP 2021). Earlier "hard" prompts were words chosen by hand; a soft prompt is P free vectors
in the embedding space, found by gradient descent.

Equation, for an input of T tokens x_1..x_T and a prompt P of N vectors p_1..p_N:
    inputs_embeds = [p_1, ..., p_N, E(x_1), ..., E(x_T)]        shape (N + T, D)
    y = frozen_model(inputs_embeds)
where E is the model's own word-embedding table and D its width. The attention mask gets N ones
in front (every input token may look at the prompt) and, for a language model, the labels get
N times -100 in front (no loss on the prompt positions).

Trained: the N x D prompt only (plus a classifier's fresh head, as peft does for classification).
Frozen: every weight of the model, including the embedding table.

Initialisation, peft's three options: "random" draws N(0, 1) (Lester et al.: uniform[-0.5, 0.5]); "vocab" copies
the rows of random token ids (theirs: of the 5,000 most common); "text" a phrase's rows, repeated or cut to N.

    model = PromptTuningModel(classifier, num_virtual_tokens=20, init="text", init_text="Topic:", tokenizer=tokenizer)
    ...train (the prompt and the classifier head)...
    save_adapter(model, "prompt.safetensors")      # N x D numbers and the head
    load_adapter(PromptTuningModel(fresh_classifier, num_virtual_tokens=20), "prompt.safetensors")
    export_peft(model, "prompt-peft", "bert-base-uncased")  # peft.PeftModel.from_pretrained loads it
T5 reads the prompt in front of its encoder's input, as in peft. This file needs only torch. Beside it,
``prompt_common.py`` adds the "vocab" and "text" inits and ``export_peft``; ``adapter_files.py`` saves.
"""

import importlib
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import torch
from torch import nn



class SoftPrompt(nn.Module):
    """The N x D learned prompt. Named like peft's ``PromptEmbedding`` (``embedding.weight``)."""

    def __init__(self, num_virtual_tokens, token_dim, init="random", word_embeddings=None,
                 init_text=None, tokenizer=None):
        super().__init__()
        _check_prompt(num_virtual_tokens, token_dim, init)
        self.num_virtual_tokens, self.token_dim = num_virtual_tokens, token_dim
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)  # N(0, 1): the "random" init
        if init != "random":  # "vocab" or "text": start from rows of the model's embedding table
            ids = _sibling("prompt_common", f"init={init!r}")._init_token_ids(init, num_virtual_tokens, token_dim,
                                                                              word_embeddings, init_text, tokenizer)
            with torch.no_grad():
                self.embedding.weight.copy_(word_embeddings(ids.to(word_embeddings.weight.device)).float())  # (N, D)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight  # (N, D)


# --- injecting into a model ---

class PromptTuningModel(nn.Module):
    """A frozen Hugging Face model (encoder classifier or causal LM) that reads a soft prompt first.

    ``modules_to_save``: modules trained alongside the prompt, by peft's rule (a module's full
    dotted name or its last dotted components); by default the classifier head (``classifier``
    or ``score``) when the model has one, as peft does for sequence classification. Pass ``[]``
    to train the prompt alone.
    ``prompt_encoder``: any module whose ``forward()`` returns the (N, D) prompt and that has
    ``num_virtual_tokens`` and ``token_dim``; defaults to a :class:`SoftPrompt`. P-tuning passes
    its reparameterising encoder here.
    The config it was built with is ``adapter_config``, a :class:`PromptTuningConfig`.

    Positions, as in peft: the prompt takes positions 0..N-1 and the input moves to N..N+T-1, so
    a model with learned absolute positions (BERT) has N fewer positions left for the input.
    """

    def __init__(self, model, num_virtual_tokens=20, init="random", init_text=None, tokenizer=None,
                 token_dim=None, modules_to_save=None, prompt_encoder=None):
        super().__init__()
        word_embeddings = model.get_input_embeddings()
        if prompt_encoder is None:
            dim = word_embeddings.embedding_dim if token_dim is None else token_dim
            prompt_encoder = SoftPrompt(num_virtual_tokens, dim, init, word_embeddings, init_text, tokenizer)
        else:
            init = None  # the given encoder starts its prompt its own way
        config, trained_modules = _wrapper_config(model, prompt_encoder, init, modules_to_save)  # all the checks
        # T5: the prompt goes in front of the encoder's input (as in peft); its labels are the decoder's.
        self.is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        # HF's own test for a generating model (a causal LM); a classifier has no generate().
        self.is_causal_lm = bool(getattr(model, "can_generate", lambda: False)()) and not self.is_encoder_decoder
        model.requires_grad_(False)  # everything is checked: only now is the model changed
        for module in trained_modules:
            module.requires_grad_(True)
        self.adapter_config, self.base_model, self.prompt_encoder = config, model, prompt_encoder

    def prompt_inputs(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        """The model inputs with the prompt in front: (inputs_embeds (B, N+T, D), attention_mask (B, N+T)).
        Takes the token ids, or their embeddings (B, T, D) as peft does (one of the two)."""
        embeds = _embeddings(self.base_model, input_ids, inputs_embeds)  # (B, T, D)
        batch, seq_len = embeds.shape[:2]
        _check_length(self.base_model, self.num_virtual_tokens, seq_len)
        prompt = self.prompt_encoder().to(embeds.dtype)  # (N, D)
        prompt = prompt.unsqueeze(0).expand(batch, -1, -1)  # (B, N, D)
        inputs_embeds = torch.cat([prompt, embeds], dim=1)  # (B, N+T, D)
        if attention_mask is None:
            attention_mask = torch.ones(batch, seq_len, dtype=torch.long, device=embeds.device)
        ones = attention_mask.new_ones(batch, self.num_virtual_tokens)
        return inputs_embeds, torch.cat([ones, attention_mask], dim=1)  # (B, N+T)

    def forward(self, input_ids=None, attention_mask=None, labels=None, token_type_ids=None, inputs_embeds=None,
                **kwargs):
        """Run the model on [prompt; input]; returns the model's own output (logits, loss).
        ``input_ids`` (B, T) or ``inputs_embeds`` (B, T, D); for T5, the decoder's arguments as usual."""
        if "position_ids" in kwargs:
            raise ValueError("pass no position_ids: the model numbers the positions of prompt and input together")
        inputs_embeds, attention_mask = self.prompt_inputs(input_ids, attention_mask, inputs_embeds)
        batch, seq_len = inputs_embeds.shape[0], inputs_embeds.shape[1] - self.num_virtual_tokens
        # One integer label per token (language model, token tagging): the output has N more
        # positions, so the prompt gets -100 (no loss). One label per sequence, or T5's decoder labels, pass as they are.
        per_token = (labels is not None and tuple(labels.shape) == (batch, seq_len) and not labels.is_floating_point()
                     and not self.is_encoder_decoder)
        if labels is not None and self.is_causal_lm and not per_token:
            raise ValueError(f"a language model's labels must be token ids shaped like the input "
                             f"{(batch, seq_len)}, got {labels.dtype} {tuple(labels.shape)}")
        if per_token:
            ignore = labels.new_full((batch, self.num_virtual_tokens), -100)
            labels = torch.cat([ignore, labels], dim=1)  # (B, N+T)
        if token_type_ids is not None:  # the prompt counts as segment 0 (BERT's sentence A), as in peft
            zeros = token_type_ids.new_zeros(batch, self.num_virtual_tokens)
            kwargs["token_type_ids"] = torch.cat([zeros, token_type_ids], dim=1)  # (B, N+T)
        return self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        """Generate after [prompt; input]; returns input_ids followed by the new tokens, like HF (given
        inputs_embeds, the new tokens only; T5: the decoder's tokens, as HF returns them).
        Batches of different lengths must be padded on the left, so every row ends at its last token."""
        if not (self.is_causal_lm or self.is_encoder_decoder):
            raise ValueError(f"generate needs a causal or seq2seq language model, not {type(self.base_model).__name__}")
        if kwargs.get("return_dict_in_generate"):
            raise ValueError("PromptTuningModel.generate returns token ids only: pass return_dict_in_generate=False")
        embeds, attention_mask = self.prompt_inputs(input_ids, attention_mask, inputs_embeds)
        # Given only inputs_embeds, HF returns only the new tokens: (B * k, new) for k sequences per input.
        new_tokens = self.base_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        if input_ids is None or self.is_encoder_decoder:
            return new_tokens
        per_input = new_tokens.shape[0] // input_ids.shape[0]  # num_return_sequences, HF repeats each row k times
        return torch.cat([input_ids.repeat_interleave(per_input, dim=0), new_tokens], dim=1)

    @property
    def num_virtual_tokens(self) -> int:
        return self.adapter_config.num_virtual_tokens


INITS = ("random", "vocab", "text")
HEAD_NAMES = ("classifier", "score")  # the fresh heads of HF classifiers, peft's modules_to_save


@dataclass
class PromptTuningConfig:
    """What a PromptTuningModel was built with; saved with the prompt and checked when loading it."""

    technique: ClassVar[str] = "prompt_tuning"  # the tag saved in files
    num_virtual_tokens: int = 20  # N, the prompt length (peft's num_virtual_tokens)
    token_dim: int | None = None  # D, the width of a prompt vector; None: the model's embedding size
    init: str | None = "random"  # "random", "vocab" or "text" (see above); None: a prompt_encoder was given
    modules_to_save: list[str] | None = None  # trained in full, peft's rule; None: the classifier head if any

    def __post_init__(self):
        _check_prompt(self.num_virtual_tokens, self.token_dim, self.init, none_allowed=True)
        self.modules_to_save = _module_names(self.modules_to_save)


def _check_prompt(num_virtual_tokens, token_dim, init, none_allowed=False):
    """Two positive sizes and one of INITS; none_allowed (the config): token_dim, init may be None."""
    _positive_int("num_virtual_tokens", num_virtual_tokens)
    if token_dim is not None or not none_allowed:
        _positive_int("token_dim", token_dim)
    if (init is not None or not none_allowed) and init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")


def _module_names(names):
    """modules_to_save as a list (None, the default, stays None)."""
    if isinstance(names, str):
        raise TypeError(f"modules_to_save is a list of module names, got the string {names!r}: use [{names!r}]")
    return None if names is None else list(names)


def _positive_int(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _sibling(name: str, needed_for: str):  # prompt_common.py or adapter_files.py: peftkit's, or the copy beside
    try:  # (prefix_tuning.py and p_tuning.py use it too)
        return importlib.import_module(f".{name}", __package__) if __package__ else importlib.import_module(name)
    except ModuleNotFoundError as err:  # that file itself is missing (not one it imports): say which to copy
        missing = ModuleNotFoundError(f"{needed_for} needs {name}.py in this folder: copy peftkit/{name}.py", name=name)
        raise missing if err.name in (name, f"{__package__}.{name}") else err


def _embeddings(model, input_ids, inputs_embeds):  # (B, T, D): looked up from input_ids, or given (exactly one)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids (batch, seq_len) or inputs_embeds (batch, seq_len, dim)")
    if input_ids is not None and input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if inputs_embeds is not None and inputs_embeds.dim() != 3:
        raise ValueError(f"inputs_embeds must be (batch, seq_len, dim), got shape {tuple(inputs_embeds.shape)}")
    return model.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds


def _max_positions(model):
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None  # XLNet says -1: relative positions, no limit


def _wrapper_config(model, prompt_encoder, init, modules_to_save):
    """The checked config and the modules trained besides the prompt (which must fit the model)."""
    config = PromptTuningConfig(prompt_encoder.num_virtual_tokens, prompt_encoder.token_dim, init, modules_to_save)
    model_dim = model.get_input_embeddings().embedding_dim
    if prompt_encoder.token_dim != model_dim:
        raise ValueError(f"the prompt has token_dim={prompt_encoder.token_dim} but the model's embedding "
                         f"size is {model_dim}: use token_dim={model_dim}")
    n, max_positions = prompt_encoder.num_virtual_tokens, _max_positions(model)
    if max_positions is not None and n >= max_positions:
        raise ValueError(f"num_virtual_tokens={n} leaves no room for input: the model has "
                         f"max_position_embeddings={max_positions}; use fewer than {max_positions}")
    names, modules = _modules_to_save(model, config.modules_to_save)
    return replace(config, modules_to_save=names), modules


def _check_length(model, n, seq_len):
    max_positions = _max_positions(model)
    if max_positions is not None and n + seq_len > max_positions:
        raise ValueError(f"prompt ({n}) + input ({seq_len} tokens) = {n + seq_len} positions, more than the "
                         f"model's max_position_embeddings={max_positions}: truncate inputs to "
                         f"{max_positions - n} tokens or use fewer virtual tokens")


def _matches(name, target):
    """peft's rule: ``target`` is a module's full dotted name or its last dotted components."""
    return name == target or name.endswith("." + target)


def _modules_to_save(model, names):
    """(names, the modules they match); names=None: the classifier heads the model has."""
    modules = [(n, m) for n, m in model.named_modules() if n]
    if names is None:
        names = [h for h in HEAD_NAMES if any(_matches(n, h) for n, _ in modules)]
    for target in names:
        if not any(_matches(n, target) for n, _ in modules):
            raise ValueError(f"modules_to_save names {target!r}, but no module's name is or ends with it; the "
                             f"model's top-level modules are {sorted(n for n, _ in model.named_children())}")
    return list(names), [m for n, m in modules if any(_matches(n, t) for t in names)]


# --- saving ---

def _check_wrapper(model, config_class=None):  # a PromptTuningModel (or PTuningModel) carrying config_class's
    if not isinstance(model, PromptTuningModel):
        raise TypeError(f"expected a PromptTuningModel or PTuningModel, got {type(model).__name__}: wrap the "
                        "model first, e.g. PromptTuningModel(model, num_virtual_tokens=...)")
    carried = model.adapter_config.technique
    if config_class is not None and carried != config_class.technique:
        raise ValueError(f"this {type(model).__name__} carries {carried}, not {config_class.technique}: load "
                         f"its files with load_adapter from {carried}.py")


def _check_config(path, saved, config, fields):  # refuse a file whose config differs in `fields`, naming each
    differ = [f"{f} (file {getattr(saved, f)!r}, model {getattr(config, f)!r})" for f in fields
              if getattr(saved, f) != getattr(config, f)]
    if differ:
        raise ValueError(f"adapter file {path} does not fit this model: its config differs in "
                         f"{', '.join(differ)}. Build the wrapper with the file's config ({saved}) before loading.")


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The trained tensors (prompt, and head if trained) by name: all that a file holds."""
    _check_wrapper(model)
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model, path):
    """Write the trained tensors and ``model.adapter_config`` to one safetensors file; returns its Path."""
    return _sibling("adapter_files", "saving").write_adapter(adapter_state_dict(model), path, model.adapter_config)


def load_adapter(model, path) -> PromptTuningConfig:
    """Copy a saved prompt (and head) into ``model``, a PromptTuningModel built with the file's
    num_virtual_tokens, token_dim and modules_to_save (any init); returns the file's config.
    Every check runs before anything is copied, and the copy is all or nothing."""
    _check_wrapper(model, PromptTuningConfig)
    tensors, saved = (files := _sibling("adapter_files", "loading")).read_adapter(path, PromptTuningConfig)
    _check_config(path, saved, model.adapter_config, ("num_virtual_tokens", "token_dim", "modules_to_save"))
    files.copy_tensors(model, tensors, source=path, config=asdict(saved))
    return saved


def export_peft(model, path, base_model_name_or_path: str | None):  # peft's two files (prompt_common.py writes them)
    return _sibling("prompt_common", "export_peft").export_peft(model, path, base_model_name_or_path)

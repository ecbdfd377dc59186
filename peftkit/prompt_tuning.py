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

Initialisation (Lester et al., section 3): "random" draws N(0, 1) like peft (far from the
scale of real embeddings); "vocab" copies rows of the embedding table for random token ids;
"text" copies the embeddings of a tokenized phrase, repeated or cut to N tokens.
"""

import math

import torch
from torch import nn

try:  # optional: lets a copy of this single file work in a project that has only torch
    from .io import load_adapter, save_adapter
except ImportError:
    load_adapter = save_adapter = None

INITS = ("random", "vocab", "text")
HEAD_NAMES = ("classifier", "score")  # the fresh heads of HF classifiers, peft's modules_to_save


class SoftPrompt(nn.Module):
    """The N x D learned prompt. Named like peft's ``PromptEmbedding`` (``embedding.weight``)."""

    def __init__(self, num_virtual_tokens, token_dim, init="random", word_embeddings=None,
                 init_text=None, tokenizer=None):
        super().__init__()
        if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.num_virtual_tokens, self.token_dim = num_virtual_tokens, token_dim
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)  # N(0, 1): the "random" init
        if init == "random":
            return
        if word_embeddings is None:
            raise ValueError(f"init={init!r} copies rows of the model's embedding table: pass word_embeddings="
                             "model.get_input_embeddings()")
        if word_embeddings.embedding_dim != token_dim:
            raise ValueError(f"token_dim={token_dim} does not match the model's embedding size "
                             f"{word_embeddings.embedding_dim}: use token_dim={word_embeddings.embedding_dim}")
        if init == "vocab":
            token_ids = torch.randint(0, word_embeddings.num_embeddings, (num_virtual_tokens,))
        else:
            token_ids = self._text_ids(init_text, tokenizer, num_virtual_tokens)
        with torch.no_grad():
            rows = word_embeddings(token_ids.to(word_embeddings.weight.device))  # (N, D)
            self.embedding.weight.copy_(rows.float())

    @staticmethod
    def _text_ids(init_text, tokenizer, n) -> torch.Tensor:
        if tokenizer is None:
            raise ValueError("init='text' needs the model's tokenizer: pass tokenizer=...")
        if not init_text:
            raise ValueError("init='text' needs a phrase to start from: pass init_text='...'")
        ids = tokenizer(init_text)["input_ids"]  # with special tokens, as peft does
        if not ids:
            raise ValueError(f"init_text {init_text!r} tokenizes to no tokens")
        ids = (ids * math.ceil(n / len(ids)))[:n]  # repeat a short phrase, cut a long one
        return torch.tensor(ids, dtype=torch.long)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight  # (N, D)


def _max_positions(model):
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


class PromptTuningModel(nn.Module):
    """A frozen Hugging Face model (encoder classifier or causal LM) that reads a soft prompt first.

    ``modules_to_save``: names of child modules trained alongside the prompt; by default the
    classifier head (``classifier`` or ``score``) when the model has one, as peft does for
    sequence classification. Pass ``[]`` to train the prompt alone.
    ``prompt_encoder``: any module whose ``forward()`` returns the (N, D) prompt; defaults to a
    :class:`SoftPrompt`. P-tuning passes its reparameterising encoder here.

    Positions, as in peft: the prompt takes positions 0..N-1 and the input moves to N..N+T-1, so
    a model with learned absolute positions (BERT) has N fewer positions left for the input.
    """

    def __init__(self, model, num_virtual_tokens=20, init="random", init_text=None, tokenizer=None,
                 token_dim=None, modules_to_save=None, prompt_encoder=None):
        super().__init__()
        word_embeddings = model.get_input_embeddings()
        model_dim = word_embeddings.embedding_dim
        self.init = init if prompt_encoder is None else None  # recorded in saved configs
        if prompt_encoder is None:
            prompt_encoder = SoftPrompt(num_virtual_tokens, model_dim if token_dim is None else token_dim,
                                        init, word_embeddings, init_text, tokenizer)
        if prompt_encoder.token_dim != model_dim:
            raise ValueError(f"the prompt has token_dim={prompt_encoder.token_dim} but the model's embedding "
                             f"size is {model_dim}: use token_dim={model_dim}")
        self.num_virtual_tokens = prompt_encoder.num_virtual_tokens
        max_positions = _max_positions(model)
        if max_positions is not None and self.num_virtual_tokens >= max_positions:
            raise ValueError(f"num_virtual_tokens={self.num_virtual_tokens} leaves no room for input: the model "
                             f"has max_position_embeddings={max_positions}; use fewer than {max_positions}")
        children = dict(model.named_children())
        if modules_to_save is None:
            modules_to_save = [n for n in children if n in HEAD_NAMES]
        if isinstance(modules_to_save, str):
            raise TypeError(f"modules_to_save is a list of child names, got the string {modules_to_save!r}: "
                            f"use [{modules_to_save!r}]")
        for name in modules_to_save:
            if name not in children:
                raise ValueError(f"modules_to_save names {name!r}, but the model's children are {sorted(children)}")
        # HF's own test for a generating model (a causal LM); a classifier has no generate().
        self.is_causal_lm = bool(getattr(model, "can_generate", lambda: False)())
        # everything is checked: only now is the model changed
        model.requires_grad_(False)
        for name in modules_to_save:
            children[name].requires_grad_(True)
        self.modules_to_save = list(modules_to_save)
        self.base_model = model
        self.prompt_encoder = prompt_encoder

    def _check_length(self, seq_len):
        max_positions = _max_positions(self.base_model)
        if max_positions is not None and self.num_virtual_tokens + seq_len > max_positions:
            raise ValueError(f"prompt ({self.num_virtual_tokens}) + input ({seq_len} tokens) = "
                             f"{self.num_virtual_tokens + seq_len} positions, more than the model's "
                             f"max_position_embeddings={max_positions}: truncate inputs to "
                             f"{max_positions - self.num_virtual_tokens} tokens or use fewer virtual tokens")

    def prompt_inputs(self, input_ids, attention_mask=None):
        """The model inputs with the prompt in front: (inputs_embeds (B, N+T, D), attention_mask (B, N+T))."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        batch, seq_len = input_ids.shape
        self._check_length(seq_len)
        embeds = self.base_model.get_input_embeddings()(input_ids)  # (B, T, D)
        prompt = self.prompt_encoder().to(embeds.dtype)  # (N, D)
        prompt = prompt.unsqueeze(0).expand(batch, -1, -1)  # (B, N, D)
        inputs_embeds = torch.cat([prompt, embeds], dim=1)  # (B, N+T, D)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ones = attention_mask.new_ones(batch, self.num_virtual_tokens)
        return inputs_embeds, torch.cat([ones, attention_mask], dim=1)  # (B, N+T)

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None, **kwargs):
        """Run the model on [prompt; input]; returns the model's own output (logits, loss)."""
        if "position_ids" in kwargs or "inputs_embeds" in kwargs:
            raise ValueError("pass input_ids only: the wrapper builds inputs_embeds itself, and the model "
                             "numbers the positions of prompt and input together")
        inputs_embeds, attention_mask = self.prompt_inputs(input_ids, attention_mask)
        batch = input_ids.shape[0]
        # One integer label per token (language model, token tagging): the output has N more
        # positions, so the prompt gets -100 (no loss). One label per sequence passes as it is.
        per_token = labels is not None and labels.shape == input_ids.shape and not labels.is_floating_point()
        if labels is not None and self.is_causal_lm and not per_token:
            raise ValueError(f"a language model's labels must be token ids shaped like input_ids "
                             f"{tuple(input_ids.shape)}, got {labels.dtype} {tuple(labels.shape)}")
        if per_token:
            ignore = labels.new_full((batch, self.num_virtual_tokens), -100)
            labels = torch.cat([ignore, labels], dim=1)  # (B, N+T)
        if token_type_ids is not None:  # the prompt counts as segment 0 (BERT's sentence A), as in peft
            zeros = token_type_ids.new_zeros(batch, self.num_virtual_tokens)
            kwargs["token_type_ids"] = torch.cat([zeros, token_type_ids], dim=1)  # (B, N+T)
        return self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Generate after [prompt; input]; returns input_ids followed by the new tokens, like HF.

        Batches of different lengths must be padded on the left, so every row ends at its last token.
        """
        if not self.is_causal_lm:
            raise ValueError(f"generate needs a causal language model, not {type(self.base_model).__name__}")
        if kwargs.get("return_dict_in_generate"):
            raise ValueError("PromptTuningModel.generate returns token ids only: pass return_dict_in_generate=False")
        inputs_embeds, attention_mask = self.prompt_inputs(input_ids, attention_mask)
        # Given only inputs_embeds, HF returns only the new tokens: (B * k, new) for k sequences per input.
        new_tokens = self.base_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        per_input = new_tokens.shape[0] // input_ids.shape[0]  # num_return_sequences, HF repeats each row k times
        return torch.cat([input_ids.repeat_interleave(per_input, dim=0), new_tokens], dim=1)

    def prompt_state_dict(self) -> dict:
        """The trained tensors (prompt, and head if trained) by name: all that a checkpoint needs."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def prompt_config(self) -> dict:
        return {"technique": "prompt_tuning", "num_virtual_tokens": self.num_virtual_tokens,
                "token_dim": self.prompt_encoder.token_dim, "init": self.init,
                "modules_to_save": self.modules_to_save}

    def save(self, path):
        """Write the trained tensors and the config to one safetensors file (via peftkit.io)."""
        if save_adapter is None:
            raise ImportError("save() uses peftkit/io.py; outside peftkit, torch.save(self.prompt_state_dict())")
        return save_adapter(self, path, config=self.prompt_config())

    def load(self, path) -> dict:
        """Copy a saved prompt (and head) into this model; returns the saved config."""
        if load_adapter is None:
            raise ImportError("load() uses peftkit/io.py; outside peftkit, use load_state_dict(strict=False)")
        return load_adapter(self, path)

"""P-tuning: a soft prompt produced by a small trained network instead of learned directly.

Paper: Liu, Zheng, Du, Ding, Qian, Yang & Tang, "GPT Understands, Too" (2021; AI Open 2023).

Equation, with a table E of N free vectors (N x D) and a prompt encoder f:
    lstm:  P = MLP(BiLSTM(E))     MLP: Linear(2H, 2H) -> ReLU -> Linear(2H, D)
    mlp:   P = MLP(E)             MLP: Linear(D, H) -> ReLU -> Linear(H, H) -> ReLU -> Linear(H, D)
    inputs_embeds = [P; embed(x)]                                  exactly as in prompt tuning
Why: the N prompt vectors are no longer independent. The encoder ties them together (the LSTM
lets each one depend on its neighbours), which the paper found makes optimisation faster and
less sensitive to the learning rate than tuning E directly.

Trained: E and the encoder (plus a classifier's fresh head, as in prompt_tuning.py).
Frozen: every weight of the model. After training, ``export_prompt()`` runs f once and keeps
only P, so the deployed artifact is an N x D tensor, as in peft's saved checkpoints.

How this differs from the paper: the paper places prompt vectors inside a template, between
the input's words (e.g. "[P0..Pi] x [Pi+1..Pj] [MASK]"), and keeps some real "anchor" tokens
in the template (e.g. a "?"). Here, as in peft's ``PromptEncoder``, all N vectors sit in front
of the input and there are no anchors. Architecture and parameter names follow peft's
``PromptEncoder`` (``embedding``, ``lstm_head``, ``mlp_head``), so weights copy across.
This file needs ``prompt_tuning.py`` beside it.
"""

from dataclasses import asdict, dataclass

import torch
from torch import nn

try:
    from .prompt_tuning import PromptTuningModel, SoftPrompt, load_adapter
except ImportError:  # copied into a project as a plain file, beside prompt_tuning.py
    from prompt_tuning import PromptTuningModel, SoftPrompt, load_adapter

try:
    from .io import load_tensors
except ImportError:
    load_tensors = None

KINDS = ("lstm", "mlp")


@dataclass
class PTuningConfig:
    num_virtual_tokens: int = 20  # N, the prompt length (peft's num_virtual_tokens)
    encoder_hidden_size: int | None = None  # H; None: the model's embedding size, as peft
    kind: str = "mlp"  # "mlp" (peft's default) or "lstm" (the paper's)
    num_layers: int = 2  # LSTM layers, or hidden layers of the MLP (peft's MLP has 2)
    dropout: float = 0.0  # between LSTM layers; the MLP has none


class PromptEncoder(nn.Module):
    """Virtual-token embeddings reparameterised by a bidirectional LSTM + MLP, or by an MLP."""

    def __init__(self, num_virtual_tokens, token_dim, encoder_hidden_size, kind="mlp", num_layers=2, dropout=0.0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        for name, value in [("num_virtual_tokens", num_virtual_tokens), ("token_dim", token_dim),
                            ("encoder_hidden_size", encoder_hidden_size), ("num_layers", num_layers)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if kind == "mlp" and dropout:
            raise ValueError(f"dropout={dropout} applies between LSTM layers; the MLP encoder has none: "
                             "use kind='lstm' or dropout=0.0")
        self.num_virtual_tokens, self.token_dim, self.kind = num_virtual_tokens, token_dim, kind
        hidden = encoder_hidden_size
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)  # E
        if kind == "lstm":
            self.lstm_head = nn.LSTM(token_dim, hidden, num_layers=num_layers, dropout=dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(),
                                          nn.Linear(2 * hidden, token_dim))
        else:
            layers = [nn.Linear(token_dim, hidden), nn.ReLU()]
            for _ in range(num_layers - 1):
                layers += [nn.Linear(hidden, hidden), nn.ReLU()]
            self.mlp_head = nn.Sequential(*layers, nn.Linear(hidden, token_dim))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight.unsqueeze(0)  # (1, N, D): the N tokens as one sequence
        if self.kind == "lstm":
            x = self.lstm_head(x)[0]  # (1, N, 2H): forward and backward states side by side
        return self.mlp_head(x)[0]  # (N, D)


class PTuningModel(PromptTuningModel):
    """Prompt tuning whose prompt comes from a :class:`PromptEncoder`; see :class:`PromptTuningModel`."""

    def __init__(self, model, config: PTuningConfig | None = None, modules_to_save=None):
        config = config or PTuningConfig()
        if not isinstance(config, PTuningConfig):
            raise TypeError(f"config must be a PTuningConfig, got {type(config).__name__}")
        token_dim = model.get_input_embeddings().embedding_dim
        hidden = token_dim if config.encoder_hidden_size is None else config.encoder_hidden_size
        encoder = PromptEncoder(config.num_virtual_tokens, token_dim, hidden, config.kind, config.num_layers,
                                config.dropout)  # checks every field before the model is touched
        super().__init__(model, modules_to_save=modules_to_save, prompt_encoder=encoder)
        self.config = config

    @property
    def exported(self) -> bool:
        return isinstance(self.prompt_encoder, SoftPrompt)

    def export_prompt(self) -> torch.Tensor:
        """Run the encoder once and keep only its output: the (N, D) prompt; returns a copy of it."""
        if not self.exported:
            encoder = self.prompt_encoder.eval()  # no LSTM dropout in the prompt we keep
            # Run with autograd on, as in training: no_grad picks another LSTM kernel (last-bit differences).
            prompt = encoder().detach()  # (N, D)
            self.prompt_encoder = SoftPrompt(encoder.num_virtual_tokens, encoder.token_dim).to(prompt.device)
            with torch.no_grad():
                self.prompt_encoder.embedding.weight.copy_(prompt)
        return self.prompt_encoder().detach().clone()

    def prompt_config(self) -> dict:
        return {"technique": "p_tuning", **asdict(self.config), "exported": self.exported,
                "modules_to_save": self.modules_to_save}

    def load(self, path) -> dict:
        """Load a checkpoint; an exported one (prompt only) first turns this model into its exported form.

        The file is checked against the model before anything changes; on any failure the model
        (its encoder included) is left as it was.
        """
        if load_tensors is None or load_adapter is None:
            raise ImportError("load() uses peftkit/io.py; outside peftkit, use load_state_dict(strict=False)")
        tensors, config = load_tensors(path)
        if not config.get("exported") or self.exported:
            return load_adapter(self, path)  # checks every key and shape before copying
        encoder = self.prompt_encoder
        # What the exported form of this model will hold: the (N, D) prompt and any trained head.
        expected = {n: tuple(p.shape) for n, p in self.named_parameters()
                    if p.requires_grad and not n.startswith("prompt_encoder.")}
        expected["prompt_encoder.embedding.weight"] = (encoder.num_virtual_tokens, encoder.token_dim)
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if found != expected:
            shapes = [f"{k}: file {found[k]} vs model {expected[k]}" for k in sorted(found.keys() & expected.keys())
                      if found[k] != expected[k]]
            raise ValueError(f"exported prompt file {path} does not fit this model: missing keys "
                             f"{sorted(expected.keys() - found.keys())}, unexpected keys "
                             f"{sorted(found.keys() - expected.keys())}, wrong shapes {shapes}. It was saved with "
                             f"{config}; build the model with the same num_virtual_tokens and base model.")
        was_training = encoder.training
        try:
            self.export_prompt()  # its values are replaced by the file's just below
            return load_adapter(self, path)
        except BaseException:
            self.prompt_encoder = encoder.train(was_training)  # back to the encoder, as it was
            raise

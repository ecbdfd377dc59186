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
This file needs ``prompt_tuning.py`` beside it (and ``prompt_common.py`` for ``export_peft``, peft's format).

    model = PTuningModel(classifier, PTuningConfig(num_virtual_tokens=20, kind="lstm"))
    ...train (the encoder and the classifier head)...
    save_adapter(model, "encoder.safetensors")     # to resume training
    model.export_prompt()                          # keep only P = f(E)
    save_adapter(model, "prompt.safetensors")      # to deploy: N x D numbers and the head
"""

from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import torch
from torch import nn

try:
    from .prompt_tuning import (PromptTuningModel, SoftPrompt, _check_config, _check_wrapper, _sibling,
                                _module_names, _positive_int, adapter_state_dict, export_peft,  # noqa: F401
                                save_adapter)
except ImportError:  # copied into a project as a plain file, beside prompt_tuning.py
    from prompt_tuning import (PromptTuningModel, SoftPrompt, _check_config, _check_wrapper, _sibling,
                               _module_names, _positive_int, adapter_state_dict, export_peft,  # noqa: F401
                               save_adapter)


class PromptEncoder(nn.Module):
    """Virtual-token embeddings reparameterised by a bidirectional LSTM + MLP, or by an MLP.

    ``num_transformer_submodules=2`` (peft's name; T5): E has 2N rows, one set per transformer stack, as in
    peft. Only the first N outputs become the encoder's prompt, but the LSTM reads all 2N.
    """

    def __init__(self, num_virtual_tokens, token_dim, encoder_hidden_size, kind="mlp", num_layers=2, dropout=0.0,
                 num_transformer_submodules=1):
        super().__init__()
        _check_encoder(num_virtual_tokens, token_dim, encoder_hidden_size, kind, num_layers, dropout)
        if num_transformer_submodules not in (1, 2):
            raise ValueError(f"num_transformer_submodules must be 1 or 2 (T5), got {num_transformer_submodules!r}")
        self.num_virtual_tokens, self.token_dim, self.kind = num_virtual_tokens, token_dim, kind
        hidden = encoder_hidden_size
        self.embedding = nn.Embedding(num_virtual_tokens * num_transformer_submodules, token_dim)  # E
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
        x = self.embedding.weight.unsqueeze(0)  # (1, N, D): the N tokens as one sequence (T5: 2N)
        if self.kind == "lstm":
            x = self.lstm_head(x)[0]  # (1, N, 2H): forward and backward states side by side
        return self.mlp_head(x)[0][:self.num_virtual_tokens]  # (N, D)


KINDS = ("lstm", "mlp")


@dataclass
class PTuningConfig:
    """What a PTuningModel was built with; saved with the encoder (or its exported prompt)."""

    technique: ClassVar[str] = "p_tuning"  # the tag saved in files
    num_virtual_tokens: int = 20  # N, the prompt length (peft's num_virtual_tokens)
    encoder_hidden_size: int | None = None  # H; None: the model's embedding size, as peft
    kind: str = "mlp"  # "mlp" (peft's default) or "lstm" (the paper's)
    num_layers: int = 2  # LSTM layers, or hidden layers of the MLP (peft's MLP has 2)
    dropout: float = 0.0  # between LSTM layers; the MLP has none
    modules_to_save: list[str] | None = None  # trained in full, peft's rule; None: the classifier head if any
    exported: bool = False  # True once export_prompt() has replaced the encoder by its output P

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        _positive_int("num_virtual_tokens", self.num_virtual_tokens)
        if self.encoder_hidden_size is not None:
            _positive_int("encoder_hidden_size", self.encoder_hidden_size)
        _positive_int("num_layers", self.num_layers)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.kind == "mlp" and self.dropout:
            raise ValueError(f"dropout={self.dropout} applies between LSTM layers; the MLP encoder has none: "
                             "use kind='lstm' or dropout=0.0")
        self.modules_to_save = _module_names(self.modules_to_save)
        if not isinstance(self.exported, bool):
            raise TypeError(f"exported must be True or False, got {self.exported!r}")


def _check_encoder(num_virtual_tokens, token_dim, encoder_hidden_size, kind, num_layers, dropout):
    """PromptEncoder's arguments: the config's checks, and the two widths it must be given (it sees no model)."""
    PTuningConfig(num_virtual_tokens, encoder_hidden_size, kind, num_layers, dropout)
    _positive_int("token_dim", token_dim)
    _positive_int("encoder_hidden_size", encoder_hidden_size)


# --- injecting into a model ---

class PTuningModel(PromptTuningModel):
    """Prompt tuning whose prompt comes from a :class:`PromptEncoder`; see :class:`PromptTuningModel`.

    The config it was built with is ``adapter_config``, a :class:`PTuningConfig` (with
    ``encoder_hidden_size`` and ``modules_to_save`` filled in, and ``exported`` kept up to date).
    A config with ``exported=True`` builds the model in its exported form.
    """

    def __init__(self, model, config: PTuningConfig | None = None):
        config = PTuningConfig() if config is None else config
        if not isinstance(config, PTuningConfig):
            raise TypeError(f"config must be a PTuningConfig, got {type(config).__name__}")
        token_dim = model.get_input_embeddings().embedding_dim
        if config.encoder_hidden_size is None:
            config = replace(config, encoder_hidden_size=token_dim)
        stacks = 2 if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else 1  # T5: as peft
        encoder = PromptEncoder(config.num_virtual_tokens, token_dim, config.encoder_hidden_size, config.kind,
                                config.num_layers, config.dropout, stacks)
        super().__init__(model, modules_to_save=config.modules_to_save, prompt_encoder=encoder)
        self.adapter_config = replace(config, modules_to_save=self.adapter_config.modules_to_save, exported=False)
        if config.exported:
            self.export_prompt()

    @property
    def exported(self) -> bool:
        return self.adapter_config.exported

    def export_prompt(self) -> torch.Tensor:
        """Run the encoder once and keep only its output: the (N, D) prompt; returns a copy of it."""
        if not self.exported:
            encoder = self.prompt_encoder.eval()  # no LSTM dropout in the prompt we keep
            # Run with autograd on, as in training: no_grad picks another LSTM kernel (last-bit differences).
            prompt = encoder().detach()  # (N, D)
            self.prompt_encoder = SoftPrompt(encoder.num_virtual_tokens, encoder.token_dim).to(prompt.device)
            with torch.no_grad():
                self.prompt_encoder.embedding.weight.copy_(prompt)
            self.adapter_config = replace(self.adapter_config, exported=True)
        return self.prompt_encoder().detach().clone()


# --- saving ---
# adapter_state_dict and save_adapter are prompt_tuning's (imported above): the file's
# technique tag and config come from model.adapter_config, here a PTuningConfig.

def load_adapter(model, path) -> PTuningConfig:
    """Copy a saved encoder, or an exported prompt, (and head) into ``model``; returns the file's config.

    ``model`` must be a PTuningModel built with the file's num_virtual_tokens and modules_to_save
    (and, for an encoder file, its encoder_hidden_size, kind and num_layers). An exported file
    (the prompt only) first turns a model that is not yet exported into its exported form; an
    exported model cannot take an encoder back. On any failure, even KeyboardInterrupt, the
    model (its encoder included) is left as it was.
    """
    _check_wrapper(model, PTuningConfig)
    tensors, saved = (files := _sibling("adapter_files", "loading")).read_adapter(path, PTuningConfig)
    if model.exported and not saved.exported:
        raise ValueError(f"adapter file {path} holds a prompt encoder, but this model's prompt was exported "
                         "(export_prompt()) and cannot take an encoder back: load it into a new PTuningModel")
    fields = ["num_virtual_tokens", "modules_to_save"]
    if not saved.exported:
        fields += ["encoder_hidden_size", "kind", "num_layers"]
    _check_config(path, saved, model.adapter_config, fields)
    encoder, was_training, config = model.prompt_encoder, model.prompt_encoder.training, model.adapter_config
    try:
        if saved.exported:
            model.export_prompt()  # its values are replaced by the file's just below
        files.copy_tensors(model, tensors, source=path, config=asdict(saved))
    except BaseException:
        model.prompt_encoder, model.adapter_config = encoder.train(was_training), config  # back as it was
        raise
    return saved

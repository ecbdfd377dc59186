"""LoRA for embedding layers (Hu et al., 2021, arXiv:2106.09685, applied to a lookup table as in Hugging Face peft).

An ``nn.Embedding`` is a linear layer applied to one-hot token vectors, ``y = W[token]`` with W of shape
(num_embeddings, embedding_dim). LoRA adds a low-rank update to that table:

    y = W[token] + scaling * (A^T)[token] B^T        A: (rank, num_embeddings), B: (embedding_dim, rank)
    delta W = scaling * (B A)^T                      shape (num_embeddings, embedding_dim), like W

The names, shapes and initialisation are peft's (``lora_embedding_A``, ``lora_embedding_B``), so a file
exported from here loads in peft: A starts at zero and B normal, the reverse of a linear layer's LoRA (the
lookup ``A^T[token]`` of a zero A is zero, so the model starts out unchanged, and the gradient reaching A is
``B^T`` times the output's, not zero). As in peft, there is no dropout on this path: dropping a token's
lookup would be dropping the token. Everything else (``scaling``, ``merge``, ``unmerge``, saving) is
``LoRALinear``'s from ``lora.py``, which this file needs beside it. Merging writes into ``base.weight``, so an
output head tied to it (GPT-2's ``lm_head``) changes with it, as in peft. GPT-2's ``Conv1D`` needs no class of its own:
``LoRALinear`` wraps it with the same A and B and transposes delta W when merging (peft's ``fan_in_fan_out``).
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

try:
    from .lora import LoRAConfig, LoRALinear
except ImportError:  # copied into a project as plain files, beside lora.py
    from lora import LoRAConfig, LoRALinear


class LoRAEmbedding(LoRALinear):
    """A frozen ``nn.Embedding`` ``base`` plus a trainable low-rank update of its table, ``scaling * (B A)^T``."""

    def __init__(self, base: nn.Embedding, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False):
        nn.Module.__init__(self)  # not LoRALinear's __init__: that one builds linear factors
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"LoRAEmbedding wraps an nn.Embedding, got {type(base).__name__}")
        LoRAConfig([], rank, alpha, dropout, rslora)  # checks the hyperparameters
        self.base, self.rank, self.alpha, self.rslora = base, rank, alpha, rslora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.fan_in_fan_out, self.merged = False, False
        self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        dtype = torch.float64 if base.weight.dtype == torch.float64 else torch.float32  # as LoRALinear
        factory = dict(device=base.weight.device, dtype=dtype)
        self.lora_embedding_A = nn.Parameter(torch.zeros(rank, base.num_embeddings, **factory))  # (rank, vocab)
        self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, rank, **factory))  # (dim, rank)
        base.requires_grad_(False)  # last: a failed construction leaves the base as it was

    def update(self, ids: torch.Tensor) -> torch.Tensor:  # what LoRALinear.forward adds to the lookup
        base = self.base  # the lookup with the base's own options (padding_idx, max_norm, ...)
        after_a = F.embedding(ids, self.lora_embedding_A.T, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)  # (..., rank): the rows A^T[token]
        return after_a @ self.lora_embedding_B.T * self.scaling  # (..., rank) @ (rank, dim) -> (..., dim)

    def delta_weight(self) -> torch.Tensor:
        """delta W = scaling * (B A)^T, shape (num_embeddings, embedding_dim) like ``base.weight``."""
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling  # ((dim, rank) @ (rank, vocab))^T


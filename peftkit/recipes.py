"""One training recipe per method for the topic task, shared by every notebook and by
``benchmarks/compare.py``, so that a method gives the same number wherever it is trained.

The protocol:

- data: ``peftkit.data.topic_splits()``: 400 training utterances, 101 for validation (a stratified
  20% of train), 168 for test; utterances cut at ``max_length`` tokens.
- model: all-MiniLM-L6-v2 read through mean pooling (``load_encoder(num_labels=8)``), a new head
  drawn from the run's seed.
- optimiser: AdamW (weight decay 0.01), 10% warm-up then linear decay over ``max_epochs``, gradient
  clipping at 1.0. The technique's parameters train at ``lr``; the new head is its own parameter
  group at ``head_lr`` (the rate the linear probe selected: a head trained at a technique's small
  rate is what kept P-tuning near chance in earlier versions of the course).
- selection: every run trains the whole schedule (the rate decays to zero at ``max_epochs``, which is
  where the curves flatten); after every epoch the validation split is scored and the model keeps
  the weights of the epoch with the best validation accuracy (ties: lower loss). No early stopping:
  on 101 validation examples one example is a point of accuracy, and stopping 3 epochs after a
  lucky early peak cost up to 2 points of test accuracy (probe 0.802 vs 0.810, Houlsby 0.816 vs
  0.827, mean of 3 seeds; measured for the course, recorded in 08).
- the rates: ``lr`` is the best of ``lr_grid`` on the validation split, chosen by
  ``benchmarks/compare.py`` (seed 0); the test split plays no part in any choice.

    recipe = RECIPES["LoRA q/v"]
    model, tokenizer = classifier(seed=0)
    model = recipe.build(model, tokenizer)
    history = train(model, tokenizer, recipe, splits, seed=0)
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .adapters import add_adapters
from .data import ClassificationCollator, topic_splits
from .dora import add_dora
from .ia3 import add_ia3
from .lora import add_lora
from .models import load_encoder
from .p_tuning import PTuningConfig, PTuningModel
from .prompt_tuning import PromptTuningModel
from .qlora import prepare_for_qlora
from .train import History, fit, seed_everything

PROMPT_TEXT = "what is the topic of this question?"  # 10 tokens with [CLS] and [SEP]
NUM_VIRTUAL_TOKENS = 10


# --- how each method turns the classifier into the model to train ----------------------------

def full_fine_tuning(model, tokenizer):
    return model


def linear_probe(model, tokenizer):
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    return model


def adapters(placement: str, bottleneck: int | None = None) -> Callable:
    """Adapters at their config's size (hidden / 16), or with a ``bottleneck`` of that many units."""
    def build(model, tokenizer):
        size = {} if bottleneck is None else {"reduction_factor": model.config.hidden_size / bottleneck}
        return add_adapters(model, placement, modules_to_save=["classifier"], **size)
    return build


def lora(targets, quantize: bool = False, rank: int = 8, rslora: bool = False) -> Callable:
    """LoRA r=8, alpha=16; QLoRA: the same LoRA over an NF4 base (the head stays float). ``rank`` and
    ``rslora`` change the size at alpha 16 (the pitfalls benchmark)."""
    def build(model, tokenizer):
        model = prepare_for_qlora(model) if quantize else model
        return add_lora(model, targets, rank=rank, alpha=16, rslora=rslora, modules_to_save=["classifier"])
    return build


def dora(targets, rank: int = 8) -> Callable:
    """DoRA at LoRA's size (r=8, alpha=16): a magnitude per output on top of the same factors."""
    return lambda model, tokenizer: add_dora(model, targets, rank=rank, alpha=16, modules_to_save=["classifier"])


def ia3(model, tokenizer):
    """(IA)³ at peft's defaults for BERT: rescale keys, values and the feed-forward's input to output.dense."""
    return add_ia3(model, modules_to_save=["classifier"])


def prompt_tuning(model, tokenizer):
    return PromptTuningModel(model, num_virtual_tokens=NUM_VIRTUAL_TOKENS, init="text", init_text=PROMPT_TEXT,
                             tokenizer=tokenizer)


def p_tuning(kind: str) -> Callable:
    return lambda model, tokenizer: PTuningModel(model, PTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS, kind=kind))


# --- the recipes ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    build: Callable  # (classifier, tokenizer) -> the model to train
    lr: float  # the technique's parameters (full fine-tuning: every encoder weight)
    head_lr: float  # the new classifier head, its own parameter group
    lr_grid: tuple = ()  # the rates for `lr` that compare.py searched on validation (seed 0)
    max_epochs: int = 12  # the linear decay reaches zero here
    patience: int | None = None  # stop after this many epochs without a better score (None: never)
    batch_size: int = 16
    max_length: int = 16  # tokens per utterance (the median is 9)
    searches_head: bool = False  # the linear probe: its only rate is the head's
    lr_scale: tuple = ()  # (module name, factor) pairs: rate multipliers inside the technique (LoRA+: lora_B x 16)

    def collate(self, tokenizer) -> ClassificationCollator:
        return ClassificationCollator(tokenizer, self.max_length)


HEAD_LR = 1e-2  # the head of every other method: the probe's rate under the first protocol (early stopping)
GRID = (3e-4, 1e-3, 3e-3, 1e-2)  # adapters, LoRA, P-tuning: a decade and a half
LORAPLUS_RATIO = 16  # B's rate over A's: Hayou et al.'s recommendation (2**4), peft's loraplus_lr_ratio
RECIPES = {
    "full fine-tuning": Recipe(full_fine_tuning, lr=0.0001, head_lr=HEAD_LR, lr_grid=(1e-5, 3e-5, 1e-4, 3e-4)),
    "linear probe": Recipe(linear_probe, lr=0.003, head_lr=0.003, lr_grid=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
                           searches_head=True),
    "Houlsby adapters": Recipe(adapters("houlsby"), lr=0.01, head_lr=HEAD_LR, lr_grid=GRID),
    "Pfeiffer adapters": Recipe(adapters("pfeiffer"), lr=0.01, head_lr=HEAD_LR, lr_grid=GRID),
    "LoRA q/v": Recipe(lora(["query", "value"]), lr=9e-05, head_lr=HEAD_LR, lr_grid=GRID),
    "LoRA all-linear": Recipe(lora("all-linear"), lr=0.001, head_lr=HEAD_LR, lr_grid=GRID),
    "prompt tuning": Recipe(prompt_tuning, lr=0.01, head_lr=HEAD_LR, lr_grid=(3e-3, 1e-2, 3e-2, 1e-1)),
    "P-tuning LSTM": Recipe(p_tuning("lstm"), lr=0.001, head_lr=HEAD_LR, lr_grid=GRID),
    "P-tuning MLP": Recipe(p_tuning("mlp"), lr=0.001, head_lr=HEAD_LR, lr_grid=GRID),
    "QLoRA all-linear": Recipe(lora("all-linear", quantize=True), lr=0.001, head_lr=HEAD_LR, lr_grid=GRID),
    # issue 21: beyond the original six (notebook 11)
    "DoRA all-linear": Recipe(dora("all-linear"), lr=0.001, head_lr=HEAD_LR, lr_grid=GRID),
    "LoRA+ all-linear": Recipe(lora("all-linear"), lr=0.0003, head_lr=HEAD_LR, lr_grid=(3e-5, 1e-4, 3e-4, 1e-3),
                               lr_scale=(("lora_B", LORAPLUS_RATIO),)),
    "(IA)³": Recipe(ia3, lr=0.001, head_lr=HEAD_LR, lr_grid=(1e-3, 3e-3, 1e-2, 3e-2)),
}


# --- running a recipe --------------------------------------------------------------------------

def classifier(seed: int = 0, num_labels: int = 8):
    """The course's classifier with a head drawn from ``seed``: (model, tokenizer)."""
    seed_everything(seed)
    return load_encoder(num_labels=num_labels)


def train(model, tokenizer, recipe: Recipe, splits=None, *, seed: int = 0, lr: float | None = None,
          head_lr: float | None = None, max_epochs: int | None = None, batch_size: int | None = None,
          desc: str = "train", progress: bool = True, on_epoch=None, comm_hook=None, **fit_options) -> History:
    """Train ``model`` (already built by ``recipe.build``) with ``recipe`` on ``splits``
    (default ``topic_splits()``); ``lr``, ``head_lr``, ``max_epochs`` and ``batch_size`` override the
    recipe (the search, a notebook's smaller budget, or the per-rank batch under DDP); ``fit_options``
    go to ``fit`` as they are (``weight_decay``, ``lr_scale``, ``patience``: the pitfalls notebook's
    remedies; a recipe's own ``lr_scale``, LoRA+'s, is the default)."""
    splits = topic_splits() if splits is None else splits
    fit_options = {"patience": recipe.patience, "lr_scale": dict(recipe.lr_scale) or None, **fit_options}
    return fit(model, splits["train"], recipe.collate(tokenizer), splits["validation"],
               epochs=max_epochs or recipe.max_epochs, batch_size=batch_size or recipe.batch_size,
               lr=lr or recipe.lr, head_lr=head_lr or recipe.head_lr, seed=seed,
               desc=desc, progress=progress, on_epoch=on_epoch, comm_hook=comm_hook, **fit_options)


def run(name: str, seed: int = 0, splits=None, **overrides) -> tuple[torch.nn.Module, History]:
    """Build and train the method ``name`` from a fresh classifier drawn from ``seed``."""
    recipe = RECIPES[name]
    model, tokenizer = classifier(seed)
    model = recipe.build(model, tokenizer)
    return model, train(model, tokenizer, recipe, splits, seed=seed, desc=name, **overrides)


# --- the recorded comparison -------------------------------------------------------------------

COMPARE_JSON = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.json"
CONTEXT = ("linear probe", "full fine-tuning", "LoRA q/v", "LoRA all-linear")  # every notebook's yardsticks


def recorded(path: str | Path = COMPARE_JSON) -> dict[str, dict]:
    """``benchmarks/compare.json``'s topic-task rows by method: the recipe run on 3 seeds each."""
    rows = json.loads(Path(path).read_text())["topic_classification"]
    return {row["method"]: row for row in rows}


def results_table(methods=(), this_notebook: dict[str, str] | None = None,
                  path: str | Path = COMPARE_JSON) -> str:
    """A table of the recorded mean ± std of 3 seeds for ``methods``, under the course's yardsticks
    (``CONTEXT``: probe, full fine-tuning, LoRA), with a notebook's own runs in the last column."""
    rows, ours = recorded(path), this_notebook or {}
    unknown = [m for m in [*methods, *ours] if m not in rows]
    if unknown:
        raise KeyError(f"not in {Path(path).name}: {unknown}; recorded methods: {sorted(rows)}")
    full = rows["full fine-tuning"]["test_accuracy_mean"]
    lines = [f"{'recorded, 3 seeds':<19}{'trainable':>10}{'test accuracy':>16}{'vs full FT':>12}{'this notebook':>15}"]
    for method in dict.fromkeys([*CONTEXT, *methods]):
        r = rows[method]
        test = f"{r['test_accuracy_mean']:.3f} ± {r['test_accuracy_std']:.3f}"
        gap = 100 * (r["test_accuracy_mean"] - full)
        lines.append(f"{method:<19}{r['trainable_percent']:>9.2f}%{test:>16}{gap:>+9.1f} pt{ours.get(method, '-'):>15}")
    return "\n".join(lines)

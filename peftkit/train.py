"""One small training loop for every notebook, plus the measurements the course reports.

``fit``: AdamW with weight decay, linear warm-up then linear decay, gradient clipping, a tqdm
progress bar, training loss per step, validation loss and accuracy per epoch, the new head in its
own parameter group, the best epoch's weights kept (with ``patience``, stopping early once validation
has stopped improving; the course's recipes train their whole schedule), and a clear stop if the loss
becomes NaN or infinite. Any model whose forward returns ``.loss`` works. Under ``torch.distributed`` (launched with ``torchrun`` or ``accelerate launch``,
see ``peftkit.distributed``) the same loop trains data-parallel with DDP.
"""

import math
import random
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm  # plain text bar: no widget state in committed notebooks

from .distributed import rank as current_rank
from .prefix_tuning import PrefixTuningModel
from .prompt_tuning import HEAD_NAMES  # the new heads of HF classifiers (peft's modules_to_save)


def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    """The course runs on the CPU, and on a GPU when one is present."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def count_parameters(model: torch.nn.Module, name: str = "model", show: bool = True) -> dict:
    """Trainable / total parameters and the trainable percentage (shared tensors counted once).

    Frozen 4-bit weights (``peftkit.nf4.NF4Linear``) are not ``Parameter``s; they count in the total.
    """
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    total += sum(m.weight.numel() for m in model.modules() if getattr(type(m), "is_peftkit_4bit", False))
    row = {"name": name, "trainable": trainable, "total": total, "percent": 100 * trainable / total}
    if show:
        print(f"{'':<24}{'trainable':>12}{'total':>14}{'%':>9}")
        print(f"{name:<24}{trainable:>12,}{total:>14,}{row['percent']:>8.3f}%")
    return row


def enable_checkpointing(model: torch.nn.Module, use_reentrant: bool = False) -> torch.nn.Module:
    """Activation (gradient) checkpointing for a Hugging Face model under any peftkit technique.

    Each layer keeps only its input; its activations are recomputed in backward: most of the
    activation memory for about one more forward pass of time. The trap (transformers #26221,
    peft #1142): with the embeddings frozen, no input of a checkpointed layer requires grad, and
    re-entrant checkpointing (``use_reentrant=True``) then gives nothing inside the layer a gradient
    (LoRA, adapters): the loss stays flat while nothing trains. The default, non-reentrant
    checkpointing, has no such blind spot; with ``use_reentrant=True`` the embeddings' output is
    made to require grad (``enable_input_require_grads``; transformers 5 does this itself for
    models that read ``input_ids``, 4.x does not), which closes it too. Prefix-tuning is
    refused: its keys and values travel in the cache, which checkpointed layers do not use.
    Returns ``model``; the cache is turned off (``config.use_cache``), as training needs none.
    """
    if not isinstance(use_reentrant, bool):
        raise TypeError(f"use_reentrant must be True or False, got {use_reentrant!r}")
    if isinstance(model, PrefixTuningModel):
        raise ValueError("prefix-tuning cannot use activation checkpointing: its keys and values travel in the "
                         "cache, which checkpointed layers do not use; train it without checkpointing")
    hf = next((m for m in model.modules() if hasattr(m, "gradient_checkpointing_enable")), None)
    if hf is None or not getattr(hf, "supports_gradient_checkpointing", False):
        raise TypeError(f"activation checkpointing needs a Hugging Face model that supports it (its layers are "
                        f"wrapped by gradient_checkpointing_enable); {type(model).__name__} holds none")
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        hf.activation_checkpointing_enable(kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if use_reentrant:
        hf.enable_input_require_grads()  # a grad-requiring input for every checkpointed layer (5.x does it too)
    if getattr(hf.config, "use_cache", None):
        hf.config.use_cache = False
    return model


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class History:
    train_loss: list = field(default_factory=list)  # one value per optimizer step
    val_loss: list = field(default_factory=list)  # one value per epoch
    val_accuracy: list = field(default_factory=list)  # one value per epoch (classifiers only)
    step_seconds: list = field(default_factory=list)
    epoch_seconds: list = field(default_factory=list)  # training time of each epoch (validation excluded)
    selected_epoch: int | None = None  # 1-based epoch whose weights the model holds after fit

    @property
    def best_epoch(self) -> int | None:
        """1-based epoch with the best validation score: accuracy (ties: lower loss), or else loss."""
        if not self.val_loss:
            return None
        accs = self.val_accuracy or [0.0] * len(self.val_loss)
        return 1 + max(range(len(self.val_loss)), key=lambda i: (accs[i], -self.val_loss[i]))

    @property
    def median_step_seconds(self) -> float:
        s = sorted(self.step_seconds)
        return s[len(s) // 2] if s else float("nan")


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _is_head(name: str) -> bool:
    return any(part in HEAD_NAMES for part in name.split("."))


def _scales(named: list, lr_scale: dict | None) -> dict[str, float]:
    """Each parameter's rate multiplier: the ``lr_scale`` entry of a module it sits under, else 1."""
    lr_scale = lr_scale or {}
    for module, factor in lr_scale.items():
        _check_positive(**{f"lr_scale[{module!r}]": factor})
        if not any(module in n.split(".") for n, _ in named):
            modules = sorted({part for n, _ in named for part in n.split(".")[:-1] if not part.isdigit()})
            raise ValueError(f"lr_scale names {module!r}, but no trainable parameter sits under a module of "
                             f"that name; the trainable ones are under {modules}")
    return {n: next((f for m, f in lr_scale.items() if m in n.split(".")), 1.0) for n, _ in named}


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def fit(model, train_data, collate, val_data=None, *, epochs: int = 3, batch_size: int = 16,
        lr: float = 1e-3, head_lr: float | None = None, patience: int | None = None,
        weight_decay: float = 0.01, warmup: float = 0.1, max_grad_norm: float = 1.0,
        max_steps: int | None = None, seed: int = 0, desc: str = "train", progress: bool = True,
        on_epoch=None, comm_hook=None, lr_scale: dict | None = None) -> History:
    """Train the parameters of ``model`` that have ``requires_grad``; returns the History.

    ``head_lr``: the learning rate of a new classifier head (parameters under a module named
    ``classifier`` or ``score``), its own parameter group; the rest train at ``lr``.
    With ``val_data``, every epoch is scored on it (accuracy, ties broken by loss, for a
    classifier; loss for a language model) and the model ends with the weights of the best
    epoch (``History.selected_epoch``). ``patience``: stop after that many epochs without a
    better validation score. ``on_epoch(epoch, model)``: called after every epoch (and its scoring),
    e.g. to record what a diagnosis needs; it must not train. ``lr_scale``: rate multipliers by
    module name, e.g. ``{"lora_B": 16}`` trains every parameter under a module ``lora_B`` at 16 x ``lr``
    (LoRA+, Hayou et al. 2024: B learns faster than A).

    Data-parallel when a ``torch.distributed`` process group is initialised: each rank trains on its
    shard of ``train_data`` (a ``DistributedSampler``, reshuffled every epoch from ``seed``) with
    ``batch_size`` examples per rank, and DDP averages the gradients of the trainable parameters
    (frozen ones are never sent) during ``backward``, so every rank takes the same step. Every rank
    scores the whole (small) validation split, so all keep the same best epoch without talking.
    ``comm_hook``: a DDP communication hook, e.g. ``peftkit.distributed.AllReduceLedger().hook``.
    Only rank 0 shows a progress bar; writing files is the caller's, on rank 0
    (``peftkit.distributed.on_main``).
    """
    _check_positive(epochs=epochs, batch_size=batch_size, lr=lr, head_lr=head_lr, max_steps=max_steps,
                    patience=patience)
    if val_data is not None and len(val_data) == 0:
        raise ValueError("val_data is empty: pass None to train without validation")
    distributed = dist.is_available() and dist.is_initialized()
    rank = current_rank()
    seed_everything(seed + rank)  # each rank its own dropout masks
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters: add a technique or unfreeze something")
    device = named[0][1].device
    head = [p for n, p in named if _is_head(n)] if head_lr is not None else []
    body = [(n, p) for n, p in named if not (head_lr is not None and _is_head(n))]
    scales = _scales(body, lr_scale)  # 1.0 for all but LoRA+-style groups
    groups = [{"params": [p for n, p in body if scales[n] == s], "lr": lr * s} for s in dict.fromkeys(scales.values())]
    groups = [g for g in groups + [{"params": head, "lr": head_lr}] if g["params"]]
    params = [p for _, p in body] + head
    net = model
    if distributed:  # this rank's shard; the ranks together see the same examples as one process would
        sampler = DistributedSampler(train_data, shuffle=True, seed=seed)
        loader = DataLoader(train_data, batch_size=batch_size, sampler=sampler, collate_fn=collate)
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                      broadcast_buffers=False)  # buffers here are constants (position ids)
        if comm_hook is not None:
            net.register_comm_hook(None, comm_hook)
    else:
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(train_data, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=generator)
    total = min(max_steps or math.inf, epochs * len(loader))
    warm = max(1, int(warmup * total))
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    history, step, best = History(), 0, None
    bar = tqdm(total=total, desc=desc, disable=not progress or rank != 0, mininterval=2.0)
    for epoch in range(epochs):
        model.train()
        if distributed:
            sampler.set_epoch(epoch)
        began = time.perf_counter()
        for batch in loader:
            start = time.perf_counter()
            loss = net(**_to(batch, device)).loss
            if not torch.isfinite(loss):
                bar.close()
                raise TrainingDiverged(
                    f"loss became {loss.item()} at step {step + 1}: lower the learning rate (now {lr}) "
                    "or check the inputs for NaN/inf")
            loss.backward()  # under DDP: returns once the gradients are averaged over the ranks
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if not torch.isfinite(norm):  # before the step: the weights stay finite
                bar.close()
                raise TrainingDiverged(
                    f"a gradient became {norm.item()} at step {step + 1} (the loss was {loss.item():.4g}): "
                    f"lower the learning rate (now {lr}) or look for an operation that overflows")
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            history.step_seconds.append(time.perf_counter() - start)
            history.train_loss.append(loss.item())
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if step >= total:
                break
        history.epoch_seconds.append(time.perf_counter() - began)
        stop = step >= total
        if val_data is not None:
            scores = evaluate(model, val_data, collate)
            history.val_loss.append(scores["loss"])
            if "accuracy" in scores:
                history.val_accuracy.append(scores["accuracy"])
            if history.best_epoch == epoch + 1:  # keep a copy of the trained tensors of the best epoch
                best = {id(p): p.detach().clone() for p in params}
                history.selected_epoch = epoch + 1
            elif patience is not None and epoch + 1 - history.best_epoch >= patience:
                stop = True
        if on_epoch is not None:
            on_epoch(epoch + 1, model)
        if stop:
            break
    bar.close()
    if best is not None:
        with torch.no_grad():
            for p in params:
                p.copy_(best[id(p)])
    return history


@torch.no_grad()
def evaluate(model, data, collate, batch_size: int = 64) -> dict:
    """Mean loss over ``data`` (for LMs: token-weighted, i.e. the held-out cross-entropy) and, for a
    classifier (one label per example), the share of examples whose arg-max logit is the label."""
    model.eval()
    device = next(model.parameters()).device
    total = count = right = 0.0
    per_example = None
    for batch in DataLoader(data, batch_size=batch_size, collate_fn=collate):
        batch = _to(batch, device)
        per_example = batch["labels"].dim() == 1
        n = len(batch["labels"]) if per_example else (batch["labels"][:, 1:] != -100).sum().item()
        out = model(**batch)
        total += out.loss.item() * n
        count += n
        if per_example:
            right += (out.logits.argmax(-1) == batch["labels"]).sum().item()
    scores = {"loss": total / count}
    if per_example:
        scores["accuracy"] = right / len(data)
    return scores


def evaluate_loss(model, data, collate, batch_size: int = 32) -> float:
    """Mean loss over ``data`` (for LMs: token-weighted, i.e. the held-out cross-entropy)."""
    return evaluate(model, data, collate, batch_size)["loss"]


def accuracy(model, data, collate, batch_size: int = 64) -> float:
    """Share of examples whose arg-max logit is the label."""
    return evaluate(model, data, collate, batch_size)["accuracy"]


@torch.no_grad()
def generate(model, tokenizer, batch: dict, max_new_tokens: int = 40) -> list[str]:
    """Greedy continuations of a left-padded ``batch``, decoded without the prompt.

    Works for Hugging Face models and peftkit's prompt and prefix wrappers alike; a row stops at EOS.
    """
    model.eval()
    device = next(model.parameters()).device
    batch = _to(batch, device)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return [t.strip() for t in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]


def peak_memory_mb(fn, *args, interval: float = 0.002, **kwargs):
    """Run ``fn`` and return (its result, peak extra memory in MB while it ran).

    On CUDA: the allocator's peak. On the CPU: the process's resident memory sampled every
    ``interval`` seconds by a thread, minus what it was before the call (psutil).
    """
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn(*args, **kwargs)
        return result, (torch.cuda.max_memory_allocated() - before) / 2**20
    import psutil

    process = psutil.Process()
    before = peak = process.memory_info().rss
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            done.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn(*args, **kwargs)
    finally:
        done.set()
        thread.join()
    peak = max(peak, process.memory_info().rss)
    return result, (peak - before) / 2**20


def training_step(model, batch: dict, lr: float = 1e-4):
    """A callable doing one AdamW step of ``model`` on ``batch``: what the benchmarks time."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def interleaved_medians(fns: dict, warmup: int = 2, rounds: int = 10) -> dict:
    """Median seconds of each callable, taking turns (in a rotating order) every round, so that a
    busy moment of the machine slows them all alike; the first ``warmup`` rounds are not timed."""
    times, names = {k: [] for k in fns}, list(fns)
    for round_ in range(warmup + rounds):
        for k in names[round_ % len(names):] + names[: round_ % len(names)]:
            start = time.perf_counter()
            fns[k]()
            if round_ >= warmup:
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}

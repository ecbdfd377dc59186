"""One small training loop for every notebook, plus the measurements the course reports.

``fit``: AdamW with weight decay, linear warm-up then linear decay, gradient clipping, a tqdm
progress bar, training loss per step and validation loss per epoch (the best epoch is reported:
when validation loss rises while training loss falls, the model is overfitting), and a clear
stop if the loss becomes NaN or infinite. Any model whose forward returns ``.loss`` works.
"""

import math
import random
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm  # plain text bar: no widget state in committed notebooks


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


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class History:
    train_loss: list = field(default_factory=list)  # one value per optimizer step
    val_loss: list = field(default_factory=list)  # one value per epoch
    step_seconds: list = field(default_factory=list)

    @property
    def best_epoch(self) -> int | None:
        """1-based epoch with the lowest validation loss."""
        return 1 + min(range(len(self.val_loss)), key=self.val_loss.__getitem__) if self.val_loss else None

    @property
    def median_step_seconds(self) -> float:
        s = sorted(self.step_seconds)
        return s[len(s) // 2] if s else float("nan")


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def fit(model, train_data, collate, val_data=None, *, epochs: int = 3, batch_size: int = 16,
        lr: float = 1e-3, weight_decay: float = 0.01, warmup: float = 0.1, max_grad_norm: float = 1.0,
        max_steps: int | None = None, seed: int = 0, desc: str = "train", progress: bool = True) -> History:
    """Train the parameters of ``model`` that have ``requires_grad``; returns the History."""
    seed_everything(seed)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: add a technique or unfreeze something")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_data, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=generator)
    total = min(max_steps or math.inf, epochs * len(loader))
    warm = max(1, int(warmup * total))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    history, step = History(), 0
    bar = tqdm(total=total, desc=desc, disable=not progress, mininterval=2.0)
    for _ in range(epochs):
        model.train()
        for batch in loader:
            start = time.perf_counter()
            loss = model(**_to(batch, device)).loss
            if not torch.isfinite(loss):
                bar.close()
                raise TrainingDiverged(
                    f"loss became {loss.item()} at step {step + 1}: lower the learning rate (now {lr}) "
                    "or check the inputs for NaN/inf")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
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
        if val_data is not None:
            history.val_loss.append(evaluate_loss(model, val_data, collate, batch_size))
        if step >= total:
            break
    bar.close()
    return history


@torch.no_grad()
def evaluate_loss(model, data, collate, batch_size: int = 32) -> float:
    """Mean loss over ``data`` (for LMs: token-weighted, i.e. the held-out cross-entropy)."""
    model.eval()
    device = next(model.parameters()).device
    total = count = 0.0
    for batch in DataLoader(data, batch_size=batch_size, collate_fn=collate):
        batch = _to(batch, device)
        n = (batch["labels"][:, 1:] != -100).sum().item() if batch["labels"].dim() == 2 else len(batch["labels"])
        total += model(**batch).loss.item() * n
        count += n
    return total / count


@torch.no_grad()
def accuracy(model, data, collate, batch_size: int = 64) -> float:
    """Share of examples whose arg-max logit is the label."""
    model.eval()
    device = next(model.parameters()).device
    right = 0
    for batch in DataLoader(data, batch_size=batch_size, collate_fn=collate):
        batch = _to(batch, device)
        right += (model(**batch).logits.argmax(-1) == batch["labels"]).sum().item()
    return right / len(data)


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

"""Every technique on one task, in one table, beside Hugging Face peft where peft has the method.

Table 1: topic classification (8 chatterbot topics) with all-MiniLM-L6-v2. Every method gets the
same data, seed, head initialisation, batch, sequence length and number of steps. Its learning
rate comes from a stated sweep: two rates x3 apart, each trained for the whole budget on the
training split less a stratified 20% validation split; the run with the best validation accuracy
(ties: lower validation loss) is the one reported, and only it sees the test set. (Sweeping for a
third of the budget picked rates that were unstable over the whole budget: QLoRA at 1e-2 ended at
chance.) Where peft has the method, peft trains at the same rate; the step-time ratio comes from
the two trained models taking turns on one batch (separate runs on a busy machine vary by 30%).

Table 2: data-to-text with SmolLM2-135M, the generation techniques at a small budget and fixed
rates (a step costs about twenty MiniLM steps): held-out loss and slot error rate of greedy
generations on the first test examples (name/food pairs unseen in training).

Per method: trainable parameters, the saved adapter file (what is deployed: P-tuning and prefix-
tuning export their prompt or prefix), the memory training adds above the loaded model
(``peftkit.train.peak_memory_mb``), the weights, the median step time, the task's metric.

    python benchmarks/compare.py          # full budget: about 10 minutes on 2 idle CPU cores
    python benchmarks/compare.py --quick --out /tmp/compare.json      # smoke test, ~1 minute
"""

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable

# Waiting OpenMP threads sleep instead of spinning: on a shared machine, spinning threads that wait
# for a descheduled peer made steps 3x slower than one thread (measured); idle, it costs little.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

from peftkit import io
from peftkit.adapters import add_adapters, save_adapters
from peftkit.data import (CausalLMCollator, ClassificationCollator, data_to_text, generation_batch,
                          slot_error_rate, topic_classification)
from peftkit.lora import add_lora
from peftkit.lora import save_adapter as save_lora
from peftkit.models import ENCODER_PACKAGE, load_causal_lm, load_encoder, package_dir, quiet
from peftkit.p_tuning import PTuningConfig, PTuningModel
from peftkit.prefix_tuning import PrefixTuningModel
from peftkit.prompt_tuning import PromptTuningModel
from peftkit.qlora import prepare_for_qlora
from peftkit.train import (TrainingDiverged, accuracy, count_parameters, evaluate_loss, fit, generate,
                           interleaved_medians, peak_memory_mb, seed_everything, training_step)

PROMPT_TEXT = "what is the topic of this question?"  # 10 tokens with [CLS] and [SEP]
LM_PROMPT_TEXT = "Write one sentence that mentions every attribute."

# --- the methods: each builds its technique on a fresh copy of the base model ---------------


def head(model) -> list[str]:
    """The fresh classification head trains with every method; a language model has none."""
    return ["classifier"] if hasattr(model, "classifier") else []


def probe(model, tokenizer):
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    return model


def adapters(placement):
    return lambda model, tokenizer: add_adapters(model, placement, modules_to_save=head(model))


def lora(targets, quantize=False):  # QLoRA: the same LoRA over an NF4 base (the head stays float)
    def build(model, tokenizer):
        model = prepare_for_qlora(model) if quantize else model
        return add_lora(model, targets, rank=8, alpha=16, modules_to_save=head(model))
    return build


def prompt(model, tokenizer):
    text = PROMPT_TEXT if hasattr(model, "classifier") else LM_PROMPT_TEXT
    return PromptTuningModel(model, num_virtual_tokens=10, init="text", init_text=text, tokenizer=tokenizer)


def p_tuning(kind):
    return lambda model, tokenizer: PTuningModel(model, PTuningConfig(num_virtual_tokens=10, kind=kind))


def prefix(model, tokenizer):
    return PrefixTuningModel(model, num_virtual_tokens=10, projection=True)


def peft_version(config_class, **config):
    """The same method built by peft (classification: peft trains the head too)."""
    def build(model, tokenizer):
        import peft

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes about position ids
            return peft.get_peft_model(model, getattr(peft, config_class)(task_type="SEQ_CLS", **config))
    return build


def save_exported_prompt(model, path):  # P-tuning deploys the (N, D) prompt, not its encoder
    model.export_prompt()
    model.save(path)


def save_exported_prefix(model, path):  # prefix-tuning deploys the key/value table, not its MLP
    PrefixTuningModel.from_prefix(model.base_model, model.export_prefix()).save(path)


@dataclass
class Method:
    build: Callable  # (model, tokenizer) -> the model to train
    lrs: tuple  # topic table: the rates swept; generation table: the one rate used
    save: Callable = io.save_adapter  # (model, path): peftkit's saver for this technique
    peft: Callable | None = None  # peft's build of the same method, where peft has it


# Sweeps: two rates x3 apart, around the notebooks' rates (probe 1e-2 to 1e-1, LoRA and adapters 1e-2,
# prompt tuning 1e-1, P-tuning 1e-2), set after a first run of this script (validation accuracy only).
P_TUNING = dict(num_virtual_tokens=10, encoder_hidden_size=384)  # peftkit's defaults, spelled out for peft
TOPIC_METHODS = {
    "full fine-tuning": Method(lambda model, tokenizer: model, (1e-4, 3e-4)),
    "linear probe": Method(probe, (3e-2, 1e-1)),
    "Houlsby adapters": Method(adapters("houlsby"), (3e-3, 1e-2), save_adapters),
    "Pfeiffer adapters": Method(adapters("pfeiffer"), (3e-3, 1e-2), save_adapters),
    "LoRA q/v": Method(lora(["query", "value"]), (3e-3, 1e-2), save_lora,
                       peft_version("LoraConfig", r=8, lora_alpha=16, target_modules=["query", "value"])),
    "LoRA all-linear": Method(lora("all-linear"), (3e-3, 1e-2), save_lora,
                              peft_version("LoraConfig", r=8, lora_alpha=16, target_modules="all-linear")),
    "prompt tuning": Method(prompt, (3e-2, 1e-1), lambda m, path: m.save(path),
                            peft_version("PromptTuningConfig", num_virtual_tokens=10, prompt_tuning_init="TEXT",
                                         prompt_tuning_init_text=PROMPT_TEXT,
                                         tokenizer_name_or_path=str(package_dir(ENCODER_PACKAGE) / "model"))),
    "P-tuning LSTM": Method(p_tuning("lstm"), (1e-3, 3e-3), save_exported_prompt,
                            peft_version("PromptEncoderConfig", encoder_reparameterization_type="LSTM", **P_TUNING)),
    "P-tuning MLP": Method(p_tuning("mlp"), (1e-3, 3e-3), save_exported_prompt,
                           peft_version("PromptEncoderConfig", encoder_reparameterization_type="MLP", **P_TUNING)),
    "QLoRA all-linear": Method(lora("all-linear", quantize=True), (3e-3, 1e-2), save_lora),
}
GENERATION_METHODS = {  # rates: the lower final training loss of two 10-step trials, x3 apart
    "LoRA all-linear": Method(lora("all-linear"), (3e-3,), save_lora),
    "QLoRA all-linear": Method(lora("all-linear", quantize=True), (3e-3,), save_lora),
    "Pfeiffer adapters": Method(adapters("pfeiffer"), (3e-3,), save_adapters),
    "prompt tuning": Method(prompt, (3e-2,), lambda m, path: m.save(path)),
    "prefix-tuning": Method(prefix, (1e-3,), save_exported_prefix),
}

# --- tasks and measurements -------------------------------------------------------------------


@dataclass
class Task:
    base: torch.nn.Module  # copied for every run
    tokenizer: object
    collate: Callable
    train: object
    val: object
    test: object
    batch_size: int
    seed: int
    max_new_tokens: int = 0  # generation: length of the greedy continuations that are scored


def topic_task(max_length=16, batch_size=16, seed=0, n_eval=None) -> Task:
    """``n_eval``: keep only that many validation and test examples (smoke tests)."""
    data = topic_classification(seed=seed)
    split = data["train"].train_test_split(test_size=0.2, stratify_by_column="label", seed=seed)
    val, test = split["test"], data["test"]
    if n_eval:
        val, test = val.select(range(n_eval)), test.select(range(n_eval))
    seed_everything(seed)  # the classifier head: one draw, copied into every method
    base, tokenizer = load_encoder(num_labels=len(data["train"].features["label"].names))
    return Task(base, tokenizer, ClassificationCollator(tokenizer, max_length), split["train"], val, test,
                batch_size, seed)


def generation_task(n_eval=24, batch_size=8, max_new_tokens=30, seed=0) -> Task:
    data = data_to_text(seed=seed)
    base, tokenizer = load_causal_lm()
    return Task(base, tokenizer, CausalLMCollator(tokenizer, max_length=64), data["train"], None,
                data["test"].select(range(n_eval)), batch_size, seed, max_new_tokens)


def release_memory():
    """Hand freed memory back to the OS, so that the next peak is measured from a clean baseline."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: peaks may then read low after a bigger run
        pass


def four_bit_weights(model) -> list:
    return [m.weight for m in model.modules() if getattr(type(m), "is_peftkit_4bit", False)]


def weights_mb(model) -> float:
    """Parameters and buffers as stored; 4-bit weights at their packed size."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return (nbytes + sum(w.nbytes for w in four_bit_weights(model))) / 2**20


def file_bytes(save, model) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter.safetensors"
        save(model, path)
        return path.stat().st_size


def train(task, method, lr, steps, desc, use_peft=False, progress=True):
    """Build ``method`` on a copy of the base and train it: (model, measurements)."""
    seed_everything(task.seed)
    model = (method.peft if use_peft else method.build)(copy.deepcopy(task.base), task.tokenizer)
    params = count_parameters(model, show=False)
    release_memory()
    history, peak = peak_memory_mb(fit, model, task.train, task.collate, epochs=steps, max_steps=steps,
                                   batch_size=task.batch_size, lr=lr, seed=task.seed, interval=0.005,
                                   desc=desc, progress=progress)
    last = history.train_loss[-5:]
    return model, {"lr": lr, "steps": steps, "trainable": params["trainable"], "total": params["total"],
                   "trainable_percent": params["percent"], "peak_memory_mb": peak,
                   "weights_mb": weights_mb(model), "step_seconds": history.median_step_seconds,
                   "train_seconds": sum(history.step_seconds), "final_train_loss": sum(last) / len(last)}


def best_lr(runs) -> float | None:
    trained = [r for r in runs if "diverged" not in r]
    return max(trained, key=lambda r: (r["val_accuracy"], -r["val_loss"]))["lr"] if trained else None


def run_topic(task, name, steps, progress=True, timing_rounds=10) -> dict:
    """Train at each rate of the sweep, keep the best on validation, test it; then peft: one table row."""
    method, runs, kept = TOPIC_METHODS[name], [], {}
    for lr in method.lrs:
        try:
            model, row = train(task, method, lr, steps, f"{name} lr={lr:g}", progress=progress)
        except TrainingDiverged as err:
            runs.append({"lr": lr, "diverged": str(err)})
            continue
        runs.append({"lr": lr, "val_accuracy": accuracy(model, task.val, task.collate),
                     "val_loss": evaluate_loss(model, task.val, task.collate),
                     "final_train_loss": row["final_train_loss"], "step_seconds": row["step_seconds"]})
        if best_lr(runs) == lr:
            kept = {"model": model, "row": row, "val": runs[-1]}
        del model  # only the best run so far stays in memory
    if not kept:
        raise TrainingDiverged(f"{name}: every rate diverged: {runs}")
    model, row = kept["model"], kept["row"]
    row = {"method": name, **row, "val_accuracy": kept["val"]["val_accuracy"],
           "test_accuracy": accuracy(model, task.test, task.collate), "sweep": runs}
    if method.peft is not None:
        theirs, m = train(task, method, row["lr"], steps, f"{name} (peft)", use_peft=True, progress=progress)
        row["peft"] = {"trainable": m["trainable"], "peak_memory_mb": m["peak_memory_mb"],
                       "step_seconds": m["step_seconds"], "test_accuracy": accuracy(theirs, task.test, task.collate)}
        batch = task.collate(task.train.select(range(task.batch_size)))
        turns = {"peftkit": training_step(model.train(), batch, lr=1e-5),
                 "peft": training_step(theirs.train(), batch, lr=1e-5)}
        ours_s, theirs_s = interleaved_medians(turns, rounds=timing_rounds).values()
        row["interleaved_step_seconds"] = {"peftkit": ours_s, "peft": theirs_s}
        row["step_time_ratio_vs_peft"] = ours_s / theirs_s
        row["accuracy_ratio_vs_peft"] = row["test_accuracy"] / max(row["peft"]["test_accuracy"], 1e-9)
    row["adapter_bytes"] = file_bytes(method.save, model)  # last: P-tuning's save exports the prompt
    return row


@torch.no_grad()
def evaluate_generation(task, model) -> dict:
    batch = generation_batch(task.tokenizer, task.test["mr"])  # left-padded prompts
    texts = generate(model, task.tokenizer, batch, task.max_new_tokens)
    return {"heldout_loss": evaluate_loss(model, task.test, task.collate, batch_size=task.batch_size),
            "slot_error_rate": slot_error_rate(texts, task.test["mr"]), "example": texts[0]}


def run_generation(task, name, steps, progress=True) -> dict:
    method = GENERATION_METHODS[name]
    model, row = train(task, method, method.lrs[0], steps, f"SmolLM2 {name}", progress=progress)
    return {"method": name, **row, **evaluate_generation(task, model), "adapter_bytes": file_bytes(method.save, model)}


def environment() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu": names[0] if names else platform.processor(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_average_1min_at_start": os.getloadavg()[0],
            **{lib: version(lib) for lib in ("torch", "transformers", "peft", "datasets", "safetensors")}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=45, help="training steps per method (topic table)")
    parser.add_argument("--lm-steps", type=int, default=8, help="training steps per method (generation table)")
    parser.add_argument("--quick", action="store_true", help="smoke test: a few steps and examples everywhere")
    parser.add_argument("--topic-methods", nargs="*", default=list(TOPIC_METHODS), choices=list(TOPIC_METHODS))
    parser.add_argument("--generation-methods", nargs="*", default=list(GENERATION_METHODS),
                        choices=list(GENERATION_METHODS))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).with_name("compare.json")))
    args = parser.parse_args(argv)
    if args.quick:  # every code path, numbers meaningless
        args.budget, args.lm_steps, n_eval, lm_batch, lm_eval, new_tokens, rounds = 4, 1, 16, 2, 2, 8, 2
    else:
        n_eval, lm_batch, lm_eval, new_tokens, rounds = None, 8, 24, 30, 10
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()
    began, progress = time.perf_counter(), not args.no_progress
    settings = {
        "topic": {"model": "all-MiniLM-L6-v2", "max_length": 16, "batch_size": 16, "steps": args.budget,
                  "seed": args.seed, "validation": "stratified 20% of train", "peft_timing_rounds": rounds,
                  "lr_selection": "each rate trained for all steps; best validation accuracy, ties: lower loss",
                  "optimizer": "AdamW, weight decay 0.01, 10% warm-up then linear decay, gradient clip 1.0"},
        "generation": {"model": "SmolLM2-135M-Instruct", "max_length": 64, "batch_size": lm_batch,
                       "steps": args.lm_steps, "eval_examples": lm_eval, "max_new_tokens": new_tokens,
                       "lr": "fixed per method: the lower training loss of two 10-step trials"}}
    result = {"environment": environment(), "settings": settings, "topic_classification": [], "generation": []}
    if args.topic_methods:
        task = topic_task(seed=args.seed, n_eval=n_eval)
        settings["topic"].update(train=len(task.train), val=len(task.val), test=len(task.test))
        for name in args.topic_methods:
            result["topic_classification"].append(run_topic(task, name, args.budget, progress, rounds))
    if args.generation_methods:
        task = generation_task(lm_eval, lm_batch, new_tokens, args.seed)
        result["generation"].append({"method": "frozen (no training)", **evaluate_generation(task, task.base)})
        for name in args.generation_methods:
            result["generation"].append(run_generation(task, name, args.lm_steps, progress))
    result["environment"]["load_average_1min_at_end"] = os.getloadavg()[0]
    result["wall_seconds"] = time.perf_counter() - began
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print_tables(result)
    return result


def print_tables(result):
    cost = "{trainable:>11,}{trainable_percent:>8.3f}{adapter_bytes:>12,}{peak_memory_mb:>9.0f}{step_seconds:>8.2f}"
    print(f"\n{'method':<20}{'trainable':>11}{'%':>8}{'file bytes':>12}{'peak MB':>9}{'step s':>8}{'lr':>8}"
          f"{'test acc':>9}{'peft acc':>9}{'vs peft':>8}")
    for r in result["topic_classification"]:
        peft = f"{r['peft']['test_accuracy']:>9.3f}{r['step_time_ratio_vs_peft']:>7.2f}x" if "peft" in r else ""
        print(f"{r['method']:<20}{cost.format(**r)}{r['lr']:>8.0e}{r['test_accuracy']:>9.3f}{peft}")
    print(f"\n{'SmolLM2':<20}{'trainable':>11}{'%':>8}{'file bytes':>12}{'peak MB':>9}{'step s':>8}"
          f"{'loss':>8}{'SER':>6}")
    for r in result["generation"]:
        print(f"{r['method']:<20}{cost.format(**r) if 'trainable' in r else ' ' * 48}"
              f"{r['heldout_loss']:>8.3f}{r['slot_error_rate']:>6.2f}")
    print(f"\nwall time {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()

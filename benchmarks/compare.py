"""Every technique on one task, in one table, beside Hugging Face peft where peft has the method.

Table 1: topic classification (8 chatterbot topics) with all-MiniLM-L6-v2 read through mean pooling,
each method trained with its recipe from ``peftkit.recipes`` (the protocol is written there):

1. search: seed 0 at every rate of the recipe's ``lr_grid``; the best validation accuracy (ties:
   lower validation loss) wins. If the winner sits on an edge of the grid, the grid is extended
   past that edge (the same ratio, at most twice) and the extension is recorded.
2. seeds: the selected rate again with seeds 1 and 2 (head, data order and dropout differ); the
   test split is scored once per seed, and the table gives mean ± std over the 3 seeds.
   Every run also records its test accuracy after each epoch (``test_accuracy_curve``), for 08's
   diagnosis of early stopping; no choice reads it.
3. peft, where it has the method: the same recipe and rate, seed 0; its test accuracy, and the
   step-time ratio from the two trained models taking turns on one batch.

Table 2: data-to-text with SmolLM2-135M: each generation method at a fixed rate for up to
``--lm-epochs`` passes over 160 training examples, held-out loss on 40 validation examples after
every pass (the curve and its last relative change are recorded: how far from flat it stopped),
then the test loss and the slot error rate of greedy generations on 24 test examples.

Memory: every method once more in a fresh process (``--memory-only``, one subprocess per method), so
that no variant inherits another's freed memory: weights and optimizer state as exact tensor bytes,
and the peak of resident memory during a training step above the steady state before it
(activations, gradients and temporaries: ``VmHWM`` reset through ``/proc/self/clear_refs``).

    python benchmarks/compare.py                   # full run: 95 minutes on 2 shared CPU cores (2 jobs x 1 thread)
    python benchmarks/compare.py --quick --out /tmp/compare.json      # smoke test: one epoch, one seed
"""

import argparse
import concurrent.futures
import ctypes
import gc
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path

# Waiting OpenMP threads sleep instead of spinning: on a shared machine, spinning threads that wait
# for a descheduled peer made steps 3x slower than one thread (measured). Only when run as a script:
# set on import (the tests import this file), it leaked into every process started afterwards, and
# a 2-thread process with sleeping waiters trains MiniLM about 1.5x slower (252 vs 375 ms per step).
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

from peftkit import adapters, ia3, lora, p_tuning, prefix_tuning, prompt_tuning  # noqa: E402
from peftkit.adapter_files import save_tensors, trainable_state_dict  # noqa: E402
from peftkit.adapters import add_adapters  # noqa: E402
from peftkit.data import (CausalLMCollator, data_to_text, generation_batch, slot_error_rate,  # noqa: E402
                          topic_splits)
from peftkit.lora import add_lora  # noqa: E402
from peftkit.models import ENCODER_PACKAGE, load_causal_lm, package_dir, quiet  # noqa: E402
from peftkit.prefix_tuning import PrefixTuningModel  # noqa: E402
from peftkit.prompt_tuning import PromptTuningModel  # noqa: E402
from peftkit.qlora import prepare_for_qlora  # noqa: E402
from peftkit.recipes import PROMPT_TEXT, RECIPES, classifier  # noqa: E402
from peftkit.recipes import train as train_recipe  # noqa: E402
from peftkit.train import (TrainingDiverged, count_parameters, evaluate, fit, generate,  # noqa: E402
                           interleaved_medians, seed_everything, training_step)

LM_PROMPT_TEXT = "Write one sentence that mentions every attribute."

# --- what peft builds for the same methods, and what each method deploys --------------------

P_TUNING = dict(num_virtual_tokens=10, encoder_hidden_size=384)  # peftkit's defaults, spelled out for peft
PEFT = {  # method -> (peft config class, its arguments); classification: peft trains the head too
    "LoRA q/v": ("LoraConfig", dict(r=8, lora_alpha=16, target_modules=["query", "value"])),
    "LoRA all-linear": ("LoraConfig", dict(r=8, lora_alpha=16, target_modules="all-linear")),
    "prompt tuning": ("PromptTuningConfig", dict(
        num_virtual_tokens=10, prompt_tuning_init="TEXT", prompt_tuning_init_text=PROMPT_TEXT,
        tokenizer_name_or_path=str(package_dir(ENCODER_PACKAGE) / "model"))),
    "P-tuning LSTM": ("PromptEncoderConfig", dict(encoder_reparameterization_type="LSTM", **P_TUNING)),
    "P-tuning MLP": ("PromptEncoderConfig", dict(encoder_reparameterization_type="MLP", **P_TUNING)),
    "DoRA all-linear": ("LoraConfig", dict(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True)),
    "(IA)³": ("IA3Config", {}),  # peft's defaults for BERT, as peftkit's
}


def peft_model(name, model):
    import peft

    config_class, config = PEFT[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about position ids
        return peft.get_peft_model(model, getattr(peft, config_class)(task_type="SEQ_CLS", **config))


def save_exported_prompt(model, path):  # P-tuning deploys the (N, D) prompt, not its encoder
    model.export_prompt()
    return p_tuning.save_adapter(model, path)


def save_exported_prefix(model, path):  # prefix-tuning deploys the key/value table, not its MLP
    return prefix_tuning.save_adapter(PrefixTuningModel.from_prefix(model.base_model, model.export_prefix()), path)


def save_trainable(model, path):  # full fine-tuning and the probe: every tensor that trained
    return save_tensors(trainable_state_dict(model), path)


SAVE = {"Houlsby adapters": adapters.save_adapter, "Pfeiffer adapters": adapters.save_adapter,
        "LoRA q/v": lora.save_adapter, "LoRA all-linear": lora.save_adapter, "QLoRA all-linear": lora.save_adapter,
        "prompt tuning": prompt_tuning.save_adapter, "P-tuning LSTM": save_exported_prompt,
        "P-tuning MLP": save_exported_prompt, "DoRA all-linear": lora.save_adapter,
        "LoRA+ all-linear": lora.save_adapter, "(IA)³": ia3.save_adapter}


def lm_lora(quantize=False):
    def build(model, tokenizer):
        return add_lora(prepare_for_qlora(model) if quantize else model, "all-linear", rank=8, alpha=16)
    return build


GENERATION = {  # method -> (build, rate, saver); rates: the lower training loss of two 10-step trials, x3 apart
    "LoRA all-linear": (lm_lora(), 3e-3, lora.save_adapter),
    "QLoRA all-linear": (lm_lora(quantize=True), 3e-3, lora.save_adapter),
    "Pfeiffer adapters": (lambda m, t: add_adapters(m, "pfeiffer"), 3e-3, adapters.save_adapter),
    "prompt tuning": (lambda m, t: PromptTuningModel(m, num_virtual_tokens=10, init="text", init_text=LM_PROMPT_TEXT,
                                                     tokenizer=t), 3e-2, prompt_tuning.save_adapter),
    "prefix-tuning": (lambda m, t: PrefixTuningModel(m, num_virtual_tokens=10, projection=True), 1e-3,
                      save_exported_prefix),
}

# --- table 1: the topic task -------------------------------------------------------------------


def file_bytes(save, model) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter.safetensors"
        save(model, path)
        return path.stat().st_size


def one_run(name, lr, seed, splits, max_epochs=None, progress=False):
    """Train ``name`` at ``lr`` from a classifier drawn from ``seed``: (model, row) or (None, row)."""
    recipe = RECIPES[name]
    rates = {"lr": lr, "head_lr": lr} if recipe.searches_head else {"lr": lr}
    model, tokenizer = classifier(seed)
    model = recipe.build(model, tokenizer)
    collate, test_curve = recipe.collate(tokenizer), []

    def score_test(epoch, model):  # for 08's diagnosis of early stopping only: no choice reads it
        test_curve.append(evaluate(model, splits["test"], collate)["accuracy"])
    try:
        history = train_recipe(model, tokenizer, recipe, splits, seed=seed, max_epochs=max_epochs,
                               desc=f"{name} lr={lr:g} seed={seed}", progress=progress, on_epoch=score_test,
                               **rates)
    except TrainingDiverged as err:
        return None, {"lr": lr, "seed": seed, "diverged": str(err)}
    best = history.selected_epoch
    return model, {"lr": lr, "seed": seed, "val_accuracy": history.val_accuracy[best - 1],
                   "val_loss": history.val_loss[best - 1], "epochs_to_best": best,
                   "epochs_run": len(history.val_loss), "val_accuracy_curve": history.val_accuracy,
                   "val_loss_curve": history.val_loss, "test_accuracy_curve": test_curve,
                   "epoch_seconds": statistics.median(history.epoch_seconds)}


def best_lr(runs) -> float | None:
    trained = [r for r in runs if "diverged" not in r]
    return max(trained, key=lambda r: (r["val_accuracy"], -r["val_loss"]))["lr"] if trained else None


def search(name, splits, max_epochs=None, max_extensions=2, progress=False, grid=None):
    """Seed 0 at every rate of the grid, extended past an edge that wins: (best model, runs, extensions)."""
    grid, runs, extended, kept = sorted(grid or RECIPES[name].lr_grid), [], [], None
    while True:
        for lr in grid:
            if any(r["lr"] == lr for r in runs):
                continue
            model, row = one_run(name, lr, 0, splits, max_epochs, progress)
            runs.append(row)
            if model is not None and best_lr(runs) == lr:
                kept = model  # only the best model so far stays in memory
        chosen = best_lr(runs)
        if chosen is None:
            raise TrainingDiverged(f"{name}: every rate diverged: {runs}")
        if len(grid) == 1 or chosen not in (grid[0], grid[-1]) or len(extended) >= max_extensions:
            return kept, sorted(runs, key=lambda r: r["lr"]), extended
        new = grid[0] ** 2 / grid[1] if chosen == grid[0] else grid[-1] ** 2 / grid[-2]
        new = float(f"{new:.2g}")
        extended.append(new)
        grid = sorted(grid + [new])


def mean_std(values) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_topic(name, seeds=(0, 1, 2), max_epochs=None, progress=False, timing_rounds=10, threads=None,
              grid=None) -> dict:
    """One table row: search on seed 0, the other seeds at the chosen rate, peft beside it."""
    if threads:
        torch.set_num_threads(threads)
    quiet()
    splits, recipe = topic_splits(), RECIPES[name]
    tokenizer = classifier(0)[1]
    collate = recipe.collate(tokenizer)
    model, sweep, extended = search(name, splits, max_epochs, progress=progress, grid=grid)
    lr = best_lr(sweep)
    per_seed = [next(r for r in sweep if r["lr"] == lr)]
    models = {0: model}
    for seed in seeds[1:]:
        m, row = one_run(name, lr, seed, splits, max_epochs, progress)
        if m is None:
            raise TrainingDiverged(f"{name} diverged at the chosen rate {lr:g} with seed {seed}: {row['diverged']}")
        per_seed.append(row)
        models[seed] = m
    for row, seed in zip(per_seed, seeds):
        row["test_accuracy"] = evaluate(models[seed], splits["test"], collate)["accuracy"]
    del models
    params = count_parameters(model, show=False)
    acc_mean, acc_std = mean_std([r["test_accuracy"] for r in per_seed])
    result = {"method": name, "lr": lr, "head_lr": lr if recipe.searches_head else recipe.head_lr,
              "recipe_lr": recipe.lr, "lr_grid": list(recipe.lr_grid), "grid_extended_with": extended,
              "sweep": sweep, "seeds": per_seed, "test_accuracy_mean": acc_mean, "test_accuracy_std": acc_std,
              "val_accuracy_mean": statistics.mean(r["val_accuracy"] for r in per_seed),
              "epochs_to_best_mean": statistics.mean(r["epochs_to_best"] for r in per_seed),
              "epochs_to_best": [r["epochs_to_best"] for r in per_seed],
              "epoch_seconds": statistics.median(r["epoch_seconds"] for r in per_seed),
              "trainable": params["trainable"], "total": params["total"], "trainable_percent": params["percent"]}
    if name in PEFT:
        theirs = peft_model(name, classifier(0)[0])  # drawn like ours: the same head and LoRA init
        train_recipe(theirs, tokenizer, recipe, splits, seed=0, lr=lr, max_epochs=max_epochs, desc=f"{name} (peft)",
                     progress=progress)
        result["peft"] = {"trainable": count_parameters(theirs, show=False)["trainable"],
                          "test_accuracy": evaluate(theirs, splits["test"], collate)["accuracy"]}
        # Timing trains both models a little further, so it comes after every score.
        batch = collate(splits["train"].select(range(recipe.batch_size)))
        turns = {"peftkit": training_step(model.train(), batch, lr=1e-5),
                 "peft": training_step(theirs.train(), batch, lr=1e-5)}
        ours_s, theirs_s = interleaved_medians(turns, rounds=timing_rounds).values()
        result["peft"].update(interleaved_step_seconds={"peftkit": ours_s, "peft": theirs_s},
                              step_time_ratio=ours_s / theirs_s)
    save = SAVE.get(name, save_trainable)
    result["adapter_bytes"] = file_bytes(save, model)  # last: P-tuning's save exports the prompt
    return result


# --- table 2: data-to-text with SmolLM2 -------------------------------------------------------

def generation_splits(seed=0, n_train=160, n_val=40, n_test=24):
    data = data_to_text(seed=seed)
    return {"train": data["train"].select(range(n_train)),
            "validation": data["train"].select(range(n_train, n_train + n_val)),
            "test": data["test"].select(range(n_test))}


@torch.no_grad()
def evaluate_generation(model, tokenizer, splits, max_new_tokens) -> dict:
    batch = generation_batch(tokenizer, splits["test"]["mr"])  # left-padded prompts
    texts = generate(model, tokenizer, batch, max_new_tokens)
    collate = CausalLMCollator(tokenizer, max_length=64)
    return {"test_loss": evaluate(model, splits["test"], collate, batch_size=8)["loss"],
            "slot_error_rate": slot_error_rate(texts, splits["test"]["mr"]), "example": texts[0]}


def run_generation(name, epochs=3, batch_size=8, max_new_tokens=30, n_test=24, threads=None, progress=False) -> dict:
    if threads:
        torch.set_num_threads(threads)
    quiet()
    splits = generation_splits(n_test=n_test)
    base, tokenizer = load_causal_lm()
    if name == "frozen (no training)":
        return {"method": name, **evaluate_generation(base, tokenizer, splits, max_new_tokens)}
    build, lr, save = GENERATION[name]
    seed_everything(0)
    model = build(base, tokenizer)
    collate = CausalLMCollator(tokenizer, max_length=64)
    history = fit(model, splits["train"], collate, splits["validation"], epochs=epochs, batch_size=batch_size,
                  lr=lr, seed=0, desc=f"SmolLM2 {name}", progress=progress)
    curve = history.val_loss
    params = count_parameters(model, show=False)
    return {"method": name, "lr": lr, "epochs": len(curve), "steps": len(history.train_loss),
            "val_loss_curve": curve, "last_relative_change": (curve[-1] - curve[-2]) / curve[-2] if len(curve) > 1
            else None, "selected_epoch": history.selected_epoch,
            "step_seconds": history.median_step_seconds, "trainable": params["trainable"], "total": params["total"],
            "trainable_percent": params["percent"], **evaluate_generation(model, tokenizer, splits, max_new_tokens),
            "adapter_bytes": file_bytes(save, model)}


# --- memory, one method per fresh process ------------------------------------------------------

def memory_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def tensor_mb(tensors) -> float:
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values()) / 2**20


def weights_mb(model) -> float:
    """Parameters and buffers as stored; 4-bit weights at their packed size."""
    four_bit = [m.weight for m in model.modules() if getattr(type(m), "is_peftkit_4bit", False)]
    return tensor_mb([*model.parameters(), *model.buffers()]) + sum(w.nbytes for w in four_bit) / 2**20


def measure_memory(task: str, name: str) -> dict:
    """Runs in a fresh process: build one method, take two training steps, measure the third."""
    quiet()
    if task == "topic":
        recipe = RECIPES[name]
        model, tokenizer = classifier(0)
        model = recipe.build(model, tokenizer)
        batch = recipe.collate(tokenizer)(topic_splits()["train"].select(range(recipe.batch_size)))
    else:
        base, tokenizer = load_causal_lm()
        seed_everything(0)
        model = GENERATION[name][0](base, tokenizer)
        batch = CausalLMCollator(tokenizer, max_length=64)(generation_splits()["train"].select(range(8)))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    for _ in range(2):  # the optimizer state is allocated on the first step
        model(**batch).loss.backward()
        optimizer.step()
        grads = tensor_mb([p.grad for p in params])
        optimizer.zero_grad(set_to_none=True)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so the baseline is the steady state
    steady = memory_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current resident size (Linux >= 4.0)
    model(**batch).loss.backward()
    optimizer.step()
    step_peak = (memory_kib("VmHWM") - steady) / 1024
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {"weights_mb": weights_mb(model), "gradients_mb": grads, "optimizer_mb": tensor_mb(state),
            "step_peak_mb": step_peak, "activations_mb": max(0.0, step_peak - grads),
            "training_mb": weights_mb(model) + tensor_mb(state) + step_peak}


def timed(fn, name, **kwargs) -> dict:
    began = time.perf_counter()
    row = fn(name, **kwargs)
    return {**row, "job_seconds": time.perf_counter() - began}


def job_seconds_of(path: Path) -> dict:
    """(is a topic job, method) -> seconds its job took in the run recorded at ``path`` (or nothing)."""
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    def seconds(row):  # a run recorded before job times were: its training time
        runs = row.get("sweep", []) + row.get("seeds", [])[1:]
        return row.get("job_seconds") or (sum(r.get("epochs_run", 0) * r.get("epoch_seconds", 0) for r in runs)
                                          + row.get("steps", 0) * row.get("step_seconds", 0))
    return {(topic, row["method"]): seconds(row)
            for topic, table in ((True, "topic_classification"), (False, "generation"))
            for row in recorded.get(table, [])}


def memory_in_fresh_process(task: str, name: str, threads: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--memory-only", task, name, "--threads", str(threads)]
    out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- the whole run -------------------------------------------------------------------------------

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
    parser.add_argument("--quick", action="store_true", help="smoke test: one epoch, one seed, no extension")
    parser.add_argument("--topic-methods", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--generation-methods", nargs="*", default=list(GENERATION), choices=list(GENERATION))
    parser.add_argument("--lm-epochs", type=int, default=3, help="passes over the 160 SmolLM2 training examples")
    parser.add_argument("--jobs", type=int, default=2, help="methods trained at once, in separate processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--memory-only", nargs=2, metavar=("TASK", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).with_name("compare.json")))
    parser.add_argument("--merge", action="store_true", help="replace or add only these methods' rows in --out "
                        "(the rest stay as recorded; this run's environment is kept under 'merged_runs')")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_only:
        print(json.dumps(measure_memory(*args.memory_only)))
        return {}
    quick = dict(max_epochs=1, seeds=(0,), timing_rounds=2) if args.quick else {}  # grid: the recipe's rate
    lm = dict(epochs=1, n_test=2, max_new_tokens=8) if args.quick else dict(epochs=args.lm_epochs)
    began, progress = time.perf_counter(), not args.no_progress and args.jobs == 1
    quiet()
    result = {"environment": environment(),
              "settings": {"topic": {"recipes": "peftkit.recipes", "seeds": list(quick.get("seeds", (0, 1, 2))),
                                     "max_epochs": quick.get("max_epochs"), "jobs": args.jobs,
                                     "threads_per_job": args.threads},
                           "generation": {"model": "SmolLM2-135M-Instruct", "train": 160, "validation": 40,
                                          "test": lm.get("n_test", 24), "batch_size": 8, "max_length": 64,
                                          "epochs": lm["epochs"], "max_new_tokens": lm.get("max_new_tokens", 30)},
                           "memory": "one fresh process per method: exact tensor bytes of weights and optimizer "
                                     "state; resident-memory peak of the third training step above the steady "
                                     "state before it (activations + gradients + temporaries)"}}
    gen_names = ["frozen (no training)", *args.generation_methods] if args.generation_methods else []
    calls = [(run_topic, n, dict(threads=args.threads, progress=progress,
                                 **(dict(quick, grid=(RECIPES[n].lr,)) if args.quick else {})))
             for n in args.topic_methods]
    calls += [(run_generation, n, dict(threads=args.threads, progress=progress, **lm)) for n in gen_names]
    probes = [("topic", n) for n in args.topic_methods] + [("generation", n) for n in args.generation_methods]
    if args.jobs == 1:  # in this process (also when the script was loaded from a path, as the tests do)
        rows = [timed(fn, name, **kwargs) for fn, name, kwargs in calls]
        memory = [memory_in_fresh_process(task, name, args.threads) for task, name in probes]
    else:  # the longest jobs first (times of the previous run), so that no job is left alone at the end
        previous = job_seconds_of(Path(args.out))
        order = sorted(range(len(calls)), key=lambda i: -previous.get((calls[i][0] is run_topic, calls[i][1]), 0.0))
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            futures = {i: pool.submit(timed, *calls[i][:2], **calls[i][2]) for i in order}
            memory = [pool.submit(memory_in_fresh_process, task, name, args.threads) for task, name in probes]
            rows, memory = [futures[i].result() for i in range(len(calls))], [f.result() for f in memory]
    result["topic_classification"] = rows[: len(args.topic_methods)]
    result["generation"] = rows[len(args.topic_methods):]
    trained = result["topic_classification"] + result["generation"][1:]  # the frozen model trains nothing
    for row, measured in zip(trained, memory):
        row["memory"] = measured
    result["environment"]["load_average_1min_at_end"] = os.getloadavg()[0]
    result["wall_seconds"] = time.perf_counter() - began
    if args.merge:
        result = merged(json.loads(Path(args.out).read_text()), result)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print_tables(result)
    return result


def merged(recorded: dict, new: dict) -> dict:
    """``recorded`` with ``new``'s rows in place of (or after) the rows of the same methods, in RECIPES' order for
    the topic table; ``new``'s environment and settings are kept beside the methods they produced."""
    out = dict(recorded)
    for table in ("topic_classification", "generation"):
        rows = {r["method"]: r for r in recorded.get(table, [])}
        rows.update({r["method"]: r for r in new.get(table, [])})  # a new method goes last
        out[table] = list(rows.values())
    out["topic_classification"].sort(key=lambda r: list(RECIPES).index(r["method"]))  # every row is a recipe's
    out["merged_runs"] = recorded.get("merged_runs", []) + [{
        "methods": [r["method"] for table in ("topic_classification", "generation") for r in new.get(table, [])],
        "environment": new["environment"], "settings": new["settings"], "wall_seconds": new["wall_seconds"]}]
    return out


def print_tables(result):
    print(f"\n{'method':<20}{'trainable':>11}{'%':>7}{'file KB':>9}{'train MB':>9}{'s/epoch':>8}{'lr':>8}"
          f"{'best ep':>8}{'test accuracy':>15}{'peft':>7}{'vs peft':>8}")
    for r in result["topic_classification"]:
        peft = f"{r['peft']['test_accuracy']:>7.3f}{r['peft']['step_time_ratio']:>7.2f}x" if "peft" in r else ""
        print(f"{r['method']:<20}{r['trainable']:>11,}{r['trainable_percent']:>7.2f}{r['adapter_bytes'] / 1e3:>9.0f}"
              f"{r['memory']['training_mb']:>9.0f}{r['epoch_seconds']:>8.1f}{r['lr']:>8.0e}"
              f"{r['epochs_to_best_mean']:>8.1f}{r['test_accuracy_mean']:>9.3f} ± {r['test_accuracy_std']:.3f}{peft}")
    print(f"\n{'SmolLM2':<20}{'trainable':>11}{'%':>7}{'file KB':>9}{'train MB':>9}{'epochs':>8}"
          f"{'last Δ':>8}{'loss':>8}{'SER':>6}")
    for r in result["generation"]:
        cost = (f"{r['trainable']:>11,}{r['trainable_percent']:>7.2f}{r['adapter_bytes'] / 1e3:>9.0f}"
                f"{r['memory']['training_mb']:>9.0f}{r['epochs']:>8}{100 * (r['last_relative_change'] or 0):>7.1f}%"
                if "trainable" in r else " " * 52)
        print(f"{r['method']:<20}{cost}{r['test_loss']:>8.3f}{r['slot_error_rate']:>6.2f}")
    print(f"\nwall time {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()

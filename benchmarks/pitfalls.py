"""The four challenges of PEFT, measured, for notebook 09 (which reads ``pitfalls.json``).

The few-shot topic task: ``few_shot(topic_splits()["train"], 8)``, 64 training utterances (8 per
topic); validation (101) and test (168) as in the rest of the course. Every run is one method's recipe
from ``peftkit.recipes`` (rates, AdamW, warm-up and linear decay over 12 epochs, the best validation
epoch kept) with one knob changed; seeds 0, 1 and 2 (head, data order, dropout); the test split is
scored once, at the selected epoch.

1. overfitting: full fine-tuning as the recipe has it, with weight decay 0.1 (recipe: 0.01), with dropout
   0.3 (the model's: 0.1); fewer trainable parameters: LoRA all-linear, LoRA q/v, the linear probe. After
   every epoch: accuracy and loss on the 64 training examples (eval mode), on validation, and on test
   (the test curve only shows what early stopping would have given; no choice reads it).
2. adapter size: LoRA all-linear at rank 1, 4, 16, 64 with alpha 16 held fixed, scaled alpha/r (LoRA) or
   alpha/sqrt(r) (rsLoRA); Houlsby adapters with a bottleneck of 2, 8, 32, 128 (reduction factor 384/m).
3. learning rate: the technique's rate from 1e-5 to 1 (the head at its recipe rate) for full
   fine-tuning, LoRA all-linear, prompt tuning and LoRA+ (LoRA all-linear with B at 16x the rate).
4. model choice: the same architecture from random initialisation (full fine-tuning, LoRA all-linear);
   the [CLS] token through BERT's untrained pooler instead of the mean pooling the model was trained
   with; SmolLM2-135M-Instruct (a decoder: its last token read by a new head, ``score``) with LoRA
   all-linear, its rate chosen on validation (seed 0) from 1e-3, 3e-3 and 1e-2. SmolLM2's float weights are
   dequantized 4-bit values (its package ships a Q4_1 GGUF).

    python benchmarks/pitfalls.py               # 39 minutes on 2 shared CPU cores (2 jobs x 1 thread)
    python benchmarks/pitfalls.py --reuse benchmarks/pitfalls.json   # train only what the file lacks
    python benchmarks/pitfalls.py --quick --out /tmp/pitfalls.json     # smoke test: 1 epoch, 1 seed
"""

import argparse
import concurrent.futures
import functools
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # why: see compare.py
import torch  # noqa: E402

from peftkit.data import few_shot, topic_splits  # noqa: E402
from peftkit.lora import add_lora  # noqa: E402
from peftkit.models import CAUSAL_LM_CACHE, cache_dir, load_causal_lm, load_encoder, quiet  # noqa: E402
from peftkit import recipes  # noqa: E402
from peftkit.recipes import RECIPES, train  # noqa: E402
from peftkit.train import TrainingDiverged, count_parameters, evaluate, seed_everything  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from compare import environment, mean_std  # noqa: E402

PER_CLASS = 8
SEEDS = (0, 1, 2)
RANKS = (1, 4, 16, 64)
BOTTLENECKS = (2, 8, 32, 128)
RATES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
LORA_PLUS = recipes.LORAPLUS_RATIO  # B's rate over A's: the LoRA+ recipe's (the paper's 2^4)
DECODER_GRID = (1e-3, 3e-3, 1e-2)


@functools.lru_cache(maxsize=1)
def splits():
    data = topic_splits()
    return {"train": few_shot(data["train"], PER_CLASS), "validation": data["validation"], "test": data["test"]}


def decoder_classifier(num_labels=8):
    """SmolLM2-135M-Instruct with a new head ``score`` on the last real token (transformers'
    LlamaForSequenceClassification), from the course's cached conversion."""
    from transformers import AutoModelForSequenceClassification

    _, tokenizer = load_causal_lm()  # builds the cache on first use
    model = AutoModelForSequenceClassification.from_pretrained(cache_dir() / CAUSAL_LM_CACHE, num_labels=num_labels,
                                                               local_files_only=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def build(spec: dict):
    """A fresh classifier drawn from the seed, changed as ``spec`` says, with its technique on."""
    seed_everything(spec["seed"])
    if spec.get("model") == "SmolLM2":
        model, tokenizer = decoder_classifier()
        return add_lora(model, "all-linear", rank=8, alpha=16, modules_to_save=["score"]), tokenizer
    model, tokenizer = load_encoder(num_labels=8, pooling="cls" if spec.get("model") == "[CLS] pooler" else "mean")
    if spec.get("model") == "random init":
        model = type(model)(model.config)  # the same architecture, every weight drawn afresh
    if "dropout" in spec:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = spec["dropout"]
    build = RECIPES[spec["method"]].build
    if "rank" in spec:
        build = recipes.lora("all-linear", rank=spec["rank"], rslora=spec["rslora"])
    if "bottleneck" in spec:
        build = recipes.adapters("houlsby", bottleneck=spec["bottleneck"])
    return build(model, tokenizer), tokenizer


def run(spec: dict, max_epochs=None) -> dict:
    """Train one spec; the row: the spec, its curves, the selected epoch and its test accuracy."""
    torch.set_num_threads(spec.get("threads", 1))
    quiet()
    data, recipe = splits(), RECIPES[spec["method"]]
    model, tokenizer = build(spec)
    collate = recipe.collate(tokenizer)
    curves = {"train_accuracy_curve": [], "train_loss_curve": [], "test_accuracy_curve": []}

    def record(epoch, model):  # the overfitting section's per-epoch view; selection never reads it
        scores = evaluate(model, data["train"], collate)
        curves["train_accuracy_curve"].append(scores["accuracy"])
        curves["train_loss_curve"].append(scores["loss"])
        curves["test_accuracy_curve"].append(evaluate(model, data["test"], collate)["accuracy"])

    row = {k: v for k, v in spec.items() if k != "threads"}
    row["trainable"] = count_parameters(model, show=False)["trainable"]
    began = time.perf_counter()
    try:
        history = train(model, tokenizer, recipe, data, seed=spec["seed"], lr=spec.get("lr"), max_epochs=max_epochs,
                        progress=False, on_epoch=record if spec.get("curves") else None, **spec.get("fit", {}))
    except TrainingDiverged as error:
        return {**row, "diverged": str(error), "seconds": time.perf_counter() - began}
    row.update(val_accuracy_curve=history.val_accuracy, val_loss_curve=history.val_loss,
               selected_epoch=history.selected_epoch, val_accuracy=history.val_accuracy[history.selected_epoch - 1],
               first_train_loss=history.train_loss[0], last_train_loss=history.train_loss[-1],
               test_accuracy=evaluate(model, data["test"], collate)["accuracy"], seconds=time.perf_counter() - began)
    if spec.get("curves"):
        row.update(curves)
    return row


# --- the runs ----------------------------------------------------------------------------------

def specs(seeds=SEEDS) -> list[dict]:
    out = []
    for seed in seeds:
        out += [{"section": "overfitting", "label": "full fine-tuning", "method": "full fine-tuning"},
                {"section": "overfitting", "label": "weight decay 0.1", "method": "full fine-tuning",
                 "fit": {"weight_decay": 0.1}},
                {"section": "overfitting", "label": "dropout 0.3", "method": "full fine-tuning", "dropout": 0.3},
                {"section": "overfitting", "label": "LoRA all-linear", "method": "LoRA all-linear"},
                {"section": "overfitting", "label": "LoRA q/v", "method": "LoRA q/v"},
                {"section": "overfitting", "label": "linear probe", "method": "linear probe"}]
        for spec in out[-6:]:
            spec.update(seed=seed, curves=True)
        out += [{"section": "size", "label": "rsLoRA" if rs else "LoRA", "method": "LoRA all-linear", "rank": r,
                 "rslora": rs, "seed": seed} for rs in (False, True) for r in RANKS]
        out += [{"section": "size", "label": "Houlsby adapters", "method": "Houlsby adapters", "bottleneck": m,
                 "seed": seed} for m in BOTTLENECKS]
        for label, method, fit in (("full fine-tuning", "full fine-tuning", {}), ("LoRA all-linear", "LoRA all-linear", {}),
                                   ("prompt tuning", "prompt tuning", {}),
                                   ("LoRA+", "LoRA all-linear", {"lr_scale": {"lora_B": LORA_PLUS}})):
            out += [{"section": "learning rate", "label": label, "method": method, "lr": lr, "fit": fit, "seed": seed}
                    for lr in RATES]
        out += [{"section": "model", "label": f"random init, {m}", "method": m, "model": "random init", "seed": seed}
                for m in ("full fine-tuning", "LoRA all-linear")]
        out.append({"section": "model", "label": "[CLS] pooler, LoRA all-linear", "method": "LoRA all-linear",
                    "model": "[CLS] pooler", "seed": seed})
    return out


def decoder_search(seed, grid) -> list[dict]:
    base = {"section": "model", "label": "SmolLM2-135M, LoRA all-linear", "method": "LoRA all-linear",
            "model": "SmolLM2", "search": True}
    return [{**base, "lr": lr, "seed": seed} for lr in grid]


def decoder_seeds(search: list[dict], seeds) -> tuple[dict, list[dict]]:
    """SmolLM2's rate: the best of the search on validation (accuracy, ties: lower loss)."""
    best = max((r for r in search if "diverged" not in r), key=lambda r: (r["val_accuracy"], -min(r["val_loss_curve"])))
    keep = ("section", "label", "method", "model", "lr")
    return {**best, "search": False}, [{**{k: best[k] for k in keep}, "seed": s} for s in seeds]


def summary(rows) -> list[dict]:
    """Mean ± std over seeds of each (section, label, knob) group; diverged runs counted apart."""
    groups = {}
    for r in rows:
        if r.get("search"):
            continue
        key = (r["section"], r["label"], r.get("rank"), r.get("bottleneck"), r.get("lr"))
        groups.setdefault(key, []).append(r)
    out = []
    for (section, label, rank, bottleneck, lr), runs in groups.items():
        ok = [r for r in runs if "diverged" not in r]
        entry = {"section": section, "label": label, "rank": rank, "bottleneck": bottleneck, "lr": lr,
                 "seeds": len(runs), "diverged": len(runs) - len(ok), "trainable": runs[0]["trainable"]}
        if ok:
            for field in ("test_accuracy", "val_accuracy", "selected_epoch", "last_train_loss"):
                entry[f"{field}_mean"], entry[f"{field}_std"] = mean_std([r[field] for r in ok])
            if "train_accuracy_curve" in ok[0]:
                gaps = [r["train_accuracy_curve"][r["selected_epoch"] - 1] - r["test_accuracy"] for r in ok]
                entry["gap_mean"], entry["gap_std"] = mean_std(gaps)
        out.append(entry)
    return out


SPEC_KEYS = ("section", "label", "method", "seed", "curves", "fit", "dropout", "rank", "rslora", "bottleneck", "lr",
             "model", "search")


def spec_key(spec: dict) -> str:
    return json.dumps({k: spec[k] for k in SPEC_KEYS if k in spec}, sort_keys=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: one epoch, one seed, a few runs")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once, in separate processes")
    parser.add_argument("--out", default=str(Path(__file__).with_name("pitfalls.json")))
    parser.add_argument("--reuse", metavar="JSON", help="take the runs this file recorded for the same spec "
                        "instead of training them again (the code that trains them must not have changed)")
    args = parser.parse_args(argv)
    previous = json.loads(Path(args.reuse).read_text()) if args.reuse else {"runs": []}
    recorded = {spec_key(r): r for r in previous["runs"]}
    quiet()
    began = time.perf_counter()
    seeds, kwargs = ((0,), {"max_epochs": 1}) if args.quick else (SEEDS, {})
    todo = specs(seeds)
    if args.quick:  # one run of each kind
        todo = [todo[0], todo[3], todo[6], todo[14], todo[18], todo[-3], todo[-1]]
    todo.sort(key=lambda s: s["method"] != "full fine-tuning")  # the longest first
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        def submit(spec):  # a finished future for a run the --reuse file already holds
            if spec_key(spec) in recorded:
                done = concurrent.futures.Future()
                done.set_result(recorded[spec_key(spec)])
                return done
            return pool.submit(run, spec, **kwargs)

        search = [submit(s) for s in decoder_search(seeds[0], DECODER_GRID[1:2] if args.quick
                                                    else DECODER_GRID)]  # the longest first
        futures = [submit(s) for s in todo]
        search = [f.result() for f in search]
        chosen, others = decoder_seeds(search, seeds[1:])
        others = [submit(s) for s in others]
        rows = [f.result() for f in futures] + search + [chosen] + [f.result() for f in others]
    result = {"environment": environment(),
              "settings": {"per_class": PER_CLASS, "train": len(splits()["train"]), "seeds": list(seeds),
                           "max_epochs": kwargs.get("max_epochs", 12), "jobs": args.jobs, "threads_per_job": 1,
                           "lora_plus_ratio": LORA_PLUS},
              "summary": summary(rows), "runs": rows, "wall_seconds": time.perf_counter() - began,
              "reused_runs": sum(spec_key(r) in recorded for r in rows)}
    # the time every run in the file took to train, over this invocation and the ones it reused
    result["wall_seconds_all_invocations"] = result["wall_seconds"] + previous.get(
        "wall_seconds_all_invocations", previous.get("wall_seconds", 0.0))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for e in result["summary"]:
        knob = e["rank"] or e["bottleneck"] or e["lr"] or ""
        acc = f"{e['test_accuracy_mean']:.3f} ± {e['test_accuracy_std']:.3f}" if "test_accuracy_mean" in e else "-"
        print(f"{e['section']:<14}{e['label']:<32}{knob!s:>8}{e['trainable']:>12,}  {acc}  diverged {e['diverged']}")
    print(f"wall time {result['wall_seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()

"""Pfeiffer adapters at AdapterHub's placement, trained with the course's recipe, for notebook 01.

peftkit's "pfeiffer" puts the adapter on the feed-forward output before residual + LayerNorm,
LN(x + adapter(h)); AdapterHub's ``SeqBnConfig`` (``original_ln_before=True``) puts it after them,
LN(x + h + W_up f(W_down LN(x + h))). The recipe ``RECIPES["Pfeiffer adapters"]`` (its rate, head
rate, 12 epochs, best validation epoch kept) trains the second placement on seeds 0, 1 and 2; the
test split is scored once per seed, and the result sits beside compare.json's recorded row, which
the same recipe gave with the default placement.

    python benchmarks/adapter_placement.py        # about 3 minutes a seed on 2 shared CPU cores (1 thread)
    python benchmarks/adapter_placement.py --default-too   # also re-train the default placement
"""

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as compare.py: waiting threads sleep
import torch  # noqa: E402

from peftkit.adapters import add_adapters  # noqa: E402
from peftkit.models import quiet  # noqa: E402
from peftkit.recipes import RECIPES, classifier, recorded  # noqa: E402
from peftkit.recipes import train as train_recipe  # noqa: E402
from peftkit.data import topic_splits  # noqa: E402
from peftkit.train import count_parameters, evaluate  # noqa: E402

METHOD = "Pfeiffer adapters"
OUT = Path(__file__).with_suffix(".json")


def placement(original_ln_before: bool):
    def build(model, tokenizer):
        return add_adapters(model, "pfeiffer", modules_to_save=["classifier"], original_ln_before=original_ln_before)
    return build


def one_seed(original_ln_before: bool, seed: int, splits) -> dict:
    recipe = dataclasses.replace(RECIPES[METHOD], build=placement(original_ln_before))
    model, tokenizer = classifier(seed)
    model = recipe.build(model, tokenizer)
    start = time.perf_counter()
    history = train_recipe(model, tokenizer, recipe, splits, seed=seed, progress=False,
                           desc=f"original_ln_before={original_ln_before} seed={seed}")
    best = history.selected_epoch
    return {"seed": seed, "lr": recipe.lr, "head_lr": recipe.head_lr, "epochs_run": len(history.val_loss),
            "epochs_to_best": best, "val_accuracy": history.val_accuracy[best - 1],
            "val_accuracy_curve": history.val_accuracy, "val_loss_curve": history.val_loss,
            "test_accuracy": evaluate(model, splits["test"], recipe.collate(tokenizer))["accuracy"],
            "trainable": count_parameters(model, show=False)["trainable"], "train_seconds": time.perf_counter() - start}


def summary(runs) -> dict:
    accuracies = [r["test_accuracy"] for r in runs]
    return {"test_accuracy_mean": statistics.mean(accuracies),
            "test_accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--default-too", action="store_true", help="also re-train the default placement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    splits = topic_splits()
    row = recorded()[METHOD]
    result = {"method": METHOD, "recipe": {"lr": RECIPES[METHOD].lr, "head_lr": RECIPES[METHOD].head_lr,
                                           "max_epochs": RECIPES[METHOD].max_epochs},
              "torch_threads": args.threads,
              "recorded_default": {"source": "benchmarks/compare.json", "original_ln_before": False,
                                   "test_accuracy_mean": row["test_accuracy_mean"],
                                   "test_accuracy_std": row["test_accuracy_std"],
                                   "test_accuracy": [r["test_accuracy"] for r in row["seeds"]]},
              "placements": {}}
    for flag in ([True, False] if args.default_too else [True]):
        runs = []
        for seed in args.seeds:
            runs.append(one_seed(flag, seed, splits))
            print(f"original_ln_before={flag} seed={seed}: test {runs[-1]['test_accuracy']:.3f} "
                  f"({runs[-1]['train_seconds']:.0f} s)", flush=True)
            result["placements"][f"original_ln_before={flag}"] = {"runs": runs, **summary(runs)}
            args.out.write_text(json.dumps(result, indent=1) + "\n")  # after every seed: a partial file is usable
    return result


if __name__ == "__main__":
    main()

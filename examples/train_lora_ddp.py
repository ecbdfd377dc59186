"""Train a method of the course on the topic task on several processes with DDP.

One process per CPU core (gloo) or per GPU (NCCL), each with its shard of every batch:

    torchrun --nproc_per_node=2 examples/train_lora_ddp.py --out runs/ddp
    accelerate launch --multi_gpu --num_processes 2 examples/train_lora_ddp.py --out runs/ddp

Several machines (run on each, with its own --node-rank; HOST is machine 0's address):

    torchrun --nnodes=2 --node-rank=0 --nproc_per_node=2 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        examples/train_lora_ddp.py --out runs/ddp

The method trains with its recipe from ``peftkit.recipes`` (rates, epochs, best validation epoch
kept); ``--batch-size`` is per process and defaults to the recipe's batch divided by the number of
processes, so that the optimizer sees the same batch as one process would. Rank 0 writes the
adapter (LoRA methods) and ``run.json``; the other ranks wait for it.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from peftkit import distributed
from peftkit.data import topic_splits
from peftkit.lora import LoRAConfig, save_adapter
from peftkit.models import quiet
from peftkit.recipes import RECIPES, classifier
from peftkit.recipes import train as train_recipe
from peftkit.train import count_parameters, evaluate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="LoRA q/v", choices=list(RECIPES))
    parser.add_argument("--out", type=Path, required=True, help="folder for run.json (and adapter.safetensors)")
    parser.add_argument("--batch-size", type=int, help="per process (default: the recipe's / processes)")
    parser.add_argument("--epochs", type=int, help="default: the recipe's")
    parser.add_argument("--train-examples", type=int, help="train on the first N training utterances only")
    parser.add_argument("--no-dropout", action="store_true", help="dropout off: runs comparable number for number")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rank, world = distributed.init_from_env()
    torch.set_num_threads(max(1, torch.get_num_threads() // world))  # the ranks share this machine's cores
    quiet()
    recipe = RECIPES[args.method]
    if args.batch_size is None and recipe.batch_size % world:
        raise SystemExit(f"the recipe's batch {recipe.batch_size} does not split over {world} processes: "
                         "pass --batch-size")
    batch = args.batch_size or recipe.batch_size // world
    splits = topic_splits()
    if args.train_examples:
        splits["train"] = splits["train"].select(range(args.train_examples))
    model, tokenizer = classifier(seed=args.seed)
    model = recipe.build(model, tokenizer).to(distributed.device())
    if args.no_dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    ledger = distributed.AllReduceLedger()
    began = time.perf_counter()
    history = train_recipe(model, tokenizer, recipe, splits, seed=args.seed, max_epochs=args.epochs,
                           batch_size=batch, desc=f"rank {rank}", comm_hook=ledger.hook if world > 1 else None)
    seconds = time.perf_counter() - began
    test = evaluate(model, splits["test"], recipe.collate(tokenizer))["accuracy"]
    trainable = count_parameters(model, show=False)["trainable"]

    def write():
        args.out.mkdir(parents=True, exist_ok=True)
        if isinstance(getattr(model, "adapter_config", None), LoRAConfig):  # a LoRA method
            save_adapter(model, args.out / "adapter.safetensors")
        run = {"method": args.method, "processes": world, "batch_per_process": batch, "steps": len(history.train_loss),
               "trainable": trainable, "allreduce_bytes_per_step": ledger.bytes / max(1, ledger.steps),
               "allreduce_steps": ledger.steps, "median_step_seconds": history.median_step_seconds,
               "train_seconds": seconds, "val_accuracy": history.val_accuracy,
               "selected_epoch": history.selected_epoch, "test_accuracy": test, "train_loss": history.train_loss}
        (args.out / "run.json").write_text(json.dumps(run, indent=1))
        print(f"{world} process(es) x batch {batch}: test accuracy {test:.3f}, best epoch {history.selected_epoch}, "
              f"{ledger.bytes / max(1, ledger.steps):,.0f} bytes all-reduced per step; wrote {args.out}")

    distributed.on_main(write)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

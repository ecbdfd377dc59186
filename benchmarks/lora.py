"""Benchmark: peftkit LoRA vs peft LoRA vs full fine-tuning on all-MiniLM-L6-v2 (CPU).

Same batch, same seed, same optimizer (AdamW) for every variant:

- training-step time: the variants take turns step by step (so that a busy machine slows them
  alike); median of the timed steps after warm-up, reported as ratios to peft;
- peak memory: each variant trains in a fresh subprocess; the resident-memory high-water mark
  (VmHWM) is reset just before training, so "training MiB" is what the step itself adds on top
  of the loaded model (activations, gradients, optimizer state);
- inference: the merged peftkit model (``merge_lora``) against the base model it came from, and
  the unmerged LoRA model for contrast.

    python benchmarks/lora.py              # about 2 minutes on 2 CPU cores
    python benchmarks/lora.py --steps 20 --batch 16 --seq 64 --threads 2
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import torch

from peftkit.train import interleaved_medians, training_step

VARIANTS = {"peftkit": "peftkit LoRA", "peft": "peft LoRA", "full": "full fine-tune"}
TARGETS = ["query", "value"]
NUM_LABELS = 8


def load_base(seed: int):
    from peftkit.models import load_encoder, quiet

    quiet()
    torch.manual_seed(seed)  # the new classifier head is drawn from the seed
    model, tokenizer = load_encoder(num_labels=NUM_LABELS)
    return model, tokenizer.vocab_size


def make_variant(base, name: str, args):
    """A trainable copy of ``base``; both LoRA variants draw the same A from the same seed."""
    model = copy.deepcopy(base)
    torch.manual_seed(args.seed + 1)
    if name == "peftkit":
        from peftkit.lora import add_lora

        add_lora(model, TARGETS, rank=args.rank, alpha=args.alpha, modules_to_save=["classifier"])
    elif name == "peft":
        import peft

        config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS,
                                 modules_to_save=["classifier"])
        model = peft.get_peft_model(model, config)
    return model.train()


def make_batch(vocab_size: int, args):
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab_size, (args.batch, args.seq), generator=g)  # (B, T)
    labels = torch.randint(0, NUM_LABELS, (args.batch,), generator=g)  # (B,)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def memory_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_memory(name: str, args) -> dict:
    """Runs in a subprocess: memory of training ``name`` beyond the loaded model, in MiB."""
    base, vocab_size = load_base(args.seed)
    model = make_variant(base, name, args)
    del base
    step = training_step(model, make_batch(vocab_size, args))
    loaded = memory_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current resident size (Linux >= 4.0)
    for _ in range(2):  # Adam's state is allocated on the first step
        step()
    peak = memory_kib("VmHWM")
    return {"loaded_mib": loaded / 1024, "peak_mib": peak / 1024, "training_mib": (peak - loaded) / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant, after 2 warm-up steps")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure_memory(args.child, args)))
        return

    began = time.perf_counter()
    argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
    children = {k: subprocess.Popen([*argv, "--child", k], stdout=subprocess.PIPE, text=True) for k in VARIANTS}
    base, vocab_size = load_base(args.seed)
    base.eval()
    batch = make_batch(vocab_size, args)
    models = {k: make_variant(base, k, args) for k in VARIANTS}
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
    memory = {}
    for k, child in children.items():  # let them finish before timing, so they do not slow it
        out, _ = child.communicate()
        if child.returncode:
            sys.exit(f"memory measurement of {k} failed (exit {child.returncode})")
        memory[k] = json.loads(out.strip().splitlines()[-1])

    steps = interleaved_medians({k: training_step(m, batch) for k, m in models.items()}, 2, args.steps)

    from peftkit.lora import merge_lora

    lora = models["peftkit"].eval()  # trained for a few steps: its B is no longer zero
    merged = merge_lora(copy.deepcopy(lora))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        gap = (merged(**inputs).logits - lora(**inputs).logits).abs().max().item()
        # A second copy of the base model is the control: its ratio shows the timing noise.
        contenders = {"base": base, "control": copy.deepcopy(base), "merged": merged, "unmerged": lora}
        forward = {k: (lambda m=m: m(**inputs)) for k, m in contenders.items()}
        infer = interleaved_medians(forward, 2, args.steps + 4)
    same_shape = [(type(m), getattr(m, "weight", torch.empty(0)).shape) for m in merged.modules()] == [
        (type(m), getattr(m, "weight", torch.empty(0)).shape) for m in base.modules()]

    n_base = sum(p.numel() for p in base.parameters())
    print(f"\nall-MiniLM-L6-v2 ({n_base / 1e6:.1f}M parameters), batch {args.batch} x {args.seq} tokens, "
          f"LoRA rank {args.rank} alpha {args.alpha:g} on {'/'.join(TARGETS)} + classifier, AdamW, "
          f"{args.threads} thread(s), torch {torch.__version__}\n")
    header = f"{'variant':<16}{'trainable':>12}{'step ms':>10}{'vs peft':>9}{'peak MiB':>10}{'training MiB':>14}"
    print(header + f"{'vs peft':>9}{'vs full':>9}")
    print("-" * (len(header) + 18))
    for k, label in VARIANTS.items():
        mem = memory[k]
        print(f"{label:<16}{trainable[k]:>12,}{steps[k] * 1e3:>10.1f}{steps[k] / steps['peft']:>8.2f}x"
              f"{mem['peak_mib']:>10.0f}{mem['training_mib']:>14.1f}"
              f"{mem['training_mib'] / memory['peft']['training_mib']:>8.2f}x"
              f"{mem['training_mib'] / memory['full']['training_mib']:>8.2f}x")
    print(f"\n{'inference':<16}{'forward ms':>12}{'vs base':>9}")
    labels = {"base": "base model", "control": "base (2nd copy)", "merged": "peftkit merged",
              "unmerged": "peftkit unmerged"}
    for k, label in labels.items():
        print(f"{label:<16}{infer[k] * 1e3:>12.1f}{infer[k] / infer['base']:>8.2f}x")
    print(f"max |logits merged - unmerged| = {gap:.1e}; merged model has the base's module types and weight "
          f"shapes: {same_shape}")
    step_ratio, merged_ratio = steps["peftkit"] / steps["peft"], infer["merged"] / infer["base"]
    print(f"\ntargets: peftkit step / peft step = {step_ratio:.2f} (target <= 1.05: "
          f"{'met' if step_ratio <= 1.05 else 'NOT met'}); merged / base inference = {merged_ratio:.2f} "
          f"(target 1.00; the control copy of the base measures {infer['control'] / infer['base']:.2f})")
    print(f"medians of {args.steps} interleaved training steps and {args.steps + 4} forwards after warm-up; "
          f"total run {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()

"""Benchmark: QLoRA training on the CPU, peftkit vs peft + bitsandbytes vs float32 LoRA.

SmolLM2-135M-Instruct (its float weights are dequantized Q4_1 values: NF4 rounds them again),
batch 8 x 64 tokens, LoRA rank 8 (alpha 16) on all 210 linears but the head, AdamW, float32
compute; each variant with and without activation checkpointing (non-reentrant, both libraries).

1. Checks: every 4-bit code of peftkit's NF4 model equals bitsandbytes' (``Linear4bit``, NF4,
   double quantization), and so do the double-quantization scales and offsets; the 8-bit codes
   of the block scales may differ in a few places (bitsandbytes' native lookup, see
   tests/test_nf4.py), which are counted. The first losses of the two QLoRA models agree
   (B = 0: the loss of the 4-bit base).
2. Speed: all six variants built in one process, one training step each in turns (a rotating
   order), the median of ``--rounds`` rounds after a warm-up: a busy moment slows all alike.
3. Memory: each variant in its own fresh process, with ``MALLOC_MMAP_THRESHOLD_=65536`` so that
   freed blocks go back to the OS and the resident set is what is alive. "loaded": resident set
   after loading and one forward; "peak": its high-water mark over the first two training
   steps; "training" = peak - loaded (activations, gradients, AdamW state); "model + training"
   = the weights' exact bytes + training, the number to compare across libraries (the Python
   process and its libraries differ between them).

    python benchmarks/qlora.py --rounds 8 --json benchmarks/qlora.json   # ~6 minutes on 2 idle cores
    python benchmarks/qlora.py --rounds 1 --batch 2 --seq 16   # a quick look
"""

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

LABELS = {"peftkit": "peftkit QLoRA", "bnb": "peft + bitsandbytes QLoRA", "lora32": "peftkit float32 LoRA"}
VARIANTS = [(kind, ckpt) for ckpt in (False, True) for kind in LABELS]  # 6 variants


def name(kind: str, ckpt: bool) -> str:
    return LABELS[kind] + (", checkpointing" if ckpt else "")


def build(kind: str, ckpt: bool):
    """One variant of SmolLM2, ready to train: (model, exact bytes of its weights)."""
    from peftkit.lora import add_lora
    from peftkit.models import load_causal_lm
    from peftkit.nf4 import NF4Linear
    from peftkit.qlora import prepare_for_qlora
    from peftkit.train import enable_checkpointing

    if kind == "bnb":
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from peftkit.models import CAUSAL_LM_CACHE, cache_dir

        load_causal_lm()  # makes sure the converted model is cached
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(cache_dir() / CAUSAL_LM_CACHE, quantization_config=config,
                                                     dtype=torch.float32, device_map="cpu")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        extra = sum(m.weight.quant_state.absmax.nbytes + m.weight.quant_state.state2.absmax.nbytes + 4
                    for m in four_bit)  # the 8-bit scales, their float32 scales and offset
    else:
        model, _ = load_causal_lm()
        if kind == "peftkit":
            prepare_for_qlora(model)
        torch.manual_seed(0)
        add_lora(model, "all-linear", rank=8, alpha=16)
        if ckpt:
            enable_checkpointing(model)
        extra = sum(m.weight.nbytes for m in model.modules() if isinstance(m, NF4Linear))
    for param in model.parameters():  # off the memory-mapped checkpoint: resident memory = live tensors
        if param.dtype.is_floating_point:
            param.data = param.data.clone()
    seen = {id(p): p for p in model.parameters()}.values()  # the tied embedding counted once
    return model.train(), sum(p.numel() * p.element_size() for p in seen) + extra


def batch(args, vocab_size: int) -> dict:
    ids = torch.randint(0, vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))
    return {"input_ids": ids, "labels": ids}


def check_against_bitsandbytes(models: dict, data: dict) -> list[str]:
    """4-bit codes, scales and first losses of the two QLoRA models (asserted, then reported)."""
    from peftkit.lora import LoRALinear

    ours, theirs = models[("peftkit", False)][0], models[("bnb", False)][0]
    bnb_layers = {n.removeprefix("base_model.model.").removesuffix(".base_layer"): m
                  for n, m in theirs.named_modules() if n.endswith(".base_layer")}
    layers, codes8, blocks = 0, 0, 0
    for n, layer in ours.named_modules():
        if isinstance(layer, LoRALinear):
            mine, other = layer.base.weight, bnb_layers[n].weight
            state = other.quant_state
            assert torch.equal(mine.packed, other.data.reshape(-1)), n
            assert torch.equal(mine.absmax_offset, state.offset) and torch.equal(mine.absmax_scale, state.state2.absmax)
            codes8 += (mine.absmax_codes != state.absmax).sum().item()
            blocks += state.absmax.numel()
            layers += 1
    assert layers == 210, layers
    with torch.no_grad():
        losses = [m[0](**data).loss.item() for m in (models[("peftkit", False)], models[("bnb", False)])]
    assert abs(losses[0] - losses[1]) < 1e-3 * losses[1], losses
    return [f"checks: {layers} layers, every 4-bit code, scale and offset equal to bitsandbytes'; 8-bit block-scale "
            f"codes differing: {codes8} of {blocks:,} (bitsandbytes' native lookup, tests/test_nf4.py)",
            f"first loss (B = 0, the 4-bit base): peftkit {losses[0]:.6f}, peft + bitsandbytes {losses[1]:.6f}"]


def speed_table(args) -> list[str]:
    from peftkit.train import interleaved_medians, training_step

    models = {v: build(*v) for v in VARIANTS}
    data = batch(args, models[VARIANTS[0]][0].config.vocab_size)
    lines = check_against_bitsandbytes(models, data)
    steps = {v: training_step(model, data) for v, (model, _) in models.items()}
    medians = interleaved_medians(steps, warmup=1, rounds=args.rounds)
    ref, base = medians[("bnb", False)], medians[("lora32", False)]
    lines += ["", f"{'training step, median of ' + str(args.rounds) + ' turns':<45}{'s':>7}{'vs peft+bnb':>13}"
              f"{'vs fp32 LoRA':>14}", "-" * 79]
    for v in VARIANTS:
        lines.append(f"{name(*v):<45}{medians[v]:>7.2f}{medians[v] / ref:>12.2f}x{medians[v] / base:>13.2f}x")
    return lines, {name(*v): medians[v] for v in VARIANTS}


def memory_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_memory(kind: str, ckpt: bool, args) -> dict:
    """Runs in a fresh process: load one variant, run it once, then the peak over two training steps."""
    from peftkit.train import training_step

    model, weights = build(kind, ckpt)
    data = batch(args, model.config.vocab_size)
    with torch.no_grad():
        model(**data)  # a first forward allocates what later steps reuse
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    loaded = memory_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current resident size (Linux >= 4.0)
    step = training_step(model, data)
    step(), step()  # the first allocates AdamW's state
    return {"weights": weights / 2**20, "loaded": loaded / 1024, "peak": memory_kib("VmHWM") / 1024}


def memory_table(args) -> list[str]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
    results = {}
    for kind, ckpt in VARIANTS:  # one after the other: each alone on the machine
        child = subprocess.run([*argv, "--child", kind, *(["--ckpt"] if ckpt else [])], stdout=subprocess.PIPE,
                               text=True, env=env)
        if child.returncode:
            sys.exit(f"the {name(kind, ckpt)} run failed (exit {child.returncode})")
        results[kind, ckpt] = json.loads(child.stdout.strip().splitlines()[-1])
    for r in results.values():
        r["training"] = r["peak"] - r["loaded"]
        r["total"] = r["weights"] + r["training"]
    ref, base = results[("bnb", True)]["total"], results[("lora32", False)]["total"]
    lines = [f"{'memory, MiB (fresh process each)':<45}{'weights':>9}{'loaded':>8}{'peak':>7}{'training':>10}"
             f"{'model+training':>16}{'vs fp32':>9}{'vs bnb ckpt':>13}", "-" * 117]
    for v in VARIANTS:
        r = results[v]
        lines.append(f"{name(*v):<45}{r['weights']:>9.0f}{r['loaded']:>8.0f}{r['peak']:>7.0f}{r['training']:>10.0f}"
                     f"{r['total']:>16.0f}{r['total'] / base:>8.2f}x{r['total'] / ref:>12.2f}x")
    lines.append("MALLOC_MMAP_THRESHOLD_=65536 (freed blocks return to the OS); vs fp32: against float32 LoRA without "
                 "checkpointing; vs bnb ckpt: against peft + bitsandbytes with checkpointing")
    return lines, {name(*v): results[v] for v in VARIANTS}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    parser.add_argument("--rounds", type=int, default=5, help="timed turns of every variant")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here (benchmarks/qlora.json)")
    parser.add_argument("--child", choices=LABELS, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # bitsandbytes' note about optional CPU kernels, peft's about 4-bit layers
    from peftkit.models import quiet

    quiet()
    if args.child:
        print(json.dumps(measure_memory(args.child, args.ckpt, args)))
        return
    began = time.perf_counter()
    import bitsandbytes
    import peft

    print(f"torch {torch.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}, "
          f"{args.threads} thread(s), CPU capability {torch.backends.cpu.get_cpu_capability()}; SmolLM2-135M, "
          f"batch {args.batch} x {args.seq}, LoRA r8 on all linears but the head, float32 compute\n")
    memory_lines, memory = memory_table(args)
    print("\n".join(memory_lines), end="\n\n", flush=True)
    speed_lines, speed = speed_table(args)
    print("\n".join(speed_lines))
    if args.json:  # what notebook 07 plots
        settings = {k: getattr(args, k) for k in ("threads", "rounds", "batch", "seq", "seed")}
        args.json.write_text(json.dumps({"settings": settings, "memory_mib": memory, "step_s": speed}, indent=1) + "\n")
    print(f"\ntotal run {time.perf_counter() - began:.0f} s wall")


if __name__ == "__main__":
    main()

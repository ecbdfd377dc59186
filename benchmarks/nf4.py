"""Benchmark: peftkit NF4 vs bitsandbytes on the CPU, at one thread and at every core.

1. Quantize and dequantize one 4096 x 4096 float32 tensor (the bf16 output too), peftkit
   against bitsandbytes' CPU path, at 1 thread and at the machine's core count: the two take
   turns, and each figure is the best wall-clock time of the rounds. Targets (issue 22):
   quantize <= 1.0x and dequantize <= 1.5x of bitsandbytes' native kernel at the core count.
   Both results are checked bit for bit. Also shown: peftkit's dequantize into a reused buffer,
   as its 4-bit matmul does it (no fresh pages to fault in).
2. Bits per parameter, measured on the tensor and on every linear of SmolLM2-135M, with and
   without double quantization, against the theory: 4 + 32/64 = 4.5 and 4 + 8/64 + 32/16384.

QLoRA training (speed and memory against peft + bitsandbytes) is ``benchmarks/qlora.py``.

    python benchmarks/nf4.py             # about a minute on an idle CPU
"""

import argparse
import os
import time

import torch

def best_of_turns(fns: dict, rounds: int) -> dict:
    """Best wall-clock seconds of each callable over ``rounds`` rounds, taking turns after a warm-up."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def kernel_table(args) -> list[str]:
    import bitsandbytes.functional as BF

    from peftkit.nf4 import quantize_nf4

    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(args.seed)) * 0.02
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = quantize_nf4(w)
    assert torch.equal(ours.packed, packed.reshape(-1)) and torch.equal(ours.absmax, state.absmax)
    bf16_state = BF.QuantState(state.absmax, shape=w.shape, dtype=torch.bfloat16, blocksize=64, code=state.code,
                               quant_type="nf4")
    assert torch.equal(ours.dequantize(), BF.dequantize_4bit(packed, state, quant_type="nf4"))
    assert torch.equal(ours.dequantize(torch.bfloat16), BF.dequantize_4bit(packed, bf16_state, quant_type="nf4"))
    assert torch.equal(ours.dequantize(reuse=True), ours.dequantize())
    fns = {
        "quantize bnb": lambda: BF.quantize_4bit(w, blocksize=64, quant_type="nf4"),
        "quantize peftkit": lambda: quantize_nf4(w),
        "dequantize fp32 bnb": lambda: BF.dequantize_4bit(packed, state, quant_type="nf4"),
        "dequantize fp32 peftkit": lambda: ours.dequantize(),
        "dequantize bf16 bnb": lambda: BF.dequantize_4bit(packed, bf16_state, quant_type="nf4"),
        "dequantize bf16 peftkit": lambda: ours.dequantize(torch.bfloat16),
        "dequantize fp32, reused buffer bnb": lambda: BF.dequantize_4bit(packed, state, quant_type="nf4"),
        "dequantize fp32, reused buffer peftkit": lambda: ours.dequantize(reuse=True),
    }
    threads = sorted({1, os.cpu_count()})
    best = {}
    for n in threads:
        torch.set_num_threads(n)
        best[n] = best_of_turns(fns, args.rounds)
    torch.set_num_threads(args.threads)
    lines = [f"{'4096 x 4096, block 64':<40}" + "".join(f"{f'bnb ms @{n}':>11}{f'ours ms @{n}':>12}{'ratio':>8}"
                                                        for n in threads) + f"{'target':>9}", "-" * (49 + 31 * len(threads))]
    targets = {"quantize": 1.0, "dequantize fp32": 1.5}
    for op in ["quantize", "dequantize fp32", "dequantize bf16", "dequantize fp32, reused buffer"]:
        row = f"{op:<40}"
        for n in threads:
            b, p = best[n][f"{op} bnb"], best[n][f"{op} peftkit"]
            row += f"{b * 1e3:>11.1f}{p * 1e3:>12.1f}{p / b:>7.2f}x"
        if op in targets:
            ratio = best[threads[-1]][f"{op} peftkit"] / best[threads[-1]][f"{op} bnb"]
            row += f"   <= {targets[op]}" + (" ok" if ratio <= targets[op] else " MISSED")
        lines.append(row)
    lines.append(f"best wall-clock time of {args.rounds} turns; targets at the core count ({threads[-1]}); bit-exact: "
                 "packed codes, absmax and the dequantized outputs equal bitsandbytes'")
    return lines


def bits_table(args, model) -> list[str]:
    from peftkit.nf4 import quantize_nf4

    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(args.seed))
    weights = {"4096 x 4096 tensor": [w],
               "SmolLM2 linears": [m.weight for n, m in model.named_modules()
                                   if isinstance(m, torch.nn.Linear) and n != "lm_head"]}
    lines = [f"{'bits per parameter':<26}{'params':>12}{'plain':>9}{'double q.':>11}{'rel. error':>12}", "-" * 70]
    for name, tensors in weights.items():
        n = sum(t.numel() for t in tensors)
        plain = sum(quantize_nf4(t).nbytes for t in tensors)
        double, err, norm = 0, 0.0, 0.0
        for t in tensors:
            q = quantize_nf4(t, double_quant=True)
            double += q.nbytes
            err += (q.dequantize() - t).float().square().sum().item()
            norm += t.float().square().sum().item()
        lines.append(f"{name:<26}{n:>12,}{8 * plain / n:>9.4f}{8 * double / n:>11.4f}{(err / norm) ** 0.5:>12.4f}")
    lines.append(f"{'theory':<26}{'':>12}{4 + 32 / 64:>9.4f}{4 + 8 / 64 + 32 / (64 * 256):>11.4f}"
                 "   (+ the 4-byte offset)")
    lines.append("rel. error: ||dequantize(quantize(W)) - W|| / ||W||, with double quantization")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for the bits table")
    parser.add_argument("--rounds", type=int, default=7, help="turns of each kernel timing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    began = time.perf_counter()
    import bitsandbytes

    from peftkit.models import load_causal_lm, quiet

    quiet()
    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, {os.cpu_count()} cores, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
    print("\n".join(kernel_table(args)), end="\n\n", flush=True)
    model, _ = load_causal_lm()
    print("\n".join(bits_table(args, model)), end="\n\n", flush=True)
    print(f"\ntotal run {time.perf_counter() - began:.0f} s wall")


if __name__ == "__main__":
    main()

import time, torch
from peftkit.models import load_causal_lm, quiet
from peftkit.lora import add_lora
from peftkit.qlora import prepare_for_qlora
from peftkit.data import data_to_text, CausalLMCollator
quiet(); torch.manual_seed(0)
m, tok = load_causal_lm(); prepare_for_qlora(m, skip=("lm_head",)); add_lora(m, "all-linear", rank=8, alpha=16)
d = data_to_text(); b = CausalLMCollator(tok)([d["train"][i] for i in range(8)])
print(b["input_ids"].shape, flush=True)
for _ in range(3):
    t = time.perf_counter(); m(**b).loss.backward(); print(f"qlora step {time.perf_counter()-t:.1f}s", flush=True)
f, _ = load_causal_lm(); add_lora(f, "all-linear", rank=8, alpha=16)
for _ in range(2):
    t = time.perf_counter(); f(**b).loss.backward(); print(f"fp32 lora step {time.perf_counter()-t:.1f}s", flush=True)

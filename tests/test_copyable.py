"""The README's promise: each technique file, copied into another project with only the sibling files its
docstring names, imports and runs with nothing but torch and the standard library; copied beside
adapter_files.py (and with safetensors installed), it saves and loads through the same two functions."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Modules torch has not loaded by itself (nor ALLOWED, set before the guard) may come only from the standard library or the copied files.
GUARD = """
import importlib.abc, sys
from pathlib import Path
import torch
here, loaded = Path.cwd(), {m.split(".")[0] for m in sys.modules}

class OnlyTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in loaded or top in sys.stdlib_module_names or (here / f"{top}.py").exists() or top in ALLOWED:
            return None
        raise ModuleNotFoundError(f"No module named {name!r} (only torch and the standard library here)", name=name)

sys.meta_path.insert(0, OnlyTorch())
sys.path.insert(0, str(here))
torch.manual_seed(0)
"""

# file -> (the sibling files it needs, a tiny use of its core module)
FILES = {
    "lora": (["targets", "lora_layers"], """
from lora import add_lora, merge_lora
model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
x = torch.randint(0, 10, (3, 5))
before = model(x)
add_lora(model, ["0", "1"], rank=2, alpha=4)
assert type(model[0]).__name__ == "LoRAEmbedding" and type(model[1]).__name__ == "LoRALinear"
assert torch.equal(model(x), before)  # A (embedding) and B (linear) start at zero
merge_lora(model)
"""),
    "dora": (["lora", "targets", "lora_files"], """
from dora import add_dora, merge_lora
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
x = torch.randn(3, 4)
before = model(x)
add_dora(model, ["0", "2"], rank=2, alpha=4)
assert type(model[0]).__name__ == "DoRALinear" and torch.allclose(model(x), before)  # m = ||W||, B = 0
torch.nn.init.ones_(model[0].lora_B.weight)
after = model(x)
assert torch.allclose(merge_lora(model)(x), after, atol=1e-6) and not torch.allclose(after, before)
"""),
    "adapters": (["adapter_layouts"], """
from adapters import BottleneckAdapter
h = torch.randn(2, 5, 32)
assert BottleneckAdapter(32, reduction_factor=8)(h).shape == h.shape
"""),
    "prompt_tuning": (["prompt_common"], """
from prompt_tuning import SoftPrompt
assert SoftPrompt(4, 16)().shape == (4, 16)
"""),
    "p_tuning": (["prompt_tuning", "prompt_common"], """
from p_tuning import PromptEncoder
assert PromptEncoder(4, 16, 8, kind="lstm")().shape == (4, 16)
"""),
    "prefix_tuning": (["prompt_tuning"], """
from prefix_tuning import PrefixEncoder
assert PrefixEncoder(num_layers=2, num_kv_heads=2, head_dim=4, num_virtual_tokens=3)().numel() == 3 * 2 * 2 * 2 * 4
"""),
    "nf4": ([], """
from nf4 import quantize_nf4
w = torch.randn(8, 64)
assert (quantize_nf4(w).dequantize() - w).abs().max() < 0.5
"""),
    "multi_adapter": (["lora", "lora_files", "targets", "lora_layers", "adapters", "adapter_layouts"], """
from lora import add_lora
from multi_adapter import active_adapter, add_named_adapter, disable_adapter, set_adapter
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
x = torch.randn(3, 4)
base = model(x)
add_named_adapter(model, "a", ["0"], rank=2, alpha=4)
add_named_adapter(model, "b", ["2"], rank=1, alpha=2)
torch.nn.init.ones_(set_adapter(model, "b")[2].lora_B.weight)
assert active_adapter(model) == "b" and not torch.equal(model(x), base)
with disable_adapter(model):
    assert torch.equal(model(x), base)
"""),
    "serving": (["lora", "multi_adapter", "lora_files", "targets", "lora_layers", "adapters", "adapter_layouts"], """
from multi_adapter import add_named_adapter, set_adapter
from serving import adapter_bytes, mixed_forward
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
x = torch.randn(3, 4)
base = model(x)
add_named_adapter(model, "a", ["0"], rank=2, alpha=4)
add_named_adapter(model, "b", ["2"], rank=1, alpha=2)
torch.nn.init.ones_(set_adapter(model, "b")[2].lora_B.weight)
mixed = mixed_forward(model, ["__base__", "b", "a"], x)
assert torch.equal(mixed[1], model(x)[1]) and torch.equal(mixed[0], base[0]) and torch.equal(mixed[2], base[2])
assert adapter_bytes(model)["b"] == {"parameters": 8 + 2, "bytes": 40}
"""),
    "loraplus": ([], """
from loraplus import loraplus_param_groups
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
model.add_module("lora_B", torch.nn.Linear(2, 4, bias=False))
groups = loraplus_param_groups(model, lr=1e-3, ratio=16, weight_decay=0.1)
assert [len(g["params"]) for g in groups] == [1, 0, 1, 3] and groups[2]["lr"] == 16e-3  # A, embedding, B, no decay
"""),
    "qlora": (["lora", "nf4"], """
from lora import add_lora
from qlora import prepare_for_qlora
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
add_lora(prepare_for_qlora(model), "all-linear", rank=2, alpha=4)
model(torch.randn(3, 64)).sum().backward()
"""),
    "lora_init": (["lora", "targets", "nf4"], """
from lora import add_lora
from lora_init import init_lora, pissa_to_lora
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
x = torch.randn(3, 64)
before = model(x)
initial = init_lora(add_lora(model, ["0"], rank=2, alpha=4), "pissa")
assert torch.allclose(model(x), before, atol=1e-5)  # W_res + s B A = W
assert pissa_to_lora(model, initial)[1].rank == 4
init_lora(add_lora(torch.nn.Sequential(torch.nn.Linear(64, 64)), ["0"], rank=2), "loftq", iters=2)
"""),
    "ia3": (["targets", "lora"], """
from ia3 import add_ia3, merge_ia3
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
x = torch.randn(3, 4)
before = model(x)
add_ia3(model, ["0", "2"], feedforward_modules=["2"])
assert model[0].ia3_l.shape == (8, 1) and model[2].ia3_l.shape == (1, 8)  # output of 0, input of 2
assert torch.equal(model(x), before)  # the vectors start at ones
torch.nn.init.uniform_(model[2].ia3_l, 0.5, 1.5)
after = model(x)
assert torch.allclose(merge_ia3(model)(x), after, atol=1e-6) and type(model[2]) is torch.nn.Linear
"""),
}


@pytest.mark.parametrize("name", FILES)
def test_a_copied_technique_file_runs_with_only_torch(name, tmp_path):
    siblings, use = FILES[name]
    docstring = re.match(r'\s*"""(.*?)"""', (ROOT / "peftkit" / f"{name}.py").read_text(), re.S).group(1)
    for sibling in siblings:  # the docstring tells a reader what to copy along
        assert f"``{sibling}.py``" in docstring, f"{name}.py's docstring should say it needs {sibling}.py"
    for file in [name, *siblings]:
        shutil.copy(ROOT / "peftkit" / f"{file}.py", tmp_path)
    done = subprocess.run([sys.executable, "-I", "-c", "ALLOWED = ()" + GUARD + use], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# Tiny stand-ins for the models each technique expects, built from torch alone.
LAYER = """
from torch import nn
def bert_layer(d=16):  # the module names adapters look for in a BERT layer
    dense = lambda: nn.ModuleDict({"dense": nn.Linear(d, d), "LayerNorm": nn.LayerNorm(d)})
    return nn.ModuleDict({"attention": nn.ModuleDict({"output": dense()}), "output": dense()})
class Encoder(nn.Module):  # what the prompt methods call: input embeddings, and a forward on them
    def __init__(self, d=16):
        super().__init__()
        self.embed, self.classifier = nn.Embedding(10, d), nn.Linear(d, 2)
    def get_input_embeddings(self):
        return self.embed
    def forward(self, inputs_embeds, attention_mask=None, labels=None):
        return self.classifier(inputs_embeds.mean(1))
"""

# technique file -> (siblings, what to build, a parameter that trains)
ROUND_TRIPS = {
    "lora": (["lora_files"], "nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))",
             "technique.add_lora(model, ['0'], rank=2, alpha=4)", "0.lora_B.weight"),
    "adapters": (["adapter_layouts"], "nn.ModuleDict({'layer': bert_layer()})", "technique.add_adapters(model, 'pfeiffer')",
                 "layer.output.dense.adapter.adapter_up.weight"),
    "prompt_tuning": ([], "Encoder()", "technique.PromptTuningModel(model, num_virtual_tokens=3)",
                      "prompt_encoder.embedding.weight"),
    "p_tuning": (["prompt_tuning"], "Encoder()", "technique.PTuningModel(model)", "prompt_encoder.embedding.weight"),
    "ia3": (["targets", "lora"], "nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))",
            "technique.add_ia3(model, ['0', '2'], feedforward_modules=['2'])", "2.ia3_l"),
}


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_a_copied_technique_file_saves_and_loads_beside_adapter_files(name, tmp_path):
    siblings, build, add, trained = ROUND_TRIPS[name]
    for file in [name, *siblings, "adapter_files"]:
        shutil.copy(ROOT / "peftkit" / f"{file}.py", tmp_path)
    use = LAYER + f"""
import {name} as technique
model = {add.replace("model", build, 1)}
with torch.no_grad():
    model.get_parameter({trained!r}).add_(1.0)
technique.save_adapter(model, "adapter.safetensors")
fresh = {add.replace("model", build, 1)}
assert not torch.equal(fresh.get_parameter({trained!r}), model.get_parameter({trained!r}))
technique.load_adapter(fresh, "adapter.safetensors")
assert torch.equal(fresh.get_parameter({trained!r}), model.get_parameter({trained!r}))
"""
    done = subprocess.run([sys.executable, "-I", "-c", "ALLOWED = ('safetensors',)" + GUARD + use], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_guard_refuses_what_is_not_torch(tmp_path):
    done = subprocess.run([sys.executable, "-I", "-c", "ALLOWED = ()" + GUARD + "import transformers"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "only torch and the standard library" in done.stderr


# The README's promise, in its strictest form: the seven technique files copied together, and nothing else
# (no targets.py, lora_layers.py, lora_files.py, adapter_layouts.py, prompt_common.py, adapter_files.py), each
# imports and does its core job with torch alone.
SEVEN = ["lora", "adapters", "prompt_tuning", "p_tuning", "prefix_tuning", "nf4", "qlora"]

TORCH_ONLY_MODELS = LAYER + """
from types import SimpleNamespace
class Tiny(nn.Module):  # LoRA's targets by name, and a head for modules_to_save
    def __init__(self):
        super().__init__()
        self.query, self.value, self.classifier = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 2)
    def forward(self, x):
        return self.classifier(self.query(x) + self.value(x))
class Conv1D(nn.Module):  # transformers' GPT-2 linear, known to LoRA by its class name: W (in, out), y = x W + b
    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.weight, self.bias = nf, nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.zeros(nf))
    def forward(self, x):
        return x @ self.weight + self.bias
def llama_layer(d=16):  # the module names adapters look for in a Llama layer
    block = lambda name, n: nn.ModuleDict({name: nn.Linear(n, d)})
    return nn.ModuleDict({"self_attn": block("o_proj", d), "mlp": block("down_proj", 2 * d),
                          "input_layernorm": nn.LayerNorm(d), "post_attention_layernorm": nn.LayerNorm(d)})
def gpt2_layer(d=16):  # GPT-2's names, whose layout is adapter_layouts.py's
    block = lambda: nn.ModuleDict({"c_proj": nn.Linear(d, d)})
    return nn.ModuleDict({"attn": block(), "mlp": block(), "ln_1": nn.LayerNorm(d), "ln_2": nn.LayerNorm(d)})
class Cache:  # the one method of a key/value cache that prefix-tuning calls
    def __init__(self):
        self.layers = {}
    def update(self, keys, values, layer):
        self.layers[layer] = (keys, values)
class TinyLM(nn.Module):  # a causal LM that reads its cache: enough for the prefix to reach the logits
    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="llama", num_attention_heads=2, hidden_size=8, num_hidden_layers=1)
        self.embed, self.head = nn.Embedding(10, 8), nn.Linear(8, 10)
    def get_input_embeddings(self):
        return self.embed
    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, use_cache=None,
                past_key_values=None, labels=None):
        keys, values = past_key_values.layers[0]  # (B, 2 heads, P, 4)
        prefix = values.transpose(1, 2).flatten(2).mean(1, keepdim=True)  # (B, 1, 8)
        return SimpleNamespace(logits=self.head(self.embed(input_ids) + prefix))
"""

CORE_USES = """
import adapters, lora, qlora, prompt_tuning, p_tuning, prefix_tuning
x, ids = torch.randn(3, 16), torch.randint(0, 10, (2, 5))

bert = nn.ModuleDict({"layer": bert_layer()})  # bottleneck adapters on a BERT-like layer: houlsby
adapters.add_adapters(bert, "houlsby", reduction_factor=4)
dense = bert.layer.output.dense
assert type(dense).__name__ == "AdaptedSublayer" and torch.allclose(dense(x), dense.base(x), atol=1e-3)
assert len(adapters.adapter_state_dict(bert)) == 2 * 4 + 2 * 2  # two adapters, two trained LayerNorms
llama = nn.ModuleDict({"layers": nn.ModuleList([llama_layer(), llama_layer()])})  # and a Llama-like one: pfeiffer
adapters.add_adapters(llama, "pfeiffer", reduction_factor=4)
llama.layers[1].mlp.down_proj(torch.randn(3, 32)).sum().backward()
assert llama.layers[1].mlp.down_proj.adapter.adapter_up.weight.grad is not None
assert type(adapters.remove_adapters(llama).layers[0].mlp.down_proj) is nn.Linear

model = Tiny()  # LoRA: names, forward, merge, unmerge, what a file would hold
before = model(x)
lora.add_lora(model, ["query", "value"], rank=2, alpha=4, modules_to_save=["classifier"])
assert type(model.query).__name__ == "LoRALinear" and torch.equal(model(x), before)
model(x).sum().backward()
assert model.query.lora_B.weight.grad is not None and model.query.base.weight.grad is None
torch.nn.init.ones_(model.value.lora_B.weight)
after = model(x)
assert sorted(lora.adapter_state_dict(model)) == ["classifier.bias", "classifier.weight", "query.lora_A.weight",
                                                  "query.lora_B.weight", "value.lora_A.weight", "value.lora_B.weight"]
assert torch.allclose(lora.merge_lora(model, unload=False)(x), after, atol=1e-5)
lora.unmerge_lora(model)
assert torch.allclose(model(x), after, atol=1e-5) and type(lora.merge_lora(model).value) is nn.Linear
assert list(lora.add_lora(Tiny(), "all-linear").adapter_config.target_modules) == ["query", "value"]  # no head

gpt2 = nn.Sequential(Conv1D(8, 16))  # GPT-2's Conv1D, by class name: delta W is transposed to merge
lora.add_lora(gpt2, ["0"], rank=2)
torch.nn.init.ones_(gpt2[0].lora_B.weight)
y = gpt2(x)
assert gpt2[0].fan_in_fan_out and torch.allclose(lora.merge_lora(gpt2)(x), y, atol=1e-5)

quantized = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))  # QLoRA: 4-bit base, LoRA on top
lora.add_lora(qlora.prepare_for_qlora(quantized, skip=["2"]), "all-linear", rank=2, alpha=4)
quantized(torch.randn(3, 64)).sum().backward()
assert type(quantized[0].base).__name__ == "NF4Linear" and quantized[0].lora_A.weight.grad is not None

wrapped = prompt_tuning.PromptTuningModel(Encoder(), num_virtual_tokens=3)  # prompt tuning: ids or embeddings
out = wrapped(input_ids=ids)
assert torch.equal(out, wrapped(inputs_embeds=wrapped.base_model.embed(ids)))
out.sum().backward()
assert wrapped.prompt_encoder.embedding.weight.grad is not None and wrapped.base_model.embed.weight.grad is None

wrapped = p_tuning.PTuningModel(Encoder(), p_tuning.PTuningConfig(num_virtual_tokens=3, kind="lstm"))  # P-tuning
wrapped(input_ids=ids).sum().backward()
assert wrapped.prompt_encoder.embedding.weight.grad is not None
assert wrapped.export_prompt().shape == (3, 16)

wrapped = prefix_tuning.PrefixTuningModel(TinyLM(), num_virtual_tokens=2, cache_class=Cache)  # prefix-tuning
wrapped(input_ids=ids).logits.sum().backward()
assert wrapped.prefix_encoder.embedding.weight.grad is not None and wrapped.base_model.head.weight.grad is None

assert not [m for m in ("peftkit", "transformers") if m in sys.modules]
"""


def run_in_folder_of_seven(tmp_path, code):
    for file in SEVEN:
        shutil.copy(ROOT / "peftkit" / f"{file}.py", tmp_path)
    return subprocess.run([sys.executable, "-I", "-c", "ALLOWED = ()" + GUARD + TORCH_ONLY_MODELS + code],
                          cwd=tmp_path, capture_output=True, text=True)


def test_the_seven_technique_files_do_their_core_job_with_only_torch(tmp_path):
    done = run_in_folder_of_seven(tmp_path, CORE_USES)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.stem for p in tmp_path.glob("*.py")) == sorted(SEVEN)  # nothing else was needed


# A feature beyond the core asks for the file that has it: (what is tried, the file it needs).
BEYOND_THE_CORE = {
    "lora regex": ("import lora; lora.add_lora(Tiny(), '.*query')", "targets"),
    "lora exclude_modules": ("import lora; lora.add_lora(Tiny(), 'all-linear', exclude_modules=['value'])",
                             "targets"),
    "lora layers_to_transform": ("import lora; lora.add_lora(Tiny(), ['query'], layers_to_transform=[0])",
                                 "targets"),
    "lora embedding": ("import lora; lora.add_lora(nn.Sequential(nn.Embedding(10, 4)), ['0'])", "lora_layers"),
    "lora saving": ("import lora; lora.save_adapter(lora.add_lora(Tiny(), ['query']), 'a.safetensors')",
                    "lora_files"),
    "prompt init from vocabulary": ("import prompt_tuning; prompt_tuning.PromptTuningModel(Encoder(), 3, init='vocab')",
                                    "prompt_common"),
    "prompt export_peft": ("import p_tuning; p_tuning.export_peft(p_tuning.PTuningModel(Encoder()), 'out', None)",
                           "prompt_common"),
    "prompt saving": ("import prompt_tuning; m = prompt_tuning.PromptTuningModel(Encoder(), 3)\n"
                      "prompt_tuning.save_adapter(m, 'a.safetensors')", "adapter_files"),
    "prefix T5": ("import prefix_tuning; t5 = TinyLM(); t5.config = SimpleNamespace(model_type='t5', "
                  "is_encoder_decoder=True, num_attention_heads=2, hidden_size=8, num_hidden_layers=1, d_kv=4, "
                  "d_model=8, num_layers=1, num_decoder_layers=1)\nprefix_tuning.PrefixTuningModel(t5, 2)",
                  "prompt_common"),
    "adapters on GPT-2": ("import adapters; adapters.add_adapters(nn.ModuleDict({'h': gpt2_layer()}))",
                          "adapter_layouts"),
    "adapters original_ln_before": ("import adapters; bert = nn.ModuleDict({'layer': bert_layer()})\n"
                                    "adapters.add_adapters(bert, original_ln_before=True)", "adapter_layouts"),
    "adapters saving": ("import adapters; m = adapters.add_adapters(nn.ModuleDict({'layer': bert_layer()}))\n"
                        "adapters.save_adapter(m, 'a.safetensors')", "adapter_files"),
    "prefix saving": ("import prefix_tuning; m = prefix_tuning.PrefixTuningModel(TinyLM(), 2, cache_class=Cache)\n"
                      "prefix_tuning.save_adapter(m, 'a.safetensors')", "adapter_files"),
}


@pytest.mark.parametrize("feature", BEYOND_THE_CORE)
def test_a_feature_beyond_the_core_names_the_file_to_copy(feature, tmp_path):
    code, needed = BEYOND_THE_CORE[feature]
    done = run_in_folder_of_seven(tmp_path, code)
    last = done.stderr.strip().splitlines()[-1]  # a ModuleNotFoundError (or, for a family, ValueError) naming the file
    assert done.returncode != 0 and last.startswith(("ModuleNotFoundError", "ValueError")), done.stderr[-2000:]
    assert f"{needed}.py" in last, done.stderr[-800:]

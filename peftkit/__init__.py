"""peftkit: parameter-efficient fine-tuning built from scratch in readable PyTorch.

Each technique lives in its own file and does its core job with only torch: lora, adapters, prompt_tuning,
p_tuning, prefix_tuning, nf4, qlora (qlora with lora and nf4 beside it; p_tuning and prefix_tuning with prompt_tuning).
Helper files add the rest, each named by an error when it is missing: targets (peft's regex, exclude and layer
rules, target suggestions), lora_layers (LoRA on embeddings), lora_files (LoRA's save, load and peft export),
adapter_layouts (ALBERT, XLNet, T5 and GPT-2 layouts), prompt_common (vocab/text inits, T5, peft export).
Turning an adapter off and several named LoRA adapters: multi_adapter (disable_adapter, set_adapter, ...).
Beyond the original six (issue 21; notebooks 11 and 12 to come): dora (DoRA), ia3 ((IA)^3), loraplus (LoRA+'s
parameter groups), lora_init (PiSSA and LoftQ initialisation), serving (a mixed batch of adapters, their sizes,
latency).
Loaders (models, tiny_models), data (data), the training loop (train) and adapter files (adapter_files) are separate.
"""

import warnings

# datasets/transformers import tqdm.auto, which warns in Jupyter when ipywidgets is absent;
# the course uses plain text progress bars on purpose (no widget state in notebooks).
warnings.filterwarnings("ignore", message="IProgress not found")

__version__ = "0.1.0"

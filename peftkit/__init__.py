"""peftkit: parameter-efficient fine-tuning built from scratch in readable PyTorch.

Each technique lives in its own file and needs only torch (and the small sibling files its docstring names):
lora, adapters, prompt_tuning, p_tuning, prefix_tuning, nf4, qlora.
Their helpers: targets (which layers LoRA wraps, per family), lora_layers (LoRA on embeddings), adapter_layouts
(where each family keeps its projections), prompt_common (what the prompt methods share: peft export, T5).
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

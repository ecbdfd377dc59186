"""Write peftkit's bottleneck adapters in AdapterHub's saved format, for AdapterHub to load.

AdapterHub's ``model.save_adapter(folder, name, use_safetensors=True)`` writes ``adapter_config.json``
(the adapter's full config, its name, the model's class and hidden size) and ``adapter.safetensors``
(the adapter's tensors under AdapterHub's names); ``model.load_adapter(folder)`` reads them back.
``save_as_adapterhub`` writes the same two files from a model carrying peftkit's adapters.

Run in the course's environment (``make adapterhub-fixtures`` does), it rebuilds the recorded tiny BERT
from ``tests/fixtures/adapterhub``, adds peftkit's Houlsby (swish) and Pfeiffer (``original_ln_before=True``)
adapters with weights drawn from a seed, and writes each in AdapterHub's format, with peftkit's output
beside it (``peftkit_output.safetensors``); ``tools/record_adapterhub.py --check`` then loads every folder
with AdapterHub in its own environment and asserts the same output.

    .venv/bin/python tools/export_adapterhub.py tests/fixtures/adapterhub
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from peftkit.adapters import add_adapters

CONFIG_CLASS = {"houlsby": "DoubleSeqBnConfig", "pfeiffer": "SeqBnConfig"}  # AdapterHub's class per placement
OPTIONS = {"houlsby": dict(non_linearity="swish"), "pfeiffer": dict(original_ln_before=True)}  # as those classes


def adapterhub_config(config, recorded: dict) -> dict:
    """AdapterHub's full config for peftkit's ``config``: the recorded config of the class with the same
    placement (every field AdapterHub writes), with peftkit's own choices put in."""
    full = dict(recorded[CONFIG_CLASS[config.placement]])
    full.update(mh_adapter=config.placement == "houlsby", output_adapter=True,
                reduction_factor=config.reduction_factor, non_linearity=config.non_linearity,
                original_ln_before=config.original_ln_before)
    return full


def adapterhub_state_dict(model, name: str) -> dict[str, torch.Tensor]:
    """The adapters' tensors under AdapterHub's names (``<block>.adapters.<name>.adapter_down.0.weight``)."""
    after = model.adapter_config.original_ln_before
    tensors = {}
    for key, p in model.named_parameters():
        if ".adapter." in key:
            wrapper, rest = key.split(".adapter.")
            block = wrapper if after else wrapper.removesuffix(".dense")
            tensors[f"{block}.adapters.{name}.{rest.replace('adapter_down.', 'adapter_down.0.')}"] = p.detach().contiguous()
    return tensors


def save_as_adapterhub(model, folder, name: str, recorded: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapterhub_state_dict(model, name), folder / "adapter.safetensors")
    meta = {"config": adapterhub_config(model.adapter_config, recorded), "hidden_size": model.config.hidden_size,
            "model_class": type(model).__name__, "model_name": "", "model_type": model.config.model_type,
            "name": name, "version": "adapters.1.3.0"}
    (folder / "adapter_config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def recorded_configs(fixtures: Path) -> dict:
    manifest = json.loads((fixtures / "manifest.json").read_text())
    return {entry["config_class"]: entry["config"] for entry in manifest["adapters"].values()}


def export(fixtures: Path, out: Path) -> None:
    manifest = json.loads((fixtures / "manifest.json").read_text())
    tensors = load_file(fixtures / "base.safetensors")
    inputs = {k: tensors.pop(k) for k in ("input_ids", "attention_mask")}
    tensors.pop("base_last_hidden_state")
    for i, (placement, options) in enumerate(OPTIONS.items()):
        model = BertModel(BertConfig(**manifest["bert_config"]), add_pooling_layer=False).eval()
        model.load_state_dict(tensors)
        add_adapters(model, placement, **options)
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if ".adapter." in key:
                    p.copy_(0.3 * torch.randn(p.shape, generator=generator))
            output = model(**inputs).last_hidden_state
        folder = save_as_adapterhub(model, out / f"peftkit_{placement}", f"peftkit_{placement}", recorded_configs(fixtures))
        save_file({"last_hidden_state": output}, folder / "peftkit_output.safetensors")
        print(f"{folder}: peftkit's {placement} adapters ({', '.join(f'{k}={v}' for k, v in options.items())})")


if __name__ == "__main__":
    fixtures = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/adapterhub")
    export(fixtures, fixtures)

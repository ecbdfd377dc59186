"""Record AdapterHub's bottleneck adapters on a tiny BERT, as fixtures for tests/test_adapterhub.py.

AdapterHub ``adapters`` 1.3.0 needs transformers 4.57, which cannot share the course's environment
(transformers 5.24), so this script runs in its own: ``make adapterhub-fixtures`` creates
``.venv-adapterhub`` and runs it. It writes, into the folder it is given:

- ``base.safetensors``: the tiny BERT's parameters (built from a config and a seed, no download;
  the LayerNorms drawn away from 1 and 0 so that a test notices which LayerNorm an adapter follows),
  the inputs (``input_ids``, ``attention_mask``, with padding) and the model's last hidden states
  without adapters (``base_last_hidden_state``);
- ``<name>.safetensors`` for ``houlsby`` (``DoubleSeqBnConfig()``) and ``pfeiffer`` (``SeqBnConfig()``):
  the adapter's weights under AdapterHub's names, all drawn non-zero from a seed, and the last hidden
  states with that adapter active (``last_hidden_state``);
- ``manifest.json``: the BERT config, each adapter config as AdapterHub spells it out, the seeds and
  the versions that recorded them.

    .venv-adapterhub/bin/python tools/record_adapterhub.py tests/fixtures/adapterhub
"""

import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

import adapters
from adapters import DoubleSeqBnConfig, SeqBnConfig

SEED = 0
BERT = dict(vocab_size=50, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=16, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
            attn_implementation="eager")
CONFIGS = {"houlsby": DoubleSeqBnConfig(), "pfeiffer": SeqBnConfig()}  # as a learner writes them: the defaults


def tiny_bert() -> BertModel:
    torch.manual_seed(SEED)
    model = BertModel(BertConfig(**BERT), add_pooling_layer=False).eval()
    with torch.no_grad():  # LayerNorms away from the identity: placing an adapter before or after one shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    return model


def inputs() -> dict:
    generator = torch.Generator().manual_seed(SEED + 1)
    input_ids = torch.randint(1, BERT["vocab_size"], (3, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # two padded sequences
    attention_mask[2, 4:] = 0
    return {"input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask}


def randomize_adapter(model, name: str, seed: int) -> dict:
    """Every weight of adapter ``name`` drawn afresh (AdapterHub starts them near zero): its tensors."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    with torch.no_grad():
        for key, p in model.named_parameters():
            if f".adapters.{name}." in key:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
                tensors[key] = p.detach().clone().contiguous()
    return tensors


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model, batch = tiny_bert(), inputs()
    base = {k: p.detach().clone().contiguous() for k, p in model.named_parameters()}
    with torch.no_grad():
        base_out = model(**batch).last_hidden_state
    save_file({**base, **batch, "base_last_hidden_state": base_out}, out / "base.safetensors")

    adapters.init(model)
    manifest = {"bert_config": BERT, "seed": SEED, "adapters": {},
                "versions": {p: version(p) for p in ("adapters", "transformers", "torch", "safetensors")}}
    for i, (name, config) in enumerate(CONFIGS.items()):
        model.add_adapter(name, config=config)
        weights = randomize_adapter(model, name, seed=SEED + 10 + i)
        model.set_active_adapters(name)
        model.eval()
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        save_file({**weights, "last_hidden_state": hidden}, out / f"{name}.safetensors")
        manifest["adapters"][name] = {"config_class": type(config).__name__, "config": config.to_dict(),
                                      "weight_seed": SEED + 10 + i, "tensors": sorted(weights)}
        print(f"{name}: {type(config).__name__}, {len(weights)} tensors, "
              f"max |output - base| = {(hidden - base_out).abs().max():.3f}")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/adapterhub"))

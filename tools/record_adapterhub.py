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

With ``--check``, it instead loads every ``peftkit_*`` folder that ``tools/export_adapterhub.py`` wrote
(peftkit's adapters in AdapterHub's saved format) with ``model.load_adapter`` into the same tiny BERT and
asserts that AdapterHub computes the output peftkit recorded beside it.

    .venv-adapterhub/bin/python tools/record_adapterhub.py tests/fixtures/adapterhub
    .venv-adapterhub/bin/python tools/record_adapterhub.py --check tests/fixtures/adapterhub
"""

import json
import logging
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

import adapters
from adapters import DoubleSeqBnConfig, SeqBnConfig

logging.getLogger("adapters").setLevel(logging.ERROR)  # "adapters available but none activated" before set_active

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


def check(fixtures: Path) -> None:
    """AdapterHub loads each folder of peftkit adapters and computes peftkit's recorded output."""
    folders = sorted(fixtures.glob("peftkit_*"))
    assert folders, f"no peftkit_* folders in {fixtures}: run tools/export_adapterhub.py first"
    batch = inputs()
    for folder in folders:
        model = tiny_bert()
        adapters.init(model)
        name = model.load_adapter(str(folder), use_safetensors=True)
        model.set_active_adapters(name)
        with torch.no_grad():
            hidden = model.eval()(**batch).last_hidden_state
        expected = load_file(folder / "peftkit_output.safetensors")["last_hidden_state"]
        torch.testing.assert_close(hidden, expected)
        config = model.adapters_config.match(name, adapters.BnConfig)
        print(f"{folder.name}: AdapterHub loads it (original_ln_before={config['original_ln_before']}, "
              f"{config['non_linearity']}) and computes peftkit's output (largest difference "
              f"{(hidden - expected).abs().max():.0e})")


if __name__ == "__main__":
    args = sys.argv[1:]
    fixtures = Path(([a for a in args if a != "--check"] or ["tests/fixtures/adapterhub"])[0])
    check(fixtures) if "--check" in args else main(fixtures)

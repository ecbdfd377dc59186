"""Run by test_distributed.py under torchrun: LoRA on a tiny BERT, data-parallel on gloo.

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT BATCH [FAIL_RANK]
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_bert  # noqa: E402

from peftkit import distributed  # noqa: E402
from peftkit.lora import add_lora, save_adapter  # noqa: E402
from peftkit.train import count_parameters, fit  # noqa: E402


def collate(rows):
    return {"input_ids": torch.stack([r["input_ids"] for r in rows]), "labels": torch.tensor([r["labels"] for r in rows])}


def main(out: Path, batch: int, fail_rank: int | None):
    rank, world = distributed.init_from_env()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 100, (6,), generator=g), "labels": i % 3} for i in range(32)]
    model = add_lora(tiny_bert(), ["query", "value"], rank=4, modules_to_save=["classifier"])
    for module in model.modules():  # dropout masks differ with the batch split: off, to compare weights
        if isinstance(module, nn.Dropout):
            module.p = 0.0

    def maybe_fail(epoch, model):
        if rank == fail_rank:
            raise RuntimeError(f"rank {rank} failed on purpose")
    ledger = distributed.AllReduceLedger()
    fit(model, data, collate, epochs=2, batch_size=batch, lr=1e-2, progress=False, on_epoch=maybe_fail,
        comm_hook=ledger.hook if world > 1 else None)

    def write():
        save_adapter(model, out / "adapter.safetensors")
        (out / f"written_by_rank_{rank}").touch()
        (out / "run.json").write_text(json.dumps({"world": world, "bytes": ledger.bytes, "steps": ledger.steps,
                                                  "trainable": count_parameters(model, show=False)["trainable"]}))
    distributed.on_main(write)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)

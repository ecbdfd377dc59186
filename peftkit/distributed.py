"""Training on several processes: the few helpers ``peftkit.train.fit`` needs around DDP.

Data parallelism (PyTorch DDP, Li et al., 2020): every process ("rank") holds the whole model,
trains on its own shard of each batch, and after ``backward`` the ranks average their gradients
with an all-reduce, so that all of them take the same optimizer step:

    g = (1 / R) * sum_r g_r          (R ranks; each g_r from batch_size examples)

With R ranks of b examples this is the step one process takes on R * b examples (up to float
rounding and dropout masks). Only parameters with ``requires_grad`` are all-reduced: a LoRA run
sends its few hundred kilobytes per step where full fine-tuning sends the whole model.

Launch a script with ``torchrun --nproc_per_node=2 script.py`` or ``accelerate launch --multi_gpu
--num_processes 2 script.py`` (accelerate's torchrun path; it runs on CPUs too). Both set ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``, which ``init_from_env`` reads. Needs only torch.
"""

import os

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks


def init_from_env() -> tuple[int, int]:
    """Join the process group a launcher described in the environment: (rank, world size).

    NCCL with one GPU per rank (``LOCAL_RANK``) when this machine has a GPU for each of its ranks,
    else gloo on the CPU. Without a launcher: (0, 1), no group.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    if torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1)):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    """Where this rank's model belongs: its GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def on_main(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only (e.g. write a file) while the other ranks wait for it.

    Returns ``fn``'s result on rank 0 and None elsewhere. If ``fn`` raises, rank 0 raises and the
    others stay at the barrier until the launcher stops them all (torchrun ends every rank when one fails).
    """
    result = fn(*args, **kwargs) if rank() == 0 else None
    if dist.is_initialized():
        dist.barrier()
    return result


class AllReduceLedger:
    """A DDP communication hook that counts what it all-reduces, then all-reduces it as DDP would.

        ledger = AllReduceLedger()
        fit(model, ..., comm_hook=ledger.hook)    # under torchrun
        ledger.bytes / ledger.steps               # bytes per optimizer step, per rank
    """

    def __init__(self):
        self.bytes = 0  # gradient bytes this rank sent into all-reduces
        self.buckets = 0
        self.steps = 0  # optimizer steps seen (the hook runs once per bucket; bucket 0 starts a step)

    def hook(self, state, bucket: dist.GradBucket):
        buffer = bucket.buffer()  # the bucket's gradients, flattened: (numel,)
        self.bytes += buffer.numel() * buffer.element_size()
        self.buckets += 1
        self.steps += bucket.index() == 0
        return default_hooks.allreduce_hook(state, bucket)  # sum over ranks, divided by the world size

"""fit under DDP: 2 gloo processes on the CPU, launched by torchrun as a user would."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit.distributed import init_from_env, on_main

WORKER = Path(__file__).parent / "ddp_worker.py"


def torchrun(processes, *args, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           str(WORKER), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for processes, batch in [(1, 8), (2, 4)]:
        folder = tmp_path_factory.mktemp(f"ranks{processes}")
        done = torchrun(processes, folder, batch)
        assert done.returncode == 0, done.stderr[-3000:]
        out[processes] = folder
    return out


def test_two_ranks_of_4_train_the_weights_one_rank_of_8_trains(runs):
    one, two = (load_file(runs[n] / "adapter.safetensors") for n in (1, 2))
    assert one.keys() == two.keys() and len(one) == 4 * 2 + 2  # 2 layers x q,v x A,B + the head
    assert one["bert.encoder.layer.0.attention.self.query.lora_B.weight"].abs().max() > 0  # trained: B starts at 0
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-5)


def test_only_the_trainable_gradients_are_all_reduced(runs):
    run = json.loads((runs[2] / "run.json").read_text())
    assert run["world"] == 2 and run["steps"] == 2 * 32 // 8  # 2 epochs of 32 examples, 8 per step
    assert run["bytes"] / run["steps"] == 4 * run["trainable"]  # float32 gradients, frozen ones never sent


def test_the_adapter_is_written_once_by_rank_0(runs):
    assert sorted(p.name for p in runs[2].glob("written_by_rank_*")) == ["written_by_rank_0"]


def test_a_failing_rank_stops_every_rank(tmp_path):
    done = torchrun(2, tmp_path, 4, 1, timeout=120)  # rank 1 raises after epoch 1; rank 0 would wait in all-reduce
    assert done.returncode != 0
    assert "rank 1 failed on purpose" in done.stderr + done.stdout
    assert not (tmp_path / "adapter.safetensors").exists()


def test_without_a_launcher_everything_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() == (0, 1)
    assert on_main(lambda: "ran") == "ran"

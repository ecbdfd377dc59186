"""peftkit.loraplus against Hugging Face peft's create_loraplus_optimizer: the same groups, rates and steps."""

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer

from peftkit.loraplus import GROUPS, loraplus_optimizer, loraplus_param_groups

from test_dora import dora_name, logits  # noqa: E402
from test_dora import twins as dora_twins  # noqa: E402
from test_lora_layers import twins  # noqa: E402
from families import build  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out")
OPTIONS = dict(lr=1e-3, ratio=16, weight_decay=0.01, lr_embedding=1e-4)
PEFT_OPTIONS = dict(lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.01, loraplus_lr_embedding=1e-4)
CASES = {  # LoRA with embeddings, trained biases and a saved head; GPT-2's Conv1D; DoRA's 1-D magnitude
    "bert": lambda: twins("bert", ["query", "value", "word_embeddings"], bias="all", modules_to_save=["classifier"]),
    "gpt2": lambda: twins("gpt2", ["c_attn"], bias="lora_only"),
    "llama-dora": lambda: dora_twins("llama"),
}


def named_groups(model, groups):
    names = {id(p): dora_name(n) for n, p in model.named_parameters()}
    return [({names[id(p)] for p in g["params"]}, g["lr"], g["weight_decay"]) for g in groups]


@pytest.mark.parametrize("case", CASES)
def test_same_groups_and_rates_as_peft(case):
    _, theirs, ours = CASES[case]()
    expected = named_groups(theirs, create_loraplus_optimizer(theirs, torch.optim.AdamW, **PEFT_OPTIONS).param_groups)
    got = named_groups(ours, loraplus_param_groups(ours, **OPTIONS))
    assert got == expected
    assert all(got[GROUPS.index("B")][0]) and sum(len(g[0]) for g in got) == sum(
        p.requires_grad for p in ours.parameters())
    if case == "llama-dora":  # peft's rule: every 1-D tensor joins B, DoRA's magnitude too
        assert any(n.endswith("lora_magnitude_vector") for n in got[GROUPS.index("B")][0])


@pytest.mark.parametrize("case", CASES)
def test_one_adamw_step_gives_the_same_parameters_as_peft(case):
    _, theirs, ours = CASES[case]()
    family = case.split("-")[0]
    optimizers = [create_loraplus_optimizer(theirs, torch.optim.AdamW, **PEFT_OPTIONS),
                  loraplus_optimizer(ours, **OPTIONS)]
    for model, optimizer in zip((theirs, ours), optimizers):
        logits(model, family).square().mean().backward()
        optimizer.step()
    for n, p in theirs.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours.get_parameter(dora_name(n)), p, msg=n)


def test_b_moves_ratio_times_faster_than_a():
    _, _, ours = twins("llama", ["q_proj"], rank=4, alpha=8)
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    optimizer = loraplus_optimizer(ours, lr=1e-3, ratio=16)  # no decay: Adam's first step is lr * sign(grad)
    logits(ours, "llama").square().mean().backward()
    optimizer.step()
    step = {n: (p - before[n]).abs().max().item() for n, p in ours.named_parameters() if p.requires_grad}
    assert all(step[n] == pytest.approx(1e-3, rel=1e-2) for n in step if "lora_A" in n)
    assert all(step[n] == pytest.approx(16e-3, rel=1e-2) for n in step if "lora_B" in n)


@pytest.mark.parametrize("kwargs,match", [({"ratio": 0}, "ratio"), ({"lr": float("nan")}, "lr"),
                                          ({"weight_decay": -1}, "weight_decay")])
def test_bad_arguments_are_refused(kwargs, match):
    _, _, ours = twins("llama", ["q_proj"])
    with pytest.raises(ValueError, match=match):
        loraplus_param_groups(ours, **{"lr": 1e-3, **kwargs})
    with pytest.raises(ValueError, match="no trainable parameters"):
        loraplus_param_groups(build("llama").requires_grad_(False), lr=1e-3)

"""Activation checkpointing under every technique: the same gradients as without it, and the trap
(re-entrant checkpointing over a frozen embedding trains nothing) shown and closed."""

import pytest
import torch

from peftkit.adapters import add_adapters
from peftkit.lora import add_lora
from peftkit.p_tuning import PTuningConfig, PTuningModel
from peftkit.prefix_tuning import PrefixTuningModel
from peftkit.prompt_tuning import PromptTuningModel
from peftkit.qlora import prepare_for_qlora
from peftkit.train import enable_checkpointing

from tiny import short_bert, tiny_llama, wide_llama  # noqa: E402

IDS = torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1, 2, 1])


def bert_lora():
    model = short_bert(eval_mode=False)  # dropout on: checkpointing must replay the same masks
    torch.manual_seed(1)
    return add_lora(model, ["query", "value"], rank=4, alpha=8, dropout=0.1, modules_to_save=["classifier"])


def llama_lora():
    torch.manual_seed(1)
    return add_lora(tiny_llama(eval_mode=False), "all-linear", rank=4, alpha=8)


def llama_qlora():
    model = prepare_for_qlora(wide_llama(eval_mode=False))
    torch.manual_seed(1)
    return add_lora(model, "all-linear", rank=4, alpha=8)


TECHNIQUES = {
    "lora (BERT)": bert_lora,
    "lora (Llama)": llama_lora,
    "qlora (Llama)": llama_qlora,
    "houlsby adapters": lambda: add_adapters(short_bert(eval_mode=False), "houlsby"),
    "pfeiffer adapters": lambda: add_adapters(short_bert(eval_mode=False), "pfeiffer"),
    "prompt tuning": lambda: PromptTuningModel(short_bert(eval_mode=False), num_virtual_tokens=4),
    "p-tuning": lambda: PTuningModel(short_bert(eval_mode=False), PTuningConfig(num_virtual_tokens=4)),
}


def gradients(model) -> dict:
    """One forward and backward from a fixed seed (the same dropout masks): the gradient of every trained tensor."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    is_llama = "Llama" in type(model).__name__ or hasattr(model, "lm_head")
    out = model(input_ids=IDS, labels=IDS if is_llama else LABELS)
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_checkpointing_changes_no_gradient(technique):
    model = TECHNIQUES[technique]()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    plain = gradients(model)
    assert set(plain) == trained and sum(g.abs().sum() for g in plain.values()) > 0  # zero-initialised B / up: A / down get 0
    assert enable_checkpointing(model) is model
    checkpointed = gradients(model)
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    assert layers, "no module was switched to checkpointing"
    assert set(checkpointed) == trained
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_reentrant_checkpointing_over_a_frozen_embedding_trains_nothing_unless_inputs_require_grad():
    model = bert_lora()
    plain = gradients(model)
    lora = {n for n in plain if "lora_" in n}
    assert lora
    # The trap as transformers 4.x (and any hand-written checkpointing) sets it: re-entrant, and no
    # input requiring grad. transformers 5 adds the input hook itself, so it is taken out here.
    model.activation_checkpointing_enable({"use_reentrant": True})
    model.disable_input_require_grads()
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):  # torch's only hint
        trapped = gradients(model)
    assert not lora & set(trapped)  # LoRA inside the checkpointed layers got no gradient at all
    enable_checkpointing(model, use_reentrant=True)  # the fix: the embeddings' output requires grad
    fixed = gradients(model)
    assert set(fixed) == set(plain)
    for name in plain:
        torch.testing.assert_close(fixed[name], plain[name], msg=name)


def test_clear_errors():
    with pytest.raises(TypeError, match="needs a Hugging Face model"):
        enable_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="use_reentrant must be True or False"):
        enable_checkpointing(bert_lora(), use_reentrant="yes")
    prefix = PrefixTuningModel(tiny_llama(), num_virtual_tokens=3)
    with pytest.raises(ValueError, match="prefix-tuning cannot use activation checkpointing"):
        enable_checkpointing(prefix)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in prefix.modules())  # left as it was

"""peftkit.doctor: each setup mistake planted in a tiny model and reported under its code (and
shown to be real); clean setups, peft's included, give no finding."""

import pytest
import torch

from peftkit.adapters import add_adapters
from peftkit.doctor import Finding, check
from peftkit.lora import LoRALinear, add_lora, adapter_state_dict
from peftkit.prompt_tuning import PromptTuningModel
from peftkit.qlora import prepare_for_qlora, requantized_update_error
from peftkit.train import enable_checkpointing

from tiny import short_bert, tiny_bert, wide_llama  # noqa: E402

IDS = torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1, 2, 1])


def codes(findings) -> list[str]:
    return [f.code for f in findings]


def bert_lora(targets=("query", "value"), modules_to_save=("classifier",), dropout=0.0, eval_mode=True):
    """The clean setup of the course, unless told otherwise."""
    return add_lora(tiny_bert(eval_mode=eval_mode), list(targets), rank=4, alpha=8, dropout=dropout,
                    modules_to_save=list(modules_to_save))


def qlora_llama():
    return add_lora(prepare_for_qlora(wide_llama()), "all-linear", rank=4, alpha=8)


CLEAN = {
    "lora": bert_lora,
    "qlora, untrained": qlora_llama,
    "prompt tuning": lambda: PromptTuningModel(short_bert(), num_virtual_tokens=4),
    "houlsby adapters": lambda: add_adapters(short_bert(), "houlsby", modules_to_save=["classifier"]),
}


@pytest.mark.parametrize("setup", CLEAN)
def test_clean_setups_have_no_findings(setup):
    model = CLEAN[setup]()
    assert check(model) == []
    assert check(model.eval(), evaluating=True) == []


def test_a_finding_reads_code_message_fix():
    assert str(Finding("no-trainable-parameters", "nothing trains", "add_lora")) == \
        "[no-trainable-parameters] nothing trains -> add_lora"


def test_targets_partial_when_a_full_name_picks_one_block():
    model = bert_lora(targets=["layer.0.attention.self.query", "value"])  # one block's query, copied from print(model)
    [finding] = check(model)
    assert finding.code == "targets-partial"
    assert "'query'" in finding.message and "bert.encoder.layer.1.attention.self.query" in finding.message
    assert "value" not in finding.message  # wrapped in every block


def test_targets_partial_when_an_expected_target_is_missing():
    model = bert_lora(targets=["query"])
    assert check(model, expected_targets=["query"]) == []
    [finding] = check(model, expected_targets=["query", "value"])
    assert finding.code == "targets-partial"
    assert "['value']" in finding.message
    assert all(name in finding.message for name in ("key", "dense", "classifier"))  # the linears there are


def test_head_not_trained_under_lora_and_prompt_tuning():
    [finding] = check(bert_lora(modules_to_save=[]))
    assert finding.code == "head-not-trained" and "classifier" in finding.message
    assert "modules_to_save=['classifier']" in finding.fix
    prompt = PromptTuningModel(short_bert(), num_virtual_tokens=4, modules_to_save=[])
    [finding] = check(prompt)
    assert finding.code == "head-not-trained" and "base_model.classifier" in finding.message


def test_trained_not_saved_when_the_head_is_unfrozen_by_hand():
    model = bert_lora(modules_to_save=[])
    model.classifier.requires_grad_(True)  # trains, but adapter_config.modules_to_save does not list it
    assert "classifier.weight" not in adapter_state_dict(model)  # the finding is true: save_adapter drops it
    [finding] = check(model)
    assert finding.code == "trained-not-saved"
    assert "classifier.weight" in finding.message and "modules_to_save=['classifier']" in finding.fix


def test_trained_not_saved_for_adapters_names_their_file():
    model = add_adapters(tiny_bert(), "pfeiffer", modules_to_save=[])
    model.classifier.requires_grad_(True)
    [finding] = check(model)
    assert finding.code == "trained-not-saved" and "adapters.save_adapter" in finding.message


def test_no_trainable_parameters_unless_evaluating():
    model = bert_lora().requires_grad_(False)  # e.g. loaded for inference, then handed to a training loop
    [finding] = check(model)
    assert finding.code == "no-trainable-parameters" and "BertForSequenceClassification" in finding.message
    assert check(model, evaluating=True) == []  # frozen is right for inference


def test_a_peft_adapter_loaded_for_inference_has_no_trainable_parameters(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    trained = peft.get_peft_model(tiny_bert(), config)
    assert check(trained) == []  # peft trains the classifier itself for SEQ_CLS
    trained.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path)  # is_trainable=False by default (peft #282)
    [finding] = check(loaded)
    assert finding.code == "no-trainable-parameters" and "is_trainable=True" in finding.fix
    assert check(peft.PeftModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)) == []


def test_reentrant_checkpointing_over_frozen_embeddings():
    model = bert_lora(eval_mode=False)
    model.activation_checkpointing_enable({"use_reentrant": True})
    model.disable_input_require_grads()  # transformers 5 adds the hook itself; 4.x and hand-made code do not
    [finding] = check(model)
    assert finding.code == "checkpointing-without-input-grads"
    assert "bert.encoder.layer.0" in finding.message and "bert.encoder.layer.1" in finding.message
    assert "bert.encoder " not in finding.message  # the blocks are named, not the encoder around them
    # The finding is true: LoRA inside the checkpointed blocks gets no gradient at all.
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        model(input_ids=IDS, labels=LABELS).loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is None for p in lora)
    assert model.classifier.weight.grad is not None  # only the head, outside the blocks, learns
    enable_checkpointing(model, use_reentrant=True)  # re-entrant, but the embeddings' output requires grad
    assert check(model) == []
    enable_checkpointing(model)  # non-reentrant, the doctor's fix
    model.disable_input_require_grads()  # transformers 5 adds the hook anyway: out, to show none is needed
    assert check(model) == []
    model.zero_grad(set_to_none=True)
    model(input_ids=IDS, labels=LABELS).loss.backward()
    assert all(p.grad is not None for p in lora)  # LoRA learns again


def test_dropout_on_at_eval():
    model = bert_lora(dropout=0.1, eval_mode=False)
    assert check(model) == []  # training: dropout is meant to be on
    [finding] = check(model, evaluating=True)
    assert finding.code == "dropout-on-at-eval" and "more" in finding.message  # many dropouts are on
    assert check(model.eval(), evaluating=True) == []
    query = "bert.encoder.layer.0.attention.self.query"
    model.get_submodule(query).lora_dropout.train()  # one submodule left in training mode
    [finding] = check(model, evaluating=True)
    assert finding.code == "dropout-on-at-eval" and finding.message.count("dropout") == 2
    assert f"{query}.lora_dropout" in finding.message


def test_4bit_merge_loses_a_small_update():
    model = qlora_llama()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    with torch.no_grad():
        for _, layer in layers:
            layer.lora_B.weight.normal_(std=1e-3)  # the size of a short run's update: far below a 4-bit step
    [finding] = check(model)
    assert finding.code == "4bit-merge-loses-update" and "merge_into_float" in finding.fix
    name, first = layers[0]
    assert f"{name} ({requantized_update_error(first):.2f})" in finding.message
    with torch.no_grad():
        for _, layer in layers:
            layer.lora_B.weight.normal_(std=0.1)  # an update a 4-bit grid can hold
    assert check(model) == []


def test_findings_come_in_a_stable_order():
    model = bert_lora(targets=["layer.0.attention.self.query"], modules_to_save=[], dropout=0.1, eval_mode=False)
    expected = ["targets-partial", "head-not-trained", "dropout-on-at-eval"]
    assert codes(check(model, evaluating=True)) == expected
    assert codes(check(model, evaluating=True)) == expected


def test_clear_errors():
    with pytest.raises(TypeError, match="check needs a torch.nn.Module, got str"):
        check("bert")
    model = bert_lora()
    with pytest.raises(TypeError, match=r"expected_targets must be a list of leaf names .* got 'query'"):
        check(model, expected_targets="query")
    with pytest.raises(TypeError, match="expected_targets must be a list"):
        check(model, expected_targets=["query", 1])
    with pytest.raises(TypeError, match="evaluating must be True or False"):
        check(model, evaluating="yes")

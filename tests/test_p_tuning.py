"""P-tuning checked against peft's PromptEncoder: same encoder weights in, same prompt and logits out."""

import copy
import warnings

import pytest
import torch
from peft import PromptEncoderConfig, TaskType, get_peft_model

from peftkit import prompt_tuning
from peftkit.adapter_files import load_tensors
from peftkit.p_tuning import (PromptEncoder, PTuningConfig, PTuningModel, adapter_state_dict, load_adapter,
                              save_adapter)
from peftkit.prompt_tuning import PromptTuningModel, SoftPrompt

from families import FAMILIES, build  # noqa: E402
from families import inputs as family_inputs  # noqa: E402
from tiny import assert_unchanged, short_bert, short_llama, snapshot  # noqa: E402

N, HIDDEN = 4, 16  # virtual tokens, encoder hidden size


def peft_and_ours(model, task_type, kind, num_layers=2, dropout=0.0):
    """peft's P-tuning model and ours around copies of ``model``, with peft's encoder weights copied into ours."""
    peft_config = PromptEncoderConfig(task_type=task_type, num_virtual_tokens=N, encoder_hidden_size=HIDDEN,
                                      encoder_reparameterization_type=kind.upper(), encoder_num_layers=num_layers,
                                      encoder_dropout=dropout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(model), peft_config).eval()
    ours = PTuningModel(copy.deepcopy(model), PTuningConfig(N, HIDDEN, kind, num_layers, dropout)).eval()
    ours.prompt_encoder.load_state_dict(peft_model.prompt_encoder.default.state_dict())  # strict: same names, shapes
    return peft_model, ours


def num_trained(model):
    return sum(t.numel() for t in adapter_state_dict(model).values())


def batch(seq_len=7):
    input_ids = torch.randint(3, 100, (2, seq_len))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, seq_len - 2:] = 0
    return input_ids, attention_mask


# --- the formula: same prompt and logits as peft -----------------------------------------

@pytest.mark.parametrize("kind,num_layers", [("lstm", 2), ("lstm", 1), ("mlp", 2)])
def test_prompt_and_logits_match_peft(kind, num_layers):
    peft_model, ours = peft_and_ours(short_llama(), TaskType.CAUSAL_LM, kind, num_layers)
    expected_prompt = peft_model.prompt_encoder.default(torch.arange(N)[None])[0]  # (N, D)
    torch.testing.assert_close(ours.prompt_encoder(), expected_prompt, rtol=0, atol=0)
    input_ids, attention_mask = batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    got = ours(input_ids, attention_mask, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)


@pytest.mark.parametrize("kind,num_layers", [("lstm", 2), ("lstm", 1), ("mlp", 2)])
def test_trains_as_many_numbers_as_peft(kind, num_layers):
    peft_model, ours = peft_and_ours(short_llama(), TaskType.CAUSAL_LM, kind, num_layers)
    assert num_trained(ours) == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_bert_classifier_matches_peft():
    peft_model, ours = peft_and_ours(short_bert(), TaskType.SEQ_CLS, "lstm")
    input_ids, attention_mask = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft_model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(ours(input_ids, attention_mask).logits, expected, rtol=0, atol=0)


def test_bert_classifier_trains_its_head():
    model = PTuningModel(short_bert(), PTuningConfig(N, HIDDEN, "lstm"))
    assert {"base_model.classifier.weight", "base_model.classifier.bias"} <= set(adapter_state_dict(model))
    assert model.adapter_config.modules_to_save == ["classifier"]


def test_mlp_has_one_linear_per_layer_and_one_out():
    encoder = PromptEncoder(N, 32, HIDDEN, kind="mlp", num_layers=3)
    linears = [m for m in encoder.mlp_head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 16), (16, 16), (16, 16), (16, 32)]


def test_default_hidden_size_is_the_embedding_size_as_in_peft():
    model = PTuningModel(short_llama(), PTuningConfig(num_virtual_tokens=N, kind="lstm"))
    assert model.prompt_encoder.lstm_head.hidden_size == 32
    assert model.adapter_config.encoder_hidden_size == 32  # the config records what was built


def test_adapter_config_records_what_was_built():
    config = PTuningConfig(N, HIDDEN, "lstm", dropout=0.5)
    model = PTuningModel(short_llama(), config)
    assert model.adapter_config == PTuningConfig(N, HIDDEN, "lstm", dropout=0.5, modules_to_save=[])
    assert config.modules_to_save is None  # the caller's config is not changed
    assert model.num_virtual_tokens == N and PTuningConfig.technique == "p_tuning"


@pytest.mark.parametrize("kind", ["lstm", "mlp"])
def test_gradients_reach_only_the_encoder(kind):
    model = PTuningModel(short_llama(), PTuningConfig(N, HIDDEN, kind))
    input_ids, attention_mask = batch()
    model(input_ids, attention_mask, labels=input_ids).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("prompt_encoder."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


# --- exporting the prompt -----------------------------------------------------------------

@pytest.fixture
def exported_pair():
    """peft's LSTM P-tuning model and ours (dropout 0.5), ours exported in training mode, and its logits before."""
    peft_model, ours = peft_and_ours(short_llama(), TaskType.CAUSAL_LM, "lstm", dropout=0.5)
    input_ids, attention_mask = batch()
    before = ours(input_ids, attention_mask).logits
    prompt = ours.train().export_prompt()  # export must run the encoder without dropout even in training mode
    return peft_model, ours.eval(), prompt, before, (input_ids, attention_mask)


def test_export_gives_the_prompt_peft_saves(exported_pair):
    peft_model, _, prompt, _, _ = exported_pair
    torch.testing.assert_close(prompt, peft_model.get_prompt_embedding_to_save("default"), rtol=0, atol=0)


def test_export_keeps_the_logits_and_only_the_prompt_trains(exported_pair):
    _, ours, _, before, inputs = exported_pair
    assert ours.exported and ours.adapter_config.exported and isinstance(ours.prompt_encoder, SoftPrompt)
    torch.testing.assert_close(ours(*inputs).logits, before, rtol=0, atol=0)
    assert num_trained(ours) == N * 32


def test_a_second_export_changes_nothing(exported_pair):
    _, ours, prompt, _, _ = exported_pair
    torch.testing.assert_close(ours.export_prompt(), prompt, rtol=0, atol=0)


def test_a_config_with_exported_builds_the_exported_form():
    model = PTuningModel(short_llama(), PTuningConfig(N, HIDDEN, "lstm", exported=True))
    assert model.exported and isinstance(model.prompt_encoder, SoftPrompt)
    assert sorted(adapter_state_dict(model)) == ["prompt_encoder.embedding.weight"]


# --- saving -------------------------------------------------------------------------------

def test_the_exported_file_holds_only_the_prompt(exported_pair, tmp_path):
    _, ours, _, _, _ = exported_pair
    tensors, config = load_tensors(save_adapter(ours, tmp_path / "prompt.safetensors"))
    assert list(tensors) == ["prompt_encoder.embedding.weight"]
    assert config["technique"] == "p_tuning" and config["exported"] is True


def test_loading_an_exported_file_exports_the_model_first(exported_pair, tmp_path):
    _, ours, _, before, inputs = exported_pair
    path = save_adapter(ours, tmp_path / "prompt.safetensors")
    fresh = PTuningModel(short_llama(), PTuningConfig(N, HIDDEN, "lstm", dropout=0.5))
    fresh.base_model.load_state_dict(ours.base_model.state_dict())
    assert load_adapter(fresh, path) == ours.adapter_config
    assert fresh.exported
    torch.testing.assert_close(fresh.eval()(*inputs).logits, before, rtol=0, atol=0)


def test_an_exported_file_loads_whatever_the_encoder_was(exported_pair, tmp_path):
    _, ours, prompt, _, _ = exported_pair
    path = save_adapter(ours, tmp_path / "prompt.safetensors")
    mlp = PTuningModel(short_llama(), PTuningConfig(N, 8, "mlp", num_layers=1))  # another encoder, the same N x D
    load_adapter(mlp, path)
    torch.testing.assert_close(mlp.prompt_encoder(), prompt, rtol=0, atol=0)


@pytest.fixture
def encoder_file(tmp_path):
    """An MLP P-tuning Llama, its base model and its saved (not exported) encoder file."""
    llama = short_llama()
    model = PTuningModel(copy.deepcopy(llama), PTuningConfig(N, HIDDEN, "mlp"))
    return model, llama, save_adapter(model, tmp_path / "encoder.safetensors")


def test_the_encoder_file_holds_the_encoder_and_its_config(encoder_file):
    model, _, path = encoder_file
    tensors, config = load_tensors(path)
    assert sorted(tensors) == sorted(adapter_state_dict(model)) and config["exported"] is False
    assert config["kind"] == "mlp" and config["encoder_hidden_size"] == HIDDEN


def test_save_and_load_before_export_are_exact(encoder_file):
    model, llama, path = encoder_file
    torch.manual_seed(1)
    fresh = PTuningModel(copy.deepcopy(llama), PTuningConfig(N, HIDDEN, "mlp"))
    assert not torch.equal(fresh.prompt_encoder(), model.prompt_encoder())
    load_adapter(fresh, path)
    torch.testing.assert_close(fresh.prompt_encoder(), model.prompt_encoder(), rtol=0, atol=0)


def test_an_exported_model_cannot_take_an_encoder_back(encoder_file):
    _, llama, path = encoder_file
    fresh = PTuningModel(copy.deepcopy(llama), PTuningConfig(N, HIDDEN, "mlp"))
    fresh.export_prompt()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="cannot take an encoder back"):
        load_adapter(fresh, path)
    assert fresh.exported
    assert_unchanged(fresh, before)


@pytest.mark.parametrize("config, match", [
    (PTuningConfig(N, HIDDEN, "lstm"), r"kind \(file 'mlp', model 'lstm'\)"),
    (PTuningConfig(N, 2 * HIDDEN, "mlp"), r"encoder_hidden_size \(file 16, model 32\)"),
    (PTuningConfig(N, HIDDEN, "mlp", num_layers=3), r"num_layers \(file 2, model 3\)"),
])
def test_load_names_how_an_encoder_file_differs(encoder_file, config, match):
    _, llama, path = encoder_file
    other = PTuningModel(copy.deepcopy(llama), config)
    before = snapshot(other)
    with pytest.raises(ValueError, match="does not fit this model: its config differs in " + match):
        load_adapter(other, path)
    assert_unchanged(other, before)


def test_load_refuses_a_prompt_tuning_file_naming_both_techniques(tmp_path):
    llama = short_llama()
    path = save_adapter(PromptTuningModel(copy.deepcopy(llama), num_virtual_tokens=N), tmp_path / "pt.safetensors")
    model = PTuningModel(copy.deepcopy(llama), PTuningConfig(N, HIDDEN, "lstm"))
    encoder, before = model.prompt_encoder, snapshot(model)
    with pytest.raises(ValueError, match="holds a prompt_tuning adapter, not p_tuning"):
        load_adapter(model, path)
    assert model.prompt_encoder is encoder and not model.exported
    assert_unchanged(model, before)


def test_each_load_adapter_refuses_the_other_techniques_wrapper(encoder_file, tmp_path):
    model, llama, path = encoder_file
    with pytest.raises(ValueError, match="this PTuningModel carries p_tuning, not prompt_tuning"):
        prompt_tuning.load_adapter(model, path)
    plain = PromptTuningModel(copy.deepcopy(llama), num_virtual_tokens=N)
    with pytest.raises(ValueError, match="this PromptTuningModel carries prompt_tuning, not p_tuning"):
        load_adapter(plain, save_adapter(plain, tmp_path / "pt.safetensors"))


# --- clear errors -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(kind="gru"), ValueError, "kind must be one of"),
    (dict(kind="mlp", dropout=0.1), ValueError, "MLP encoder has none"),
    (dict(kind="lstm", num_layers=0), ValueError, "num_layers must be a positive integer"),
    (dict(kind="lstm", dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
    (dict(num_virtual_tokens=0), ValueError, "num_virtual_tokens must be a positive integer"),
    (dict(encoder_hidden_size=0), ValueError, "encoder_hidden_size must be a positive integer"),
    (dict(modules_to_save="classifier"), TypeError, r"\['classifier'\]"),
    (dict(exported="yes"), TypeError, "exported must be True or False"),
])
def test_config_checks_its_fields(kwargs, error, match):
    with pytest.raises(error, match=match):
        PTuningConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="gru"), "kind must be one of"),
    (dict(kind="mlp", dropout=0.1), "MLP encoder has none"),
    (dict(token_dim=0), "token_dim must be a positive integer"),
    (dict(encoder_hidden_size=None), "encoder_hidden_size must be a positive integer"),
])
def test_prompt_encoder_checks_its_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptEncoder(**{"num_virtual_tokens": N, "token_dim": 32, "encoder_hidden_size": HIDDEN, **kwargs})


def test_the_wrapper_takes_a_config_object():
    with pytest.raises(TypeError, match="PTuningConfig"):
        PTuningModel(short_llama(), {"num_virtual_tokens": N})


def test_a_prompt_too_long_for_the_model_is_refused():
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        PTuningModel(short_llama(), PTuningConfig(num_virtual_tokens=40))


def test_an_encoder_of_another_width_is_refused():
    with pytest.raises(ValueError, match="token_dim=64.*32"):
        PromptTuningModel(short_llama(), prompt_encoder=PromptEncoder(N, 64, HIDDEN))


# --- every family of tests/families.py, against peft ---------------------------------------

TASKS = {"t5": TaskType.SEQ_2_SEQ_LM, "gpt2": TaskType.CAUSAL_LM, "llama": TaskType.CAUSAL_LM}


@pytest.mark.parametrize("kind", ["lstm", "mlp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_matches_peft_with_ids_or_embeddings_and_trains_only_the_encoder(family, kind):
    model = build(family)
    dim = model.get_input_embeddings().embedding_dim  # ALBERT, ELECTRA: 16 < hidden_size, which peft assumes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(model), PromptEncoderConfig(
            task_type=TASKS.get(family, TaskType.SEQ_CLS), num_virtual_tokens=N, token_dim=dim,
            encoder_reparameterization_type=kind.upper())).eval()
    ours = PTuningModel(copy.deepcopy(model), PTuningConfig(N, kind=kind)).eval()
    ours.prompt_encoder.load_state_dict(peft_model.prompt_encoder.default.state_dict())  # T5: 2N rows in both
    x = family_inputs(family)
    x["labels"] = x.get("decoder_input_ids", x["input_ids"]) if family in TASKS else torch.tensor([0, 2])
    embedded = {k: v for k, v in x.items() if k != "input_ids"}
    embedded["inputs_embeds"] = model.get_input_embeddings()(x["input_ids"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = [peft_model(**x), peft_model(**embedded)]
    got = [ours(**x), ours(**embedded)]
    for e, g in zip(expected, got):
        torch.testing.assert_close(g.logits, e.logits)
        torch.testing.assert_close(g.loss, e.loss)
    got[0].loss.backward()
    with_grad = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in ours.named_parameters() if p.requires_grad}
    assert {n for n in with_grad if not n.startswith("prompt_encoder.")} <= {
        "base_model.classifier.weight", "base_model.classifier.bias", "base_model.classifier.dense.weight",
        "base_model.classifier.dense.bias", "base_model.classifier.out_proj.weight", "base_model.classifier.out_proj.bias"}


def test_t5_s_lstm_reads_2n_virtual_tokens_and_gives_n_as_peft():
    ours = PTuningModel(build("t5"), PTuningConfig(N, kind="lstm"))
    assert ours.prompt_encoder.embedding.weight.shape == (2 * N, 32) and ours.prompt_encoder().shape == (N, 32)
    with pytest.raises(ValueError, match="num_transformer_submodules must be 1 or 2"):
        PromptEncoder(N, 32, 16, "lstm", num_transformer_submodules=3)

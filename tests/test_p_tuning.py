"""P-tuning checked against peft's PromptEncoder: same encoder weights in, same prompt and logits out."""

import copy
import warnings

import pytest
import torch
from peft import PromptEncoderConfig, TaskType, get_peft_model

from peftkit.io import load_tensors
from peftkit.p_tuning import PromptEncoder, PTuningConfig, PTuningModel
from peftkit.prompt_tuning import PromptTuningModel, SoftPrompt

from tiny import short_bert, short_llama  # noqa: E402

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
    return sum(t.numel() for t in model.prompt_state_dict().values())


def batch(seq_len=7):
    input_ids = torch.randint(3, 100, (2, seq_len))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, seq_len - 2:] = 0
    return input_ids, attention_mask


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
    expected_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert num_trained(ours) == expected_trainable


def test_bert_classifier_matches_peft():
    peft_model, ours = peft_and_ours(short_bert(), TaskType.SEQ_CLS, "lstm")
    input_ids, attention_mask = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft_model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(ours(input_ids, attention_mask).logits, expected, rtol=0, atol=0)
    assert {"base_model.classifier.weight", "base_model.classifier.bias"} <= set(ours.prompt_state_dict())


def test_mlp_layers_and_default_hidden_size():
    encoder = PromptEncoder(N, 32, HIDDEN, kind="mlp", num_layers=3)
    linears = [m for m in encoder.mlp_head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 16), (16, 16), (16, 16), (16, 32)]
    model = PTuningModel(short_llama(), PTuningConfig(num_virtual_tokens=N, kind="lstm"))
    assert model.prompt_encoder.lstm_head.hidden_size == 32  # peft's default: the model's embedding size


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


def test_export_keeps_only_the_prompt_as_peft_saves_it(tmp_path):
    peft_model, ours = peft_and_ours(short_llama(), TaskType.CAUSAL_LM, "lstm", dropout=0.5)
    input_ids, attention_mask = batch()
    before = ours(input_ids, attention_mask).logits
    prompt = ours.train().export_prompt()  # export must run the encoder without dropout even in training mode
    ours.eval()
    assert ours.exported and isinstance(ours.prompt_encoder, SoftPrompt)
    torch.testing.assert_close(prompt, peft_model.get_prompt_embedding_to_save("default"), rtol=0, atol=0)
    torch.testing.assert_close(ours(input_ids, attention_mask).logits, before, rtol=0, atol=0)
    assert num_trained(ours) == N * 32
    torch.testing.assert_close(ours.export_prompt(), prompt, rtol=0, atol=0)  # a second export changes nothing

    path = ours.save(tmp_path / "prompt.safetensors")
    tensors, config = load_tensors(path)
    assert list(tensors) == ["prompt_encoder.embedding.weight"] and config["exported"] is True
    fresh = PTuningModel(short_llama(), PTuningConfig(N, HIDDEN, "lstm", dropout=0.5))
    fresh.base_model.load_state_dict(ours.base_model.state_dict())
    fresh.load(path)  # turns the fresh encoder into its exported form, then loads
    assert fresh.exported
    torch.testing.assert_close(fresh.eval()(input_ids, attention_mask).logits, before, rtol=0, atol=0)


def test_save_and_load_before_export_are_exact(tmp_path):
    llama = short_llama()
    model = PTuningModel(copy.deepcopy(llama), PTuningConfig(N, HIDDEN, "mlp"))
    path = model.save(tmp_path / "encoder.safetensors")
    tensors, config = load_tensors(path)
    assert sorted(tensors) == sorted(model.prompt_state_dict()) and config["exported"] is False
    assert config["kind"] == "mlp" and config["encoder_hidden_size"] == HIDDEN
    torch.manual_seed(1)
    fresh = PTuningModel(copy.deepcopy(llama), PTuningConfig(N, HIDDEN, "mlp"))
    assert not torch.equal(fresh.prompt_encoder(), model.prompt_encoder())
    fresh.load(path)
    torch.testing.assert_close(fresh.prompt_encoder(), model.prompt_encoder(), rtol=0, atol=0)
    fresh.export_prompt()
    with pytest.raises(ValueError, match="missing keys"):  # an exported model cannot take an encoder back
        fresh.load(path)


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="kind must be one of"):
        PromptEncoder(N, 32, HIDDEN, kind="gru")
    with pytest.raises(ValueError, match="MLP encoder has none"):
        PromptEncoder(N, 32, HIDDEN, kind="mlp", dropout=0.1)
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        PromptEncoder(N, 32, HIDDEN, kind="lstm", num_layers=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        PromptEncoder(N, 32, HIDDEN, kind="lstm", dropout=1.0)
    with pytest.raises(TypeError, match="PTuningConfig"):
        PTuningModel(short_llama(), {"num_virtual_tokens": N})
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        PTuningModel(short_llama(), PTuningConfig(num_virtual_tokens=40))
    with pytest.raises(ValueError, match="token_dim=64.*32"):
        PromptTuningModel(short_llama(), prompt_encoder=PromptEncoder(N, 64, HIDDEN))

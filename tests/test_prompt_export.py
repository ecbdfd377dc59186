"""export_peft for the prompt methods: peft.PeftModel.from_pretrained loads the folder and gives our outputs."""

import copy
import json
import warnings

import peft
import pytest
import torch

from families import build, inputs
from peftkit import adapter_files, p_tuning, prefix_tuning, prompt_tuning
from peftkit.p_tuning import PTuningConfig, PTuningModel
from peftkit.prefix_tuning import PrefixTuningModel
from peftkit.prompt_common import export_peft
from peftkit.prompt_tuning import PromptTuningModel

N = 3
WRAPPERS = {
    "prompt": lambda m: PromptTuningModel(m, num_virtual_tokens=N),
    "p-lstm": lambda m: PTuningModel(m, PTuningConfig(num_virtual_tokens=N, kind="lstm")),
    "p-mlp": lambda m: PTuningModel(m, PTuningConfig(num_virtual_tokens=N, kind="mlp")),
    "prefix": lambda m: PrefixTuningModel(m, num_virtual_tokens=N, projection=False),
    "prefix-mlp": lambda m: PrefixTuningModel(m, num_virtual_tokens=N, projection=True, encoder_hidden_size=24),
}
CASES = [(f, w) for f in ("bert", "llama", "t5") for w in WRAPPERS if not (f == "bert" and w.startswith("prefix"))]
CASES += [("gpt2", "prefix-mlp"), ("albert", "p-lstm")]


def trained(family, wrapper):
    """A wrapper whose prompt (and head) differ from their fresh values, as after training."""
    ours = WRAPPERS[wrapper](build(family))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return ours.eval()


def outputs(model, family):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**inputs(family)).logits


@pytest.mark.parametrize("family, wrapper", CASES)
def test_peft_loads_the_export_with_the_same_outputs(family, wrapper, tmp_path):
    ours = trained(family, wrapper)
    export_peft(ours, tmp_path / "out", "tiny-" + family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(build(family), tmp_path / "out").eval()
    torch.testing.assert_close(outputs(loaded, family), outputs(ours, family))
    last = lambda logits: logits[:, -1]  # the prompt makes causal outputs longer: compare the last position
    assert not torch.allclose(last(outputs(ours.base_model, family)), last(outputs(ours, family)), atol=1e-3)


def test_each_technique_file_offers_the_same_export():  # prompt_tuning's, which hands over to prompt_common's
    assert prompt_tuning.export_peft is p_tuning.export_peft is prefix_tuning.export_peft


def test_the_folder_holds_peft_s_config_and_keys(tmp_path):
    ours = trained("bert", "p-lstm")
    export_peft(ours, tmp_path, "bert-tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "P_TUNING" and config["task_type"] == "SEQ_CLS"
    assert config["encoder_reparameterization_type"] == "LSTM" and config["base_model_name_or_path"] == "bert-tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(build("bert"), peft.PromptEncoderConfig(task_type="SEQ_CLS",
                                                                                num_virtual_tokens=N))
        reference.save_pretrained(tmp_path / "peft")
    from safetensors import safe_open
    keys = [sorted(safe_open(str(d / "adapter_model.safetensors"), "pt").keys()) for d in (tmp_path, tmp_path / "peft")]
    assert keys[0] == keys[1] == ["base_model.classifier.bias", "base_model.classifier.weight", "prompt_embeddings"]


def test_t5_keeps_peft_s_two_rows_per_virtual_token(tmp_path):
    export_peft(trained("t5", "prompt"), tmp_path, None)
    from safetensors.torch import load_file
    prompt = load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"]
    assert prompt.shape == (2 * N, 32) and not prompt[N:].any()


def test_a_failed_export_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    (tmp_path / "adapter_config.json").write_text("earlier")
    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(adapter_files, "save_tensors", broken)
    with pytest.raises(OSError, match="disk full"):
        export_peft(trained("llama", "prompt"), tmp_path, None)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter_config.json"]
    assert (tmp_path / "adapter_config.json").read_text() == "earlier"


@pytest.mark.parametrize("model, base, error, match", [
    (lambda: build("llama"), None, TypeError, "PromptTuningModel, PTuningModel or PrefixTuningModel"),
    (lambda: trained("llama", "prompt"), 3, TypeError, "base_model_name_or_path"),
])
def test_bad_arguments_are_refused(model, base, error, match, tmp_path):
    with pytest.raises(error, match=match):
        export_peft(model(), tmp_path / "out", base)
    assert not (tmp_path / "out").exists()


def test_a_file_where_the_folder_should_be_is_refused_and_kept(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is a file"):
        export_peft(trained("llama", "prefix"), tmp_path / "out", None)
    assert (tmp_path / "out").read_text() == "not a folder"

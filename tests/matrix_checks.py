"""One check per technique x model family: the coverage matrix of the README, run by tests/test_matrix.py
and written out by tools/coverage_matrix.py.

``check(technique, family)`` builds the tiny model of ``family`` (tests/families.py), applies the technique
with peftkit's public API and asserts: the forward and backward pass run; gradients reach exactly the
trained parameters (those the technique saves); a save/load round trip into a fresh model gives identical
outputs; a LoRA merge gives the same outputs; and, where peft has the technique for that family, peft's
model holding the same trained tensors gives the same outputs. It returns "✔" or raises.
``cell(technique, family)`` is what the matrix shows: "✔", or "✘ <short reason>" when the technique
refuses the family with a ValueError that names it (its ``config.model_type``). Any other exception is a bug.
"""

import copy
import re
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import peft
import torch
from torch.testing import assert_close

import families
from peftkit import adapters, dora, ia3, lora, p_tuning, prefix_tuning, prompt_tuning, qlora

RANK, ALPHA, N = 4, 8, 4  # LoRA rank and alpha; virtual tokens of the prompt methods
HEADS = {"xlnet": ["logits_proj"], "t5": ["lm_head"], "gpt2": ["lm_head"], "llama": ["lm_head"]}
TASK = {"t5": "SEQ_2_SEQ_LM", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM"}  # peft's task type; else SEQ_CLS
NAMES = {"bert": "BERT", "roberta": "RoBERTa", "albert": "ALBERT", "electra": "ELECTRA", "xlnet": "XLNet",
         "t5": "T5", "gpt2": "GPT-2", "llama": "Llama"}


def logits(model, family) -> torch.Tensor:
    return model(**families.inputs(family)).logits


def close(actual, expected):
    """assert_close with an absolute tolerance on the outputs' own scale (encoders' logits ~ 1e-2, T5's ~ 1): the
    default 1e-5 would let a 1% error in an encoder's LoRA update pass, and 1e-6 fails T5's float32 rounding."""
    assert_close(actual, expected, rtol=1e-5, atol=1e-6 + 2e-6 * expected.abs().max().item())


def quietly(build):  # peft warns about position ids and the renamed cache argument; the values are checked
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build()


def check_training(model, family, saved: dict, trains) -> torch.Tensor:
    """Forward, backward, and gradients on exactly the saved tensors, each of them one ``trains(name)`` allows."""
    out = logits(model, family)
    out.float().square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable == set(saved), (with_grad ^ set(saved), trainable ^ set(saved))
    assert trainable and all(trains(n) for n in trainable), sorted(n for n in trainable if not trains(n))
    model.zero_grad(set_to_none=True)
    return out.detach()


def check_round_trip(module, model, build, family, folder):
    """Save ``model``'s trained tensors; ``build()`` (a fresh, differently seeded model) loads them: same outputs."""
    path = module.save_adapter(model, Path(folder) / "adapter.safetensors")
    torch.manual_seed(1)
    fresh = build()
    module.load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(logits(fresh, family), logits(model, family))


def randomize(model, pattern="lora_B", mean=0.0):
    """LoRA's B starts at zero, so B A = 0 and every output would match anyway: give it values ((IA)³'s vectors
    start at ones: around ``mean`` 1, so that the layers they scale still carry the signal)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if pattern in name:
                p.normal_(mean, 0.5)
    return model


# --- LoRA and QLoRA ---

def _peft_outputs(module, model, family, out):
    """``module.export_peft`` of ``model``, loaded by peft into a fresh model: the same outputs as ``out``."""
    with tempfile.TemporaryDirectory() as folder:
        module.export_peft(model, Path(folder) / "peft", None)
        theirs = quietly(lambda: peft.PeftModel.from_pretrained(families.build(family), Path(folder) / "peft"))
        with torch.no_grad():
            close(logits(theirs, family), out)


def _lora(family, targets):
    model = randomize(lora.add_lora(families.build(family), targets, rank=RANK, alpha=ALPHA))
    out = check_training(model, family, lora.adapter_state_dict(model), lambda n: "lora_" in n)
    with tempfile.TemporaryDirectory() as folder:
        check_round_trip(lora, model, lambda: lora.add_lora(families.build(family), targets, RANK, ALPHA),
                         family, folder)
    _peft_outputs(lora, model, family, out)  # peft's LoRA with our A and B: its outputs
    if targets == "all-linear":  # what we wrap, peft's "all-linear" wraps too (peft may add the head)
        theirs = quietly(lambda: peft.get_peft_model(families.build(family), peft.LoraConfig(
            r=RANK, target_modules="all-linear")))
        wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
        assert set(model.adapter_config.target_modules) <= wrapped, set(model.adapter_config.target_modules) - wrapped
    with torch.no_grad():
        close(logits(lora.merge_lora(model), family), out)


def _qlora(family):
    def build():
        quantized = qlora.prepare_for_qlora(families.build(family), skip=HEADS.get(family, ["classifier"]))
        return lora.add_lora(quantized, "all-linear", rank=RANK, alpha=ALPHA)
    model = randomize(build())
    check_training(model, family, lora.adapter_state_dict(model), lambda n: "lora_" in n)
    with tempfile.TemporaryDirectory() as folder:
        check_round_trip(lora, model, build, family, folder)
        # merging into the float weights = LoRA with the same A and B on the float model
        float_lora = lora.add_lora(families.build(family), model.adapter_config.target_modules, RANK, ALPHA)
        lora.load_adapter(float_lora, lora.save_adapter(model, Path(folder) / "qlora.safetensors"))
    with torch.no_grad():
        close(logits(qlora.merge_into_float(model, families.build(family)), family), logits(float_lora, family))


def _dora(family):  # DoRA on every linear layer (dora.py: LoRA's wrapper plus a magnitude per output)
    build = lambda: dora.add_dora(families.build(family), "all-linear", rank=RANK, alpha=ALPHA)  # noqa: E731
    model = randomize(build())
    out = check_training(model, family, lora.adapter_state_dict(model), lambda n: "lora_" in n)
    with tempfile.TemporaryDirectory() as folder:
        check_round_trip(dora, model, build, family, folder)
    _peft_outputs(dora, model, family, out)
    with torch.no_grad():
        close(logits(dora.merge_lora(model), family), out)


# (IA)³'s targets where peft has no default for the family: the same roles, named (keys, values, feed-forward)
IA3_TARGETS = {"electra": (["key", "value", "output.dense"], ["output.dense"]),
               "albert": (["key", "value", "ffn_output"], ["ffn_output"]),
               "xlnet": (["layer_2"], ["layer_2"])}  # XLNet's keys and values are parameters: its feed-forward only


def _ia3(family):
    targets, feedforward = IA3_TARGETS.get(family, (None, None))  # None: peft's default for the family
    build = lambda: ia3.add_ia3(families.build(family), targets, feedforward)  # noqa: E731
    model = randomize(build(), "ia3_l", mean=1.0)
    out = check_training(model, family, ia3.adapter_state_dict(model), lambda n: n.endswith("ia3_l"))
    with tempfile.TemporaryDirectory() as folder:
        check_round_trip(ia3, model, build, family, folder)
    _peft_outputs(ia3, model, family, out)
    with torch.no_grad():
        close(logits(ia3.merge_ia3(model), family), out)


# --- bottleneck adapters (peft has none; tests/test_adapters.py checks them against the formula) ---

def _adapters(family, placement):
    build = lambda: adapters.add_adapters(families.build(family), placement, reduction_factor=4)  # noqa: E731
    model = randomize(build(), ".adapter.")
    norms = re.compile(r"norm|\.ln_\d")
    check_training(model, family, adapters.adapter_state_dict(model),
                   lambda n: ".adapter." in n or (placement == "houlsby" and bool(norms.search(n.lower()))))
    with tempfile.TemporaryDirectory() as folder:
        check_round_trip(adapters, model, build, family, folder)


# --- prompt tuning, P-tuning, prefix-tuning ---

def _peft_prompt_config(config_class, family, **kwargs):
    """peft's config for ``family``; token_dim is the embedding size (ALBERT, ELECTRA: smaller than hidden_size,
    which peft would take by default). For T5, peft keeps 2N prompt rows and prepends the first N to the encoder
    input, as peftkit does (P-tuning's encoder reads all 2N, prompt_common.py)."""
    dim = families.build(family).get_input_embeddings().embedding_dim
    return config_class(task_type=TASK.get(family, "SEQ_CLS"), num_virtual_tokens=N, token_dim=dim, **kwargs)


def _prompt(family, module, build, peft_config, copy_into_peft):
    model = build(families.build(family))
    trains = re.compile(r"(prompt_encoder|prefix_encoder|base_model\.(classifier|score))\.")  # prompt, head
    out = check_training(model, family, module.adapter_state_dict(model), lambda n: bool(trains.match(n)))
    with tempfile.TemporaryDirectory() as folder:
        check_round_trip(module, model, lambda: build(families.build(family)), family, folder)
    theirs = quietly(lambda: peft.get_peft_model(families.build(family), peft_config).eval())
    copy_into_peft(model, theirs)
    with torch.no_grad():
        close(quietly(lambda: logits(theirs, family)), out)


def _prompt_tuning(family):
    _prompt(family, prompt_tuning, lambda m: prompt_tuning.PromptTuningModel(m, num_virtual_tokens=N),
            _peft_prompt_config(peft.PromptTuningConfig, family),
            lambda ours, theirs: theirs.prompt_encoder.default.embedding.weight.data[:N].copy_(
                ours.prompt_encoder.embedding.weight))  # T5: peft's rows N..2N are never read


def _p_tuning(family):
    _prompt(family, p_tuning, lambda m: p_tuning.PTuningModel(m, p_tuning.PTuningConfig(N, 16, "mlp")),
            _peft_prompt_config(peft.PromptEncoderConfig, family, encoder_hidden_size=16,
                                encoder_reparameterization_type="MLP"),
            lambda ours, theirs: theirs.prompt_encoder.default.load_state_dict(ours.prompt_encoder.state_dict()))


def _prefix_tuning(family):  # the table, peft's default (prefix_projection=False)
    _prompt(family, prefix_tuning, lambda m: prefix_tuning.PrefixTuningModel(m, N, projection=False),
            _peft_prompt_config(peft.PrefixTuningConfig, family),
            lambda ours, theirs: theirs.prompt_encoder.default.embedding.weight.data.copy_(
                ours.prefix_encoder.embedding.weight))


TECHNIQUES = {
    "LoRA q/v": lambda family: _lora(family, families.QV[family] or ["q", "v"]),  # XLNet: its q, v parameters
    "LoRA all-linear": lambda family: _lora(family, "all-linear"),
    "Houlsby": lambda family: _adapters(family, "houlsby"),
    "Pfeiffer": lambda family: _adapters(family, "pfeiffer"),
    "prompt tuning": _prompt_tuning,
    "P-tuning (MLP)": _p_tuning,
    "prefix-tuning": _prefix_tuning,
    "QLoRA": _qlora,
    "DoRA all-linear": _dora,
    "(IA)³": _ia3,
}

# What the matrix says for a refusal, by a phrase of its message (else the message's first clause).
REASONS = {
    r"keeps as a parameter": "attention output is a parameter",
    r"prefix-tuning supports these families": "no key/value cache to take a prefix (peft refuses too)",
    r"are parameters, not layers": "q, k, v are parameters, not layers",
    r"which peftkit's NF4 does not quantize": "Conv1D projections: peftkit's NF4 quantizes nn.Linear",
}


def check(technique: str, family: str) -> str:
    """Build the tiny ``family`` model, apply ``technique``, check it (see the module docstring); "✔" or raise."""
    torch.manual_seed(0)
    TECHNIQUES[technique](family)
    return "✔"


def refusal(error: BaseException, family: str) -> str | None:
    """The matrix's "✘ reason" if ``error`` is a ValueError naming ``family``, else None."""
    message = str(error)
    if not isinstance(error, ValueError) or not re.search(rf"\b{re.escape(family)}\b", message):
        return None
    reason = next((r for pattern, r in REASONS.items() if re.search(pattern, message)), None)
    return "✘ " + (reason or re.split(r"[:;.(]", message)[0][:60].strip())


@lru_cache(maxsize=None)
def cell(technique: str, family: str) -> str:
    """check's answer as the matrix shows it; an exception that is no refusal naming the family propagates."""
    try:
        return check(technique, family)
    except Exception as error:
        if (reason := refusal(error, family)) is None:
            raise
        return reason

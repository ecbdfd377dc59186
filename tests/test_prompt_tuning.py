"""Prompt tuning checked against peft: same prompt in, same logits out (tiny BERT classifier, tiny Llama)."""

import copy
import warnings

import pytest
import torch
import transformers
from peft import PromptTuningConfig as PeftPromptTuningConfig
from peft import TaskType, get_peft_model

from peftkit import p_tuning
from peftkit.adapter_files import load_tensors
from peftkit.prompt_tuning import (PromptTuningConfig, PromptTuningModel, SoftPrompt, adapter_state_dict, load_adapter,
                                   save_adapter)

from families import FAMILIES, build  # noqa: E402
from families import inputs as family_inputs  # noqa: E402
from tiny import assert_unchanged, short_bert, short_llama, snapshot  # noqa: E402

N = 5  # virtual tokens


def peft_prompt_model(model, task_type, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about ignored position ids
        config = PeftPromptTuningConfig(task_type=task_type, num_virtual_tokens=N, **kwargs)
        return get_peft_model(copy.deepcopy(model), config).eval()


def ours_with_peft_prompt(model, peft_model):
    ours = PromptTuningModel(copy.deepcopy(model), num_virtual_tokens=N).eval()
    with torch.no_grad():
        ours.prompt_encoder.embedding.weight.copy_(peft_model.prompt_encoder.default.embedding.weight)
    return ours


def batch(seq_len=7):
    input_ids = torch.randint(3, 100, (2, seq_len))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, seq_len - 2:] = 0  # the second row is right-padded
    return input_ids, attention_mask


# --- the formula: same logits as peft ---------------------------------------------------

def test_bert_classifier_matches_peft():
    bert = short_bert()
    peft_model = peft_prompt_model(bert, TaskType.SEQ_CLS)
    ours = ours_with_peft_prompt(bert, peft_model)
    input_ids, attention_mask = batch()
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 4:] = 1  # a sentence pair, so segment ids matter
    labels = torch.tensor([0, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft_model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                              labels=labels)
    got = ours(input_ids, attention_mask, labels=labels, token_type_ids=token_type_ids)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)


def test_llama_matches_peft():
    llama = short_llama()
    peft_model = peft_prompt_model(llama, TaskType.CAUSAL_LM)
    ours = ours_with_peft_prompt(llama, peft_model)
    input_ids, attention_mask = batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    got = ours(input_ids, attention_mask, labels=labels)
    assert got.logits.shape == (2, N + 7, 100)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)


@pytest.mark.parametrize("build, task_type, expected_names", [
    (short_bert, TaskType.SEQ_CLS, ["base_model.classifier.bias", "base_model.classifier.weight",
                                    "prompt_encoder.embedding.weight"]),
    (short_llama, TaskType.CAUSAL_LM, ["prompt_encoder.embedding.weight"]),
])
def test_trains_what_peft_trains(build, task_type, expected_names):
    model = build()
    peft_model = peft_prompt_model(model, task_type)
    ours = ours_with_peft_prompt(model, peft_model)
    # peft trains the prompt and (a copy of) a classifier's head: so do we, with the same sizes
    expected_sizes = sorted(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert sorted(p.numel() for p in ours.parameters() if p.requires_grad) == expected_sizes
    assert sorted(adapter_state_dict(ours)) == expected_names


# --- mask, labels and segments get the prompt's positions ---------------------------------

def capture_model_kwargs(wrapper):
    seen = {}
    wrapper.base_model.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True)
    return seen


def test_language_model_inputs_get_the_prompt_in_front():
    llama = PromptTuningModel(short_llama(), num_virtual_tokens=N)
    seen = capture_model_kwargs(llama)
    input_ids, attention_mask = batch()
    labels = input_ids.clone()
    llama(input_ids, attention_mask, labels=labels)
    assert seen["inputs_embeds"].shape == (2, N + 7, 32)
    torch.testing.assert_close(seen["inputs_embeds"][0, :N], llama.prompt_encoder.embedding.weight)
    torch.testing.assert_close(seen["attention_mask"], torch.cat([torch.ones(2, N, dtype=torch.long),
                                                                  attention_mask], dim=1))
    torch.testing.assert_close(seen["labels"], torch.cat([torch.full((2, N), -100), labels], dim=1))


def test_without_a_mask_every_position_is_attended():
    llama = PromptTuningModel(short_llama(), num_virtual_tokens=N)
    seen = capture_model_kwargs(llama)
    llama(batch()[0])
    torch.testing.assert_close(seen["attention_mask"], torch.ones(2, N + 7, dtype=torch.long))


def test_classifier_labels_pass_and_segments_get_zeros_for_the_prompt():
    bert = PromptTuningModel(short_bert(), num_virtual_tokens=N)
    seen = capture_model_kwargs(bert)
    input_ids, attention_mask = batch()
    token_type_ids = torch.ones_like(input_ids)
    class_labels = torch.tensor([1, 0])
    bert(input_ids, attention_mask, labels=class_labels, token_type_ids=token_type_ids)
    torch.testing.assert_close(seen["labels"], class_labels)  # one label per sequence: left alone
    torch.testing.assert_close(seen["token_type_ids"], torch.cat([torch.zeros(2, N, dtype=torch.long),
                                                                  token_type_ids], dim=1))


def test_token_tagger_labels_get_minus_100_for_the_prompt():
    tagger = PromptTuningModel(short_bert(model_class=transformers.BertForTokenClassification, num_hidden_layers=1,
                                          num_labels=4, eval_mode=False), num_virtual_tokens=N)
    seen = capture_model_kwargs(tagger)
    input_ids, attention_mask = batch()
    tags = torch.randint(0, 4, input_ids.shape)
    assert tagger(input_ids, attention_mask, labels=tags).logits.shape == (2, N + 7, 4)
    torch.testing.assert_close(seen["labels"], torch.cat([torch.full((2, N), -100), tags], dim=1))


# --- generate ---------------------------------------------------------------------------

def greedy_without_cache(wrapper, input_ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            next_token = wrapper(input_ids).logits[:, -1].argmax(-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_token], dim=1)
    return input_ids


@pytest.fixture
def llama_pair():
    llama = short_llama()
    peft_model = peft_prompt_model(llama, TaskType.CAUSAL_LM)
    return peft_model, ours_with_peft_prompt(llama, peft_model)


def test_generate_equals_greedy_decoding_without_cache(llama_pair):
    _, ours = llama_pair
    input_ids = torch.randint(3, 100, (2, 6))
    out = ours.generate(input_ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 11)
    torch.testing.assert_close(out, greedy_without_cache(ours, input_ids, 5), rtol=0, atol=0)


def test_generate_first_token_matches_peft(llama_pair):
    peft_model, ours = llama_pair
    input_ids = torch.randint(3, 100, (2, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = peft_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=1, do_sample=False)
    # Only the first token is compared: with transformers 5.x (cache argument renamed to `cache`),
    # peft 0.21 re-inserts the prompt at every cached decoding step, so its later tokens drift.
    torch.testing.assert_close(ours.generate(input_ids, max_new_tokens=1, do_sample=False), first, rtol=0, atol=0)


def test_generate_left_padded_rows_continue_as_they_do_alone(llama_pair):
    _, ours = llama_pair
    input_ids = torch.randint(3, 100, (2, 6))
    short = input_ids[1:, 2:]
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), short], dim=1)
    mask = torch.cat([torch.ones(1, 6, dtype=torch.long), (padded != 0).long()])
    together = ours.generate(torch.cat([input_ids[:1], padded]), mask, max_new_tokens=3, do_sample=False)
    alone = ours.generate(short, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(together[1, 6:], alone[0, 4:], rtol=0, atol=0)


# --- initialisation -----------------------------------------------------------------------

@pytest.mark.parametrize("init, peft_init", [("random", "RANDOM"), ("vocab", "SAMPLE_VOCAB")])
def test_random_and_vocab_inits_match_peft(init, peft_init):
    bert = short_bert()
    torch.manual_seed(1)
    expected = peft_prompt_model(bert, TaskType.SEQ_CLS, prompt_tuning_init=peft_init)
    torch.manual_seed(1)
    got = PromptTuningModel(copy.deepcopy(bert), num_virtual_tokens=N, init=init)
    torch.testing.assert_close(got.prompt_encoder.embedding.weight,
                               expected.prompt_encoder.default.embedding.weight, rtol=0, atol=0)


def test_every_vocab_row_is_a_row_of_the_embedding_table():
    bert = short_bert()
    table = bert.get_input_embeddings().weight
    got = PromptTuningModel(bert, num_virtual_tokens=N, init="vocab")
    same_row = (got.prompt_encoder.embedding.weight[:, None] == table[None]).all(dim=-1)  # (N, vocab)
    assert same_row.any(dim=1).all()


@pytest.fixture
def word_tokenizer(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "classify", "the", "topic", "of", "this", "news"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    tokenizer.save_pretrained(tmp_path / "tok")
    return tokenizer, str(tmp_path / "tok")


@pytest.mark.parametrize("text", ["classify the topic", "classify the topic of this news"])  # 5 tokens; 8 cut to N
def test_text_init_matches_peft(word_tokenizer, text):
    tokenizer, folder = word_tokenizer
    bert = short_bert()
    expected = peft_prompt_model(bert, TaskType.SEQ_CLS, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                                 tokenizer_name_or_path=folder)
    got = PromptTuningModel(copy.deepcopy(bert), num_virtual_tokens=N, init="text", init_text=text,
                            tokenizer=tokenizer)
    torch.testing.assert_close(got.prompt_encoder.embedding.weight,
                               expected.prompt_encoder.default.embedding.weight, rtol=0, atol=0)


@pytest.mark.parametrize("n", [N, 2 * N + 1])
def test_text_init_repeats_a_short_phrase_and_cuts_a_long_one(word_tokenizer, n):
    tokenizer, _ = word_tokenizer
    table = short_bert().get_input_embeddings()
    for text in ["classify the topic", "classify the topic of this news"]:
        got = SoftPrompt(n, 32, init="text", word_embeddings=table, init_text=text, tokenizer=tokenizer)
        ids = tokenizer(text)["input_ids"]
        torch.testing.assert_close(got(), table.weight[[ids[i % len(ids)] for i in range(n)]], rtol=0, atol=0)


# --- what trains --------------------------------------------------------------------------

@pytest.mark.parametrize("modules_to_save", [None, []])
def test_gradients_reach_only_the_prompt_and_head(modules_to_save):
    model = PromptTuningModel(short_bert(), num_virtual_tokens=N, modules_to_save=modules_to_save)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    input_ids, attention_mask = batch()
    model(input_ids, attention_mask, labels=torch.tensor([0, 2])).loss.backward()
    optimizer.step()
    head = modules_to_save is None
    for name, p in model.named_parameters():
        trained = name.startswith("prompt_encoder.") or (head and name.startswith("base_model.classifier."))
        assert (p.grad is not None) == trained, name
        assert torch.equal(p, before[name]) != trained, name


@pytest.mark.parametrize("target", ["bert.pooler.dense", "pooler.dense", "dense"])
def test_modules_to_save_names_a_full_name_or_its_last_components(target):
    model = PromptTuningModel(short_bert(), num_virtual_tokens=N, modules_to_save=[target])
    trained = {n for n, p in model.base_model.named_parameters() if p.requires_grad}
    matched = {n for n, _ in model.base_model.named_modules() if n == target or n.endswith("." + target)}
    assert trained == {f"{m}.{p}" for m in matched for p in ("weight", "bias")}
    assert model.adapter_config.modules_to_save == [target]


def test_adapter_config_records_what_was_built():
    model = PromptTuningModel(short_bert(), num_virtual_tokens=N, init="vocab")
    assert model.adapter_config == PromptTuningConfig(num_virtual_tokens=N, token_dim=32, init="vocab",
                                                      modules_to_save=["classifier"])
    assert model.num_virtual_tokens == N and PromptTuningConfig.technique == "prompt_tuning"


# --- saving -------------------------------------------------------------------------------

@pytest.fixture
def trained(tmp_path):
    """A trained-looking prompt-tuned BERT, its base model and its saved file."""
    bert = short_bert()
    model = PromptTuningModel(copy.deepcopy(bert), num_virtual_tokens=N, init="vocab")
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.add_(torch.randn_like(p))  # stands in for training
    return model, bert, save_adapter(model, tmp_path / "prompt.safetensors")


def test_the_file_holds_the_trained_tensors_and_the_tagged_config(trained):
    model, _, path = trained
    tensors, config = load_tensors(path)
    assert sorted(tensors) == sorted(adapter_state_dict(model))
    assert config == {"technique": "prompt_tuning", "num_virtual_tokens": N, "token_dim": 32, "init": "vocab",
                      "modules_to_save": ["classifier"]}


def test_save_and_load_round_trip_is_exact(trained):
    model, bert, path = trained
    fresh = PromptTuningModel(copy.deepcopy(bert), num_virtual_tokens=N)  # another init: the file's values win
    assert not torch.equal(fresh.prompt_encoder(), model.prompt_encoder())
    assert load_adapter(fresh, path) == model.adapter_config
    for name, tensor in adapter_state_dict(model).items():
        torch.testing.assert_close(adapter_state_dict(fresh)[name], tensor, rtol=0, atol=0)
    input_ids, attention_mask = batch()
    torch.testing.assert_close(fresh.eval()(input_ids, attention_mask).logits,
                               model.eval()(input_ids, attention_mask).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_virtual_tokens=N + 1), r"num_virtual_tokens \(file 5, model 6\)"),
    (dict(num_virtual_tokens=N, modules_to_save=[]), r"modules_to_save \(file \['classifier'\], model \[\]\)"),
])
def test_load_refuses_a_file_of_another_config_and_changes_nothing(trained, kwargs, match):
    _, bert, path = trained
    other = PromptTuningModel(copy.deepcopy(bert), **kwargs)
    before = snapshot(other)
    with pytest.raises(ValueError, match="does not fit this model: its config differs in " + match):
        load_adapter(other, path)
    assert_unchanged(other, before)


def test_load_refuses_a_p_tuning_file_naming_both_techniques(tmp_path):
    bert = short_bert()
    path = save_adapter(p_tuning.PTuningModel(copy.deepcopy(bert), p_tuning.PTuningConfig(N)), tmp_path / "p.safetensors")
    model = PromptTuningModel(copy.deepcopy(bert), num_virtual_tokens=N)
    before = snapshot(model)
    with pytest.raises(ValueError, match="holds a p_tuning adapter, not prompt_tuning"):
        load_adapter(model, path)
    assert_unchanged(model, before)


def test_saving_and_loading_need_the_wrapper(trained):
    _, bert, path = trained
    with pytest.raises(TypeError, match="wrap the model first"):
        save_adapter(bert, path)
    with pytest.raises(TypeError, match="wrap the model first"):
        load_adapter(bert, path)


# --- clear errors -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_virtual_tokens=0), ValueError, "num_virtual_tokens must be a positive integer"),
    (dict(num_virtual_tokens=2.5), ValueError, "num_virtual_tokens must be a positive integer"),
    (dict(token_dim=0), ValueError, "token_dim must be a positive integer"),
    (dict(init="zeros"), ValueError, "init must be one of"),
    (dict(modules_to_save="classifier"), TypeError, r"\['classifier'\]"),
])
def test_config_checks_its_fields(kwargs, error, match):
    with pytest.raises(error, match=match):
        PromptTuningConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_virtual_tokens=32), "max_position_embeddings=32"),
    (dict(init="text", init_text="classify the topic"), "tokenizer"),
    (dict(token_dim=64), "token_dim=64.*32"),
    (dict(init="vocab", token_dim=64), "token_dim=64.*32"),
    (dict(prompt_encoder=SoftPrompt(N, 16)), "token_dim=16.*32"),
    (dict(init="zeros"), "init must be one of"),
    (dict(num_virtual_tokens=0), "positive integer"),
    (dict(modules_to_save=["head"]), "modules_to_save names 'head'"),
    (dict(modules_to_save=["ooler.dense"]), "modules_to_save names 'ooler.dense'"),  # whole components only
])
def test_wrapper_arguments_get_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptTuningModel(short_bert(), **{"num_virtual_tokens": N, **kwargs})


def test_text_init_without_a_phrase_is_refused():
    with pytest.raises(ValueError, match="init_text"):
        SoftPrompt(N, 32, init="text", word_embeddings=short_bert().get_input_embeddings(), tokenizer=lambda text: None)


def test_an_input_too_long_for_the_positions_left_is_refused():
    model = PromptTuningModel(short_bert(), num_virtual_tokens=30)
    with pytest.raises(ValueError, match=r"prompt \(30\) \+ input \(7 tokens\) = 37 positions.*truncate inputs to 2"):
        model(*batch())


def test_generate_needs_a_causal_language_model():
    with pytest.raises(ValueError, match="causal or seq2seq language model"):
        PromptTuningModel(short_bert(), num_virtual_tokens=N).generate(batch()[0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=torch.tensor([1, 2])), r"labels must be token ids shaped like the input \(2, 7\)"),
    (dict(position_ids=torch.arange(7)[None]), "pass no position_ids"),
    (dict(inputs_embeds=torch.zeros(2, 7, 32)), "exactly one of input_ids .* or inputs_embeds"),
])
def test_language_model_forward_refuses_what_it_cannot_use(kwargs, match):
    lm = PromptTuningModel(short_llama(), num_virtual_tokens=N)
    with pytest.raises(ValueError, match=match):
        lm(*batch(), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(attention_mask=torch.ones(2, 7)), r"exactly one of input_ids \(batch, seq_len\)"),
    (dict(inputs_embeds=torch.zeros(2, 7)), r"inputs_embeds must be \(batch, seq_len, dim\), got shape \(2, 7\)"),
])
def test_forward_needs_ids_or_embeddings_of_the_right_shape(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptTuningModel(short_llama(), num_virtual_tokens=N)(**kwargs)


# --- every family of tests/families.py, against peft ---------------------------------------

TASKS = {"t5": TaskType.SEQ_2_SEQ_LM, "gpt2": TaskType.CAUSAL_LM, "llama": TaskType.CAUSAL_LM}


def family_batch(family):
    """Inputs with labels: the decoder's ids (T5), the input ids (causal LM) or one class per row (encoders)."""
    x = family_inputs(family)
    x["labels"] = x.get("decoder_input_ids", x["input_ids"]) if family in TASKS else torch.tensor([0, 2])
    return x


def with_embeds(model, x):
    """The same inputs with inputs_embeds (B, T, D) in place of input_ids."""
    x = dict(x)
    x["inputs_embeds"] = model.get_input_embeddings()(x.pop("input_ids"))
    return x


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_matches_peft_with_ids_or_embeddings_and_trains_only_the_prompt(family):
    model = build(family)
    dim = model.get_input_embeddings().embedding_dim  # ALBERT, ELECTRA: 16 < hidden_size, which peft assumes
    peft_model = peft_prompt_model(model, TASKS.get(family, TaskType.SEQ_CLS), token_dim=dim)
    ours = PromptTuningModel(copy.deepcopy(model), num_virtual_tokens=N).eval()
    with torch.no_grad():  # T5: peft keeps 2N rows (encoder and decoder) and reads the first N
        ours.prompt_encoder.embedding.weight.copy_(peft_model.prompt_encoder.default.embedding.weight[:N])
    x = family_batch(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = [peft_model(**x), peft_model(**with_embeds(model, x))]
    got = [ours(**x), ours(**with_embeds(model, x))]
    for e, g in zip(expected, got):
        torch.testing.assert_close(g.logits, e.logits, rtol=0, atol=0)
        torch.testing.assert_close(g.loss, e.loss, rtol=0, atol=0)
    got[0].loss.backward()
    with_grad = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in ours.named_parameters() if p.requires_grad}
    assert "prompt_encoder.embedding.weight" in with_grad
    assert with_grad <= {"prompt_encoder.embedding.weight", "base_model.classifier.weight", "base_model.classifier.bias",
                         "base_model.classifier.dense.weight", "base_model.classifier.dense.bias",
                         "base_model.classifier.out_proj.weight", "base_model.classifier.out_proj.bias"}


def test_generate_from_embeddings_returns_the_new_tokens_of_the_ids():
    ours = PromptTuningModel(build("llama"), num_virtual_tokens=N).eval()
    ids = family_inputs("llama")["input_ids"]
    from_ids = ours.generate(ids, max_new_tokens=3, do_sample=False)
    from_embeds = ours.generate(inputs_embeds=ours.base_model.get_input_embeddings()(ids), max_new_tokens=3,
                                do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])


def test_t5_generate_matches_peft_and_the_prompt_changes_the_answer():
    model = build("t5")
    peft_model = peft_prompt_model(model, TaskType.SEQ_2_SEQ_LM)
    ours = PromptTuningModel(copy.deepcopy(model), num_virtual_tokens=N).eval()
    prompt = torch.randn(N, 32, generator=torch.Generator().manual_seed(0)) * 30  # loud enough to change the answer
    with torch.no_grad():  # peft keeps 2N rows for T5 and reads the first N
        peft_model.prompt_encoder.default.embedding.weight[:N] = prompt
        ours.prompt_encoder.embedding.weight.copy_(prompt)
    x = family_inputs("t5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft_model.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=4,
                                       do_sample=False)
    got = ours.generate(x["input_ids"], x["attention_mask"], max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)  # the decoder's tokens, as HF and peft return them
    assert not torch.equal(got, model.generate(x["input_ids"], max_new_tokens=4, do_sample=False))

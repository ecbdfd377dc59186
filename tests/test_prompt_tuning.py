"""Prompt tuning checked against peft: same prompt in, same logits out (tiny BERT classifier, tiny Llama)."""

import copy
import warnings

import pytest
import torch
import transformers
from peft import PromptTuningConfig, TaskType, get_peft_model

from peftkit.io import load_tensors
from peftkit.prompt_tuning import PromptTuningModel, SoftPrompt

from tiny import short_bert, short_llama  # noqa: E402

N = 5  # virtual tokens


def peft_prompt_model(model, task_type, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about ignored position ids
        return get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type=task_type, num_virtual_tokens=N,
                                                                       **kwargs)).eval()


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
    # peft trains the prompt and (a copy of) the classifier head: so do we, with the same sizes
    expected_trainable = sorted(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert sorted(p.numel() for p in ours.parameters() if p.requires_grad) == expected_trainable
    assert sorted(ours.prompt_state_dict()) == ["base_model.classifier.bias", "base_model.classifier.weight",
                                                "prompt_encoder.embedding.weight"]


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
    assert sum(t.numel() for t in ours.prompt_state_dict().values()) == N * 32


def capture_model_kwargs(wrapper):
    seen = {}
    wrapper.base_model.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True)
    return seen


def test_mask_labels_and_segments_are_padded_for_the_prompt():
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

    # with no mask given, every position is attended
    llama(input_ids)
    torch.testing.assert_close(seen["attention_mask"], torch.ones(2, N + 7, dtype=torch.long))

    bert = PromptTuningModel(short_bert(), num_virtual_tokens=N)
    seen = capture_model_kwargs(bert)
    token_type_ids = torch.ones_like(input_ids)
    class_labels = torch.tensor([1, 0])
    bert(input_ids, attention_mask, labels=class_labels, token_type_ids=token_type_ids)
    torch.testing.assert_close(seen["labels"], class_labels)  # one label per sequence: left alone
    torch.testing.assert_close(seen["token_type_ids"], torch.cat([torch.zeros(2, N, dtype=torch.long),
                                                                  token_type_ids], dim=1))

    # a token tagger has one label per token too: the prompt positions get -100
    tagger = PromptTuningModel(short_bert(model_class=transformers.BertForTokenClassification, num_hidden_layers=1,
                                          num_labels=4, eval_mode=False), num_virtual_tokens=N)
    seen = capture_model_kwargs(tagger)
    tags = torch.randint(0, 4, input_ids.shape)
    assert tagger(input_ids, attention_mask, labels=tags).logits.shape == (2, N + 7, 4)
    torch.testing.assert_close(seen["labels"], torch.cat([torch.full((2, N), -100), tags], dim=1))


def greedy_without_cache(wrapper, input_ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            next_token = wrapper(input_ids).logits[:, -1].argmax(-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_token], dim=1)
    return input_ids


def test_generate_with_prompt():
    llama = short_llama()
    peft_model = peft_prompt_model(llama, TaskType.CAUSAL_LM)
    ours = ours_with_peft_prompt(llama, peft_model)
    input_ids = torch.randint(3, 100, (2, 6))
    out = ours.generate(input_ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 11)
    torch.testing.assert_close(out, greedy_without_cache(ours, input_ids, 5), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = peft_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=1, do_sample=False)
    # Only the first token is compared: with transformers 5.x (cache argument renamed to `cache`),
    # peft 0.21 re-inserts the prompt at every cached decoding step, so its later tokens drift.
    torch.testing.assert_close(out[:, :7], first, rtol=0, atol=0)
    # rows of different lengths, padded on the left, continue as they do alone
    short = input_ids[1:, 2:]
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), short], dim=1)
    together = ours.generate(torch.cat([input_ids[:1], padded]), torch.cat([torch.ones(1, 6, dtype=torch.long),
                                                                            (padded != 0).long()]),
                             max_new_tokens=3, do_sample=False)
    alone = ours.generate(short, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(together[1, 6:], alone[0, 4:], rtol=0, atol=0)


def test_inits_match_peft_and_the_vocabulary(tmp_path):
    bert = short_bert()
    table = bert.get_input_embeddings().weight
    for init, peft_init in [("random", "RANDOM"), ("vocab", "SAMPLE_VOCAB")]:
        torch.manual_seed(1)
        expected = peft_prompt_model(bert, TaskType.SEQ_CLS, prompt_tuning_init=peft_init)
        torch.manual_seed(1)
        got = PromptTuningModel(copy.deepcopy(bert), num_virtual_tokens=N, init=init)
        torch.testing.assert_close(got.prompt_encoder.embedding.weight,
                                   expected.prompt_encoder.default.embedding.weight, rtol=0, atol=0)
    # every "vocab" row is a row of the embedding table
    same_row = (got.prompt_encoder.embedding.weight[:, None] == table[None]).all(dim=-1)  # (N, vocab)
    assert same_row.any(dim=1).all()

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "classify", "the", "topic", "of", "this", "news"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    tokenizer.save_pretrained(tmp_path / "tok")
    for text in ["classify the topic", "classify the topic of this news"]:  # 5 tokens repeated; 8 cut to N
        expected = peft_prompt_model(bert, TaskType.SEQ_CLS, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                                     tokenizer_name_or_path=str(tmp_path / "tok"))
        for n in [N, 2 * N + 1]:
            got = SoftPrompt(n, 32, init="text", word_embeddings=bert.get_input_embeddings(), init_text=text,
                             tokenizer=tokenizer)
            ids = tokenizer(text)["input_ids"]
            torch.testing.assert_close(got(), table[[ids[i % len(ids)] for i in range(n)]], rtol=0, atol=0)
        got = PromptTuningModel(copy.deepcopy(bert), num_virtual_tokens=N, init="text", init_text=text,
                                tokenizer=tokenizer)
        torch.testing.assert_close(got.prompt_encoder.embedding.weight,
                                   expected.prompt_encoder.default.embedding.weight, rtol=0, atol=0)


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


def test_save_and_load_are_exact(tmp_path):
    bert = short_bert()
    model = PromptTuningModel(copy.deepcopy(bert), num_virtual_tokens=N, init="vocab")
    with torch.no_grad():
        for p in model.prompt_state_dict().values():
            p.add_(torch.randn_like(p))  # stands in for training
    path = model.save(tmp_path / "prompt.safetensors")
    tensors, config = load_tensors(path)
    assert sorted(tensors) == sorted(model.prompt_state_dict())
    assert config["num_virtual_tokens"] == N and config["init"] == "vocab"

    fresh = PromptTuningModel(copy.deepcopy(bert), num_virtual_tokens=N)
    assert not torch.equal(fresh.prompt_encoder(), model.prompt_encoder())
    assert fresh.load(path) == config
    for name, tensor in model.prompt_state_dict().items():
        torch.testing.assert_close(fresh.prompt_state_dict()[name], tensor, rtol=0, atol=0)
    input_ids, attention_mask = batch()
    torch.testing.assert_close(fresh.eval()(input_ids, attention_mask).logits,
                               model.eval()(input_ids, attention_mask).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="wrong shapes"):
        PromptTuningModel(copy.deepcopy(bert), num_virtual_tokens=N + 1).load(path)


def test_bad_inputs_get_clear_errors():
    bert, llama = short_bert(), short_llama()
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        PromptTuningModel(bert, num_virtual_tokens=32)
    model = PromptTuningModel(bert, num_virtual_tokens=30)
    with pytest.raises(ValueError, match=r"prompt \(30\) \+ input \(7 tokens\) = 37 positions.*truncate inputs to 2"):
        model(*batch())
    with pytest.raises(ValueError, match="tokenizer"):
        PromptTuningModel(bert, num_virtual_tokens=N, init="text", init_text="classify the topic")
    with pytest.raises(ValueError, match="init_text"):
        SoftPrompt(N, 32, init="text", word_embeddings=bert.get_input_embeddings(), tokenizer=lambda text: None)
    with pytest.raises(ValueError, match="token_dim=64.*32"):
        PromptTuningModel(bert, num_virtual_tokens=N, token_dim=64)
    with pytest.raises(ValueError, match="token_dim=64.*32"):
        PromptTuningModel(bert, num_virtual_tokens=N, init="vocab", token_dim=64)
    with pytest.raises(ValueError, match="token_dim=16.*32"):
        PromptTuningModel(bert, prompt_encoder=SoftPrompt(N, 16))
    with pytest.raises(ValueError, match="init must be one of"):
        PromptTuningModel(bert, num_virtual_tokens=N, init="zeros")
    with pytest.raises(ValueError, match="positive integer"):
        PromptTuningModel(bert, num_virtual_tokens=0)
    with pytest.raises(ValueError, match="modules_to_save names 'head'"):
        PromptTuningModel(bert, num_virtual_tokens=N, modules_to_save=["head"])
    with pytest.raises(ValueError, match="causal language model"):
        PromptTuningModel(bert, num_virtual_tokens=N).generate(batch()[0])
    lm = PromptTuningModel(llama, num_virtual_tokens=N)
    with pytest.raises(ValueError, match="labels must be token ids shaped like input_ids"):
        lm(*batch(), labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="pass input_ids only"):
        lm(*batch(), position_ids=torch.arange(7)[None])

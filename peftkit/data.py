"""The course's two tasks, deterministic, as Hugging Face ``datasets`` objects.

- ``topic_classification``: real human-written utterances from chatterbot-corpus (BSD),
  labelled by the topic file they come from. Every encoder technique is compared on it.
- ``data_to_text``: a miniature E2E-style task generated here with a fixed seed:
  ``name[The Mill] food[Italian] area[riverside] price[cheap]`` → a fluent sentence.
  The test set uses (name, food) pairs never seen in training.

Plus ``slot_error_rate`` and the collators that turn examples into padded batches.
"""

import importlib.util
import itertools
import random
import re
from pathlib import Path

import torch
from datasets import ClassLabel, Dataset, DatasetDict

TOPICS = ("ai", "coding", "emotion", "literature", "psychology", "science", "sports", "trivia")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _split_size(name: str, value):
    """A share in (0, 1) or a positive count, as ``Dataset.train_test_split`` takes it."""
    if isinstance(value, float) and 0 < value < 1:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"{name} must be a share in (0, 1) or a positive number of examples, got {value!r}")


def _corpus_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        raise ModuleNotFoundError("the topic task needs chatterbot-corpus: pip install chatterbot-corpus")
    return Path(spec.origin).parent / "data" / "english"


def topic_classification(topics=TOPICS, max_per_topic: int = 100, test_size: float = 0.25, seed: int = 0):
    """Utterances → topic, as a DatasetDict(train, test) with a ``label`` ClassLabel.

    Utterances are whitespace-normalised and de-duplicated; one that appears under two topics is
    dropped (its label would be ambiguous). Each topic keeps at most ``max_per_topic`` examples
    (a seeded sample), and the split is stratified so both sides have the same label balance.
    """
    import yaml

    topics = tuple(topics) if not isinstance(topics, str) else (topics,)
    if not topics or len(set(topics)) != len(topics):
        raise ValueError(f"topics must name at least one topic, each once, got {topics!r}; e.g. {TOPICS}")
    _positive_int("max_per_topic", max_per_topic)
    _split_size("test_size", test_size)
    owners: dict[str, set] = {}
    for topic in topics:
        path = _corpus_dir() / f"{topic}.yml"
        if not path.exists():
            known = sorted(p.stem for p in _corpus_dir().glob("*.yml"))
            raise ValueError(f"unknown topic {topic!r}; chatterbot-corpus has {known}")
        for conversation in yaml.safe_load(path.read_text())["conversations"]:
            for utterance in conversation:
                if isinstance(utterance, str) and utterance.strip():
                    owners.setdefault(" ".join(utterance.split()), set()).add(topic)
    rng = random.Random(seed)
    texts, labels = [], []
    for label, topic in enumerate(topics):
        mine = sorted(t for t, o in owners.items() if o == {topic})
        mine = rng.sample(mine, min(max_per_topic, len(mine)))
        texts += mine
        labels += [label] * len(mine)
    ds = Dataset.from_dict({"text": texts, "label": labels})
    ds = ds.cast_column("label", ClassLabel(names=list(topics)))
    return ds.train_test_split(test_size=test_size, stratify_by_column="label", seed=seed)


def topic_splits(seed: int = 0, validation_size: float = 0.2) -> DatasetDict:
    """The course's one split of the topic task: train, validation (a stratified ``validation_size``
    of train, for choosing learning rates and epochs) and test (looked at once, at the end)."""
    if not 0 < validation_size < 1:
        raise ValueError(f"validation_size is a share of the training split in (0, 1), got {validation_size!r}")
    data = topic_classification(seed=seed)
    split = data["train"].train_test_split(test_size=validation_size, stratify_by_column="label", seed=seed)
    return DatasetDict(train=split["train"], validation=split["test"], test=data["test"])


def few_shot(data: Dataset, per_class: int, seed: int = 0) -> Dataset:
    """The first ``per_class`` examples of each label after a seeded shuffle (a class with fewer
    keeps them all), in shuffled order: a small-data version of a split, e.g. 8 per class."""
    _positive_int("per_class", per_class)
    shuffled = data.shuffle(seed=seed)
    taken: dict = {}  # label -> examples kept so far
    keep = []
    for i, label in enumerate(shuffled["label"]):
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            keep.append(i)
    return shuffled.select(keep)


# --- data-to-text -------------------------------------------------------------------------

NAMES = ("The Mill", "Blue Spice", "The Punter", "Zizzi", "Aromi", "The Eagle", "Giraffe",
         "Cotto", "The Phoenix", "Wildwood", "The Wrestlers", "Loch Fyne")
FOODS = ("Italian", "French", "Chinese", "Indian", "Japanese", "English", "Fast food", "Mexican")
AREAS = ("riverside", "city centre")
PRICES = ("cheap", "mid-priced", "expensive")
TEMPLATES = (
    "{name} is a {price} {food} restaurant in the {area}.",
    "In the {area} there is a {price} {food} place called {name}.",
    "{name} serves {price} {food} food in the {area}.",
    "For {price} {food} food in the {area}, try {name}.",
    "{name}, in the {area}, offers {food} dishes at {price} prices.",
)
_SLOT = re.compile(r"(\w+)\[([^\]]*)\]")


def meaning_representation(name, food, area, price) -> str:
    return f"name[{name}] food[{food}] area[{area}] price[{price}]"


def data_to_text(n_train: int = 400, n_test: int = 60, seed: int = 0) -> DatasetDict:
    """(mr, text) pairs; the test set's (name, food) pairs never occur in training."""
    _positive_int("n_train", n_train)
    _positive_int("n_test", n_test)
    rng = random.Random(seed)
    pairs = list(itertools.product(NAMES, FOODS))
    rng.shuffle(pairs)
    held_out = set(pairs[: len(pairs) // 5])

    def sample(n, allowed):
        rows = {"mr": [], "text": []}
        for _ in range(n):
            name, food = rng.choice(allowed)
            slots = dict(name=name, food=food, area=rng.choice(AREAS), price=rng.choice(PRICES))
            text = rng.choice(TEMPLATES).format(**slots)
            rows["mr"].append(meaning_representation(**slots))
            rows["text"].append(text[0].upper() + text[1:])
        return Dataset.from_dict(rows)

    train_pairs = [p for p in pairs if p not in held_out]
    return DatasetDict(train=sample(n_train, train_pairs), test=sample(n_test, sorted(held_out)))


def slot_error_rate(predictions, mrs) -> float:
    """Share of attribute values in the MRs that the predictions fail to mention (case-insensitive)."""
    missing = total = 0
    for prediction, mr in zip(predictions, mrs, strict=True):
        for _, value in _SLOT.findall(mr):
            total += 1
            missing += value.lower() not in prediction.lower()
    if total == 0:
        raise ValueError("no attribute[value] slots found in the meaning representations")
    return missing / total


def lm_prompt(mr: str) -> str:
    """The text the LM sees before the sentence it must write."""
    return f"Describe the restaurant: {mr}\nSentence:"


# --- collators ----------------------------------------------------------------------------

class ClassificationCollator:
    """Examples with ``text`` and ``label`` → a padded batch with ``labels``."""

    def __init__(self, tokenizer, max_length: int = 64):
        self.tokenizer, self.max_length = tokenizer, _positive_int("max_length", max_length)

    def __call__(self, examples):
        if not examples:
            raise ValueError("ClassificationCollator got no examples: a batch needs at least one")
        batch = self.tokenizer([e["text"] for e in examples], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        batch["labels"] = torch.tensor([e["label"] for e in examples])
        return dict(batch)


class CausalLMCollator:
    """Examples with ``mr`` and ``text`` → prompt + sentence + EOS, right-padded.

    Labels are -100 on the prompt and the padding, so the loss counts only the sentence.
    """

    def __init__(self, tokenizer, max_length: int = 96):
        self.tokenizer, self.max_length = tokenizer, _positive_int("max_length", max_length)

    def __call__(self, examples):
        if not examples:
            raise ValueError("CausalLMCollator got no examples: a batch needs at least one")
        tok, rows = self.tokenizer, []
        for e in examples:
            prompt = tok(lm_prompt(e["mr"]), add_special_tokens=False)["input_ids"]
            if len(prompt) >= self.max_length:  # nothing of the sentence would be left to learn
                raise ValueError(f"max_length={self.max_length} cuts off the whole sentence: its prompt alone has "
                                 f"{len(prompt)} tokens; use max_length > {len(prompt)}")
            target = tok(" " + e["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = (prompt + target)[: self.max_length]
            rows.append((ids, ([-100] * len(prompt) + target)[: self.max_length]))
        width = max(len(ids) for ids, _ in rows)
        pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
        return {
            "input_ids": torch.tensor([pad(ids, tok.pad_token_id) for ids, _ in rows]),
            "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _ in rows]),
            "labels": torch.tensor([pad(labels, -100) for _, labels in rows]),
        }


def generation_batch(tokenizer, mrs):
    """Left-padded prompts for ``generate`` (the new tokens must follow each prompt directly)."""
    if isinstance(mrs, str) or not len(mrs):
        raise ValueError(f"mrs must be a non-empty list of meaning representations, got {mrs!r}")
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return dict(tokenizer([lm_prompt(m) for m in mrs], padding=True, add_special_tokens=False,
                              return_tensors="pt"))
    finally:
        tokenizer.padding_side = side

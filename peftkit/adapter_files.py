"""Adapter files: the trained tensors of any technique, as one safetensors file.

Every technique file saves and loads through the same two functions, ``save_adapter(model,
path)`` and ``load_adapter(model, path)``, which use this module. A file holds what the
technique trains plus its config dataclass as JSON in the safetensors metadata, tagged with
the technique's name (``config.technique``), which every load checks. Writes go to a temporary file in the same folder
and are renamed into place, so an interrupted save never leaves a half-written file;
several files that belong together (a peft export) are written into a temporary folder
that then replaces the target folder whole. Reading a truncated or foreign file raises a
ValueError that names it; loading copies all tensors or, on any error, none.
"""

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


def _as_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike such as 'adapter.safetensors', got {type(path).__name__}")
    return Path(path)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by their names in ``model``."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_tensors(tensors: dict[str, torch.Tensor], path, config: dict | None = None) -> Path:
    """Write ``tensors`` (and ``config`` as JSON metadata) to ``path`` atomically."""
    path = _as_path(path)
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise TypeError("tensors must be a dict of name (str) -> torch.Tensor")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; pass a file path such as {path / 'adapter.safetensors'}")
    try:
        metadata = {"config": json.dumps(config or {})}
    except (TypeError, ValueError) as err:
        raise TypeError(f"config must hold only JSON values (str, numbers, lists, dicts): {err}") from err
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_tensors(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read back what :func:`save_tensors` wrote: (tensors, config)."""
    path = _as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            config = json.loads((f.metadata() or {}).get("config", "{}"))
    except (SafetensorError, ValueError) as err:  # json's decode error is a ValueError
        raise ValueError(f"cannot read {path}: it is not a complete safetensors file (truncated, or "
                         f"not an adapter file): {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"cannot read {path}: its saved config is {config!r}, not a JSON object")
    return tensors, config


def write_adapter(tensors: dict[str, torch.Tensor], path, config) -> Path:
    """Write ``tensors`` and ``config`` (a technique's config dataclass) to ``path``, atomically;
    the config goes into the metadata as JSON, with its technique's name under "technique"."""
    if not tensors:
        raise ValueError("the model has no trained tensors to save: add a technique first")
    return save_tensors(tensors, path, {"technique": config.technique, **asdict(config)})


def read_adapter(path, config_class) -> tuple[dict[str, torch.Tensor], object]:
    """(tensors, config) of a file that ``write_adapter`` wrote for ``config_class.technique``,
    the config rebuilt as ``config_class``. A file of another technique, or with a config that
    ``config_class`` refuses, is a ValueError naming both."""
    tensors, config = load_tensors(path)
    technique = config.pop("technique", None)
    if technique != config_class.technique:
        raise ValueError(f"{path} holds a {technique or 'non-peftkit'} adapter, not {config_class.technique}: "
                         f"load it with load_adapter from the file of the technique that saved it ({config})")
    try:
        return tensors, config_class(**config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} holds a {technique} config that cannot be used: {config} ({err})") from err


def copy_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], expected=None, source="the file",
                 config: dict | None = None) -> None:
    """Copy ``tensors`` into the parameters of ``model`` of the same names: all of them or none.

    The names must be exactly ``expected`` (default: every trainable parameter): a missing
    one, one more (a frozen base weight above all) or a shape that differs is a ValueError
    listing them. Any exception while copying puts back the values the model had.
    """
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad} if expected is None else set(expected)
    if expected - params.keys():
        raise ValueError(f"expected names that are no parameters of the model: {sorted(expected - params.keys())}")
    missing = sorted(expected - tensors.keys())
    unexpected = sorted(tensors.keys() - expected)
    shapes = sorted(f"{k}: file {tuple(v.shape)} vs model {tuple(params[k].shape)}"
                    for k, v in tensors.items() if k in expected and v.shape != params[k].shape)
    if missing or unexpected or shapes:
        frozen = [k for k in unexpected if k in params]
        raise ValueError(
            f"adapter file {source} does not fit this model: missing keys {missing}, unexpected keys "
            f"{unexpected}, wrong shapes {shapes}. "
            + (f"{len(frozen)} unexpected keys name parameters the technique does not train (e.g. "
               f"{frozen[0]!r}): an adapter file may not overwrite them. " if frozen else "")
            + f"Inject the same technique with the same config (saved config: {config}) before loading.")
    old = {k: params[k].detach().clone() for k in tensors}
    try:
        with torch.no_grad():
            for k, v in tensors.items():
                params[k].copy_(v)
    except BaseException:
        with torch.no_grad():
            for k, v in old.items():
                params[k].copy_(v)
        raise


@contextmanager
def atomic_folder(path):
    """Yield a new temporary folder beside ``path``; if the block ends without an error, the
    temporary folder replaces ``path`` whole (files already in ``path`` that the block did
    not write are copied over first). On any exception, even KeyboardInterrupt, ``path`` is
    left as it was and the temporary folder is removed."""
    path = Path(os.path.realpath(_as_path(path)))
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; pass the path of a folder to write into")
    if Path.cwd() == path or path in Path.cwd().parents:
        raise ValueError(f"{path} is the working folder (or holds it); pass a subfolder such as {path / 'out'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}", None
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.copymode(path, tmp)
            for entry in os.scandir(path):
                target = tmp / entry.name
                if target.exists():
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.copytree(entry.path, target, symlinks=True)
                else:
                    shutil.copy2(entry.path, target, follow_symlinks=False)
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

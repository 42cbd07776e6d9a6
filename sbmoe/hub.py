"""Backbones and checkpoints by name or folder: a source's one-line check, tokenizer loading, pooling detection, a checkpoint's digest."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer


def checkpoint_digest(path: str | Path) -> str:
    """A checkpoint's identity by content: sha1 of its config.json and model.safetensors (a copy or a move
    keeps it, retraining into the same folder changes it). What metrics.json and export.json record."""
    import hashlib

    h = hashlib.sha1()
    for name in ("config.json", "model.safetensors"):
        with open(Path(path) / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def looks_like_path(name_or_path: str) -> bool:
    """A name that can only mean a local folder (not a hub id such as `org/name`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.replace("/", "", 1):
        return True
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return True
    return False


def check_source(name_or_path: str) -> None:
    """A one-line ValueError when a model is neither a local folder nor reachable on the hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{name_or_path}: a folder without config.json, not a model")
        return
    if path.exists() or looks_like_path(str(name_or_path)):
        raise ValueError(f"{name_or_path}: no such model folder (and not a hub name)")
    try:
        AutoConfig.from_pretrained(name_or_path)  # a local hub cache is enough; online, fetches config.json
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else str(exc).splitlines()[0]
        raise ValueError(f"{name_or_path}: not a local folder and not available from the hub ({why}); "
                         "pass a local model folder") from None  # fmt: skip


class _ExpectedNotices(logging.Filter):
    """Drops the one notice every checkpoint load gives: AutoTokenizer reading our config.json as a generic one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "model of type `moe_retriever` to instantiate a model of type ``" not in record.getMessage()


logging.getLogger("transformers.configuration_utils").addFilter(_ExpectedNotices())


def load_tokenizer(name_or_path: str | Path):
    """The tokenizer of a checkpoint or backbone; a ValueError (one line) when the folder has none."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{name_or_path}: no usable tokenizer ({str(exc).splitlines()[0][:200]})") from None


def detect_pooling(name_or_path: str) -> str:
    """Mean pooling when a local sentence-transformers folder says so, [CLS] otherwise (the paper)."""
    cfg = Path(name_or_path) / "1_Pooling" / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls"

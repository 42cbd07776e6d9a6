"""Encoding: tokenise once (flat int32 ids), encode length-sorted batches under autocast, and the
embedding cache of encoded corpus chunks (`EmbeddingCache`, keyed by `cache_key`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sbmoe.data import corpus_path, dataset_name, iter_corpus
from sbmoe.device import autocast
from sbmoe.files import atomic_write_text, cache_name, file_stat, file_stats, move_into_place

# The lengths (tokens) and the encoding batch of every command line's defaults: train.py, eval.py, frozen.py, export.py
QUERY_MAX_LENGTH, DOC_MAX_LENGTH, BATCH_SIZE = 64, 256, 128

# --------------------------------------------------------------------------------------------
# Encoding


def tokenize(tokenizer, texts: list[str], max_length: int, step: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of every text as one flat int32 array and offsets (4 bytes a token, not a Python int)."""
    flat, lengths = [], []
    for start in range(0, len(texts), step):
        ids = tokenizer(texts[start : start + step], truncation=True, max_length=max_length, add_special_tokens=True)
        ids = ids["input_ids"]
        lengths.append(np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids)))
        flat.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32))
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return (np.concatenate(flat) if flat else np.zeros(0, dtype=np.int32)), offsets


def _pad(ids: np.ndarray, offsets: np.ndarray, rows: np.ndarray, pad_id: int, left: bool):
    """(input_ids, attention_mask) of the given texts, padded as tokenizer.pad would."""
    lengths = offsets[rows + 1] - offsets[rows]
    width = int(lengths.max())
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for r, (i, n) in enumerate(zip(rows, lengths)):
        cols = slice(width - n, width) if left else slice(0, n)
        input_ids[r, cols] = ids[offsets[i] : offsets[i] + n]
        mask[r, cols] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(mask)


def length_sorted_batches(model, tokenizer, texts: list[str], max_length: int, batch_size: int,
                          domain: int | None = None, desc: str = "encode", show_progress: bool = False,
                          tokens: tuple[np.ndarray, np.ndarray] | None = None):  # fmt: skip
    """(rows, model inputs) of length-sorted batches, on the model's device; the model in eval mode meanwhile.
    The one length-sorted batching of the project (encode_texts, routing_counts, the frozen study's backbone
    pass); `tokens`: the texts' `tokenize` output, when the caller needs it too."""
    device = next(model.parameters()).device
    ids, offsets = tokens if tokens is not None else tokenize(tokenizer, texts, max_length)
    order = np.argsort(-np.diff(offsets), kind="stable")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_progress, leave=False):
            rows = order[start : start + batch_size]
            input_ids, mask = _pad(ids, offsets, rows, pad_id, left)
            args = (input_ids.to(device), mask.to(device))
            if domain is not None:  # (an exported graph takes no domains: it is never given one)
                args += (torch.full((len(rows),), domain, dtype=torch.long, device=device),)
            yield rows, args
    finally:
        model.train(was_training)


@torch.inference_mode()
def encode_texts(
    model,
    tokenizer,
    texts: list[str],
    max_length: int,
    batch_size: int = BATCH_SIZE,
    bf16: bool = False,
    fp16: bool = False,
    desc: str = "encode",
    show_progress: bool = True,
    domain: int | None = None,
) -> np.ndarray:
    """(N, H) float32 embeddings; batches sorted by length so padding stays small. `domain`: the dataset index
    every text is routed to under SB-MoE's `--routing domain` (None: no dataset of the model's)."""
    device = next(model.parameters()).device
    out = np.empty((len(texts), model.config.backbone_config["hidden_size"]), dtype=np.float32)
    for rows, args in length_sorted_batches(model, tokenizer, texts, max_length, batch_size, domain, desc, show_progress):
        with autocast(device, bf16=bf16, fp16=fp16):
            reps = model.encode(*args)
        out[rows] = reps.float().cpu().numpy()
    return out


@torch.inference_mode()
def routing_counts(model, tokenizer, texts: list[str], max_length: int, batch_size: int = BATCH_SIZE,
                   bf16: bool = False, fp16: bool = False, domain: int | None = None) -> np.ndarray:  # fmt: skip
    """(blocks, experts) how many routed units (inputs for a pooled SB-MoE head, non-padding tokens for the
    per-token designs and the token-level MoE) chose each expert first, as the router decides in top-1 mode
    (SB-MoE's `all` inference mode would hide the decision: it mixes every expert)."""
    device = next(model.parameters()).device
    blocks = model.moe_blocks()
    counts = np.zeros((len(blocks), max(len(b.experts) for b in blocks)), dtype=np.int64)
    mode, model.config.inference_mode = model.config.inference_mode, "top1"
    try:
        for _, args in length_sorted_batches(model, tokenizer, texts, max_length, batch_size, domain, "routing"):
            with autocast(device, bf16=bf16, fp16=fp16):
                routings = model.embed_with(*args[:2], args[2] if len(args) > 2 else None).routings
            for b, routing in enumerate(routings):
                first = routing.indices[:, 0].cpu().numpy()
                counts[b] += np.bincount(first, minlength=counts.shape[1])[: counts.shape[1]]
    finally:
        model.config.inference_mode = mode
    return counts


def model_domain(model, data_dir: Path) -> int | None:
    """The index of the dataset being evaluated among the model's training datasets (`config.domains`), or None.
    Under `--routing domain` that index is the expert its queries and documents go to; a dataset the model was
    not trained on (zero-shot transfer) has no expert of its own, and gets every expert at 1/E (said here)."""
    domains = getattr(model.config, "domains", None) or []
    name = dataset_name(data_dir)
    if name in domains:
        return domains.index(name)
    if getattr(model.config, "routing", None) == "domain":
        print(f"{name}: not one of the training datasets {domains}; --routing domain gives every expert 1/E")
    return None


ROUTING_SAMPLE_SEED = 0


def routing_record(model, tokenizer, data_dir: Path, n_docs: int, queries: list[str], sample: int,
                   lengths: tuple[int | None, int | None], domain: int | None, **kw) -> dict:  # fmt: skip
    """A `<tag>.routing.json` record: first-choice expert counts per block (`routing_counts`) on the queries and
    on a seeded sample of `sample` of the corpus' `n_docs` documents, at (query, document) `lengths`."""
    picked = set(random.Random(ROUTING_SAMPLE_SEED).sample(range(n_docs), min(sample, n_docs)))
    texts = [t for i, (_, t) in enumerate(iter_corpus(data_dir)) if i in picked]
    counts = {"queries": routing_counts(model, tokenizer, queries, lengths[0], domain=domain, **kw),
              "documents": routing_counts(model, tokenizer, texts, lengths[1], domain=domain, **kw)}  # fmt: skip
    unit = "tokens" if model.head_on_tokens() or model.config.kind == "moe" else "inputs"
    return {"dataset": dataset_name(data_dir), "domain": domain, "n_queries": len(queries), "n_documents": len(texts),
            "lengths": list(lengths), "sample_seed": ROUTING_SAMPLE_SEED, "unit": unit,
            **{k: v.tolist() for k, v in counts.items()}}  # fmt: skip


# --------------------------------------------------------------------------------------------
# The embedding cache: encoded chunks on disk


class EmbeddingCache:
    """Encoded chunks as `<root>/<hash of key>/chunk-<start>-<stop>.npy`, written atomically and read
    back as memory maps. The key names everything the embeddings depend on (see `cache_key`)."""

    def __init__(self, root: str | Path, key: dict, readonly: bool = False):
        self.dir = Path(root) / cache_name(key)
        self.readonly = readonly  # reads what is there, writes nothing (eval.py on a checkpoint's dev passes)
        if not readonly:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not (self.dir / "key.json").is_file():
                atomic_write_text(self.dir / "key.json", json.dumps(key, indent=2, sort_keys=True, default=str))
        self.hits = self.misses = 0

    def path(self, start: int, stop: int) -> Path:
        return self.dir / f"chunk-{start:012d}-{stop:012d}.npy"

    def load(self, start: int, stop: int, dim: int) -> np.ndarray | None:
        path = self.path(start, stop)
        try:
            emb = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            self.misses += 1
            return None
        if emb.shape != (stop - start, dim) or emb.dtype != np.float32:
            self.misses += 1
            return None
        self.hits += 1
        return emb

    def save(self, start: int, stop: int, emb: np.ndarray) -> None:
        if self.readonly:
            return
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".chunk-", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, np.ascontiguousarray(emb, dtype=np.float32))
            move_into_place(tmp, self.path(start, stop))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


REUSE_DIR = ".embedding-cache"  # inside a checkpoint folder: training's dev-pass corpus embeddings, for eval.py
ENCODING_CONFIG = ("kind", "pooling", "normalize", "inference_mode", "design", "routing", "num_experts", "top_k",
                   "gate_temperature", "expert_dim", "moe_layers", "backbone_config")  # fmt: skip


def weights_digest(model) -> str:
    """A hash of every tensor of the model's state (names, shapes, dtypes, bytes): equal exactly when the
    weights are, whether they sit in the training process or were read back from the checkpoint."""
    h = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def content_key(model, data_dir: Path, n_docs: int, doc_max_length: int, dtype: str, batch_size: int,
                encode_chunk: int, domain: int | None) -> dict:  # fmt: skip
    """What a corpus' embeddings depend on, by content: the weights (`weights_digest`), the settings that shape
    encoding, the corpus file and its size, truncation, autocast dtype, batch size (padding changes the last
    bits), chunking, the domain routed to and the device type. Training's dev passes and eval.py compute the
    same key for the same model and data, so the test evaluation reuses the selected checkpoint's dev pass."""
    config = model.config.to_dict()
    return {
        "weights": weights_digest(model), "config": {k: config.get(k) for k in ENCODING_CONFIG},
        "data_dir": str(Path(data_dir).resolve()), "corpus_file": file_stat(corpus_path(data_dir)), "n_docs": n_docs,
        "doc_max_length": doc_max_length, "dtype": dtype, "batch_size": batch_size, "encode_chunk": encode_chunk,
        "domain": domain, "device": next(model.parameters()).device.type,
    }  # fmt: skip


def prune_reuse_cache(folder: Path, model) -> int:
    """Keep in `<folder>/.embedding-cache` only the entries of the model's final weights; returns how many stay."""
    root, keep = Path(folder) / REUSE_DIR, weights_digest(model)
    kept = 0
    for entry in sorted(root.glob("*/key.json")) if root.is_dir() else []:
        if json.loads(entry.read_text()).get("weights") == keep:
            kept += 1
        else:
            shutil.rmtree(entry.parent, ignore_errors=True)
    return kept


def cache_key(source: str, model, data_dir: Path, n_docs: int, doc_max_length: int, dtype: str,
              batch_size: int) -> dict:  # fmt: skip
    """What a corpus' embeddings depend on: the model (its folder's files by size and mtime, its config:
    pooling, inference mode, ...), the corpus file, its size, truncation, autocast dtype, batch size
    (padding changes the last bits) and the device type."""
    folder = Path(source)
    files = file_stats(folder) if folder.is_dir() else None
    device = next(model.parameters()).device.type
    return {
        "model": str(folder.resolve()) if folder.is_dir() else source, "model_files": files,
        "config": model.config.to_dict(), "data_dir": str(Path(data_dir).resolve()),
        "corpus_file": file_stat(corpus_path(data_dir)), "n_docs": n_docs, "doc_max_length": doc_max_length,
        "dtype": dtype, "batch_size": batch_size, "device": device,
    }  # fmt: skip

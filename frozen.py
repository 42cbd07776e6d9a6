"""Frozen-backbone head study: the backbone runs once, heads train on its cached outputs in seconds.

    python frozen.py --kind sbmoe --design sokli --model_name_or_path M --dataset scifact --seed 42 \
        --output_dir checkpoints/frozen/sokli/seed42 --eval_output_dir results/frozen/sokli/seed42 --eval_splits test

The arguments are train.py's (the head learns at --moe_learning_rate; epochs, batch size, warm-up, weight
decay, seed and dev selection as there) plus `FrozenArguments`. The backbone's outputs for every document
and query (pooled vectors, and the non-padding token states for a head that works per token) are cached
on disk once per (backbone, texts, length). Each epoch samples one positive per training query, as
train.py does; dev NDCG@10 after each epoch picks the best epoch. Evaluation applies the head to the
cached document vectors and scores the run with the same search and metrics code as eval.py, writing the
same files. `--kind baseline` has no head: it evaluates the backbone's vectors as they are (zero-shot).
A saved head (`head.safetensors` beside `config.json`) is reused: a second call with other evaluation
flags (`--inference_mode all`) only evaluates.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import get_linear_schedule_with_warmup

import analysis as an
from eval import search
from model import BiEncoder, Embedding, load_tokenizer
from train import ContrastiveDataset, build_model, load_data, mine_negatives, parse, positive_ids
from utils import (
    MAX_CUTOFF,
    DataError,
    FolderLock,
    atomic_write_text,
    check_writable,
    doc_text,
    fail,
    load_beir,
    mean_metrics,
    per_query_metrics,
    resolve_data_dir,
    set_seed,
)


@dataclass
class FrozenArguments:
    eval_output_dir: str | None = field(default=None, metadata={"help": "write eval.py's files in DIR/<split>/"})
    eval_splits: list[str] = field(default_factory=lambda: ["test"], metadata={"help": "splits to evaluate"})
    tag: str | None = field(default=None, metadata={"help": "name of the run files (default: the kind)"})
    trec_depth: list[str] = field(default_factory=list, metadata={"help": "SPLIT=K: keep only the top K in the file"})
    inference_mode: str | None = field(default=None, metadata={"help": "SB-MoE routing at evaluation: top1 | all"})
    embedding_cache: str = field(default="cache/frozen", metadata={"help": "where the backbone's outputs are kept"})


# --------------------------------------------------------------------------------------------
# The backbone's outputs, computed once


@dataclass
class Features:
    """Backbone outputs for a list of texts: pooled (N, H) float32, non-padding token states (M, H) fp16
    concatenated, and row offsets (N + 1) into them."""

    pooled: np.ndarray
    tokens: np.ndarray
    offsets: np.ndarray

    def hidden(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded (B, T, H) float32 token states and their (B, T) mask for some rows."""
        spans = [(self.offsets[r], self.offsets[r + 1]) for r in rows]
        T = max(b - a for a, b in spans)
        hidden = torch.zeros(len(rows), T, self.tokens.shape[1])
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, (a, b) in enumerate(spans):
            hidden[i, : b - a] = torch.from_numpy(np.asarray(self.tokens[a:b], dtype=np.float32))
            mask[i, : b - a] = 1
        return hidden, mask


@torch.inference_mode()
def encode_features(model: BiEncoder, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> Features:
    """One pass of the backbone, length-sorted batches; the pooled vector is the model's own pooling."""
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([-len(x) for x in ids], kind="stable")
    lengths = np.array([len(x) for x in ids])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    pooled = np.empty((len(texts), model.config.backbone_config["hidden_size"]), dtype=np.float32)
    tokens = np.empty((offsets[-1], pooled.shape[1]), dtype=np.float16)
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])  # (B, T, H)
        pooled[rows] = model.pool(hidden, batch["attention_mask"]).float().numpy()
        for i, r in enumerate(rows):
            tokens[offsets[r] : offsets[r + 1]] = hidden[i, : lengths[r]].to(torch.float16).numpy()
    return Features(pooled, tokens, offsets)


def digest(texts: list[str]) -> str:
    return hashlib.sha1("\x00".join(texts).encode()).hexdigest()


def cached_features(folder: Path, key: list, compute) -> Features:
    """`compute()` once per key; kept as three .npy files (written to temp names, then renamed), memory-mapped."""
    folder = folder / hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]
    names = ("pooled", "tokens", "offsets")
    if not all((folder / f"{n}.npy").is_file() for n in names):
        feats = compute()
        folder.mkdir(parents=True, exist_ok=True)
        for n in names:
            tmp = folder / f".{n}.{os.getpid()}.{threading.get_ident()}.tmp.npy"  # parallel jobs never share one
            np.save(tmp, getattr(feats, n))
            tmp.replace(folder / f"{n}.npy")
    return Features(*(np.load(folder / f"{n}.npy", mmap_mode="r") for n in names))


# --------------------------------------------------------------------------------------------
# The head on cached features


def head(model: BiEncoder, feats: Features, rows) -> Embedding:
    """The model from the backbone's output on: what `model.embed` would give for these texts."""
    if model.head_on_tokens():
        return model.embed_hidden(*feats.hidden(rows))
    return model.embed_pooled(torch.from_numpy(np.asarray(feats.pooled[rows], dtype=np.float32)))


@torch.no_grad()
def encode_all(model: BiEncoder, feats: Features, batch_size: int = 256) -> np.ndarray:
    """(N, H) final, normalised representations of every row, in evaluation mode."""
    was_training = model.training
    model.eval()
    out = [model._norm(head(model, feats, list(range(a, min(a + batch_size, len(feats.offsets) - 1)))).reps)
           for a in range(0, len(feats.offsets) - 1, batch_size)]  # fmt: skip
    model.train(was_training)
    return torch.cat(out).numpy()


def retrieve_cached(model, doc_feats: Features, doc_ids: list[str], q_feats: Features, q_rows: dict[str, int],
                    qids: list[str], top_k: int = MAX_CUTOFF) -> dict:  # fmt: skip
    """eval.py's exact search over the head's document vectors."""
    d = encode_all(model, doc_feats)
    q = encode_all(model, q_feats)[[q_rows[x] for x in qids]]
    return search(q, d, doc_ids, qids, top_k)


# --------------------------------------------------------------------------------------------
# Training


def train_head(model, margs, targs, data, negatives, num_negatives: int, sampling: str, log) -> list[dict]:
    """AdamW on the head alone, linear warm-up and decay, the best epoch on dev kept; returns the history."""
    corpus_ids, doc_feats, q_feats, q_rows, train_qrels, dev_qrels = data
    doc_index = {d: i for i, d in enumerate(corpus_ids)}
    trainable = model.moe_parameter_names()
    params = [p for n, p in model.named_parameters() if n in trainable]
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    dataset = ContrastiveDataset(None, train_qrels, negatives, num_negatives, targs.seed, sampling=sampling)
    B = targs.per_device_train_batch_size
    steps_per_epoch = len(dataset) // B
    if steps_per_epoch == 0:
        raise DataError(f"{len(dataset)} training examples are fewer than one batch of {B}")
    epochs = math.ceil(targs.num_train_epochs)
    total = min(epochs * steps_per_epoch, targs.max_steps if targs.max_steps > 0 else 10**12)
    optimizer = torch.optim.AdamW(params, lr=margs.moe_learning_rate, weight_decay=targs.weight_decay)
    warmup = int(targs.warmup_steps * total) if targs.warmup_steps < 1 else int(targs.warmup_steps)
    schedule = get_linear_schedule_with_warmup(optimizer, warmup, total)
    width = max(sum(1 for r in docs.values() if r > 0) for docs in train_qrels.values())
    history, best, best_state, step = [], -1.0, None, 0
    dev_qids = sorted(dev_qrels)
    model.train()
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        order = np.random.default_rng([targs.seed, epoch]).permutation(len(dataset))
        losses, load = [], None
        for b in range(steps_per_epoch):
            if step >= total:
                break
            examples = [dataset[int(i)] for i in order[b * B : (b + 1) * B]]
            qids = [e["qid"] for e in examples]
            docs = [doc_index[d] for e in examples for d in e["docs"]]
            out = model.contrastive(head(model, q_feats, [q_rows[q] for q in qids]), head(model, doc_feats, docs),
                                    torch.tensor(docs), positive_ids(train_qrels, qids, doc_index, width))  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            losses.append(out.contrastive_loss.item())
            if out.expert_load is not None:
                load = out.expert_load if load is None else load + out.expert_load
        row = {"epoch": float(epoch + 1), "step": step, an.LOSS_KEY: float(np.mean(losses)) if losses else None}
        if load is not None:
            shares = load / load.sum(-1, keepdim=True)
            row.update({an.expert_share_key(b, e): round(v.item(), 4) for b, r in enumerate(shares)
                        for e, v in enumerate(r)})  # fmt: skip
        history.append(row)
        if targs.eval_strategy != "no":
            run = retrieve_cached(model, doc_feats, corpus_ids, q_feats, q_rows, dev_qids)
            dev = mean_metrics(per_query_metrics(dev_qrels, run))["NDCG@10"]
            history.append({"epoch": float(epoch + 1), "step": step, an.DEV_KEY: dev})
            if dev > best:
                best, best_state = dev, {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}
            log(f"epoch {epoch + 1}: InfoNCE {row[an.LOSS_KEY]:.4f}, dev NDCG@10 {dev:.4f}")
        if step >= total:
            break
    if best_state is not None:  # the best epoch on dev, as train.py's load_best_model_at_end
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in best_state:
                    p.copy_(best_state[n])
    model.eval()
    return history


# --------------------------------------------------------------------------------------------
# Entry point


HEAD_TRAINING = ("seed", "num_train_epochs", "max_steps", "per_device_train_batch_size", "learning_rate",
                 "warmup_steps", "weight_decay", "eval_strategy")  # the training arguments a head depends on


def head_settings(margs, dargs, targs, data: str) -> dict:
    """Everything a trained head depends on (model and data arguments, its training arguments, the texts):
    a saved head is reused only under the same settings."""
    settings = {k: v for k, v in {**asdict(margs), **asdict(dargs)}.items() if k not in ("cache_dir", "data_dir")}
    settings.update({k: getattr(targs, k) for k in HEAD_TRAINING}, data=data)
    return json.loads(json.dumps(settings, default=str))


def check_head_settings(out: Path, settings: dict) -> None:
    """A DataError naming the differences when the head in `out` was trained under other settings."""
    info = json.loads((out / "run_info.json").read_text()) if (out / "run_info.json").is_file() else {}
    saved = info.get("head_settings")
    if saved is None:
        raise DataError(f"{out}: a head saved without its settings; delete the folder or use another --output_dir")
    diff = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
    if diff:
        shown = ", ".join(f"{k}={saved.get(k)!r} there, {settings.get(k)!r} here" for k in diff[:3])
        raise DataError(f"{out}: holds a head trained with other settings ({shown}); use another --output_dir")


def backbone_fingerprint(name_or_path: str) -> list:
    """The backbone's identity for the feature cache: a local folder's files (name, size, mtime), else its name."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return [str(name_or_path)]
    return [str(name_or_path)] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.iterdir())
                                  if f.is_file() and f.suffix in (".json", ".safetensors", ".bin", ".txt")]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    margs, dargs, targs, fargs = parse(None, argv, extra=(FrozenArguments,))
    set_seed(targs.seed)
    torch.manual_seed(targs.seed)
    out = Path(targs.output_dir)
    if fargs.inference_mode not in (None, "top1", "all"):
        fail(f"--inference_mode {fargs.inference_mode}: expected top1 or all")
    try:
        check_writable(out)
        for split in fargs.eval_splits if fargs.eval_output_dir else []:
            check_writable(Path(fargs.eval_output_dir) / split, "--eval_output_dir")
        depth = {k: int(v) for k, v in (x.split("=") for x in fargs.trec_depth)}
        if any(k not in fargs.eval_splits or v < 1 for k, v in depth.items()):
            raise ValueError
    except ValueError:
        fail(f"--trec_depth {' '.join(fargs.trec_depth)}: expected SPLIT=K entries, K >= 1, splits of --eval_splits")
    except DataError as exc:
        fail(str(exc))
    try:
        corpus, queries, train_qrels, dev_qrels, cache, dev_info = load_data(dargs, targs.seed)
        data_dir = resolve_data_dir(dargs.dataset, dargs.data_dir)
        splits = {s: load_beir(data_dir, s)[1:] for s in fargs.eval_splits}
    except DataError as exc:
        fail(str(exc))
    model = build_model(margs)
    if any(n.startswith("encoder.") for n in model.moe_parameter_names()):
        fail(f"--kind {margs.kind}: its MoE sits inside the backbone, so the backbone cannot be frozen")
    try:
        tokenizer = load_tokenizer(margs.model_name_or_path)
    except ValueError as exc:
        fail(str(exc))
    all_queries = {**queries, **{q: t for qs, _ in splits.values() for q, t in qs.items()}}
    qids_all = sorted(all_queries)
    key = [*backbone_fingerprint(margs.model_name_or_path), model.config.pooling]  # + the texts encoded
    folder = Path(fargs.embedding_cache)
    start = time.time()
    doc_texts = [doc_text(d) for d in corpus.values()]
    q_texts = [all_queries[q] for q in qids_all]
    doc_feats = cached_features(folder, [*key, "docs", dargs.doc_max_length, digest(doc_texts)],
                                lambda: encode_features(model, tokenizer, doc_texts, dargs.doc_max_length))
    q_feats = cached_features(folder, [*key, "queries", dargs.query_max_length, digest(q_texts)],
                              lambda: encode_features(model, tokenizer, q_texts, dargs.query_max_length))
    q_rows = {q: i for i, q in enumerate(qids_all)}
    print(f"frozen {margs.kind}: backbone outputs ready in {time.time() - start:.0f}s "
          f"({len(corpus)} documents, {len(qids_all)} queries)", flush=True)  # fmt: skip
    trainable = model.moe_parameter_names()
    saved = out / "head.safetensors"
    history = []
    judged = sorted({**train_qrels, **dev_qrels})  # what training saw: documents, judgments, their queries
    trained_on = json.dumps([train_qrels, dev_qrels, [queries[q] for q in judged]], sort_keys=True)
    settings = head_settings(margs, dargs, targs, digest([*doc_texts, trained_on]))
    try:
        with FolderLock(out):  # one writer per head folder
            if saved.is_file():
                check_head_settings(out, settings)
                model.load_state_dict(load_file(saved), strict=False)
                history = an.read_log_history(out) if (out / "log_history.json").is_file() else []
                print(f"frozen {margs.kind}: head loaded from {saved}", flush=True)
            elif trainable:
                negatives = mine_negatives(model, tokenizer, corpus, queries, train_qrels, cache, margs, dargs, targs)
                data = (list(corpus), doc_feats, q_feats, q_rows, train_qrels, dev_qrels)
                history = train_head(model, margs, targs, data, negatives, dargs.hard_negatives, dargs.sampling,
                                     lambda m: print(f"frozen {margs.kind}: {m}", flush=True))  # fmt: skip
                model.config.save_pretrained(out)
                an.write_log_history(out, history)
                info = {"frozen_backbone": True, "dev": dev_info, "head_settings": settings}
                atomic_write_text(out / "run_info.json", json.dumps(info, indent=1))
                tmp = out / f".head.{os.getpid()}.safetensors"  # last, and whole: it marks the run as trained
                save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if n in trainable}, tmp)
                tmp.replace(saved)
    except DataError as exc:
        fail(str(exc))
    if fargs.inference_mode:
        model.config.inference_mode = fargs.inference_mode
    if fargs.eval_output_dir:
        evaluate(model, fargs, (list(corpus), doc_feats, q_feats, q_rows), splits, data_dir.name, str(out))


def evaluate(model, fargs, data, splits: dict, dataset: str, source: str) -> None:
    """eval.py's files in a folder per split: `<tag>.trec.gz`, `<tag>.perquery.json.gz`, `metrics.json`."""
    doc_ids, doc_feats, q_feats, q_rows = data
    tag = fargs.tag or model.config.kind
    depth = {k: int(v) for k, v in (x.split("=") for x in fargs.trec_depth)}
    d, q = encode_all(model, doc_feats), encode_all(model, q_feats)  # the head on the documents once, every split
    for split, (queries, qrels) in splits.items():
        folder = Path(fargs.eval_output_dir) / split
        qids = list(queries)
        run = search(q[[q_rows[x] for x in qids]], d, doc_ids, qids, MAX_CUTOFF)
        meta = {"split": split, "dataset": dataset, "checkpoints": {tag: source}, "dtype": "fp32",
                "frozen_backbone": True}  # fmt: skip
        metrics = an.write_evaluation(folder, tag, run, qrels, depth.get(split, MAX_CUTOFF), meta)
        print(f"{tag}/{split}: NDCG@10 {metrics['NDCG@10']:.4f}, Recall@100 {metrics['Recall@100']:.4f}")


if __name__ == "__main__":
    main()

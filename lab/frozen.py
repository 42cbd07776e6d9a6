"""Frozen-backbone head study: the backbone runs once, heads train on its cached outputs in seconds.

    python frozen.py --kind sbmoe --design sokli --model_name_or_path M --dataset scifact --seed 42 \
        --output_dir checkpoints/frozen/sokli/seed42 --eval_output_dir results/frozen/sokli/seed42 --eval_splits test

The arguments are train.py's (the head learns at --moe_learning_rate; epochs, batch size, warm-up, weight
decay, seed and dev selection as there) plus `FrozenArguments`. The backbone's outputs for every document
and query (pooled vectors, and the non-padding token states for a head that works per token) are cached
on disk once per (backbone, texts, length). The head trains with train.py's ContrastiveTrainer, fed those
outputs instead of tokens: the same sampling (one positive per training query an epoch), optimizer groups,
schedule, logging (expert shares included), checkpoints and best epoch on dev NDCG@10. Evaluation applies
the head to the cached document vectors and scores the run with the same search and metrics code as
eval.py, writing the same files. `--kind baseline` has no head: it evaluates the backbone's vectors as they
are (zero-shot). A saved head (`head.safetensors` beside `config.json`) is reused: a second call with other
evaluation flags (`--inference_mode all`) only evaluates.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model import BiEncoder
from sbmoe import results as an
from sbmoe.config import Embedding, RetrieverOutput
from sbmoe.data import DataError, data_dirs, doc_text, load_data, load_split
from sbmoe.device import set_seed
from sbmoe.encoding import length_sorted_batches, tokenize
from sbmoe.files import FolderLock, atomic_write_text, cache_name, file_stats
from sbmoe.hub import load_tokenizer
from sbmoe.layers import sequence_keys, token_keys
from sbmoe.metrics import MAX_CUTOFF, PRIMARY_METRIC, mean_metrics, per_query_metrics
from sbmoe.negatives import default_cache_dir
from sbmoe.search import search
from sbmoe.trainer import ContrastiveDataset, ContrastiveTrainer, EpochCallback, NonFiniteLossError, positive_ids
from train import build_model, mine_negatives, parse
from utils import check_writable, fail


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
    concatenated, the tokens' integer routing keys (M,) (model.token_keys), and row offsets (N + 1) into them."""

    pooled: np.ndarray
    tokens: np.ndarray
    keys: np.ndarray
    offsets: np.ndarray

    def hidden(self, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded (B, T, H) float32 token states, their (B, T) mask and (B, T) routing keys for some rows."""
        spans = [(self.offsets[r], self.offsets[r + 1]) for r in rows]
        T = max(b - a for a, b in spans)
        hidden = torch.zeros(len(rows), T, self.tokens.shape[1])
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        keys = torch.zeros(len(rows), T, dtype=torch.long)
        for i, (a, b) in enumerate(spans):
            hidden[i, : b - a] = torch.from_numpy(np.asarray(self.tokens[a:b], dtype=np.float32))
            mask[i, : b - a] = 1
            keys[i, : b - a] = torch.from_numpy(np.array(self.keys[a:b], dtype=np.int64))  # a copy: the cache is read-only
        return hidden, mask, keys

    def sequence_keys(self, rows) -> torch.Tensor:
        """(B,) the rows' sequence routing keys, as `model.embed` computes them."""
        sums = np.add.reduceat(np.asarray(self.keys, dtype=np.int64), self.offsets[:-1])[rows]
        return sequence_keys(torch.from_numpy(np.asarray(sums, dtype=np.int64))[:, None])


@torch.inference_mode()
def encode_features(model: BiEncoder, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> Features:
    """One pass of the backbone in sbmoe.encoding's length-sorted batches; the pooled vector is the model's own
    pooling."""
    ids, offsets = tokenize(tokenizer, texts, max_length)
    lengths = np.diff(offsets)
    pooled = np.empty((len(texts), model.config.backbone_config["hidden_size"]), dtype=np.float32)
    tokens = np.empty((offsets[-1], pooled.shape[1]), dtype=np.float16)
    keys = np.empty(offsets[-1], dtype=np.int64)
    for rows, (input_ids, mask) in length_sorted_batches(model, tokenizer, texts, max_length, batch_size,
                                                         tokens=(ids, offsets)):  # fmt: skip
        hidden = model.hidden_states(input_ids, mask)  # (B, T, H)
        pooled[rows] = model.pool(hidden, mask).float().cpu().numpy()
        batch_keys = token_keys(input_ids, mask)
        for i, r in enumerate(rows):
            tokens[offsets[r] : offsets[r + 1]] = hidden[i, : lengths[r]].to(torch.float16).cpu().numpy()
            keys[offsets[r] : offsets[r + 1]] = batch_keys[i, : lengths[r]].cpu().numpy()
    model.eval()
    return Features(pooled, tokens, keys, offsets)


def digest(texts: list[str]) -> str:
    return hashlib.sha1("\x00".join(texts).encode()).hexdigest()


def cached_features(folder: Path, key: list, compute) -> Features:
    """`compute()` once per key; kept as three .npy files (written to temp names, then renamed), memory-mapped."""
    folder = folder / cache_name(key)
    names = ("pooled", "tokens", "keys", "offsets")
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


def features(feats: Features, rows, per_token: bool) -> tuple[torch.Tensor, ...]:
    """What the head takes for some rows: padded token states (B, T, H), their mask and routing keys (B, T) for a
    head that works per token, else the pooled vectors (B, H) and their routing keys (B,)."""
    if per_token:
        return feats.hidden(rows)
    return torch.from_numpy(np.asarray(feats.pooled[rows], dtype=np.float32)), feats.sequence_keys(rows)


def head(model: BiEncoder, x: tuple[torch.Tensor, ...]) -> Embedding:
    """The model from the backbone's output on: what `model.embed` would give for these texts."""
    return model.embed_hidden(*x) if model.head_on_tokens() else model.embed_pooled(*x)


@torch.no_grad()
def encode_all(model: BiEncoder, feats: Features, batch_size: int = 256) -> np.ndarray:
    """(N, H) final, normalised representations of every row, in evaluation mode."""
    was_training = model.training
    model.eval()
    n, out = len(feats.offsets) - 1, []
    for a in range(0, n, batch_size):
        x = features(feats, list(range(a, min(a + batch_size, n))), model.head_on_tokens())
        out.append(model.normalize_reps(head(model, [t.to(model.device) for t in x]).reps).cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


class CachedHead:
    """A head on a frozen backbone as a retriever (sbmoe.retrieval.Retriever's `search(corpus, queries, top_k)`): the
    head applied once to the cached features of every document and query, then the exact search of search.py."""

    def __init__(self, model, doc_ids: list[str], doc_feats: Features, q_feats: Features, q_rows: dict[str, int]):
        self.doc_ids, self.q_rows = doc_ids, q_rows
        self.docs, self.queries = encode_all(model, doc_feats), encode_all(model, q_feats)

    def search(self, corpus, queries, top_k: int = MAX_CUTOFF) -> dict:
        if len(corpus) != len(self.doc_ids) or any(d not in corpus for d in self.doc_ids):
            raise DataError(f"a corpus of {len(corpus)} documents is not the one whose features are cached")
        qids = list(queries)
        unknown = [q for q in qids if q not in self.q_rows]
        if unknown:
            raise DataError(f"query {unknown[0]!r}: its backbone output is not among the cached features")
        return search(self.queries[[self.q_rows[q] for q in qids]], self.docs, self.doc_ids, qids, top_k)


def retrieve_cached(model, doc_feats: Features, doc_ids: list[str], q_feats: Features, q_rows: dict[str, int],
                    qids: list[str], top_k: int = MAX_CUTOFF) -> dict:  # fmt: skip
    """The head's run for these queries (the dev evaluation each epoch: the head changes between calls)."""
    return CachedHead(model, doc_ids, doc_feats, q_feats, q_rows).search(dict.fromkeys(doc_ids), qids, top_k)


# --------------------------------------------------------------------------------------------
# Training: train.py's ContrastiveTrainer, fed cached features


class HeadOnFeatures(nn.Module):
    """The Trainer's model: a batch of cached backbone outputs in, the model's InfoNCE output out.

    It holds the model's modules outside the backbone, under their own names, so the Trainer's optimizer,
    checkpoints and best-epoch restore see the head alone; the backbone is frozen besides.
    """

    def __init__(self, model: BiEncoder):
        super().__init__()
        trainable = model.moe_parameter_names()
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
        for name, module in model.named_children():
            if name != "encoder":
                self.add_module(name, module)
        object.__setattr__(self, "model", model)  # not a submodule: the backbone stays out of the Trainer's sight

    def moe_parameter_names(self) -> set[str]:
        return self.model.moe_parameter_names()  # the head's names are the same here

    def train(self, mode: bool = True) -> HeadOnFeatures:
        self.model.train(mode)  # the model's own flag picks the routing and the auxiliary loss
        return super().train(mode)

    def forward(self, queries: tuple, docs: tuple, doc_ids: torch.Tensor, pos_ids: torch.Tensor) -> RetrieverOutput:
        return self.model.contrastive(head(self.model, queries), head(self.model, docs), doc_ids, pos_ids)


class FeatureCollator:
    """ContrastiveDataset's examples as cached backbone outputs, as train.py's collator gives them as tokens:
    queries (B), documents (B*(1+N), positive first), and the ids that mask false negatives."""

    def __init__(self, q_feats: Features, q_rows: dict[str, int], doc_feats: Features, doc_ids: list[str],
                 qrels: dict, per_token: bool):  # fmt: skip
        self.q_feats, self.q_rows, self.doc_feats, self.qrels = q_feats, q_rows, doc_feats, qrels
        self.per_token = per_token
        self.doc_index = {d: i for i, d in enumerate(doc_ids)}
        self.width = max(sum(1 for r in docs.values() if r > 0) for docs in qrels.values())

    def __call__(self, examples: list[dict]) -> dict:
        qids = [e["qid"] for e in examples]
        docs = [self.doc_index[d] for e in examples for d in e["docs"]]
        return {
            "queries": features(self.q_feats, [self.q_rows[q] for q in qids], self.per_token),
            "docs": features(self.doc_feats, docs, self.per_token),
            "doc_ids": torch.tensor(docs),
            "pos_ids": positive_ids(self.qrels, qids, self.doc_index, self.width),
        }


class FrozenTrainer(ContrastiveTrainer):
    """ContrastiveTrainer with dev evaluation on the cached features: exact search over the head's vectors."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval") -> dict[str, float]:
        doc_ids, doc_feats, q_feats, q_rows, qrels = self.dev_data
        run = retrieve_cached(self.model.model, doc_feats, doc_ids, q_feats, q_rows, sorted(qrels))
        scores = mean_metrics(per_query_metrics(qrels, run))
        metrics = {f"{metric_key_prefix}_{k.lower()}": v for k, v in scores.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def train_head(model: BiEncoder, margs, targs, data: tuple, negatives: dict, num_negatives: int,
               sampling: str) -> list[dict]:  # fmt: skip
    """The head trained as train.py trains a model (at --moe_learning_rate, the best dev epoch restored), on
    cached features; returns the Trainer's log history."""
    doc_ids, doc_feats, q_feats, q_rows, train_qrels, dev_qrels = data
    dataset = ContrastiveDataset(None, train_qrels, negatives, num_negatives, targs.seed, sampling=sampling)
    if len(dataset) < targs.per_device_train_batch_size * targs.world_size:
        raise DataError(f"{len(dataset)} training examples are fewer than one batch of "
                        f"{targs.per_device_train_batch_size * targs.world_size}")  # fmt: skip
    collator = FeatureCollator(q_feats, q_rows, doc_feats, doc_ids, train_qrels, model.head_on_tokens())
    trainer = FrozenTrainer(
        model=HeadOnFeatures(model.to(targs.device)), args=targs, train_dataset=dataset, data_collator=collator,
        eval_dataset=sorted(dev_qrels),  # only its presence matters: evaluate() searches the cached documents
        dev_data=(doc_ids, doc_feats, q_feats, q_rows, dev_qrels), moe_learning_rate=margs.moe_learning_rate,
        callbacks=[EpochCallback(dataset)],
    )  # fmt: skip
    try:
        trainer.train()
    except NonFiniteLossError as exc:  # one line, as train.py says it
        raise DataError(str(exc)) from None
    model.eval()
    return trainer.state.log_history


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
    return [str(name_or_path), *file_stats(folder, (".json", ".safetensors", ".bin", ".txt"))]


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
        an.trec_depths(fargs.trec_depth, fargs.eval_splits, splits_flag="--eval_splits")
    except (ValueError, DataError) as exc:
        fail(str(exc))
    try:
        dirs = data_dirs(dargs.dataset, dargs.data_dir)
        if len(dirs) > 1:
            raise DataError(f"--dataset {' '.join(dargs.dataset)}: the frozen-backbone study trains on one dataset")
        data_dir = dirs[0]
        corpus, queries, train_qrels, dev_qrels, dev_info = load_data(data_dir, dargs.train_split, dargs.dev_split,
                                                                      dargs.dev_fraction, targs.seed)  # fmt: skip
        splits = {s: load_split(data_dir, s, corpus) for s in fargs.eval_splits}  # the corpus read once
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
                cache = default_cache_dir(data_dir, dargs.cache_dir)
                negatives = mine_negatives(model, tokenizer, corpus, queries, train_qrels, cache, margs, dargs, targs)
                data = (list(corpus), doc_feats, q_feats, q_rows, train_qrels, dev_qrels)
                history = train_head(model, margs, targs, data, negatives, dargs.hard_negatives, dargs.sampling)
                model.config.save_pretrained(out)
                an.write_log_history(out, history)
                info = {"frozen_backbone": True, "dev": dev_info, "head_settings": settings}
                atomic_write_text(out / "run_info.json", json.dumps(info, indent=1))
                tmp = out / f".head.{os.getpid()}.safetensors"  # last, and whole: it marks the run as trained
                trained = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
                save_file(trained, tmp)
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
    depth = an.trec_depths(fargs.trec_depth, fargs.eval_splits)  # checked in main
    retriever = CachedHead(model, doc_ids, doc_feats, q_feats, q_rows)  # the head on the documents once, every split
    for split, (queries, qrels) in splits.items():
        folder = Path(fargs.eval_output_dir) / split
        run = retriever.search(dict.fromkeys(doc_ids), queries, MAX_CUTOFF)
        meta = {"split": split, "dataset": dataset, "checkpoints": {tag: source}, "dtype": "fp32",
                "frozen_backbone": True}  # fmt: skip
        metrics = an.write_evaluation(folder, tag, run, qrels, depth.get(split, MAX_CUTOFF), meta)
        print(f"{tag}/{split}: {PRIMARY_METRIC} {metrics[PRIMARY_METRIC]:.4f}, Recall@100 {metrics['Recall@100']:.4f}")


if __name__ == "__main__":
    main()

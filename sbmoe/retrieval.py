"""One retrieval interface, BEIR's BaseSearch: `search(corpus, queries, top_k) -> results[qid][doc_id] = score`.

    Dense(model, tokenizer).search(corpus, queries, 100)              # a model (eval.load_for_eval loads one)
    BM25().search(corpus, queries, 100)
    Hybrid(BM25(), Dense(...)).fit(corpus, dev_queries, dev_qrels).search(corpus, queries, 100)
    Hybrid(Runs(model_run), Runs(bm25_run)).fit(None, ...)            # runs already made (eval.py, the runner)

A hybrid fuses two runs the way Pyserini's hybrid search does: each run's scores min-max normalised per
query, then `weight * first + (1 - weight) * second`, a document missing from one run counting 0 for it;
the weight is chosen on dev (`WEIGHTS`, by NDCG@10, ties to the equal weight). Reciprocal rank fusion
(`1 / (RRF_K + rank)` summed) is the parameter-free option. The fusion is written out here rather than
taken from ranx: ranx (0.3.21) fuses the same way (checked on the SciFact runs: equal scores), but it
brings numba, ir_datasets and fastparquet, takes 3 s to import and 7-50 s to compile on its first call,
against milliseconds for these lines.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from sbmoe.data import doc_text
from sbmoe.encoding import BATCH_SIZE, DOC_MAX_LENGTH, QUERY_MAX_LENGTH, EmbeddingCache, encode_texts
from sbmoe.metrics import PRIMARY_METRIC, evaluate_run, truncate_run
from sbmoe.search import (
    ENCODE_CHUNK,
    TopK,
    broadcast_rows,
    gather_topk,
    make_searcher,
    rank_chunks,
    resolve_backend,
    search_chunk,
    to_results,
)

RRF_K = 60
WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))  # the dev grid of the first run's weight
SELECT_METRIC = PRIMARY_METRIC  # what the weight is chosen by
FUSIONS = ("interpolate", "rrf")

Run = dict[str, dict[str, float]]


class Retriever(Protocol):
    def search(self, corpus: dict, queries: dict[str, str], top_k: int = 100) -> Run: ...


class Dense:
    """Exact inner-product search with a bi-encoder (`retrieve`: chunked, length-sorted encoding)."""

    def __init__(self, model, tokenizer, **options):
        self.model, self.tokenizer, self.options = model, tokenizer, options  # options: retrieve_topk's

    def search(self, corpus: dict, queries: dict[str, str], top_k: int = 100) -> Run:
        return retrieve(self.model, self.tokenizer, corpus, queries, top_k, **self.options)


class Runs:
    """Runs already made (a corpus pass that served several query sets, or run files read back) as a retriever:
    `search` gives each query's run as it is (already cut to its depth); the corpus is not read."""

    def __init__(self, run: Run):
        self.run = run

    def search(self, corpus: dict | None, queries: dict[str, str], top_k: int = 100) -> Run:
        return {q: self.run[q] for q in queries if q in self.run}


class BM25:
    """bm25s (Lucene variant, English stopwords, Snowball stemming): `bm25_search`."""

    def search(self, corpus: dict, queries: dict[str, str], top_k: int = 100) -> Run:
        return bm25_search(corpus, queries, top_k)


# --------------------------------------------------------------------------------------------
# Fusion of two runs


def min_max(run: Run) -> Run:
    """Each query's scores mapped to [0, 1]; all 0 where a query's scores are all equal (no ranking in them)."""
    out = {}
    for qid, docs in run.items():
        lo, hi = min(docs.values(), default=0.0), max(docs.values(), default=0.0)
        out[qid] = {d: (s - lo) / (hi - lo) if hi > lo else 0.0 for d, s in docs.items()}
    return out


def interpolate(first: Run, second: Run, weight: float) -> Run:
    """weight * min-max(first) + (1 - weight) * min-max(second); a document absent from a run gets 0 there."""
    a, b = min_max(first), min_max(second)
    out = {}
    for qid in dict.fromkeys([*a, *b]):
        da, db = a.get(qid, {}), b.get(qid, {})
        out[qid] = {d: weight * da.get(d, 0.0) + (1 - weight) * db.get(d, 0.0) for d in dict.fromkeys([*da, *db])}
    return out


def ranks(docs: dict[str, float]) -> dict[str, int]:
    """1-based ranks in trec_eval's order (score descending, then doc id descending)."""
    order = sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)
    return {d: r for r, (d, _) in enumerate(order, 1)}


def rrf(first: Run, second: Run, k: int = RRF_K) -> Run:
    """Reciprocal rank fusion: sum over the runs of 1 / (k + rank)."""
    out = {}
    for qid in dict.fromkeys([*first, *second]):
        ra, rb = ranks(first.get(qid, {})), ranks(second.get(qid, {}))
        out[qid] = {d: sum(1.0 / (k + r[d]) for r in (ra, rb) if d in r) for d in dict.fromkeys([*ra, *rb])}
    return out


def fuse(first: Run, second: Run, fusion: str = "interpolate", weight: float = 0.5, top_k: int | None = None) -> Run:
    """One fused run, cut to each query's `top_k` (trec_eval's order) when given."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion {fusion!r}: expected one of {', '.join(FUSIONS)}")
    run = interpolate(first, second, weight) if fusion == "interpolate" else rrf(first, second)
    return truncate_run(run, top_k) if top_k else run


def choose_weight(first: Run, second: Run, qrels: dict, top_k: int | None = None) -> tuple[float, dict[float, float]]:
    """The weight of `WEIGHTS` with the best dev NDCG@10 (ties: the one nearest 0.5, then the lower);
    returns it and every weight's score."""
    scores = {w: evaluate_run(qrels, fuse(first, second, "interpolate", w, top_k))[SELECT_METRIC] for w in WEIGHTS}
    best = max(scores.values())
    return min((w for w, s in scores.items() if s >= best - 1e-12), key=lambda w: (abs(w - 0.5), w)), scores


class Hybrid:
    """Two retrievers' runs fused; `fit` chooses the interpolation weight on dev unless one is given."""

    def __init__(self, first: Retriever, second: Retriever, weight: float | None = None,
                 fusion: str = "interpolate"):  # fmt: skip
        if fusion not in FUSIONS:
            raise ValueError(f"fusion {fusion!r}: expected one of {', '.join(FUSIONS)}")
        self.first, self.second, self.weight, self.fusion = first, second, weight, fusion
        self.dev_scores: dict[float, float] = {}

    def fit(self, corpus: dict, queries: dict[str, str], qrels: dict, top_k: int = 100) -> Hybrid:
        if self.fusion == "interpolate":
            a, b = self.first.search(corpus, queries, top_k), self.second.search(corpus, queries, top_k)
            self.weight, self.dev_scores = choose_weight(a, b, qrels, top_k)
        return self

    def search(self, corpus: dict, queries: dict[str, str], top_k: int = 100) -> Run:
        a, b = self.first.search(corpus, queries, top_k), self.second.search(corpus, queries, top_k)
        return fuse(a, b, self.fusion, 0.5 if self.weight is None else self.weight, top_k)

    def info(self, weight_from: str) -> dict:
        """How the runs are fused, as result files record it (metrics.json's `hybrid`): the fusion and, for an
        interpolation, the first run's weight, where it came from and the dev scores it was chosen by."""
        if self.fusion != "interpolate":
            return {"fusion": self.fusion}
        info = {"fusion": self.fusion, "weight": 0.5 if self.weight is None else self.weight, "weight_from": weight_from}
        if self.dev_scores:
            info[f"dev {SELECT_METRIC}"] = {f"{w:g}": v for w, v in self.dev_scores.items()}
        return info


def bm25_search(corpus: dict, queries: dict, top_k: int = 100) -> dict[str, dict[str, float]]:
    """BM25 (bm25s, Lucene variant, English stopwords and Snowball stemming) top-k run."""
    # bm25s uses JAX when it is installed; JAX would otherwise reserve 75% of a GPU's memory per process
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import bm25s

    try:
        import Stemmer

        stemmer = Stemmer.Stemmer("english")
    except ImportError:  # PyStemmer is optional; scores drop a little without stemming
        stemmer = None
    doc_ids = list(corpus)
    tokens = bm25s.tokenize([doc_text(corpus[d]) for d in doc_ids], stopwords="en", stemmer=stemmer, show_progress=False)
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=False)
    qids = list(queries)
    q_tokens = bm25s.tokenize([queries[q] for q in qids], stopwords="en", stemmer=stemmer, show_progress=False)
    idx, scores = retriever.retrieve(q_tokens, k=min(top_k, len(doc_ids)), show_progress=False, n_threads=1)
    return {
        qid: {doc_ids[i]: float(s) for i, s in zip(idx[row], scores[row])} for row, qid in enumerate(qids)
    }


@dataclass(frozen=True)
class RetrieveOptions:
    """How to encode and search: the keyword arguments of `retrieve` and `evaluate_model`."""

    query_max_length: int = QUERY_MAX_LENGTH
    doc_max_length: int = DOC_MAX_LENGTH
    batch_size: int = BATCH_SIZE
    bf16: bool = False
    fp16: bool = False
    show_progress: bool = True
    encode_chunk: int = ENCODE_CHUNK  # documents encoded, held and searched at a time
    backend: str = "auto"  # search backend: auto | faiss | torch
    domain: int | None = None  # the dataset index queries and documents are routed to (SB-MoE --routing domain)


def retrieve_topk(
    model,
    tokenizer,
    n_docs: int,
    texts,  # texts(start, stop) -> the documents' texts, in corpus order
    query_sets: dict[str, dict[str, str]],
    top_k: int,
    options: RetrieveOptions = RetrieveOptions(),
    *,
    rank: int = 0,
    world: int = 1,
    cache: EmbeddingCache | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, TopK]:
    """The corpus encoded once for every query set, chunk by chunk; on rank 0 the global exact top-k of
    each set, on other ranks their shard's (already sent to rank 0)."""
    timings = {} if timings is None else timings
    for key in ("encode", "index", "search", "gather"):
        timings.setdefault(key, 0.0)
    o = options
    kw = dict(batch_size=o.batch_size, bf16=o.bf16, fp16=o.fp16, show_progress=o.show_progress and rank == 0,
              domain=o.domain)  # fmt: skip
    backend = resolve_backend(o.backend)
    dim = model.config.backbone_config["hidden_size"]
    start = time.perf_counter()
    q_sets = {}
    for name, queries in query_sets.items():  # rank 0 encodes the queries, every rank searches with them
        q_emb = None
        if rank == 0:
            q_emb = encode_texts(model, tokenizer, list(queries.values()), o.query_max_length, desc="queries", **kw)
        q_sets[name] = q_emb if world == 1 else broadcast_rows(q_emb, (len(queries), dim), rank)
    timings["encode"] += time.perf_counter() - start
    tops = {name: TopK(len(q), top_k) for name, q in q_sets.items()}
    gpu = torch.cuda.current_device() if world > 1 and torch.cuda.is_available() else None
    chunks = rank_chunks(n_docs, o.encode_chunk, rank, world)
    inner = {**kw, "show_progress": kw["show_progress"] and len(chunks) < 2}  # one bar: batches, or chunks
    for a, b in tqdm(chunks, desc="corpus chunks", disable=not kw["show_progress"] or len(chunks) < 2, leave=False):
        t0 = time.perf_counter()
        emb = cache.load(a, b, dim) if cache else None
        if emb is None:
            emb = encode_texts(model, tokenizer, texts(a, b), o.doc_max_length, desc="corpus", **inner)
            if cache:
                cache.save(a, b, emb)
        t1 = time.perf_counter()
        searcher = make_searcher(emb, backend, verbose=rank == 0, gpu=gpu)
        t2 = time.perf_counter()
        search_chunk(searcher, a, b - a, q_sets, tops)
        del searcher, emb
        t3 = time.perf_counter()
        timings["encode"] += t1 - t0
        timings["index"] += t2 - t1
        timings["search"] += t3 - t2
    if world > 1:
        t0 = time.perf_counter()
        shard_docs = [sum(b - a for a, b in rank_chunks(n_docs, o.encode_chunk, r, world)) for r in range(world)]
        gather_topk(tops, shard_docs, rank, world)
        timings["gather"] += time.perf_counter() - t0
    return tops


def retrieve(model, tokenizer, corpus: dict, queries: dict, top_k: int = 100,
             cache: EmbeddingCache | None = None, **kwargs) -> dict:  # fmt: skip
    """results[qid][doc_id] = score, top-k by exact inner product (the corpus encoded chunk by chunk, or read
    from `cache`).

    `kwargs` are `RetrieveOptions`' fields: query_max_length, doc_max_length, batch_size, bf16, fp16,
    show_progress, encode_chunk, backend, domain.
    """
    doc_ids = list(corpus)
    texts = lambda a, b: [doc_text(corpus[d]) for d in doc_ids[a:b]]  # noqa: E731
    options = RetrieveOptions(**kwargs)
    tops = retrieve_topk(model, tokenizer, len(doc_ids), texts, {"q": queries}, top_k, options, cache=cache)
    return to_results(tops["q"], list(queries), doc_ids)


def evaluate_model(model, tokenizer, corpus, queries, qrels, **kwargs) -> dict[str, float]:
    """The one evaluation function: train.py's dev evaluation and eval.py both call it."""
    return evaluate_run(qrels, retrieve(model, tokenizer, corpus, queries, **kwargs))

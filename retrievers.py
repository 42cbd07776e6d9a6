"""One retrieval interface, BEIR's BaseSearch: `search(corpus, queries, top_k) -> results[qid][doc_id] = score`.

    Dense.load("checkpoints/sbmoe").search(corpus, queries, 100)      # any checkpoint
    Dense.load(M, zeroshot=True).search(corpus, queries, 100)         # the backbone, untrained
    BM25().search(corpus, queries, 100)
    Hybrid(BM25(), Dense.load(...)).fit(corpus, dev_queries, dev_qrels).search(corpus, queries, 100)

A hybrid fuses two runs the way Pyserini's hybrid search does: each run's scores min-max normalised per
query, then `weight * first + (1 - weight) * second`, a document missing from one run counting 0 for it;
the weight is chosen on dev (`WEIGHTS`, by NDCG@10, ties to the equal weight). Reciprocal rank fusion
(`1 / (RRF_K + rank)` summed) is the parameter-free option. The fusion is written out here rather than
taken from ranx: ranx (0.3.21) fuses the same way (checked on the SciFact runs: equal scores), but it
brings numba, ir_datasets and fastparquet, takes 3 s to import and 7-50 s to compile on its first call,
against milliseconds for these lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from utils import PRIMARY_METRIC, bm25_search, evaluate_run, load_qrels, split_dev, truncate_run

RRF_K = 60
WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))  # the dev grid of the first run's weight
SELECT_METRIC = PRIMARY_METRIC  # what the weight is chosen by
DEV_FRACTION, DEV_SEED = 0.1, 42  # training's defaults: its dev slice of the train queries
FUSIONS = ("interpolate", "rrf")

Run = dict[str, dict[str, float]]


class Retriever(Protocol):
    def search(self, corpus: dict, queries: dict[str, str], top_k: int = 100) -> Run: ...


class Dense:
    """Exact inner-product search with a bi-encoder (eval.retrieve: chunked, length-sorted encoding)."""

    def __init__(self, model, tokenizer, **options):
        self.model, self.tokenizer, self.options = model, tokenizer, options  # options: retrieve_topk's

    @classmethod
    def load(cls, source: str | Path, zeroshot: bool = False, pooling: str = "auto", **options) -> Dense:
        """A trained checkpoint, or (`zeroshot`) any encoder from the hub or a folder, untrained."""
        import torch
        from transformers import AutoTokenizer

        from model import BiEncoder, load_model

        model = BiEncoder.from_backbone(str(source), pooling=pooling) if zeroshot else load_model(source)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(model.to(device).eval(), AutoTokenizer.from_pretrained(source), **options)

    def search(self, corpus: dict, queries: dict[str, str], top_k: int = 100) -> Run:
        from eval import retrieve

        return retrieve(self.model, self.tokenizer, corpus, queries, top_k, **self.options)


class BM25:
    """bm25s (Lucene variant, English stopwords, Snowball stemming), as utils.bm25_search."""

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


def dev_qrels(data_dir: str | Path, seeds: list[int] | tuple[int, ...] = (DEV_SEED,),
              fraction: float = DEV_FRACTION) -> tuple[dict, str]:  # fmt: skip
    """The qrels that tune a hybrid's weight and where they come from: the official dev split when the
    folder has qrels/dev.tsv, else training's seeded `fraction` slice of the train queries (the union of
    the slices of several training seeds, for a run that serves them all)."""
    folder = Path(data_dir)
    if (folder / "qrels" / "dev.tsv").is_file():
        return load_qrels(folder / "qrels" / "dev.tsv"), "split dev"
    train = load_qrels(folder / "qrels" / "train.tsv")
    qrels = {}
    for seed in seeds:
        qrels.update(split_dev(train, fraction, seed)[1])
    seeds_text = ", ".join(map(str, seeds))
    return qrels, f"slice of train ({fraction * 100:g}%, seed{'s' if len(seeds) > 1 else ''} {seeds_text})"


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

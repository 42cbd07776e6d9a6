"""Hard negatives: mined from a run (BM25 or dense) and cached by content."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sbmoe.files import atomic_write_text, cache_name
from sbmoe.retrieval import bm25_search, retrieve


def cache_root() -> Path:
    """Where caches live: $RETRIEVAL_CACHE_DIR, else ./cache (never inside a dataset folder)."""
    return Path(os.environ.get("RETRIEVAL_CACHE_DIR") or "cache")


def default_cache_dir(data_dir: Path, given: str | None = None) -> Path:
    """The hard-negatives cache of a dataset: `given` (--cache_dir), else <cache root>/negatives/<dataset>;
    entries are keyed by content."""
    return Path(given) if given else cache_root() / "negatives" / Path(data_dir).resolve().name


def corpus_digest(corpus: dict[str, dict[str, str]]) -> str:
    """A hash of the corpus' content (ids, titles, texts, in order): a cache key that an edit changes."""
    h = hashlib.sha1()
    for did, doc in corpus.items():
        h.update(json.dumps([did, doc.get("title", ""), doc.get("text", "")]).encode("utf-8"))
    return h.hexdigest()


def negatives_from_run(run: dict, qrels: dict, depth: int) -> dict[str, list[str]]:
    """Each query's top-`depth` documents of a run that are not known positives, best first."""
    return {
        qid: [d for d, _ in sorted(docs.items(), key=lambda x: -x[1]) if qrels[qid].get(d, 0) <= 0][:depth]
        for qid, docs in run.items()
    }


def cached_negatives(cache_dir: Path, name: str, key: list, mine) -> dict[str, list[str]]:
    """`mine()` once per key, kept as `<cache_dir>/<name>_<hash>.json` (written atomically)."""
    path = Path(cache_dir) / f"{name}_{cache_name(key, 12)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    negatives = mine()
    atomic_write_text(path, json.dumps(negatives))
    return negatives


def mine_bm25_negatives(corpus: dict, queries: dict, qrels: dict, depth: int, cache_dir: Path) -> dict[str, list[str]]:
    """Top-`depth` BM25 documents per query that are not known positives, cached as JSON."""

    def mine():
        return negatives_from_run(bm25_search(corpus, {q: queries[q] for q in qrels}, top_k=depth + 20), qrels, depth)

    return cached_negatives(cache_dir, "bm25_negatives", [sorted(qrels), corpus_digest(corpus), depth], mine)




def mine_dense_negatives(model, tokenizer, corpus: dict, queries: dict, qrels: dict, depth: int, cache_dir: Path,
                         device, identity: list, **options) -> dict[str, list[str]]:  # fmt: skip
    """The model's own top-`depth` documents per query that are not known positives (retrieved on `device` with
    `retrieve`'s `options`), cached as JSON; `identity` (the model's name, pooling, document length) joins the key."""

    def mine():
        model.to(device)
        run = retrieve(model, tokenizer, corpus, {q: queries[q] for q in qrels}, top_k=depth + 20, show_progress=False,
                       **options)  # fmt: skip
        return negatives_from_run(run, qrels, depth)

    return cached_negatives(cache_dir, "dense_negatives", [sorted(qrels), corpus_digest(corpus), depth, *identity], mine)

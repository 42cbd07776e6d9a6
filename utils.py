"""Data, loss, metrics and small helpers shared by train.py, eval.py and the benchmarks.

Data are plain BEIR-shaped dicts (``corpus[doc_id] = {"title", "text"}``,
``queries[qid] = text``, ``qrels[qid][doc_id] = relevance``); runs are
``results[qid][doc_id] = score``.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{}.zip"


@dataclass(frozen=True)
class Metric:
    """One metric: its name in tables and files, the pytrec_eval measure and cutoff behind it."""

    name: str
    measure: str  # pytrec_eval measure family: recall | ndcg_cut | map_cut | recip_rank
    cutoff: int
    table: bool = True  # a column of the printed tables

    @property
    def key(self) -> str:
        """The key pytrec_eval reports it under (recip_rank is computed on the run cut to `cutoff`)."""
        return self.measure if self.measure == "recip_rank" else f"{self.measure}_{self.cutoff}"


# The one metric list: per-query metrics, printed tables, --verify and the reports derive from it.
METRICS: tuple[Metric, ...] = (
    Metric("Recall@1", "recall", 1),
    Metric("Recall@5", "recall", 5),
    Metric("Recall@10", "recall", 10),
    Metric("Recall@100", "recall", 100),
    Metric("NDCG@10", "ndcg_cut", 10),
    Metric("MRR@10", "recip_rank", 10),
    Metric("MAP@100", "map_cut", 100, table=False),
)
TABLE_COLUMNS: tuple[str, ...] = tuple(m.name for m in METRICS if m.table)
PRIMARY_METRIC = "NDCG@10"  # the one metric tests, dev selection and reports lead with
assert PRIMARY_METRIC in TABLE_COLUMNS
MAX_CUTOFF = max(m.cutoff for m in METRICS)


class DataError(Exception):
    """Bad input: the message names the file (and line) at fault, and is shown without a traceback."""


def fail(message: str) -> None:
    """Print a one-line error and exit non-zero; for command-line entry points only."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# --------------------------------------------------------------------------------------------
# Data loading


def resolve_dataset(entry: str, download: bool = True) -> Path:
    """A dataset given as a name (under $BEIR_DATA_DIR, downloaded when missing) or as a folder: an entry with a
    path separator, or starting with `.`, is a folder."""
    return resolve_data_dir(None, entry) if is_dataset_folder(entry) else resolve_data_dir(entry, None, download=download)


def is_dataset_folder(entry: str) -> bool:
    """Whether a dataset entry names a folder (a path separator, or a leading `.`) rather than a dataset name."""
    return "/" in entry or os.sep in entry or entry.startswith(".")


def dataset_name(entry: str | Path) -> str:
    """A dataset's name in results, logs and a checkpoint's `domains`: the name, or a folder's last component."""
    return Path(str(entry).rstrip("/\\")).name


def resolve_data_dir(dataset: str | None, data_dir: str | None, download: bool = True) -> Path:
    """``--data_dir`` wins; else ``$BEIR_DATA_DIR/<dataset>``, fetched with BEIR's downloader if missing."""
    if data_dir:
        path = Path(data_dir)
        if not path.is_dir():
            raise DataError(f"{path}: --data_dir does not exist")
        return path
    if not dataset:
        raise DataError("give --dataset NAME or --data_dir DIR")
    root = Path(os.environ.get("BEIR_DATA_DIR", "data"))
    path = root / dataset
    if path.is_dir():
        return path
    if not download:
        raise DataError(f"{path}: dataset folder missing (set BEIR_DATA_DIR or pass --data_dir)")
    from beir import util as beir_util  # imported late: beir.util needs requests and network

    created = [p for p in (root, *root.parents) if not p.exists()]  # removed again if the download fails
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(beir_util.download_and_unzip(BEIR_URL.format(dataset), str(root)))
    except Exception as exc:  # network errors come in many types; report one line
        for folder in created:  # innermost first; a partial download is removed with its folder
            if folder == root:
                shutil.rmtree(root / dataset, ignore_errors=True)
                (root / f"{dataset}.zip").unlink(missing_ok=True)
            with suppress(OSError):
                folder.rmdir()
        reason = str(exc).splitlines()[0].split(" (Caused by")[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: dataset {dataset!r} is not there and BEIR's download failed ({reason[:200]}); "
                        "set BEIR_DATA_DIR or pass --data_dir") from None  # fmt: skip


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, plain or `.gz`; bad bytes, a corrupt or truncated gzip stream
    and unreadable files are a DataError naming the file and line."""
    path = Path(path)
    lineno = 0
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {raw[exc.start]:#x} at column "
                                    f"{exc.start + 1})") from None  # fmt: skip
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}:{lineno + 1}: corrupt or truncated gzip stream ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _find(folder: Path, stem: str) -> Path:
    found = [folder / name for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz") if (folder / name).is_file()]
    if len(found) > 1:
        raise DataError(f"{found[0]}: both {found[0].name} and {found[1].name} exist; keep one")
    if not found:
        raise DataError(f"{folder / (stem + '.jsonl')}: file not found (nor .jsonl.gz)")
    return found[0]


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for every non-blank line, with a file:line error on bad JSON."""
    for lineno, line in read_lines(path):
        if line.strip():
            yield lineno, _corpus_record(path, lineno, line)


# An id is one TREC column: no whitespace (the run file's separator), no control character, not empty.
BAD_ID_CHARS = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


def check_id(path: Path, lineno: int, kind: str, value: str) -> str:
    """`value` if it can be a column of a TREC run file, else a DataError naming the file and line."""
    bad = BAD_ID_CHARS.search(value)
    if not value or bad:
        why = "is empty" if not value else f"contains {bad.group()!r} at column {bad.start() + 1}"
        raise DataError(f"{path}:{lineno}: {kind} id {value!r} {why} (ids are TREC run columns: no whitespace "
                        "or control characters)")  # fmt: skip
    return value


def _unique_records(path: Path, kind: str) -> Iterator[tuple[int, str, dict]]:
    """(line, id, record) of a corpus or queries file; a repeated id is a DataError naming both lines."""
    first: dict[str, int] = {}
    for lineno, rec in read_jsonl(path):
        rid = str(rec["_id"])
        if rid in first:
            raise DataError(f"{path}:{lineno}: {kind} id {rid!r} repeats line {first[rid]} (ids must be unique)")
        first[rid] = lineno
        yield lineno, rid, rec


def load_corpus(folder: Path) -> dict[str, dict[str, str]]:
    path = _find(folder, "corpus")
    return {did: {"title": rec.get("title") or "", "text": rec.get("text") or ""}
            for _, did, rec in _unique_records(path, "document")}  # fmt: skip


def load_queries(folder: Path) -> dict[str, str]:
    """Every query of the folder; an empty one is kept (BEIR scores it) with a warning naming its line."""
    path = _find(folder, "queries")
    queries, empty = {}, []
    for lineno, qid, rec in _unique_records(path, "query"):
        queries[qid] = rec.get("text") or ""
        if not str(queries[qid]).strip():
            empty.append(lineno)
    if empty:
        print(f"warning: {path}:{empty[0]}: {len(empty)} empty quer{'y' if len(empty) == 1 else 'ies'} "
              "(scored as they are: every document ties)", file=sys.stderr)  # fmt: skip
    return queries


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels tsv with a header; CRLF tolerated; every row must be `qid docid int`."""
    if not path.is_file():
        raise DataError(f"{path}: split file does not exist")
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[tuple[str, str], int] = {}
    for lineno, line in read_lines(path):
        row = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE), [])
        if lineno == 1 and row and row[0].strip().lower() in {"query-id", "query_id", "qid"}:
            continue
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 3:
            raise DataError(f"{path}:{lineno}: expected 3 tab-separated columns, got {len(row)}")
        qid, did, score = (c.strip() for c in row)
        check_id(path, lineno, "query", qid)
        check_id(path, lineno, "document", did)
        try:
            value = int(score)
        except ValueError:
            raise DataError(f"{path}:{lineno}: score {score!r} is not an integer") from None
        seen = qrels.setdefault(qid, {})
        if did in seen and seen[did] != value:
            raise DataError(f"{path}:{lineno}: query {qid!r}, document {did!r} judged {value} here and "
                            f"{seen[did]} on line {first_line[qid, did]}")  # fmt: skip
        first_line.setdefault((qid, did), lineno)
        seen[did] = value
    return qrels


def load_beir(data_dir: str | Path, split: str = "test"):
    """Return (corpus, queries, qrels) for one split; queries are restricted to the split's judged ones."""
    corpus = load_corpus(Path(data_dir))
    queries, qrels = load_split(data_dir, split, corpus)
    return corpus, queries, qrels


# Streaming access for corpora too large to hold: ids once, texts by record range, splits without the corpus.


def corpus_path(data_dir: str | Path) -> Path:
    """The corpus file of a BEIR folder (corpus.jsonl or corpus.jsonl.gz)."""
    return _find(Path(data_dir), "corpus")


def _corpus_record(path: Path, lineno: int, line: str) -> dict:
    """One JSONL record that must have an `_id`; a file:line error otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(record, dict) or "_id" not in record:
        raise DataError(f"{path}:{lineno}: record has no '_id'")
    check_id(path, lineno, "query" if path.name.startswith("queries") else "document", str(record["_id"]))
    return record


def iter_corpus(data_dir: str | Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, str]]:
    """(doc_id, doc_text) of corpus records start..stop-1 in file order (blank lines are not records),
    streamed: records before `start` are skipped without being parsed. The text is `doc_text` of the
    record, as `load_corpus` + `doc_text` give it."""
    path = corpus_path(data_dir)
    n = 0
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        if stop is not None and n >= stop:
            return
        if n >= start:
            rec = _corpus_record(path, lineno, line)
            yield str(rec["_id"]), doc_text({"title": rec.get("title") or "", "text": rec.get("text") or ""})
        n += 1


def iter_corpus_ids(data_dir: str | Path) -> Iterator[str]:
    """Every record's document id in file order (duplicates kept, so positions are record numbers)."""
    path = corpus_path(data_dir)
    for lineno, line in read_lines(path):
        if line.strip():
            yield str(_corpus_record(path, lineno, line)["_id"])


def load_split(data_dir: str | Path, split: str, doc_ids, queries: dict[str, str] | None = None):
    """(queries, qrels) of one split, checked like `load_beir` against `doc_ids` (any container of ids)
    instead of a loaded corpus; `queries` (all of them, from `load_queries`) saves re-reading the file."""
    folder = Path(data_dir)
    queries = load_queries(folder) if queries is None else queries
    qrels_path = folder / "qrels" / f"{split}.tsv"
    qrels = load_qrels(qrels_path)
    for qid, docs in qrels.items():
        if qid not in queries:
            raise DataError(f"{qrels_path}: query {qid!r} is not in {_find(folder, 'queries').name}")
        for did in docs:
            if did not in doc_ids:
                raise DataError(f"{qrels_path}: document {did!r} (query {qid!r}) is not in the corpus")
    if not qrels:
        raise DataError(f"{qrels_path}: no judgments")
    if not any(r > 0 for docs in qrels.values() for r in docs.values()):
        raise DataError(f"{qrels_path}: no positive judgment (every score is 0 or less): nothing to score")
    return {qid: queries[qid] for qid in qrels}, qrels


def split_dev(qrels: dict, dev_fraction: float, seed: int) -> tuple[dict, dict]:
    """Hold out a seeded fraction of the (train) queries for model selection."""
    qids = sorted(qrels)
    random.Random(seed).shuffle(qids)
    n_dev = int(round(len(qids) * dev_fraction))
    dev = set(qids[:n_dev])
    return ({q: d for q, d in qrels.items() if q not in dev}, {q: d for q, d in qrels.items() if q in dev})


def unseen_document_queries(train_qrels: dict, test_qrels: dict) -> list[str]:
    """Test queries none of whose relevant documents is relevant to any training query.

    On SciFact most test claims cite an abstract that some training claim also cites; a model can
    score those by remembering the abstract. This subset measures retrieval of documents never seen
    as positives in training.
    """
    seen = {d for docs in train_qrels.values() for d, r in docs.items() if r > 0}
    return sorted(q for q, docs in test_qrels.items() if not any(r > 0 and d in seen for d, r in docs.items()))


def doc_text(doc: dict[str, str]) -> str:
    """BEIR's convention for dense models: title and text joined by a space."""
    return (doc.get("title", "") + " " + doc.get("text", "")).strip()


# --------------------------------------------------------------------------------------------
# BM25 and hard negatives


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


def cache_root() -> Path:
    """Where caches live: $RETRIEVAL_CACHE_DIR, else ./cache (never inside a dataset folder)."""
    return Path(os.environ.get("RETRIEVAL_CACHE_DIR") or "cache")


def default_cache_dir(data_dir: Path) -> Path:
    """The hard-negatives cache of a dataset: <cache root>/negatives/<dataset>; entries are keyed by content."""
    return cache_root() / "negatives" / Path(data_dir).resolve().name


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
    path = Path(cache_dir) / f"{name}_{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]}.json"
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


# --------------------------------------------------------------------------------------------
# Contrastive loss across devices


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """All ranks' rows concatenated; the local slot is the live tensor, so its gradient survives.

    Identity with one process. Other ranks' rows carry no gradient here; each rank back-propagates
    into its own slot, and DDP's gradient averaging plus the one world-size factor in
    ``info_nce`` make the sum exact.
    """
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[dist.get_rank()] = t
    return torch.cat(parts, dim=0)


def info_nce(
    q_reps: torch.Tensor,  # (B, H)
    d_reps: torch.Tensor,  # (B * (1 + N), H): query i's positive at i * (1 + N), its negatives after it
    temperature: float,
    doc_ids: torch.Tensor | None = None,  # (B * (1 + N),) integer document ids
    pos_ids: torch.Tensor | None = None,  # (B, P) every known positive of each query, -1 padded
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE over every document of every rank; returns (loss, logits).

    Logits are (world*B, world*B*(1+N)): each rank scores all gathered queries against all gathered
    documents, so the gradients of every rank's embeddings are exact after DDP's averaging. A known
    positive of a query that is not its target is masked out rather than used as a negative.
    """
    q_all, d_all = gather_with_grad(q_reps), gather_with_grad(d_reps)
    logits = (q_all @ d_all.T).float() / temperature  # (W*B, W*B*(1+N))
    group = d_all.shape[0] // q_all.shape[0]
    target = torch.arange(q_all.shape[0], device=logits.device) * group
    if doc_ids is not None and pos_ids is not None:
        doc_all, pos_all = gather_with_grad(doc_ids), gather_with_grad(pos_ids)
        known = (doc_all[None, :, None] == pos_all[:, None, :]).any(-1)  # (W*B, W*B*(1+N))
        known[torch.arange(len(target)), target] = False
        logits = logits.masked_fill(known, torch.finfo(logits.dtype).min)
    loss = F.cross_entropy(logits, target) * world_size()  # the one world-size correction
    return loss, logits


# --------------------------------------------------------------------------------------------
# Metrics (BEIR's definitions, computed by pytrec_eval)


def truncate_run(results: dict[str, dict[str, float]], k: int) -> dict[str, dict[str, float]]:
    """Top-k per query in trec_eval's order (score descending, then doc id descending)."""
    return {
        qid: dict(sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)[:k]) for qid, docs in results.items()
    }


def per_query_metrics(
    qrels: dict[str, dict[str, int]],
    results: dict[str, dict[str, float]],
    metrics: Sequence[Metric] | None = None,
    ignore_identical_ids: bool = False,
) -> dict[str, dict[str, float]]:
    """Per-query scores of every metric in `metrics` for every judged query (missing runs score 0).

    Reciprocal rank is scored on each query's top `cutoff` (trec_eval's order). `ignore_identical_ids`
    drops a retrieved doc whose id equals the query id (BEIR's default, off here): the count of what
    was dropped is printed, never silent.
    """
    import pytrec_eval

    metrics = METRICS if metrics is None else metrics
    if ignore_identical_ids:
        dropped = sum(1 for q, docs in results.items() if q in docs)
        results = {q: {d: s for d, s in docs.items() if d != q} for q, docs in results.items()}
        print(f"ignore_identical_ids: dropped {dropped} retrieved documents whose id equals the query id")
    results = {q: {d: float(s) for d, s in docs.items()} for q, docs in results.items() if q in qrels}
    scores: dict[Metric, dict] = {}
    plain = [m for m in metrics if m.measure != "recip_rank"]
    if plain:
        families: dict[str, list[str]] = {}
        for m in plain:
            families.setdefault(m.measure, []).append(str(m.cutoff))
        measures = {f"{family}.{','.join(cuts)}" for family, cuts in families.items()}
        evaluated = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(results)
        scores.update({m: evaluated for m in plain})
    for m in metrics:
        if m.measure == "recip_rank":
            scores[m] = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(truncate_run(results, m.cutoff))
    return {qid: {m.name: scores[m].get(qid, {}).get(m.key, 0.0) for m in metrics} for qid in qrels}


def mean_metrics(per_query: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each metric averaged over the queries of a per-query table."""
    names = next(iter(per_query.values())).keys()
    return {m: float(np.mean([row[m] for row in per_query.values()])) for m in names}


def evaluate_run(qrels: dict, results: dict, **kwargs) -> dict[str, float]:
    """Metrics averaged over the split's judged queries."""
    return mean_metrics(per_query_metrics(qrels, results, **kwargs))


def format_table(rows: dict[str, dict[str, object]], columns: Iterable[str] = TABLE_COLUMNS) -> str:
    """A Markdown table, one row per model; cells are floats (4 places) or preformatted strings."""
    columns = list(columns)
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows.items():
        cells = [f"{metrics[c]:.4f}" if isinstance(metrics.get(c), float) else str(metrics.get(c, "")) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Run files and small helpers


def write_trec(path: Path, results: dict[str, dict[str, float]], tag: str, top_k: int) -> None:
    """TREC run `qid Q0 docid rank score tag`; scores as repr so reading them back is lossless.

    A path ending in `.gz` is written gzip-compressed (reproducibly: no timestamp in the header).
    """
    lines = []
    for qid, docs in truncate_run(results, top_k).items():
        for rank, (did, score) in enumerate(docs.items(), 1):
            lines.append(f"{qid} Q0 {did} {rank} {float(score)!r} {tag}\n")
    text = "".join(lines)
    if str(path).endswith(".gz"):
        atomic_write_bytes(path, gzip.compress(text.encode("utf-8"), mtime=0))
    else:
        atomic_write_text(path, text)


def read_trec(path: Path) -> dict[str, dict[str, float]]:
    """A TREC run file, plain or `.gz`."""
    run: dict[str, dict[str, float]] = {}
    for lineno, line in read_lines(Path(path)):
        parts = line.split()
        if len(parts) != 6:
            raise DataError(f"{path}:{lineno}: expected 6 columns in a TREC run, got {len(parts)}")
        try:
            run.setdefault(parts[0], {})[parts[2]] = float(parts[4])
        except ValueError:
            raise DataError(f"{path}:{lineno}: score {parts[4]!r} is not a number") from None
    return run


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    atomic_write_bytes(path, text.encode("utf-8"))


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp creates 0600 files, written files get the user's usual mode


def temp_prefix(path: Path) -> str:
    """The name prefix of `path`'s temporary sibling: hidden, with this process' id, so a run killed with
    SIGKILL leaves a name that `remove_stale_temps` recognises."""
    return f".{path.name}.tmp-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: Path | str) -> list[Path]:
    """Remove what a killed writer of `path` left beside it (`.NAME.tmp-PID-*`, `.NAME.old-PID`) when that
    process is gone; returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:tmp-(\d+)-.*|old-(\d+))$")
    for entry in path.parent.iterdir():
        m = pattern.match(entry.name)
        if m and int(m.group(1) or m.group(2)) != os.getpid() and not _alive(int(m.group(1) or m.group(2))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def make_temp_dir(path: Path) -> Path:
    """A new temporary folder beside `path` (see `temp_prefix`) with the user's usual mode, not mkdtemp's 0700."""
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    return tmp


def follow_umask(folder: Path) -> None:
    """Give a staged folder's files and folders the user's usual modes (libraries such as safetensors write
    0600 through a temporary file) before it is renamed into place."""
    for p in [folder, *folder.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_UMASK)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(folder: Path | str, flag: str = "--output_dir") -> None:
    """A DataError unless files can be created in `folder` (or in the nearest existing folder above it,
    which is then where it will be made); nothing is created here."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.is_symlink() or probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise DataError(f"{flag} {folder}: {probe} is a file, not a folder")
    if not os.access(probe if probe.exists() else Path.cwd(), os.W_OK | os.X_OK):
        raise DataError(f"{flag} {folder}: {probe} is not writable")


def check_output(path: Path | str, flag: str, inputs: Iterable[Path | str | None] = (), file: bool = False,
                 extra_name: int = 0) -> None:
    """An output path checked before any work starts, or a one-line DataError naming `flag`: not an input
    (nor inside one, nor holding one), every name short enough for the file system (`extra_name` bytes more
    for a temporary sibling's name), and a folder (`file`: a file's folder) that exists or can be made and is
    writable. Nothing is created here."""
    path = Path(path)
    target = path.resolve()
    for given in inputs:
        if given is None:
            continue
        src = Path(given).resolve()
        if target == src or src in target.parents or target in src.parents:
            how = "is" if target == src else "is inside" if src in target.parents else "holds"
            raise DataError(f"{flag} {path}: {how} the input {given}; write somewhere else")
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        limit = os.pathconf(probe if probe.is_dir() else probe.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for i, part in enumerate(path.parts):
        size = len(os.fsencode(part)) + (extra_name if i == len(path.parts) - 1 else 0)
        if size > limit:
            raise DataError(f"{flag} {path}: the name {part[:24]}... is {len(os.fsencode(part))} bytes; the file "
                            f"system takes {limit - (extra_name if i == len(path.parts) - 1 else 0)} here")  # fmt: skip
    if file:
        if path.is_dir():
            raise DataError(f"{flag} {path}: is a folder, not a file")
        check_writable(path.parent, flag)
    else:
        check_writable(path, flag)


class FolderLock:
    """An exclusive `fcntl.flock` on `<folder>/.lock` while a process writes into the folder: a second
    writer (a rerun while an orphan still trains) fails at once; the kernel drops the lock when its holder dies."""

    def __init__(self, folder: Path | str):
        self.folder, self.fh = Path(folder), None

    def __enter__(self) -> FolderLock:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.folder / ".lock", "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise DataError(f"{self.folder}: another process is writing into this folder (it holds "
                            f"{self.folder / '.lock'}); wait for it or stop it") from None  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()  # closing releases the lock; the empty lock file stays (removing it would race)


_ENTRY_DEPTH = 0


def entry_point(main):
    """A command line's `main`: SIGTERM is raised as KeyboardInterrupt like SIGINT (so every `finally` and
    `except BaseException` cleanup runs), and either ends in one line and exit 130 (SIGINT) or 143 (SIGTERM).
    Only the outermost entry point of the main thread does this: an in-process caller sees the interrupt."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        global _ENTRY_DEPTH
        if _ENTRY_DEPTH or threading.current_thread() is not threading.main_thread():
            return main(*args, **kwargs)

        def on_term(signum, frame):
            raise KeyboardInterrupt("SIGTERM")

        previous = signal.signal(signal.SIGTERM, on_term)
        _ENTRY_DEPTH += 1
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt as exc:
            name = "SIGTERM" if str(exc) == "SIGTERM" else "SIGINT"
            print(f"error: interrupted by {name}; temporary files removed, nothing half-written", file=sys.stderr)
            raise SystemExit(143 if name == "SIGTERM" else 130) from None
        finally:
            _ENTRY_DEPTH -= 1
            signal.signal(signal.SIGTERM, previous)

    return wrapper


def autocast(device: torch.device | str, bf16: bool = False, fp16: bool = False):
    """Autocast for the chosen dtype, or a no-op context in fp32."""
    device_type = torch.device(device).type
    if bf16 or fp16:
        return torch.autocast(device_type, dtype=torch.bfloat16 if bf16 else torch.float16)
    return nullcontext()


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 units (AVX512-BF16 or AMX-BF16), where bf16 autocast is faster than fp32
    rather than emulated: torch's own check where it has one, else the kernel's CPU flags."""
    check = getattr(getattr(torch.backends, "mkldnn", None), "is_bf16_supported", None)
    if check is not None:
        try:
            return bool(check())
        except Exception:  # an older torch without the probe on this platform
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def auto_precision() -> str:
    """bf16 where the device computes it natively (a CUDA GPU with bf16, or a CPU with bf16 units), else fp32."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

"""Evaluate retrievers on a BEIR split: encode, exact search, pytrec_eval metrics, run files.

    python eval.py --model sbmoe                          # checkpoint from checkpoints/sbmoe
    python eval.py --model baseline sbmoe moe             # one table, a row per model
    python eval.py --model zeroshot --model_name_or_path M --pooling mean
    python eval.py --model sbmoe --split test train --trec_depth train=10   # one corpus pass, two splits
    torchrun --nproc_per_node N eval.py --model sbmoe ... # the corpus sharded over N processes
    python eval.py --model sbmoe --backend onnx-int8      # encode through an ONNX graph (onnxruntime, CPU)

`--backend onnx | onnx-int8` encodes through export.py's graph of the whole encoder (fp32, or int8
weights): from `--checkpoint DIR` when DIR is an export folder (`export.py CKPT DIR --onnx --int8`),
otherwise exported on the fly from the checkpoint (or the zero-shot backbone) into a temporary
folder for this run. Search and metrics are the same either way.

Writes `<tag>.trec.gz` (the run), `<tag>.perquery.json.gz` and `metrics.json` per split (analysis.write_evaluation).

`--hybrid bm25` also writes `<tag>+bm25`: the model's run fused with BM25's (retrievers.py), the model's weight
chosen on dev (`--split dev` means the official dev split, else training's seeded slice of the train queries;
its queries are searched in the same corpus pass) unless `--hybrid_weight` fixes it.

`retrieve` and `evaluate_model` are also what train.py calls for its dev evaluation.

Memory is bounded by one chunk of the corpus, not the corpus: the corpus is cut into chunks of
`--encode_chunk` documents (fixed boundaries 0, C, 2C, ..., whatever the number of processes);
process r of W takes the contiguous run of chunks r*n/W .. (r+1)*n/W - 1 (n chunks). Each chunk is
encoded (length-sorted within the chunk), searched exactly for every query, and its per-query top-k
merged into a running top-k; then rank 0 receives every rank's top-k and merges them. Every
selection orders by (score desc, global document index asc), so ties are broken the same way
whatever the chunking or the number of processes; since a chunk is encoded and searched by the same
computation wherever it runs, a run with N processes writes the same file as one process.
Per process: chunk embeddings (twice: ours and the index's copy) + the query embeddings of every
split + the top-k buffers (queries x k, score and index) + one block of search temporaries.

Exact search within a chunk: FAISS IndexFlatIP (CPU, or every GPU faiss sees, one per rank under
torchrun). Where faiss sees no GPU but torch does (torch+CUDA without faiss-gpu), a torch matmul +
top-k on the GPU, query block by query block, with the same ids and ranks as the CPU index and scores
equal to float32 rounding (another summation order). `--search torch` (or EVAL_SEARCH_BACKEND=torch)
forces that path, also on the CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import tempfile
import time
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from analysis import write_evaluation, write_metrics
from model import VARIANTS, BiEncoder, load_model, load_tokenizer
from retrievers import BM25, DEV_FRACTION, DEV_SEED, FUSIONS, SELECT_METRIC, choose_weight, dev_qrels, fuse
from utils import (
    MAX_CUTOFF,
    METRICS,
    TABLE_COLUMNS,
    DataError,
    atomic_write_text,
    autocast,
    check_writable,
    corpus_path,
    doc_text,
    evaluate_run,
    fail,
    format_table,
    iter_corpus,
    iter_corpus_ids,
    load_corpus,
    load_queries,
    load_split,
    mean_metrics,
    per_query_metrics,
    read_trec,
    resolve_data_dir,
)

ENCODE_CHUNK = 50_000  # documents encoded, held and searched at a time (--encode_chunk)
QUERY_BLOCK = 8_192  # queries per search call and per top-k merge
TIE_MARGIN = 16  # extra candidates asked of a chunk, so a tie across the k-th place is seen whole
TIE_ENTRIES = 2**21  # (query, candidate) pairs per re-search of tied rows, and per torch score block / 4
_ANNOUNCED: set[str] = set()
_GPU_RESOURCES: dict = {}


# --------------------------------------------------------------------------------------------
# Encoding


def _tokenize(tokenizer, texts: list[str], max_length: int, step: int = 2048) -> tuple[np.ndarray, np.ndarray]:
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


@torch.inference_mode()
def encode_texts(
    model: BiEncoder,
    tokenizer,
    texts: list[str],
    max_length: int,
    batch_size: int = 128,
    bf16: bool = False,
    fp16: bool = False,
    desc: str = "encode",
    show_progress: bool = True,
) -> np.ndarray:
    """(N, H) float32 embeddings; batches sorted by length so padding stays small."""
    device = next(model.parameters()).device
    ids, offsets = _tokenize(tokenizer, texts, max_length)
    order = np.argsort(-np.diff(offsets), kind="stable")
    out = np.empty((len(texts), model.config.backbone_config["hidden_size"]), dtype=np.float32)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_progress, leave=False):
        rows = order[start : start + batch_size]
        input_ids, mask = _pad(ids, offsets, rows, pad_id, left)
        with autocast(device, bf16=bf16, fp16=fp16):
            reps = model.encode(input_ids.to(device), mask.to(device))
        out[rows] = reps.float().cpu().numpy()
    model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------
# Exact search, chunk by chunk, with one tie rule


def _announce(message: str, verbose: bool = True) -> None:
    if verbose and message not in _ANNOUNCED:
        print(message, flush=True)
        _ANNOUNCED.add(message)


def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def build_index(dim: int, verbose: bool = True, gpu: int | None = None):
    """Exact inner product: on every GPU faiss sees (sharded; only GPU `gpu` when given), else CPU IndexFlatIP."""
    import faiss

    index = faiss.IndexFlatIP(dim)
    n_gpus = faiss_gpus()
    if n_gpus > 0 and gpu is not None:
        if gpu not in _GPU_RESOURCES:  # one set of resources (and its scratch memory) per GPU, for every chunk
            _GPU_RESOURCES[gpu] = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(_GPU_RESOURCES[gpu], gpu, index)
        choice = f"FAISS: exact inner product on GPU {gpu}"
    elif n_gpus > 0:
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True
        index = faiss.index_cpu_to_all_gpus(index, co=options)
        choice = f"FAISS: exact inner product on {n_gpus} GPU(s), sharded"
    else:
        choice = "FAISS: exact inner product on CPU (IndexFlatIP)"
    _announce(choice, verbose)
    return index


def resolve_backend(choice: str = "auto") -> str:
    """faiss | torch: `auto` (or $EVAL_SEARCH_BACKEND) takes faiss, unless torch sees a GPU that faiss does not."""
    if choice == "auto":
        choice = os.environ.get("EVAL_SEARCH_BACKEND", "auto")
    if choice not in ("auto", "faiss", "torch"):
        raise ValueError(f"search backend {choice!r}: expected auto, faiss or torch")
    if choice == "auto":
        choice = "torch" if torch.cuda.is_available() and faiss_gpus() == 0 else "faiss"
    return choice


def select_topk(scores: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first k in the order (score desc, index asc): the one tie rule of every search."""
    order = np.lexsort((index, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(index, order, 1)


class FaissChunk:
    """Exact top-k of one chunk with FAISS; ties at the k-th place resolved by the lower index."""

    max_k = None  # faiss-gpu selects at most 2048 per query

    def __init__(self, d_emb: np.ndarray, verbose: bool = True, gpu: int | None = None):
        self.n = len(d_emb)
        self.index = build_index(d_emb.shape[1], verbose, gpu)
        self.index.add(np.ascontiguousarray(d_emb, dtype=np.float32))  # the index keeps its own copy
        if faiss_gpus() > 0:
            self.max_k, self.d_emb = 2048, d_emb

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, idx = self.index.search(np.ascontiguousarray(q, dtype=np.float32), k)
        return select_topk(scores, idx, k)

    def topk(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.n)
        k2 = min(self.n, k + TIE_MARGIN)
        scores, idx = self._search(q, k2)
        out_s, out_i = scores[:, :k].copy(), idx[:, :k].copy()
        # A row whose k-th score equals its last candidate's may have more documents at that score
        # than were returned: ask again for more until the tie ends inside the list.
        rows = np.flatnonzero(scores[:, k - 1] == scores[:, k2 - 1]) if k2 < self.n else np.zeros(0, np.int64)
        while rows.size:
            k2 = min(self.n, 2 * k2)
            if self.max_k is not None and k2 > self.max_k:  # faiss-gpu: those rows go to the torch path
                s, i = TorchChunk(self.d_emb, "cuda").topk(q[rows], k)
                out_s[rows], out_i[rows] = s, i
                break
            tied = []
            for a in range(0, rows.size, max(1, TIE_ENTRIES // k2)):  # bounded: rows x k2 <= TIE_ENTRIES
                part = rows[a : a + max(1, TIE_ENTRIES // k2)]
                s, i = self._search(q[part], k2)
                out_s[part], out_i[part] = s[:, :k], i[:, :k]
                tied.append(part[s[:, k - 1] == s[:, k2 - 1]])
            rows = np.concatenate(tied) if k2 < self.n else rows[:0]
        return out_s, out_i


class TorchChunk:
    """Exact top-k of one chunk by matmul + top-k on `device`; ties resolved by the lower index."""

    def __init__(self, d_emb: np.ndarray, device: str, verbose: bool = False):
        self.n, self.device = len(d_emb), torch.device(device)
        self.d = torch.from_numpy(np.array(d_emb, dtype=np.float32)).to(self.device)
        _announce(f"torch: exact inner product on {self.device.type} (chunked matmul + top-k)", verbose)

    def topk(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.n)
        k2 = min(self.n, k + TIE_MARGIN)
        out_s, out_i = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        step = max(1, min(QUERY_BLOCK, 4 * TIE_ENTRIES // self.n))  # a score block of at most 32 MiB
        q_all = torch.from_numpy(np.array(q, dtype=np.float32))
        tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False  # full fp32
        try:
            self._blocks(q_all, k, k2, step, out_s, out_i)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return out_s, out_i

    def _blocks(self, q_all: torch.Tensor, k: int, k2: int, step: int, out_s: np.ndarray, out_i: np.ndarray) -> None:
        for a in range(0, len(q_all), step):
            block = q_all[a : a + step].to(self.device) @ self.d.T
            v, i = torch.topk(block, k2, dim=1)
            v, i = select_topk(v.cpu().numpy(), i.cpu().numpy(), k2)
            out_s[a : a + step], out_i[a : a + step] = v[:, :k], i[:, :k]
            if k2 < self.n:  # a tie across the k-th place: sort those rows whole (stable: lower index first)
                rows = np.flatnonzero(v[:, k - 1] == v[:, k2 - 1])
                if rows.size:
                    picked = block[torch.from_numpy(rows).to(self.device)]
                    vs, js = torch.sort(picked, dim=1, descending=True, stable=True)
                    out_s[a + rows], out_i[a + rows] = vs[:, :k].cpu().numpy(), js[:, :k].cpu().numpy()


def make_searcher(d_emb: np.ndarray, backend: str, verbose: bool = True, gpu: int | None = None):
    if backend == "torch":
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        return TorchChunk(d_emb, device, verbose)
    return FaissChunk(d_emb, verbose, gpu)


class TopK:
    """Running exact top-k of every query over the documents seen so far, in (score desc, index asc)."""

    def __init__(self, n_queries: int, k: int):
        self.k, self.width = k, 0  # width: min(k, documents seen)
        self.scores = np.empty((n_queries, k), dtype=np.float32)
        self.index = np.empty((n_queries, k), dtype=np.int64)

    def merge(self, rows: slice, scores: np.ndarray, index: np.ndarray) -> None:
        """Merge candidates of the query rows `rows`; call `grow` once every row has had its share."""
        w = self.width
        s = np.concatenate([self.scores[rows, :w], scores], axis=1)
        i = np.concatenate([self.index[rows, :w], index], axis=1)
        s, i = select_topk(s, i, self.k)
        self.scores[rows, : s.shape[1]], self.index[rows, : s.shape[1]] = s, i

    def grow(self, n_docs: int) -> None:
        self.width = min(self.k, self.width + n_docs)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.scores[:, : self.width], self.index[:, : self.width]


def search_chunk(searcher, offset: int, n_docs: int, q_sets: dict[str, np.ndarray], tops: dict[str, TopK]) -> None:
    """Search one chunk (global documents offset .. offset+n_docs-1) for every query set, merge into `tops`."""
    for name, q in q_sets.items():
        top = tops[name]
        for a in range(0, len(q), QUERY_BLOCK):
            scores, idx = searcher.topk(q[a : a + QUERY_BLOCK], top.k)
            top.merge(slice(a, a + QUERY_BLOCK), scores, idx + offset)
        top.grow(n_docs)


def chunk_bounds(n_docs: int, chunk: int) -> list[tuple[int, int]]:
    """The corpus' chunks: [0, C), [C, 2C), ... whatever the number of processes."""
    return [(a, min(a + chunk, n_docs)) for a in range(0, n_docs, chunk)]


def rank_chunks(n_docs: int, chunk: int, rank: int = 0, world: int = 1) -> list[tuple[int, int]]:
    """Rank `rank`'s shard: a contiguous run of whole chunks (none when there are fewer chunks than ranks)."""
    bounds = chunk_bounds(n_docs, chunk)
    return bounds[rank * len(bounds) // world : (rank + 1) * len(bounds) // world]


def search_embeddings(q_sets: dict[str, np.ndarray], d_emb: np.ndarray, top_k: int, chunk: int | None = None,
                      backend: str = "auto") -> dict[str, TopK]:  # fmt: skip
    """Exact top-k of every query set over embeddings already encoded (an array or a .npy memory map)."""
    backend = resolve_backend(backend)
    tops = {name: TopK(len(q), top_k) for name, q in q_sets.items()}
    for a, b in chunk_bounds(len(d_emb), chunk or ENCODE_CHUNK):
        search_chunk(make_searcher(d_emb[a:b], backend), a, b - a, q_sets, tops)
    return tops


def to_results(top: TopK, qids: list[str], doc_ids: list[str]) -> dict[str, dict[str, float]]:
    scores, index = top.result()
    return {qid: {doc_ids[j]: float(s) for j, s in zip(index[r], scores[r]) if j >= 0} for r, qid in enumerate(qids)}


def search(q_emb: np.ndarray, d_emb: np.ndarray, doc_ids: list[str], qids: list[str], top_k: int, *,
           chunk: int | None = None, backend: str = "auto") -> dict:  # fmt: skip
    """results[qid][doc_id] = score: exact top-k, searched `chunk` documents at a time."""
    return to_results(search_embeddings({"q": q_emb}, d_emb, top_k, chunk, backend)["q"], qids, doc_ids)


# --------------------------------------------------------------------------------------------
# Sharded retrieval: encode (or read cached) chunks, search them, gather the top-k on rank 0


class EmbeddingCache:
    """Encoded chunks as `<root>/<hash of key>/chunk-<start>-<stop>.npy`, written atomically and read
    back as memory maps. The key names everything the embeddings depend on (see `cache_key`)."""

    def __init__(self, root: str | Path, key: dict):
        text = json.dumps(key, sort_keys=True, default=str)
        self.dir = Path(root) / hashlib.sha1(text.encode()).hexdigest()[:16]
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
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".chunk-", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, np.ascontiguousarray(emb, dtype=np.float32))
            os.replace(tmp, self.path(start, stop))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _stat(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def cache_key(source: str, model: BiEncoder, data_dir: Path, n_docs: int, doc_max_length: int, dtype: str,
              batch_size: int) -> dict:  # fmt: skip
    """What a corpus' embeddings depend on: the model (its folder's files by size and mtime, its config:
    pooling, inference mode, ...), the corpus file, its size, truncation, autocast dtype, batch size
    (padding changes the last bits) and the device type."""
    folder = Path(source)
    files = sorted(_stat(p) for p in folder.iterdir() if p.is_file()) if folder.is_dir() else None
    device = next(model.parameters()).device.type
    return {
        "model": str(folder.resolve()) if folder.is_dir() else source, "model_files": files,
        "config": model.config.to_dict(), "data_dir": str(Path(data_dir).resolve()),
        "corpus_file": _stat(corpus_path(data_dir)), "n_docs": n_docs, "doc_max_length": doc_max_length,
        "dtype": dtype, "batch_size": batch_size, "device": device,
    }  # fmt: skip


def _broadcast(array: np.ndarray | None, shape: tuple[int, int], rank: int) -> np.ndarray:
    t = torch.from_numpy(array) if rank == 0 else torch.empty(shape, dtype=torch.float32)
    dist.broadcast(t, 0)
    return t.numpy()


def gather_topk(tops: dict[str, TopK], shard_docs: list[int], rank: int, world: int) -> None:
    """Every rank's top-k to rank 0, merged there in rank order (the merge order does not matter)."""
    for top in tops.values():
        scores, index = top.result()
        if rank != 0:
            if scores.shape[1]:
                dist.send(torch.from_numpy(np.ascontiguousarray(scores)), 0)
                dist.send(torch.from_numpy(np.ascontiguousarray(index)), 0)
            continue
        for r in range(1, world):
            w = min(top.k, shard_docs[r])
            if w == 0:
                continue
            s = torch.empty((len(top.scores), w), dtype=torch.float32)
            i = torch.empty((len(top.scores), w), dtype=torch.int64)
            dist.recv(s, r)
            dist.recv(i, r)
            s, i = s.numpy(), i.numpy()
            for a in range(0, len(s), QUERY_BLOCK):
                top.merge(slice(a, a + QUERY_BLOCK), s[a : a + QUERY_BLOCK], i[a : a + QUERY_BLOCK])
            top.grow(shard_docs[r])


def retrieve_topk(
    model: BiEncoder,
    tokenizer,
    n_docs: int,
    texts,  # texts(start, stop) -> the documents' texts, in corpus order
    query_sets: dict[str, dict[str, str]],
    top_k: int,
    *,
    query_max_length: int = 64,
    doc_max_length: int = 256,
    batch_size: int = 128,
    bf16: bool = False,
    fp16: bool = False,
    show_progress: bool = True,
    encode_chunk: int = ENCODE_CHUNK,
    backend: str = "auto",
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
    kw = dict(batch_size=batch_size, bf16=bf16, fp16=fp16, show_progress=show_progress and rank == 0)
    backend = resolve_backend(backend)
    dim = model.config.backbone_config["hidden_size"]
    start = time.perf_counter()
    q_sets = {}
    for name, queries in query_sets.items():  # rank 0 encodes the queries, every rank searches with them
        q_emb = None
        if rank == 0:
            q_emb = encode_texts(model, tokenizer, list(queries.values()), query_max_length, desc="queries", **kw)
        q_sets[name] = q_emb if world == 1 else _broadcast(q_emb, (len(queries), dim), rank)
    timings["encode"] += time.perf_counter() - start
    tops = {name: TopK(len(q), top_k) for name, q in q_sets.items()}
    gpu = torch.cuda.current_device() if world > 1 and torch.cuda.is_available() else None
    chunks = rank_chunks(n_docs, encode_chunk, rank, world)
    inner = {**kw, "show_progress": kw["show_progress"] and len(chunks) < 2}  # one bar: batches, or chunks
    for a, b in tqdm(chunks, desc="corpus chunks", disable=not kw["show_progress"] or len(chunks) < 2, leave=False):
        t0 = time.perf_counter()
        emb = cache.load(a, b, dim) if cache else None
        if emb is None:
            emb = encode_texts(model, tokenizer, texts(a, b), doc_max_length, desc="corpus", **inner)
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
        shard_docs = [sum(b - a for a, b in rank_chunks(n_docs, encode_chunk, r, world)) for r in range(world)]
        gather_topk(tops, shard_docs, rank, world)
        timings["gather"] += time.perf_counter() - t0
    return tops


def retrieve(model: BiEncoder, tokenizer, corpus: dict, queries: dict, top_k: int = 100, **kwargs) -> dict:
    """results[qid][doc_id] = score, top-k by exact inner product (the corpus encoded chunk by chunk).

    `kwargs` are `retrieve_topk`'s: query_max_length, doc_max_length, batch_size, bf16, fp16,
    show_progress, encode_chunk, backend.
    """
    doc_ids = list(corpus)
    texts = lambda a, b: [doc_text(corpus[d]) for d in doc_ids[a:b]]  # noqa: E731
    tops = retrieve_topk(model, tokenizer, len(doc_ids), texts, {"q": queries}, top_k, **kwargs)
    return to_results(tops["q"], list(queries), doc_ids)


def evaluate_model(model, tokenizer, corpus, queries, qrels, **kwargs) -> dict[str, float]:
    """The one evaluation function: train.py's dev evaluation and eval.py both call it."""
    return evaluate_run(qrels, retrieve(model, tokenizer, corpus, queries, **kwargs))


class DocIds:
    """Document ids by record number, packed (utf-8 in one buffer, int64 ends: len + 8 bytes an id, not ~60
    for a Python string in a list), with a hash lookup for `in` and duplicates until `drop_lookup`."""

    def __init__(self, ids: Iterable[str]):
        buf, ends, hashes = bytearray(), array("q"), array("q")
        for d in ids:
            buf += d.encode("utf-8")
            ends.append(len(buf))
            hashes.append(hash(d))
        self._buf, self._ends = bytes(buf), np.array(ends, dtype=np.int64)
        del buf, ends
        h = np.array(hashes, dtype=np.int64)
        del hashes
        self._order = np.argsort(h, kind="stable")
        self._sorted = h[self._order]

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        j = int(j)
        return self._buf[self._ends[j - 1] if j else 0 : self._ends[j]].decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        return (self[j] for j in range(len(self)))

    def _positions(self, d: str) -> list[int]:
        h = hash(d)
        a, b = np.searchsorted(self._sorted, h, "left"), np.searchsorted(self._sorted, h, "right")
        return [int(j) for j in self._order[a:b] if self[j] == d]

    def __contains__(self, d) -> bool:
        return isinstance(d, str) and bool(self._positions(d))

    def repeated(self) -> int:
        """How many records repeat an earlier record's id."""
        same = np.flatnonzero(self._sorted[1:] == self._sorted[:-1])  # equal hashes: compare the ids
        return len({j for i in same for j in self._positions(self[self._order[i + 1]])[1:]})

    def drop_lookup(self) -> None:
        self._order = self._sorted = None


class Corpus:
    """A BEIR corpus by record number: every id held (packed), texts streamed from the file a chunk at a time.

    A corpus with repeated ids is loaded whole instead, as `load_corpus` reads it (first position, last text).
    """

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.ids = DocIds(iter_corpus_ids(data_dir))
        self.loaded = None
        repeated = self.ids.repeated()
        if repeated:
            print(f"{corpus_path(data_dir)}: {repeated} repeated document ids; "
                  "the corpus is held in memory as load_corpus reads it")  # fmt: skip
            self.loaded = load_corpus(data_dir)
            self.ids = DocIds(self.loaded)

    def __len__(self) -> int:
        return len(self.ids)

    def reader(self):
        """texts(start, stop) for increasing, non-overlapping ranges: one forward pass over the file."""
        if self.loaded is not None:
            return lambda a, b: [doc_text(self.loaded[d]) for d in self.ids[a:b]]
        state = {"it": None, "pos": 0}

        def texts(a: int, b: int) -> list[str]:
            if state["it"] is None or a != state["pos"]:  # records skipped by line, not parsed
                state["it"], state["pos"] = iter_corpus(self.data_dir, a), a
            out = [t for _, t in itertools.islice(state["it"], b - a)]
            state["pos"] = b
            return out

        return texts


def init_distributed() -> tuple[int, int, bool]:
    """(rank, world size, created): under torchrun (WORLD_SIZE > 1) a process group, gloo for the CPU
    tensors this script sends, and one GPU per rank (LOCAL_RANK) when there are GPUs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), True


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", required=True, choices=[*VARIANTS, "zeroshot"],
                   help="trained variants to evaluate, or zeroshot: a plain encoder without training")  # fmt: skip
    p.add_argument("--model_name_or_path", help="backbone for --model zeroshot (hub name or local folder)")
    p.add_argument("--pooling", default="auto", choices=["auto", "cls", "mean"], help="zeroshot pooling")
    p.add_argument("--checkpoint", nargs="+", help="checkpoint dir per model (default checkpoints/<model>)")
    p.add_argument("--dataset", default=None, help="BEIR dataset under $BEIR_DATA_DIR (default scifact)")
    p.add_argument("--data_dir", default=None, help="a BEIR folder (overrides --dataset)")
    p.add_argument("--split", nargs="+", default=["test"], help="one split, or several (corpus encoded once)")
    p.add_argument("--output_dir", default="results/eval")
    p.add_argument("--top_k", type=int, default=100, help="documents retrieved and scored per query")
    p.add_argument("--trec_depth", nargs="+", default=[], metavar="SPLIT=K",
                   help="write only the top K of SPLIT's run file (e.g. train=10); metrics use --top_k")  # fmt: skip
    p.add_argument("--query_max_length", type=int, default=64)
    p.add_argument("--doc_max_length", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--encode_chunk", type=int, default=ENCODE_CHUNK,
                   help="documents encoded and searched at a time (memory bound); the same value gives the same "
                        "run with any number of processes")  # fmt: skip
    p.add_argument("--embedding_cache", default=None, metavar="DIR",
                   help="keep the encoded corpus chunks here (.npy, memory-mapped) and reuse them (same model files, "
                        "corpus, --doc_max_length, dtype, --batch_size, device and --encode_chunk)")  # fmt: skip
    p.add_argument("--search", default="auto", choices=["auto", "faiss", "torch"],
                   help="exact search: faiss IndexFlatIP, or torch matmul + top-k (auto: torch only where torch "
                        "sees a GPU and faiss does not)")  # fmt: skip
    p.add_argument("--inference_mode", choices=["top1", "all"], help="SB-MoE routing at inference")
    p.add_argument("--ignore_identical_ids", action="store_true", help="drop docs whose id equals the query id")
    p.add_argument("--verify", action="store_true", help="re-score the written .trec with pytrec_eval and compare")
    p.add_argument("--tag", default=None, help="name of the row and the run file (default: the model name)")
    p.add_argument("--hybrid", choices=["bm25"], help="also fuse each model's run with BM25: row and files <tag>+bm25")
    p.add_argument("--hybrid_weight", type=float, metavar="W",
                   help="the model run's weight in the fusion (BM25's: 1 - W), instead of choosing it on dev")  # fmt: skip
    p.add_argument("--hybrid_fusion", default="interpolate", choices=FUSIONS,
                   help="interpolate: min-max normalised scores, weighted; rrf: reciprocal rank fusion (k = 60)")  # fmt: skip
    p.add_argument("--dev_seed", nargs="+", type=int, default=[DEV_SEED],
                   help="split dev without qrels/dev.tsv: training's seeded slice of the train queries (the union "
                        "of several seeds' slices for an untrained model); also what tunes --hybrid")  # fmt: skip
    p.add_argument("--dev_fraction", type=float, default=DEV_FRACTION, help="that slice's share (training's)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "onnx-int8"],
                   help="encode with PyTorch, or through export.py's ONNX graph (fp32 or int8) in onnxruntime")
    dtype = p.add_mutually_exclusive_group()
    dtype.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU or GPU)")
    dtype.add_argument("--fp16", action="store_true", help="fp16 autocast (GPU)")
    args = p.parse_args(argv)
    if args.checkpoint and len(args.checkpoint) != len(args.model):
        p.error("--checkpoint needs one folder per --model")
    if "zeroshot" in args.model and not args.model_name_or_path:
        p.error("--model zeroshot needs --model_name_or_path")
    if args.top_k < MAX_CUTOFF:
        p.error(f"--top_k must be at least {MAX_CUTOFF}, the deepest metric cutoff")
    for flag in ("encode_chunk", "batch_size", "query_max_length", "doc_max_length"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    try:
        args.trec_depth = {k: int(v) for k, v in (x.split("=") for x in args.trec_depth)}
    except ValueError:
        p.error(f"--trec_depth {' '.join(args.trec_depth)}: expected SPLIT=K entries")
    for split, depth in args.trec_depth.items():
        if split not in args.split or depth < 1:
            p.error(f"--trec_depth {split}={depth}: needs a split of --split and K >= 1")
    if args.hybrid_weight is not None and not (args.hybrid and args.hybrid_fusion == "interpolate"
                                               and 0 <= args.hybrid_weight <= 1):  # fmt: skip
        p.error(f"--hybrid_weight {args.hybrid_weight}: needs --hybrid, interpolation and a weight in [0, 1]")
    if not 0 < args.dev_fraction < 1:
        p.error(f"--dev_fraction {args.dev_fraction} must be in (0, 1)")
    if args.backend != "torch" and (args.bf16 or args.fp16):
        p.error(f"--backend {args.backend}: --bf16/--fp16 apply to --backend torch only")
    if args.dataset is None and args.data_dir is None:
        args.dataset = "scifact"
    return args


def load_for_eval(name: str, checkpoint: str | None, args) -> tuple[BiEncoder, object, str]:
    backend = getattr(args, "backend", "torch")
    if checkpoint and name != "zeroshot":
        import export

        if export.is_export(checkpoint):  # export.py's folder: its graphs (no PyTorch checkpoint in it)
            if backend == "torch":
                raise DataError(f"{checkpoint}: an export folder; evaluate it with --backend onnx or onnx-int8")
            model = export.load_onnx_retriever(checkpoint, backend)
            if model.config.kind != name:
                raise DataError(f"{checkpoint}: holds a {model.config.kind} export, not {name}")
            return model, load_tokenizer(checkpoint), checkpoint
    if name == "zeroshot":
        source = args.model_name_or_path
        try:
            model = BiEncoder.from_backbone(source, pooling=args.pooling)
        except ValueError as exc:  # neither a local folder nor on the hub
            raise DataError(str(exc).splitlines()[0]) from None
        except OSError as exc:
            raise DataError(f"--model_name_or_path {source}: cannot load an encoder ({str(exc).splitlines()[0]})") from None
    else:
        source = checkpoint or f"checkpoints/{name}"
        if not (Path(source) / "config.json").is_file():
            raise DataError(f"{source}: no checkpoint (config.json missing); train it first or pass --checkpoint")
        try:
            model = load_model(source)
        except (OSError, ValueError) as exc:
            raise DataError(str(exc).splitlines()[0]) from None
        if model.config.kind != name:  # the row is labelled with what was loaded, never with what was asked
            raise DataError(f"{source}: holds a {model.config.kind} checkpoint, not {name} "
                            f"(evaluate it as --model {model.config.kind})")  # fmt: skip
    if args.inference_mode:
        model.config.inference_mode = args.inference_mode
    try:
        tokenizer = load_tokenizer(source)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if backend != "torch":
        import export

        try:
            return export.onnx_retriever(model.eval(), backend), tokenizer, source
        except RuntimeError as exc:
            raise DataError(f"{source}: ONNX export failed ({str(exc).splitlines()[0]})") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer, source


def load_data(args, rank: int, world: int):
    """The corpus (ids, texts streamed) and each split's queries and qrels; rank 0 downloads first."""
    if world > 1 and rank != 0:
        dist.barrier()  # rank 0 resolves (and downloads) the dataset first
    try:
        data_dir = resolve_data_dir(args.dataset, args.data_dir, download=rank == 0)
    finally:
        if world > 1 and rank == 0:
            dist.barrier()
    corpus = Corpus(data_dir)
    queries = load_queries(data_dir)
    splits = {split: load_split(data_dir, split, corpus.ids, queries) for split in args.split if split != "dev"}
    dev = None
    if "dev" in args.split or tunes_hybrid(args):  # searched in the same corpus pass; written if asked for
        dev = load_dev(data_dir, args, corpus.ids, queries)
        splits["dev"] = dev[:2]
    splits = {s: splits[s] for s in [*args.split, "dev"] if s in splits}  # the order asked for
    corpus.ids.drop_lookup()  # only the checks above needed it
    return data_dir, corpus, splits, dev and dev[2]


def tunes_hybrid(args) -> bool:
    return bool(args.hybrid) and args.hybrid_fusion == "interpolate" and args.hybrid_weight is None


def load_dev(data_dir: Path, args, doc_ids, queries: dict) -> tuple[dict, dict, str]:
    """Split dev: qrels/dev.tsv, else training's seeded slice of the train queries; and which it is."""
    if (data_dir / "qrels" / "dev.tsv").is_file():
        return (*load_split(data_dir, "dev", doc_ids, queries), "split dev")
    train_queries, _ = load_split(data_dir, "train", doc_ids, queries)  # checked as any split is
    qrels, source = dev_qrels(data_dir, args.dev_seed, args.dev_fraction)
    return {q: train_queries[q] for q in qrels}, qrels, source


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, created = init_distributed()
    try:
        for split in args.split:  # before any encoding: a folder that cannot be written is found now
            check_writable(split_dir(args, split))
        if args.embedding_cache:
            check_writable(args.embedding_cache, "--embedding_cache")
        data_dir, corpus, splits, dev_source = load_data(args, rank, world)
    except DataError as exc:
        fail(str(exc))
    dataset = args.dataset or str(data_dir)
    dtype = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    rows = {split: {} for split in args.split}  # dev may be searched only to tune --hybrid: not written then
    checkpoints, seconds, hybrid, bm25 = {}, {}, {}, None

    def meta(split: str) -> dict:
        # retrieval_seconds: encoding the corpus and the queries of every split, search and metrics
        out = {"split": split, "dataset": dataset, "checkpoints": checkpoints, "dtype": dtype, "backend": args.backend}
        return {**out, "retrieval_seconds": seconds, **({"hybrid": hybrid} if hybrid else {})}

    def write(split: str, tag: str, results: dict) -> None:
        out_dir, qrels = split_dir(args, split), splits[split][1]
        depth = args.trec_depth.get(split, args.top_k)

        def verify(path: Path, metrics: dict) -> None:
            worst = verify_trec(path, qrels, metrics, depth)
            print(f"{tag}/{split}: metrics match pytrec_eval on the run file (max |diff| {worst:.1e})")

        try:  # every file is written whole (temp file, then rename) or not at all
            rows[split][tag] = write_evaluation(out_dir, tag, results, qrels, depth, meta(split), rows=rows[split],
                                                ignore_identical_ids=args.ignore_identical_ids,
                                                verify=verify if args.verify else None)  # fmt: skip
        except OSError as exc:
            fail(f"{out_dir}: cannot write the results ({exc.strerror or exc})")

    for i, name in enumerate(args.model):
        try:
            model, tokenizer, source = load_for_eval(name, args.checkpoint[i] if args.checkpoint else None, args)
        except DataError as exc:
            fail(str(exc))
        tag = args.tag if args.tag and len(args.model) == 1 else name
        checkpoints[tag] = str(source)
        start = time.perf_counter()
        cache = None
        if args.embedding_cache:
            key = cache_key(str(source), model, data_dir, len(corpus), args.doc_max_length,
                            dtype if args.backend == "torch" else args.backend, args.batch_size)  # fmt: skip
            cache = EmbeddingCache(args.embedding_cache, key)
        timings: dict[str, float] = {}
        tops = retrieve_topk(
            model, tokenizer, len(corpus), corpus.reader(), {split: q for split, (q, _) in splits.items()},
            args.top_k, query_max_length=args.query_max_length, doc_max_length=args.doc_max_length,
            batch_size=args.batch_size, bf16=args.bf16, fp16=args.fp16, encode_chunk=args.encode_chunk,
            backend=args.search, rank=rank, world=world, cache=cache, timings=timings,
        )  # fmt: skip
        if rank != 0:
            continue
        runs = {split: to_results(tops[split], list(queries), corpus.ids) for split, (queries, _) in splits.items()}
        for split in args.split:
            write(split, tag, runs[split])
        elapsed = seconds[tag] = time.perf_counter() - start
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if k != "gather" or world > 1)
        cached = f", {cache.hits} cached chunk(s) read, {cache.misses} encoded" if cache else ""
        print(f"{tag}: {len(corpus)} docs, splits {', '.join(splits)}, retrieval {elapsed:.1f}s "
              f"({parts}{' on rank 0' if world > 1 else ''}{cached}; {world} process(es), chunks of "
              f"{args.encode_chunk})", flush=True)  # fmt: skip
        if args.hybrid:
            bm25 = bm25 or bm25_runs(data_dir, corpus, splits, args.top_k)
            fused, hybrid[f"{tag}+bm25"] = fuse_runs(args, tag, runs, bm25, splits, dev_source)
            how = hybrid[f"{tag}+bm25"]
            weight = f", {tag} weight {how['weight']:g} ({how['weight_from']})" if "weight" in how else ""
            print(f"{tag}+bm25: {how['fusion']}{weight}", flush=True)
            for split in args.split:
                write(split, f"{tag}+bm25", fused[split])
    if created:
        dist.destroy_process_group()
    if rank != 0:
        return {}
    summaries = {}
    for split, split_rows in rows.items():
        summary = {**split_rows, **meta(split)}
        write_metrics(split_dir(args, split), split_rows, meta(split))
        print(f"\n{dataset} / {split} ({len(splits[split][1])} judged queries, {dtype})")
        print(format_table(split_rows, TABLE_COLUMNS))
        summaries[split] = summary
    return summaries[args.split[0]] if len(summaries) == 1 else summaries


def bm25_runs(data_dir: Path, corpus: Corpus, splits: dict, top_k: int) -> dict[str, dict]:
    """BM25's run of every split's queries (one index for all of them)."""
    docs = corpus.loaded if corpus.loaded is not None else load_corpus(data_dir)
    run = BM25().search(docs, {q: t for queries, _ in splits.values() for q, t in queries.items()}, top_k)
    return {split: {q: run[q] for q in queries} for split, (queries, _) in splits.items()}


def fuse_runs(args, tag: str, dense: dict, bm25: dict, splits: dict, dev_source: str | None) -> tuple[dict, dict]:
    """The model's run fused with BM25's on every split asked for, and how (recorded in metrics.json):
    the model's weight, fixed by --hybrid_weight or chosen on dev."""
    info = {"fuse": [tag, "bm25"], "fusion": args.hybrid_fusion}
    weight = 0.5 if args.hybrid_weight is None else args.hybrid_weight
    if tunes_hybrid(args):
        dev_qrels = splits["dev"][1]
        weight, scores = choose_weight(dense["dev"], bm25["dev"], dev_qrels, args.top_k)
        info.update(weight=weight, weight_from=f"dev: {dev_source}, {len(dev_qrels)} queries")
        info[f"dev {SELECT_METRIC}"] = {f"{w:g}": s for w, s in scores.items()}
    elif args.hybrid_fusion == "interpolate":
        info.update(weight=weight, weight_from="--hybrid_weight")
    return {s: fuse(dense[s], bm25[s], args.hybrid_fusion, weight, args.top_k) for s in args.split}, info


def verify_trec(path: Path, qrels: dict, metrics: dict[str, float], depth: int, tol: float = 1e-6) -> float:
    """Re-read the written run and score it again; fail if any metric the file is deep enough for differs."""
    again = mean_metrics(per_query_metrics(qrels, read_trec(path)))
    names = [m.name for m in METRICS if m.cutoff <= depth]
    worst = max(abs(again[m] - metrics[m]) for m in names)
    if worst > tol:
        fail(f"{path}: metrics differ from pytrec_eval on the run file by {worst:.2e}")
    return worst


def split_dir(args, split: str) -> Path:
    """--output_dir itself for one split; a subfolder per split when several are evaluated at once."""
    return Path(args.output_dir) if len(args.split) == 1 else Path(args.output_dir) / split


if __name__ == "__main__":
    main()

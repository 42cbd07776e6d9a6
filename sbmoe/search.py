"""Exact search of embeddings, chunk by chunk, with one tie rule; the top-k gathered over ranks.

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

import os

import numpy as np
import torch
import torch.distributed as dist

ENCODE_CHUNK = 50_000  # documents encoded, held and searched at a time (eval.py --encode_chunk)
QUERY_BLOCK = 8_192  # queries per search call and per top-k merge
TIE_MARGIN = 16  # extra candidates asked of a chunk, so a tie across the k-th place is seen whole
TIE_ENTRIES = 2**21  # (query, candidate) pairs per re-search of tied rows, and per torch score block / 4
_ANNOUNCED: set[str] = set()
_GPU_RESOURCES: dict = {}


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
# Sharded top-k: every rank's to rank 0


def broadcast_rows(array: np.ndarray | None, shape: tuple[int, int], rank: int) -> np.ndarray:
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

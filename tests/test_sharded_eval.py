"""Sharded, chunked, cached evaluation: the run does not depend on the chunking, the number of processes,
the search backend or whether the corpus embeddings came from the cache."""

import json
import os

import numpy as np
import pytest
from conftest import torchrun, write_tiny_beir

import sbmoe.retrieval
from sbmoe.data import DataError
from sbmoe.files import read_trec
from sbmoe.results import read_per_query

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def word_backbone(tiny_backbone):
    """tiny_backbone, whose tokenizer knows its words, so documents of one length do not all tie."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    assert tok("protein gene")["input_ids"][1:3] != [tok.unk_token_id] * 2
    return tiny_backbone


def beir_with_ties(folder, n_docs: int = 150, every: int = 5):
    """A tiny BEIR folder of more documents than the top-k (100), every `every`-th one the same text:
    identical embeddings, so exact score ties that the cutoff splits for some queries."""
    write_tiny_beir(folder, n_docs=n_docs)
    lines = (folder / "corpus.jsonl").read_text().splitlines()
    docs = [json.loads(line) for line in lines]
    for i in range(0, n_docs, every):
        docs[i]["title"], docs[i]["text"] = "cancer", "gene cell protein dose risk"
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return folder, {f"d{i}" for i in range(0, n_docs, every)}


def eval_argv(backbone, data_dir, out, *extra):
    return ["--model", "zeroshot", "--model_name_or_path", str(backbone), "--pooling", "mean", "--data_dir",
            str(data_dir), "--split", "test", "train", "--tag", "T", "--verify", "--trec_depth", "train=10",
            "--output_dir", str(out), *extra]  # fmt: skip


def rows(out, split):
    metrics = json.loads((out / split / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k != "retrieval_seconds"}


def test_two_processes_write_the_one_process_run(word_backbone, tmp_path):
    import eval as evaluation

    data, dups = beir_with_ties(tmp_path / "beir")
    one, two = tmp_path / "one", tmp_path / "two"
    evaluation.main(eval_argv(word_backbone, data, one, "--encode_chunk", "40"))
    proc = torchrun("eval.py", *eval_argv(word_backbone, data, two, "--encode_chunk", "40"), env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es), chunks of 40" in proc.stdout
    for split in ("test", "train"):
        a, b = read_trec(one / split / "T.trec.gz"), read_trec(two / split / "T.trec.gz")
        assert a == b and all(list(a[q].items()) == list(b[q].items()) for q in a)  # ids, ranks, scores
        assert (one / split / "T.trec.gz").read_bytes() == (two / split / "T.trec.gz").read_bytes()
        assert rows(one, split) == rows(two, split)
        assert read_per_query(one / split, "T") == read_per_query(two / split, "T")
    # the premise: the duplicated documents tie exactly, and the top-100 cuts through the tie for some query
    run = read_trec(one / "test" / "T.trec.gz")
    assert all(len(set(run[q].values())) > 50 for q in run)  # the other documents do not tie
    assert any(
        len({run[q][d] for d in dups & set(run[q])}) == 1 and 0 < len(dups & set(run[q])) < len(dups) for q in run
    )


def integer_case(seed: int, n_docs: int = 500, n_queries: int = 40, dim: int = 16):
    """Embeddings in {-1, 0, 1}: every inner product is an exact small integer whatever the summation
    order, so ties are many and exact, and every backend computes the same scores."""
    rng = np.random.default_rng(seed)
    d = rng.integers(-1, 2, size=(n_docs, dim)).astype(np.float32)
    q = rng.integers(-1, 2, size=(n_queries, dim)).astype(np.float32)
    return q, d, [f"d{i}" for i in range(n_docs)], [f"q{j}" for j in range(n_queries)]


def reference(q, d, doc_ids, qids, k):
    """Brute force in the one order: score descending, then corpus position ascending."""
    scores = q @ d.T
    out = {}
    for r, qid in enumerate(qids):
        order = np.lexsort((np.arange(len(d)), -scores[r]))[:k]
        out[qid] = {doc_ids[j]: float(scores[r, j]) for j in order}
    return out


def same_ranking(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(list(a[q].items()) == list(b[q].items()) for q in a)


@pytest.mark.parametrize("chunk", [7, 37, 100, 499])
def test_chunked_search_equals_unchunked_search_ties_included(chunk):
    from sbmoe.search import search

    q, d, doc_ids, qids = integer_case(0)
    whole = search(q, d, doc_ids, qids, 100)
    assert same_ranking(whole, reference(q, d, doc_ids, qids, 100))
    assert same_ranking(search(q, d, doc_ids, qids, 100, chunk=chunk), whole)
    rng = np.random.default_rng(1)  # real-valued embeddings: same documents and the very same scores
    qf, df = rng.standard_normal((30, 24)).astype(np.float32), rng.standard_normal((400, 24)).astype(np.float32)
    ids, qf_ids = [f"d{i}" for i in range(400)], [f"q{j}" for j in range(30)]
    assert same_ranking(search(qf, df, ids, qf_ids, 100, chunk=chunk), search(qf, df, ids, qf_ids, 100))


def test_torch_topk_path_equals_faiss(monkeypatch):
    from sbmoe.search import resolve_backend, search

    q, d, doc_ids, qids = integer_case(2)
    faiss_run = search(q, d, doc_ids, qids, 100, backend="faiss")
    assert same_ranking(search(q, d, doc_ids, qids, 100, chunk=61, backend="torch"), faiss_run)  # exact ties
    assert same_ranking(search(q, d, doc_ids, qids, 100, backend="torch"), faiss_run)
    rng = np.random.default_rng(3)
    qf, df = rng.standard_normal((50, 32)).astype(np.float32), rng.standard_normal((700, 32)).astype(np.float32)
    ids, qf_ids = [f"d{i}" for i in range(700)], [f"q{j}" for j in range(50)]
    a, b = search(qf, df, ids, qf_ids, 100, chunk=300, backend="torch"), search(qf, df, ids, qf_ids, 100)
    assert all(list(a[x]) == list(b[x]) for x in qf_ids)  # same documents in the same ranks
    assert max(abs(a[x][y] - b[x][y]) for x in qf_ids for y in a[x]) < 1e-5  # scores to float32 rounding
    monkeypatch.setenv("EVAL_SEARCH_BACKEND", "torch")
    assert resolve_backend("auto") == "torch" and resolve_backend("faiss") == "faiss"


def test_embedding_cache_is_reused_without_encoding_the_corpus(word_backbone, tiny_beir, tmp_path, monkeypatch, capsys):
    import eval as evaluation
    from sbmoe import search as search_module

    cache = tmp_path / "cache"
    first, second = tmp_path / "first", tmp_path / "second"
    extra = ["--encode_chunk", "25", "--embedding_cache", str(cache)]
    evaluation.main(eval_argv(word_backbone, tiny_beir, first, *extra))
    files = sorted(cache.glob("*/chunk-*.npy"))
    assert len(files) == 3 and not list(cache.glob("*/.*"))  # 60 docs in chunks of 25; no temp file left
    assert np.load(files[0], mmap_mode="r").shape == (25, 32)
    real = sbmoe.retrieval.encode_texts

    def queries_only(model, tokenizer, texts, *args, desc="encode", **kw):
        assert desc != "corpus", "the corpus was encoded again"
        return real(model, tokenizer, texts, *args, desc=desc, **kw)

    monkeypatch.setattr(sbmoe.retrieval, "encode_texts", queries_only)
    capsys.readouterr()
    evaluation.main(eval_argv(word_backbone, tiny_beir, second, *extra))
    assert "3 cached chunk(s) read, 0 encoded" in capsys.readouterr().out
    for split in ("test", "train"):  # the same embeddings, the same search: the same bytes
        assert (first / split / "T.trec.gz").read_bytes() == (second / split / "T.trec.gz").read_bytes()
        assert rows(first, split) == rows(second, split)
    monkeypatch.setattr(search_module, "_ANNOUNCED", set())  # the backend is announced once per process
    evaluation.main(eval_argv(word_backbone, tiny_beir, tmp_path / "torch", *extra, "--search", "torch"))
    assert "torch: exact inner product on cpu" in capsys.readouterr().out
    a, b = read_trec(first / "test" / "T.trec.gz"), read_trec(tmp_path / "torch" / "test" / "T.trec.gz")
    assert a.keys() == b.keys() and all(a[q].keys() == b[q].keys() for q in a)  # all 60 documents
    assert max(abs(a[q][d] - b[q][d]) for q in a for d in a[q]) < 1e-5  # (this random BERT's scores nearly tie)
    monkeypatch.setattr(sbmoe.retrieval, "encode_texts", real)
    # another truncation is another key: encoded again, into a second folder
    evaluation.main(eval_argv(word_backbone, tiny_beir, tmp_path / "fourth", *extra, "--doc_max_length", "5"))
    assert len(list(cache.glob("*/key.json"))) == 2


def test_streamed_corpus_reads_what_load_corpus_reads(tmp_path):
    """eval.py never loads the corpus whole: ids once, texts by record range; the same texts, in the same
    order, as load_corpus + doc_text (gzip and blank lines included); a repeated id is an error."""
    import gzip

    from sbmoe.data import Corpus, DocIds, doc_text, iter_corpus_ids, load_corpus

    folder = write_tiny_beir(tmp_path / "gz", n_docs=30, gz=True)
    with gzip.open(folder / "corpus.jsonl.gz", "rt") as fh:
        lines = fh.read().splitlines()
    lines.insert(7, "   ")
    lines[3] = json.dumps({"_id": 3, "text": "no title"})  # integer id, missing title
    with gzip.open(folder / "corpus.jsonl.gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n\n")
    loaded = load_corpus(folder)
    corpus = Corpus(folder)
    texts = corpus.reader()
    assert list(corpus.ids) == list(loaded) and len(corpus) == 30
    assert "d29" in corpus.ids and "3" in corpus.ids and "d3" not in corpus.ids and corpus.ids[3] == "3"
    want = [doc_text(d) for d in loaded.values()]
    assert texts(0, 10) + texts(12, 30) == want[:10] + want[12:]  # forward, skipping records unparsed
    assert corpus.reader()(5, 8) == [doc_text(loaded[d]) for d in corpus.ids[5:8]]
    plain = write_tiny_beir(tmp_path / "dup", n_docs=10)
    with open(plain / "corpus.jsonl", "a") as fh:
        fh.write(json.dumps({"_id": "d2", "title": "", "text": "protein again"}) + "\n")
    assert Corpus(folder).ids.repeated() == 0
    assert DocIds(iter_corpus_ids(plain)).repeated() == 1
    with pytest.raises(DataError, match=r"corpus.jsonl:11: document id 'd2' repeats line 3"):
        Corpus(plain)  # a repeated id is load_corpus' error, never a silent choice of one record

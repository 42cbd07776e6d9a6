"""Tiny BEIR folders and tiny random BERTs for tests and for scripts that measure plumbing (scripts/measure_sampling.py,
the lab's transfer demo): nothing is downloaded, every file is made from a seed.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

WORDS = (
    "protein gene cell cancer virus immune brain heart drug trial mouse dose risk blood lung liver "
    "insulin vitamin neuron receptor enzyme tumor therapy infection memory sleep diet exercise"
).split()


def write_tiny_beir(folder: Path, n_docs: int = 60, n_queries: int = 24, gz: bool = False, seed: int = 0) -> Path:
    """A BEIR folder whose queries share words with their positives, so training can learn."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for i in range(n_docs):
        words = rng.sample(WORDS, 6)
        docs.append({"_id": f"d{i}", "title": words[0], "text": " ".join(words[1:]), "metadata": {}})
    lines = "".join(json.dumps(d) + "\n" for d in docs)
    if gz:
        with gzip.open(folder / "corpus.jsonl.gz", "wt", encoding="utf-8") as fh:
            fh.write(lines)
    else:
        (folder / "corpus.jsonl").write_text(lines)
    queries, train, test = [], [], []
    for j in range(n_queries):
        pos = [rng.randrange(n_docs)] + ([rng.randrange(n_docs)] if j % 4 == 0 else [])
        words = docs[pos[0]]["text"].split()[:3]
        queries.append({"_id": f"q{j}", "text": " ".join(words), "metadata": {}})
        rows = train if j < n_queries * 2 // 3 else test
        rows.extend(f"q{j}\td{p}\t1" for p in dict.fromkeys(pos))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels").mkdir(exist_ok=True)
    header = "query-id\tcorpus-id\tscore"
    for name, rows in (("train", train), ("test", test)):
        (folder / "qrels" / f"{name}.tsv").write_bytes(("\r\n".join([header, *rows]) + "\r\n").encode())
    return folder


def write_tiny_backbone(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised BERT with a word-level vocabulary, saved as a local model folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(folder / "vocab.txt")).save_pretrained(folder)  # vocab_file= is ignored in transformers 5
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=hidden * 2, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)
    return folder


def write_graded_beir(
    folder: Path, n_docs: int = 80, n_train: int = 30, n_dev: int = 8, n_test: int = 8, judged: int = 6,
    dev: bool = True, seed: int = 0,
) -> Path:  # fmt: skip
    """A BEIR folder like the big ones: graded relevance (0/1/2), up to `judged` judged documents per query
    (many positives), every 7th query with only relevance-0 judgments (no positive), empty titles on even
    documents and, with `dev`, an official qrels/dev.tsv."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for i in range(n_docs):
        words = rng.sample(WORDS, 6)
        docs.append({"_id": f"d{i}", "title": "" if i % 2 == 0 else words[0], "text": " ".join(words[1:])})
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries, splits = [], {"train": [], "dev": [], "test": []}
    names = ["train"] * n_train + ["dev"] * (n_dev if dev else 0) + ["test"] * n_test
    for j, split in enumerate(names):
        picked = rng.sample(range(n_docs), 2 + j % max(1, judged - 1))  # 2 .. judged documents
        grades = [0] * len(picked) if j % 7 == 3 else [0] + [1 + (k % 2) for k in range(len(picked) - 1)]
        first = picked[grades.index(max(grades))]
        queries.append({"_id": f"q{j}", "text": " ".join(docs[first]["text"].split()[:3])})
        splits[split].extend(f"q{j}\td{p}\t{g}" for p, g in zip(picked, grades))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels").mkdir(exist_ok=True)
    for split, rows in splits.items():
        if rows:
            (folder / "qrels" / f"{split}.tsv").write_text("\n".join(["query-id\tcorpus-id\tscore", *rows]) + "\n")
    return folder

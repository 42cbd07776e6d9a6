"""eval.py end to end on a tiny BEIR folder and a tiny random BERT: files, table, exact metrics."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import pytrec_eval
from conftest import ROOT

from sbmoe.data import load_beir
from sbmoe.files import read_trec


def test_zeroshot_end_to_end_metrics_equal_pytrec_eval_on_the_trec_file(tiny_backbone, tiny_beir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "eval.py", "--model", "zeroshot", "--model_name_or_path", str(tiny_backbone),
         "--pooling", "mean", "--data_dir", str(tiny_beir), "--output_dir", str(out), "--batch_size", "7", "--verify"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| model"))
    assert header.split("|")[2:8] == [f" {c} " for c in ("Recall@1", "Recall@5", "Recall@10", "Recall@100", "NDCG@10", "MRR@10")]
    assert "FAISS: exact inner product on CPU" in proc.stdout
    assert "metrics match pytrec_eval on the run file" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["checkpoints"]["zeroshot"] == str(tiny_backbone)
    assert metrics["dtype"] == "fp32" and metrics["retrieval_seconds"]["zeroshot"] > 0
    _, _, qrels = load_beir(tiny_beir, "test")
    run = read_trec(out / "zeroshot.trec.gz")
    assert set(run) == set(qrels) and all(len(docs) == 60 for docs in run.values())  # top_k capped at the corpus
    measures = {"ndcg_cut.10", "recall.1,5,10,100", "recip_rank"}
    ev = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    mean = lambda key: np.mean([v[key] for v in ev.values()])  # noqa: E731
    got = metrics["zeroshot"]
    assert got["NDCG@10"] == pytest.approx(mean("ndcg_cut_10"), abs=1e-6)
    for k in (1, 5, 10, 100):
        assert got[f"Recall@{k}"] == pytest.approx(mean(f"recall_{k}"), abs=1e-6)
    top10 = {q: dict(sorted(d.items(), key=lambda x: (x[1], x[0]), reverse=True)[:10]) for q, d in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    assert got["MRR@10"] == pytest.approx(np.mean([v["recip_rank"] for v in rr.values()]), abs=1e-6)


def test_length_sorted_encoding_equals_one_by_one(tiny_backbone):
    from transformers import AutoTokenizer

    from model import BiEncoder
    from sbmoe.encoding import encode_texts

    model = BiEncoder.from_backbone(str(tiny_backbone), pooling="mean").eval()
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    texts = ["protein", "gene cell cancer virus immune brain", "heart drug", "mouse dose risk blood lung"]
    batched = encode_texts(model, tok, texts, max_length=16, batch_size=3, show_progress=False)
    single = np.concatenate([encode_texts(model, tok, [t], 16, batch_size=1, show_progress=False) for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)

"""Metrics are pytrec_eval's, with BEIR's definitions, and survive a round trip through a TREC file."""

import math
import random

import pytest
import pytrec_eval

import sbmoe.metrics
import sbmoe.results
from sbmoe.data import DataError
from sbmoe.files import read_trec, write_trec
from sbmoe.metrics import evaluate_run, per_query_metrics, truncate_run


def random_case(seed, n_queries=30, n_docs=200):
    rng = random.Random(seed)
    qrels = {f"q{i}": {f"d{rng.randrange(n_docs)}": rng.choice([1, 1, 2]) for _ in range(rng.randint(1, 4))}
             for i in range(n_queries)}  # fmt: skip
    run = {q: {f"d{j}": rng.random() for j in rng.sample(range(n_docs), 120)} for q in qrels}
    return qrels, run


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_pytrec_eval_on_random_runs(seed):
    qrels, run = random_case(seed)
    ours = evaluate_run(qrels, run)
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.1,5,10,100", "map_cut.100"}).evaluate(run)
    mean = lambda key: sum(v[key] for v in ev.values()) / len(qrels)  # noqa: E731
    assert ours["NDCG@10"] == pytest.approx(mean("ndcg_cut_10"), abs=1e-9)
    for k in (1, 5, 10, 100):
        assert ours[f"Recall@{k}"] == pytest.approx(mean(f"recall_{k}"), abs=1e-9)
    assert ours["MAP@100"] == pytest.approx(mean("map_cut_100"), abs=1e-9)
    # MRR@10 by hand: reciprocal rank of the first relevant document within the top 10
    hand = []
    for q, docs in run.items():
        top = sorted(docs, key=lambda d: docs[d], reverse=True)[:10]
        hand.append(next((1 / (i + 1) for i, d in enumerate(top) if qrels[q].get(d, 0) > 0), 0.0))
    assert ours["MRR@10"] == pytest.approx(sum(hand) / len(hand), abs=1e-9)


def test_hand_made_case():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1, "c": 1}, "q3": {"z": 1}}
    run = {"q1": {"x": 3.0, "a": 2.0}, "q2": {"b": 5.0, "y": 4.0, "c": 3.0}}  # q3 retrieved nothing
    per_q = per_query_metrics(qrels, run)
    assert per_q["q1"]["MRR@10"] == 0.5 and per_q["q1"]["Recall@1"] == 0.0
    assert per_q["q1"]["NDCG@10"] == pytest.approx(1 / math.log2(3))
    idcg = 1 + 1 / math.log2(3)
    assert per_q["q2"]["NDCG@10"] == pytest.approx((1 + 1 / math.log2(4)) / idcg)
    assert per_q["q2"]["Recall@1"] == 0.5 and per_q["q2"]["Recall@5"] == 1.0
    assert per_q["q3"] == {k: 0.0 for k in per_q["q3"]}  # judged but missing: counts as zero
    assert evaluate_run(qrels, run)["MRR@10"] == pytest.approx((0.5 + 1 + 0) / 3)


def test_identical_ids_dropped_only_when_asked(capsys):
    qrels = {"q1": {"a": 1}}
    run = {"q1": {"q1": 9.0, "a": 1.0}}
    assert evaluate_run(qrels, run)["MRR@10"] == 0.5
    assert evaluate_run(qrels, run, ignore_identical_ids=True)["MRR@10"] == 1.0
    assert "dropped 1" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["run.trec", "run.trec.gz"])
def test_trec_round_trip_keeps_every_metric(tmp_path, name):
    import gzip

    qrels, run = random_case(7)
    write_trec(tmp_path / name, run, "tag", top_k=100)
    back = read_trec(tmp_path / name)
    assert back == truncate_run(run, 100)
    a, b = evaluate_run(qrels, truncate_run(run, 100)), evaluate_run(qrels, back)
    assert a == b
    raw = (tmp_path / name).read_bytes()
    text = gzip.decompress(raw).decode() if name.endswith(".gz") else raw.decode()
    assert raw[:2] == b"\x1f\x8b" if name.endswith(".gz") else raw[:2] != b"\x1f\x8b"  # really compressed, or not
    first = text.splitlines()[0].split()
    assert first[1] == "Q0" and first[3] == "1" and first[5] == "tag"


def test_every_metric_comes_from_the_one_list_and_a_new_entry_flows_through(tmp_path, monkeypatch):
    qrels, run = random_case(3)
    extra = sbmoe.metrics.Metric("NDCG@5", "ndcg_cut", 5)
    monkeypatch.setattr(sbmoe.metrics, "METRICS", (*sbmoe.metrics.METRICS, extra))
    monkeypatch.setattr(sbmoe.results, "METRICS", sbmoe.metrics.METRICS)
    per_query = per_query_metrics(qrels, run, metrics=sbmoe.metrics.METRICS)
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.5"}).evaluate(run)
    assert all(per_query[q]["NDCG@5"] == pytest.approx(ev[q]["ndcg_cut_5"]) for q in ev)
    write_trec(tmp_path / "r.trec.gz", run, "t", 100)
    means = sbmoe.metrics.mean_metrics(per_query)
    assert sbmoe.results.verify_run(tmp_path / "r.trec.gz", qrels, means, depth=100) < 1e-9  # no KeyError
    means["NDCG@5"] += 0.01
    with pytest.raises(DataError, match="metrics differ"):
        sbmoe.results.verify_run(tmp_path / "r.trec.gz", qrels, means, depth=100)


def test_compare_pairs_per_query_files_and_rejects_mismatched_queries(tmp_path, capsys):
    import json

    from scipy import stats

    from lab import compare

    qrels, run = random_case(5)
    rng = random.Random(0)
    other = {q: {d: s + rng.random() for d, s in docs.items()} for q, docs in run.items()}  # a reshuffled ranking
    a, b = per_query_metrics(qrels, run), per_query_metrics(qrels, other)
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    got = compare.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    qids = sorted(a)
    x, y = [a[q]["NDCG@10"] for q in qids], [b[q]["NDCG@10"] for q in qids]
    assert len(set(x) ^ set(y)) > 0  # the runs differ, so the tests have something to find
    assert got["mean_diff"] == pytest.approx(sum(x) / len(x) - sum(y) / len(y), abs=1e-12)
    assert got["t_pvalue"] == pytest.approx(stats.ttest_rel(x, y).pvalue)
    assert 0 < got["rand_pvalue"] <= 1 and "randomisation p" in capsys.readouterr().out
    del b[qids[0]]
    (tmp_path / "b.json").write_text(json.dumps(b))
    with pytest.raises(SystemExit) as exc:
        compare.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert exc.value.code == 2 and "score different queries" in capsys.readouterr().err


def test_compare_subset_keeps_unseen_or_seen_test_queries(tiny_beir, tmp_path, monkeypatch, capsys):
    import json

    from lab import compare
    from sbmoe.data import load_beir, unseen_document_queries

    monkeypatch.setenv("BEIR_DATA_DIR", str(tiny_beir.parent))
    _, _, train = load_beir(tiny_beir, "train")
    _, _, test = load_beir(tiny_beir, "test")
    unseen = unseen_document_queries(train, test)
    a = {q: {"NDCG@10": 0.5 + 0.1 * (i % 3)} for i, q in enumerate(sorted(test))}
    b = {q: {"NDCG@10": 0.5} for q in test}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    for subset, qids in (("unseen", unseen), ("seen", sorted(set(test) - set(unseen)))):
        if len(qids) < 2:
            continue
        got = compare.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--subset", subset, "--dataset", "tiny"])
        assert got["mean_diff"] == pytest.approx(sum(a[q]["NDCG@10"] - 0.5 for q in qids) / len(qids))
        assert f"over {len(qids)} queries ({subset})" in capsys.readouterr().out
    assert len(unseen) >= 2  # the tiny folder has such queries, so the unseen branch above ran
    (tmp_path / "c.json").write_text(json.dumps({"zz": {"NDCG@10": 1.0}, "zy": {"NDCG@10": 0.0}}))
    (tmp_path / "d.json").write_text(json.dumps({"zz": {"NDCG@10": 0.0}, "zy": {"NDCG@10": 1.0}}))
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path / "c.json"), str(tmp_path / "d.json"), "--subset", "unseen", "--dataset", "tiny"])
    assert "does not score tiny's test queries" in capsys.readouterr().err

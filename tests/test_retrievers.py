"""The retrieval interface, run fusion (hand-computed values on toy runs), eval.py --hybrid and hybrid runs."""

import argparse
import json

import pytest
from conftest import ZEROSHOT_AND_BASELINE

from lab.runner import Runner
from sbmoe.data import dev_qrels, load_beir, split_dev
from sbmoe.retrieval import BM25, WEIGHTS, Hybrid, choose_weight, fuse, interpolate, min_max, rrf

FIRST = {"q1": {"d1": 3.0, "d2": 2.0, "d3": 1.0}}  # min-max: d1 1, d2 0.5, d3 0
SECOND = {"q1": {"d2": 10.0, "d4": 0.0}}  # min-max: d2 1, d4 0


def test_min_max_maps_each_query_to_unit_range_and_equal_scores_to_zero():
    assert min_max({"q": {"a": 4.0, "b": 2.0, "c": 3.0}, "one": {"a": 7.0}}) == {
        "q": {"a": 1.0, "b": 0.0, "c": 0.5}, "one": {"a": 0.0}}  # fmt: skip


def test_interpolation_weights_first_run_and_gives_missing_documents_zero():
    fused = interpolate(FIRST, SECOND, 0.3)
    assert fused["q1"] == pytest.approx({"d1": 0.3, "d2": 0.3 * 0.5 + 0.7 * 1.0, "d3": 0.0, "d4": 0.0})
    assert interpolate(FIRST, SECOND, 1.0)["q1"] == pytest.approx({"d1": 1.0, "d2": 0.5, "d3": 0.0, "d4": 0.0})
    alone = interpolate(FIRST, {}, 0.5)["q1"]  # a query the second run lacks
    assert alone == pytest.approx({"d1": 0.5, "d2": 0.25, "d3": 0.0})


def test_rrf_sums_reciprocal_ranks_with_k_60():
    fused = rrf(FIRST, SECOND)["q1"]
    assert fused == pytest.approx({"d1": 1 / 61, "d2": 1 / 62 + 1 / 61, "d3": 1 / 63, "d4": 1 / 62})


def test_fuse_cuts_to_top_k_in_trec_eval_order():
    fused = fuse(FIRST, SECOND, "interpolate", 0.5, top_k=2)["q1"]
    assert fused == pytest.approx({"d2": 0.75, "d1": 0.5})
    with pytest.raises(ValueError, match="fusion 'sum'"):
        fuse(FIRST, SECOND, "sum")


def test_weight_chosen_on_dev_and_ties_go_to_the_equal_weight():
    first, second = {"q": {"x": 1.0, "r": 0.0}}, {"q": {"r": 1.0, "x": 0.0}}  # fused: x = w, r = 1 - w
    weight, scores = choose_weight(first, second, {"q": {"r": 1}})
    assert set(scores) == set(WEIGHTS) and len(WEIGHTS) == 11
    assert [w for w, s in scores.items() if s == 1.0] == [0.0, 0.1, 0.2, 0.3, 0.4]  # at 0.5 the tie puts x first
    assert weight == 0.4  # the best weights' nearest to 0.5
    weight, _ = choose_weight(first, second, {"q": {"x": 1}})
    assert weight == 0.5  # 0.5 .. 1.0 all rank x first
    assert choose_weight(first, first, {"q": {"r": 1}})[0] == 0.5  # every weight scores the same


class Fixed:
    def __init__(self, run):
        self.run = run

    def search(self, corpus, queries, top_k=100):
        return {q: self.run[q] for q in queries}


def test_hybrid_fits_its_weight_on_dev_then_fuses():
    first = Fixed({"dev": {"x": 1.0, "r": 0.0}, "t": {"a": 2.0, "b": 1.0}})
    second = Fixed({"dev": {"r": 1.0, "x": 0.0}, "t": {"b": 5.0, "c": 1.0}})
    hybrid = Hybrid(first, second).fit({}, {"dev": ""}, {"dev": {"r": 1}})
    assert hybrid.weight == 0.4 and hybrid.dev_scores[0.4] == 1.0
    assert hybrid.search({}, {"t": ""}, 100)["t"] == pytest.approx({"a": 0.4, "b": 0.6, "c": 0.0})
    assert Hybrid(first, second, weight=0.9).fit({}, {"dev": ""}, {"dev": {"r": 1}}).weight == 0.4  # fit decides
    assert set(Hybrid(first, second, fusion="rrf").fit({}, {}, {}).search({}, {"t": ""})["t"]) == {"a", "b", "c"}


def test_dev_qrels_are_the_official_split_or_trainings_seeded_slice(tiny_beir):
    _, _, train = load_beir(tiny_beir, "train")
    qrels, source = dev_qrels(tiny_beir)
    assert qrels == split_dev(train, 0.1, 42)[1] and source == "slice of train (10%, seed 42)"
    union, source = dev_qrels(tiny_beir, [42, 43], 0.25)
    assert union == {**split_dev(train, 0.25, 42)[1], **split_dev(train, 0.25, 43)[1]}
    assert source == "slice of train (25%, seeds 42, 43)"
    (tiny_beir / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td3\t1\n")
    assert dev_qrels(tiny_beir) == ({"q1": {"d3": 1}}, "split dev")


def test_bm25_retriever_ranks_the_matching_document_first():
    corpus = {"a": {"title": "", "text": "protein folding in cells"}, "b": {"title": "", "text": "heart rate"}}
    run = BM25().search(corpus, {"q": "protein cells"}, top_k=2)
    assert max(run["q"], key=run["q"].get) == "a"


# --------------------------------------------------------------------------------------------
# eval.py --hybrid bm25 and the runner's hybrid runs


def test_eval_hybrid_bm25_writes_the_fused_run_with_the_weight_chosen_on_dev(tiny_backbone, tiny_beir, tmp_path):
    import eval as evaluation
    from sbmoe.data import load_corpus
    from sbmoe.files import read_trec
    from sbmoe.metrics import truncate_run
    from sbmoe.results import read_per_query, run_path

    common = ["--model", "zeroshot", "--model_name_or_path", str(tiny_backbone), "--pooling", "mean",
              "--data_dir", str(tiny_beir), "--batch_size", "7", "--verify", "--hybrid", "bm25"]  # fmt: skip
    out = tmp_path / "tuned"
    summary = evaluation.main([*common, "--output_dir", str(out)])
    how = summary["hybrid"]["zeroshot+bm25"]
    dev, source = dev_qrels(tiny_beir)
    assert how["weight_from"] == f"dev: {source}, {len(dev)} queries" and how["fuse"] == ["zeroshot", "bm25"]
    assert how["weight"] in WEIGHTS and set(how["dev NDCG@10"]) == {f"{w:g}" for w in WEIGHTS}
    assert not (out / "dev").exists()  # dev tuned the weight; only the asked-for split is written
    _, queries, qrels = load_beir(tiny_beir, "test")
    bm25 = BM25().search(load_corpus(tiny_beir), queries, 100)
    expected = truncate_run(fuse(read_trec(run_path(out, "zeroshot")), bm25, "interpolate", how["weight"]), 100)
    assert read_trec(run_path(out, "zeroshot+bm25")) == expected  # scores are written losslessly
    assert set(read_per_query(out, "zeroshot+bm25")) == set(qrels)
    assert summary["zeroshot+bm25"]["NDCG@10"] == pytest.approx(evaluate_ndcg(qrels, expected))

    fixed = evaluation.main([*common, "--output_dir", str(tmp_path / "fixed"), "--hybrid_weight", "0.3"])
    assert fixed["hybrid"]["zeroshot+bm25"] == {"fuse": ["zeroshot", "bm25"], "fusion": "interpolate",
                                                "weight": 0.3, "weight_from": "--hybrid_weight"}  # fmt: skip
    expected = truncate_run(fuse(read_trec(run_path(out, "zeroshot")), bm25, "interpolate", 0.3), 100)
    assert read_trec(run_path(tmp_path / "fixed", "zeroshot+bm25")) == expected  # 0.3 is the model's weight
    rrf_run = evaluation.main([*common, "--output_dir", str(tmp_path / "rrf"), "--hybrid_fusion", "rrf"])
    assert rrf_run["hybrid"]["zeroshot+bm25"] == {"fuse": ["zeroshot", "bm25"], "fusion": "rrf"}
    both = evaluation.main([*common, "--output_dir", str(tmp_path / "both"), "--split", "test", "dev"])
    runs = [read_trec(run_path(tmp_path / "both" / "dev", tag)) for tag in ("zeroshot", "zeroshot+bm25")]
    assert set(runs[0]) == set(runs[1]) == set(dev)  # dev asked for: written, and the weight chosen on it
    _, train_queries, _ = load_beir(tiny_beir, "train")
    bm25_dev = BM25().search(load_corpus(tiny_beir), {q: train_queries[q] for q in dev}, 100)
    weight, scores = choose_weight(runs[0], bm25_dev, dev, 100)
    assert both["test"]["hybrid"]["zeroshot+bm25"]["weight"] == weight == how["weight"]
    assert how["dev NDCG@10"] == {f"{w:g}": s for w, s in scores.items()}
    with pytest.raises(SystemExit):
        evaluation.parse_args([*common, "--hybrid_weight", "1.5"])


def evaluate_ndcg(qrels, run):
    from sbmoe.metrics import evaluate_run

    return evaluate_run(qrels, run)["NDCG@10"]


HYBRIDS = """
name = "tiny-hybrid"
seeds = [42]
subsets = ["unseen", "seen"]
recipe = { num_train_epochs = 1 }

[runs.bm25]
kind = "bm25"
""" + ZEROSHOT_AND_BASELINE + """
[runs.bm25-zeroshot]
kind = "hybrid"
fuse = ["bm25", "zeroshot"]
reference = ["bm25", "zeroshot"]

[runs.bm25-baseline]
kind = "hybrid"
fuse = ["bm25", "baseline"]
reference = ["bm25", "baseline"]

[runs.fixed]
kind = "hybrid"
fuse = ["zeroshot", "bm25"]
weight = 0.3

[runs.rrf]
kind = "hybrid"
fuse = ["bm25", "baseline"]
fusion = "rrf"
"""


def test_runner_fuses_run_files_per_seed_with_the_weight_chosen_on_their_dev_runs(tiny_backbone, tiny_beir, tmp_path):
    from lab import experiment
    from sbmoe.files import read_trec
    from sbmoe.metrics import truncate_run
    from sbmoe.results import read_metrics, run_path

    (tmp_path / "h.toml").write_text(HYBRIDS)
    res = tmp_path / "res"
    experiment.main(list(map(str, [tmp_path / "h.toml", "--model_name_or_path", tiny_backbone, "--data_dir", tiny_beir,
                                   "--results", res, "--ckpt_root", tmp_path / "ck", "--smoke", "--in_process",
                                   "--extra", "--per_device_train_batch_size", "4", "--dev_fraction", "0.2"])))  # fmt: skip
    root = res / "tiny-hybrid"
    data = res / "tiny-hybrid" / "smoke-data" / tiny_beir.name  # what --smoke evaluates on (a slice of a big one)
    data = data if data.is_dir() else tiny_beir
    dev, source = dev_qrels(data, [42], 0.2)
    assert source == "slice of train (20%, seed 42)"
    for folder, tag in ((root / "bm25" / "dev", "bm25"), (root / "zeroshot" / "dev", "zeroshot"),
                        (root / "baseline" / "seed42" / "dev", "baseline")):  # fmt: skip
        assert set(read_trec(run_path(folder, tag))) == set(dev)  # the fused runs wrote dev runs of training's slice
    run = lambda folder, tag: read_trec(run_path(folder, tag))  # noqa: E731
    how = read_metrics(root / "bm25-baseline" / "seed42" / "test")["hybrid"]
    assert how["weight_from"] == f"dev: {source}, {len(dev)} queries" and how["fuse"] == ["bm25", "baseline"]
    chosen = choose_weight({q: run(root / "bm25" / "dev", "bm25")[q] for q in dev},
                           {q: run(root / "baseline" / "seed42" / "dev", "baseline")[q] for q in dev}, dev, 100)[0]  # fmt: skip
    assert how["weight"] == chosen
    fused = fuse(run(root / "bm25" / "test", "bm25"), run(root / "baseline" / "seed42" / "test", "baseline"),
                 "interpolate", chosen)  # fmt: skip
    assert run(root / "bm25-baseline" / "seed42" / "test", "bm25-baseline") == truncate_run(fused, 100)
    assert (root / "bm25-zeroshot" / "test" / "bm25-zeroshot.trec.gz").is_file()  # untrained: no seed level
    assert read_metrics(root / "fixed" / "test")["hybrid"]["weight"] == 0.3
    assert read_metrics(root / "rrf" / "seed42" / "test")["hybrid"]["fusion"] == "rrf"
    report = json.loads((root / "report.json").read_text())
    tests = {(t["run"], t["reference"]) for t in report["stages"][0]["tests"]}
    assert {("bm25-baseline", "bm25"), ("bm25-baseline", "baseline"), ("bm25-zeroshot", "zeroshot")} <= tests
    assert "- bm25-baseline: min-max normalised scores, bm25 weighted" in (root / "report.md").read_text()
    for path in (root / "bm25" / "dev").iterdir():  # one fused run without its dev run: the equal weight, said so
        path.unlink()
    args = argparse.Namespace(results=res, ckpt_root=tmp_path / "ck", model_name_or_path=None, fp16=False, bf16=False,
                              extra=["--dev_fraction", "0.2"], smoke=False)  # fmt: skip
    runner = Runner(experiment.load_experiment(tmp_path / "h.toml"), args, data)
    assert runner.hybrid(runner.exp.runs["bm25-baseline"], 42) is None
    how = read_metrics(root / "bm25-baseline" / "seed42" / "test")["hybrid"]
    assert how["weight"] == 0.5 and how["weight_from"].startswith("equal weight: the fused runs have no dev run")


def test_hybrid_runs_are_checked_in_the_experiment_file(tmp_path):
    from lab import experiment
    from sbmoe.data import DataError

    base = '[runs.bm25]\nkind = "bm25"\n[runs.zs]\nkind = "zeroshot"\n[runs.h]\nkind = "hybrid"\n'
    for extra, message in (('fuse = ["bm25"]', "fuse must name two different runs"),
                           ('fuse = ["bm25", "nope"]', "'nope' is not a"),
                           ('fuse = ["bm25", "zs"]\nweight = 1.5', "weight must be in"),
                           ('fuse = ["bm25", "zs"]\nfusion = "sum"', "fusion must be one of"),
                           ('fuse = ["bm25", "zs"]\ntrain = { x = true }', "a hybrid has no train"),
                           ("", "`fuse`")):  # fmt: skip
        (tmp_path / "e.toml").write_text(base + extra + "\n")
        with pytest.raises(DataError, match=message):
            experiment.load_experiment(tmp_path / "e.toml")
    (tmp_path / "e.toml").write_text('[runs.bm25]\nkind = "bm25"\nweight = 0.5\n')
    with pytest.raises(DataError, match="belong to kind 'hybrid'"):
        experiment.load_experiment(tmp_path / "e.toml")


def test_dense_and_hybrid_retrievers_share_the_interface(tiny_backbone, tiny_beir):
    from sbmoe.retrieval import Dense, retrieve

    corpus, queries, qrels = load_beir(tiny_beir, "test")
    from model import BiEncoder
    from sbmoe.hub import load_tokenizer

    model = BiEncoder.from_backbone(str(tiny_backbone), pooling="mean").eval()
    dense = Dense(model, load_tokenizer(tiny_backbone), show_progress=False)
    run = dense.search(corpus, queries, 5)
    assert run == retrieve(dense.model, dense.tokenizer, corpus, queries, 5, show_progress=False)
    assert all(len(docs) == 5 for docs in run.values())
    _, train_queries, train_qrels = load_beir(tiny_beir, "train")
    hybrid = Hybrid(BM25(), dense).fit(corpus, train_queries, train_qrels, 10)
    bm25_dev, dense_dev = BM25().search(corpus, train_queries, 10), dense.search(corpus, train_queries, 10)
    assert hybrid.weight == choose_weight(bm25_dev, dense_dev, train_qrels, 10)[0]
    bm25_test, dense_test = BM25().search(corpus, queries, 10), dense.search(corpus, queries, 10)
    assert hybrid.search(corpus, queries, 10) == fuse(bm25_test, dense_test, "interpolate", hybrid.weight, 10)

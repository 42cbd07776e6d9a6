"""Each rule in one place: the dev split, fusion, data loading, model loading, length-sorted encoding, cache names,
the length defaults and the SPLIT=K syntax. Each test pins what the one home does, so breaking it fails here, and
checks that the callers reach it rather than a copy."""
import numpy as np
import pytest

import eval as evaluation
import train
from lab import frozen, runner
from sbmoe import data, encoding, negatives, results, retrieval
from sbmoe.data import DataError
from sbmoe.files import cache_name


def test_the_dev_split_is_one_seeded_slice_that_training_tuning_and_the_runner_share(tiny_beir):
    qrels = {f"q{i}": {"d": 1} for i in range(20)}
    assert sorted(data.split_dev(qrels, data.DEV_FRACTION, data.DEV_SEED)[1]) == ["q13", "q9"]  # pinned
    assert (data.DEV_FRACTION, data.DEV_SEED) == (0.1, 42)
    assert train.DataArguments().dev_fraction == data.DEV_FRACTION
    args = evaluation.parse_args(["--model", "baseline"])
    assert (args.dev_fraction, args.dev_seed) == (data.DEV_FRACTION, [data.DEV_SEED])
    assert runner.DEV_FRACTION is data.DEV_FRACTION
    assert data.dev_fraction_error(0.1) is None and data.dev_fraction_error(1.0) == "--dev_fraction 1.0 must be in (0, 1)"
    for fails in (lambda: train.parse(None, ["--dev_fraction", "0"]),
                  lambda: evaluation.parse_args(["--model", "baseline", "--dev_fraction", "1"])):  # fmt: skip
        with pytest.raises(SystemExit):
            fails()
    (tiny_beir / "qrels" / "dev.tsv").unlink(missing_ok=True)
    _, _, train_qrels, dev, info = data.load_data(tiny_beir, dev_split="none", dev_fraction=0.2, seed=7)
    tuned, source = data.dev_qrels(tiny_beir, [7], 0.2)  # what eval.py and the runner tune a hybrid on
    assert dev == tuned and not set(dev) & set(train_qrels)
    assert info["source"] == source == "slice of train (20%, seed 7)"
    _, splits, eval_source = data.load_eval_data(tiny_beir, ["test"], ([7], 0.2, "--split dev"))
    assert splits["dev"][1] == dev and eval_source == source


def test_eval_and_the_runner_fuse_through_the_hybrid_retriever(monkeypatch):
    first = {"q": {"a": 3.0, "b": 1.0}}
    second = {"q": {"b": 2.0, "c": 1.0}}
    hybrid = retrieval.Hybrid(retrieval.Runs(first), retrieval.Runs(second)).fit(None, {"q": ""}, {"q": {"b": 1}}, 10)
    assert hybrid.weight == 0.5 and hybrid.info("dev")["weight_from"] == "dev"
    assert hybrid.search(None, {"q": ""}, 10) == retrieval.fuse(first, second, "interpolate", 0.5, 10)
    assert retrieval.Hybrid(None, None, fusion="rrf").info("x") == {"fusion": "rrf"}
    calls = []
    monkeypatch.setattr(retrieval.Hybrid, "search", lambda self, *a: calls.append(self) or {})
    args = evaluation.parse_args(["--model", "baseline", "--hybrid", "bm25", "--hybrid_weight", "0.3"])
    fused, info = evaluation.fuse_runs(args, "m", {"test": first}, second, {"test": ({"q": ""}, {})}, None)
    assert calls and info == {"fuse": ["m", "bm25"], "fusion": "interpolate", "weight": 0.3,
                              "weight_from": "--hybrid_weight"}  # fmt: skip
    assert runner.Hybrid is retrieval.Hybrid and runner.Runs is retrieval.Runs


def test_training_and_the_frozen_study_load_data_from_the_library():
    assert train.load_data is data.load_data and frozen.load_data is data.load_data
    assert train.data_dirs is data.data_dirs and frozen.data_dirs is data.data_dirs
    assert evaluation.load_eval_data is data.load_eval_data


def test_one_function_loads_a_model_for_evaluation(tiny_backbone, tmp_path):
    model = evaluation.load_retriever("zeroshot", str(tiny_backbone), "mean")
    model.save_pretrained(tmp_path / "ck")
    assert evaluation.load_retriever(None, str(tmp_path / "ck")).config.kind == "baseline"
    assert evaluation.load_retriever("baseline", str(tmp_path / "ck")).config.pooling == "mean"
    with pytest.raises(DataError, match="holds a baseline checkpoint, not sbmoe"):
        evaluation.load_retriever("sbmoe", str(tmp_path / "ck"))
    with pytest.raises(DataError, match="no checkpoint"):
        evaluation.load_retriever("baseline", str(tmp_path / "none"))


def test_length_sorted_batches_cover_every_text_once_longest_first(tiny_backbone):
    from model import BiEncoder
    from sbmoe.hub import load_tokenizer

    model, tok = BiEncoder.from_backbone(str(tiny_backbone), pooling="mean"), load_tokenizer(tiny_backbone)
    texts = ["a", "a b c d e", "a b", "a b c d e f g", "a b c"]
    batches = list(encoding.length_sorted_batches(model, tok, texts, 16, 2))
    rows = np.concatenate([r for r, _ in batches])
    assert sorted(rows) == list(range(len(texts)))
    widths = [int(args[1].sum(1).max()) for _, args in batches]
    assert list(rows[:2]) == [3, 1] and widths == sorted(widths, reverse=True)
    assert frozen.length_sorted_batches is encoding.length_sorted_batches


def test_every_disk_cache_is_named_by_the_one_key_function(tmp_path):
    assert cache_name(["k"]) == "293beab58c266bf2" and cache_name(["k"], 12) == "293beab58c26"  # existing caches
    assert cache_name({"b": 1, "a": [1, 2]}) == cache_name({"a": [1, 2], "b": 1})
    assert encoding.EmbeddingCache(tmp_path / "e", {"x": 1}).dir.name == cache_name({"x": 1})
    negatives.cached_negatives(tmp_path / "n", "bm25_negatives", ["k"], lambda: {"q": ["d"]})
    assert (tmp_path / "n" / f"bm25_negatives_{cache_name(['k'], 12)}.json").is_file()
    assert frozen.backbone_fingerprint(str(tmp_path / "n"))[1][0] == f"bm25_negatives_{cache_name(['k'], 12)}.json"
    feats = frozen.Features(*(np.zeros(n, dtype=np.float32) for n in (2, 2, 2, 3)))
    frozen.cached_features(tmp_path / "f", ["k"], lambda: feats)
    assert (tmp_path / "f" / cache_name(["k"]) / "pooled.npy").is_file()


def test_the_length_defaults_are_declared_once():
    assert (encoding.QUERY_MAX_LENGTH, encoding.DOC_MAX_LENGTH, encoding.BATCH_SIZE) == (64, 256, 128)
    d = train.DataArguments()
    assert (d.query_max_length, d.doc_max_length) == (encoding.QUERY_MAX_LENGTH, encoding.DOC_MAX_LENGTH)
    assert train.RetrievalTrainingArguments(output_dir="x").eval_batch_size == encoding.BATCH_SIZE
    assert evaluation.parse_args(["--model", "baseline"]).batch_size == encoding.BATCH_SIZE
    assert evaluation.DEFAULT_LENGTHS == {"query_max_length": 64, "doc_max_length": 256}
    o = retrieval.RetrieveOptions()
    assert (o.query_max_length, o.doc_max_length, o.batch_size) == (64, 256, 128)


@pytest.mark.parametrize("entries, error", [
    (["train"], "expected SPLIT=K entries"), (["train=x"], "expected SPLIT=K entries"),
    (["test=0"], "test=0: needs a split of --split and K >= 1"), (["dev=3"], "dev=3: needs a split of"),
])  # fmt: skip
def test_split_equals_k_is_parsed_in_one_place(entries, error):
    assert results.trec_depths(["train=10", "test=5"], ["test", "train"]) == {"train": 10, "test": 5}
    assert results.trec_depths([], ["test"]) == {}
    with pytest.raises(ValueError, match=error):
        results.trec_depths(entries, ["test", "train"])
    with pytest.raises(SystemExit):
        evaluation.parse_args(["--model", "baseline", "--split", "test", "train", "--trec_depth", *entries])

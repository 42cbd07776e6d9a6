"""BEIR loading: both corpus formats, CRLF qrels, and one clear line for every kind of bad input."""

import json

import pytest
from conftest import SCIFACT, needs_shared, write_tiny_beir

from sbmoe.data import DataError, load_beir, resolve_data_dir, split_dev, unseen_document_queries


def test_plain_and_gzipped_corpus_load_the_same(tmp_path):
    plain = load_beir(write_tiny_beir(tmp_path / "a"), "train")
    gz = load_beir(write_tiny_beir(tmp_path / "b", gz=True), "train")
    assert plain == gz
    corpus, queries, qrels = plain
    assert len(corpus) == 60 and set(queries) == set(qrels)


def test_crlf_qrels_have_clean_ids(tiny_beir):
    assert b"\r\n" in (tiny_beir / "qrels" / "test.tsv").read_bytes()
    _, _, qrels = load_beir(tiny_beir, "test")
    for qid, docs in qrels.items():
        assert not qid.endswith("\r") and all(not d.endswith("\r") and r == 1 for d, r in docs.items())


def _corrupt(folder, name, text):
    path = folder / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("corpus.jsonl", '{"_id": "d0", "title": "", "text": "x"}\n{"_id": "d1", "text": \n', "corpus.jsonl:2: malformed JSON"),
        ("corpus.jsonl", '{"title": "no id", "text": "x"}\n', "corpus.jsonl:1: record has no '_id'"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq20\td1\n", "test.tsv:2: expected 3 tab-separated columns"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq20\td1\tyes\n", "test.tsv:2: score 'yes' is not an integer"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq999\td1\t1\n", "query 'q999' is not in queries.jsonl"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq20\td999\t1\n", "document 'd999' (query 'q20') is not in the corpus"),
    ],
)
def test_bad_input_names_file_and_line(tiny_beir, name, text, expected):
    _corrupt(tiny_beir, name, text)
    with pytest.raises(DataError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_beir(tiny_beir, "test")


def test_missing_split_is_named(tiny_beir):
    with pytest.raises(DataError, match=r"dev.tsv: split file does not exist"):
        load_beir(tiny_beir, "dev")


def test_dataset_name_resolves_under_beir_data_dir(tiny_beir, monkeypatch):
    monkeypatch.setenv("BEIR_DATA_DIR", str(tiny_beir.parent))
    assert resolve_data_dir("tiny", None) == tiny_beir
    with pytest.raises(DataError, match="dataset folder missing"):
        resolve_data_dir("absent", None, download=False)


def test_dev_split_is_seeded_and_disjoint(tiny_beir):
    _, _, qrels = load_beir(tiny_beir, "train")
    train, dev = split_dev(qrels, 0.25, seed=3)
    assert set(train).isdisjoint(dev) and set(train) | set(dev) == set(qrels)
    assert split_dev(qrels, 0.25, seed=3) == (train, dev)
    assert len(dev) == round(len(qrels) * 0.25)


def test_eval_cli_bad_input_is_one_line_and_nonzero(tiny_beir, tmp_path, capsys):
    import eval as eval_cli

    (tiny_beir / "queries.jsonl").write_text('{"_id": "q0", "text": "a"}\nnot json\n')
    with pytest.raises(SystemExit) as exc:  # the command's entry point, in-process
        eval_cli.main(["--model", "zeroshot", "--model_name_or_path", "unused", "--data_dir", str(tiny_beir),
                       "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tiny_beir / 'queries.jsonl'}:2: malformed JSON (Expecting value)"
    ]
    assert not (tmp_path / "out").exists()


@needs_shared
def test_scifact_matches_beir_statistics():
    corpus, queries, qrels = load_beir(SCIFACT, "test")
    assert len(corpus) == 5183 and len(queries) == 300 and sum(map(len, qrels.values())) == 339
    _, train_queries, train_qrels = load_beir(SCIFACT, "train")
    assert len(train_queries) == 809 and sum(map(len, train_qrels.values())) == 919
    assert json.loads((SCIFACT / "queries.jsonl").open().readline())["_id"]


def test_unseen_document_queries_have_no_positive_seen_in_training():
    train = {"a": {"d1": 1, "d2": 0}, "b": {"d3": 1}}
    test = {"x": {"d1": 1}, "y": {"d2": 1, "d4": 1}, "z": {"d4": 1, "d3": 1}, "w": {"d5": 1}}
    assert unseen_document_queries(train, test) == ["w", "y"]  # d2 was judged non-relevant in training: unseen

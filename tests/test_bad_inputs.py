"""Bad input, one class per test: exit code 2, one line naming the culprit, no traceback, nothing half-written.

Every command is called in this process (`main(argv)`), so these stay fast; the folders are built here.
"""

import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, one_line_error, write_tiny_beir

import eval as evaluation
import sbmoe.data
import sbmoe.results
import sbmoe.retrieval
import train
from lab import compare, experiment, runner, stages
from model import BiEncoder, TinyBERTWithMoE, load_model
from sbmoe.data import DataError, load_beir, load_corpus
from sbmoe.files import FolderLock, atomic_write_text
from sbmoe.negatives import corpus_digest, default_cache_dir


def exits(fn, *args) -> int:
    with pytest.raises(SystemExit) as exc:
        fn(*args)
    return exc.value.code


def eval_zeroshot(backbone, data, out, *extra) -> list[str]:
    return ["--model", "zeroshot", "--model_name_or_path", str(backbone), "--data_dir", str(data), "--output_dir",
            str(out), *map(str, extra)]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Data files


def _non_utf8(folder: Path) -> str:
    lines = (folder / "corpus.jsonl").read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"title": "', b'"title": "\xff\xfe', 1)
    (folder / "corpus.jsonl").write_bytes(b"".join(lines))
    return "corpus.jsonl:3: not UTF-8"


def _truncated_gzip(folder: Path) -> str:
    data = gzip.compress((folder / "corpus.jsonl").read_bytes())
    (folder / "corpus.jsonl").unlink()
    (folder / "corpus.jsonl.gz").write_bytes(data[: len(data) // 2])
    return "corpus.jsonl.gz:"


def _not_gzip(folder: Path) -> str:
    (folder / "corpus.jsonl").rename(folder / "corpus.jsonl.gz")  # plain text under a .gz name
    return "corpus.jsonl.gz:1: corrupt or truncated gzip"


def _both_corpora(folder: Path) -> str:
    (folder / "corpus.jsonl.gz").write_bytes(gzip.compress((folder / "corpus.jsonl").read_bytes()))
    return "both corpus.jsonl and corpus.jsonl.gz"


def _qrels_all_zero(folder: Path) -> str:
    path = folder / "qrels" / "test.tsv"
    path.write_bytes(path.read_bytes().replace(b"\t1\r\n", b"\t0\r\n"))
    return "test.tsv: no positive judgment"


def _conflicting_duplicate(folder: Path) -> str:
    path = folder / "qrels" / "test.tsv"
    rows = path.read_text().splitlines()
    qid, did, _ = rows[1].split("\t")
    path.write_text("\n".join([*rows, f"{qid}\t{did}\t0"]) + "\n")
    return f"test.tsv:{len(rows) + 1}: query '{qid}', document '{did}' judged 0 here and 1 on line 2"


def _non_utf8_qrels(folder: Path) -> str:
    path = folder / "qrels" / "test.tsv"
    path.write_bytes(path.read_bytes().replace(b"\r\n", b"\xe9\r\n", 2))
    return "test.tsv:1: not UTF-8"


def _non_utf8_queries(folder: Path) -> str:
    path = folder / "queries.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"text": "', b'"text": "\xc3(', 1))
    return "queries.jsonl:1: not UTF-8"


@pytest.mark.parametrize("break_it", [_non_utf8, _truncated_gzip, _not_gzip, _both_corpora, _qrels_all_zero,
                                      _conflicting_duplicate, _non_utf8_qrels, _non_utf8_queries],
                         ids=lambda f: f.__name__.strip("_"))  # fmt: skip
def test_bad_data_file_is_one_line_naming_file_and_line(break_it, tiny_backbone, tmp_path, capsys):
    data = write_tiny_beir(tmp_path / "tiny")
    expected = break_it(data)
    out = tmp_path / "out"
    assert exits(evaluation.main, eval_zeroshot(tiny_backbone, data, out)) == 2
    one_line_error(capsys, expected)
    assert not out.exists()  # found before any result is written
    with pytest.raises(DataError, match="corpus|queries|test.tsv"):  # the library call says the same
        load_beir(data, "test")


def test_duplicate_qrels_line_with_the_same_score_is_fine(tmp_path):
    data = write_tiny_beir(tmp_path / "tiny")
    path = data / "qrels" / "test.tsv"
    rows = path.read_text().splitlines()
    path.write_text("\n".join([*rows, rows[1]]) + "\n")
    assert load_beir(data, "test")[2] == load_beir(write_tiny_beir(tmp_path / "again"), "test")[2]


# --------------------------------------------------------------------------------------------
# Numeric flags, range-checked at parse time


@pytest.mark.parametrize("kind, flag, value", [
    ("baseline", "--temperature", "-0.05"), ("sbmoe", "--expert_dim", "0"), ("sbmoe", "--num_experts", "0"),
    ("sbmoe", "--gate_temperature", "0"), ("baseline", "--per_device_train_batch_size", "0"),
    ("baseline", "--eval_batch_size", "-1"), ("baseline", "--query_max_length", "0"),
    ("baseline", "--doc_max_length", "-8"), ("baseline", "--negative_depth", "0"),
    ("baseline", "--hard_negatives", "-1"), ("baseline", "--learning_rate", "0"),
    ("baseline", "--num_train_epochs", "0"), ("moe", "--moe_layers", "-1"), ("sbmoe", "--moe_layers", "1"),
    ("sbmoe", "--noise_std", "nan"),
])  # fmt: skip
def test_out_of_range_training_flag_is_named(kind, flag, value, tiny_backbone, tiny_beir, tmp_path, capsys):
    out = tmp_path / "ck"
    argv = ["--model_name_or_path", str(tiny_backbone), "--data_dir", str(tiny_beir), "--output_dir", str(out),
            flag, value]  # fmt: skip
    assert exits(train.main, kind, argv) == 2
    one_line_error(capsys, flag)
    assert not out.exists()


@pytest.mark.parametrize("flag, value, needle", [
    ("--moe_layers", "7", "--moe_layers [7] must name layers in 0..1"),  # the tiny backbone has 2 layers
])  # fmt: skip
def test_flag_beyond_the_backbone_is_named(flag, value, needle, tiny_backbone, tiny_beir, tmp_path, capsys):
    out = tmp_path / "ck"
    argv = ["--model_name_or_path", str(tiny_backbone), "--data_dir", str(tiny_beir), "--output_dir", str(out),
            "--cache_dir", str(tmp_path / "neg"), flag, value]  # fmt: skip
    assert exits(train.main, "moe", argv) == 2
    one_line_error(capsys, needle)
    assert not out.exists()


def test_lengths_beyond_the_backbones_positions_are_cut_with_a_note(tiny_backbone, capsys):
    model = BiEncoder.from_backbone(str(tiny_backbone))
    dargs = train.DataArguments(doc_max_length=500, query_max_length=16)
    train.check_lengths(model, dargs)
    assert dargs.doc_max_length == 64 and dargs.query_max_length == 16
    assert "--doc_max_length 500: the backbone has 64 positions; using 64" in capsys.readouterr().out


@pytest.mark.parametrize("flags, needle", [
    (["--batch_size", "0"], "--batch_size 0"), (["--doc_max_length", "0"], "--doc_max_length 0"),
    (["--query_max_length", "-3"], "--query_max_length -3"), (["--trec_depth", "test=0"], "--trec_depth test=0"),
    (["--trec_depth", "train=10"], "--trec_depth train=10"), (["--top_k", "5"], "--top_k"),
])  # fmt: skip
def test_out_of_range_eval_flag_is_named(flags, needle, tiny_backbone, tiny_beir, tmp_path, capsys):
    assert exits(evaluation.main, eval_zeroshot(tiny_backbone, tiny_beir, tmp_path / "out", *flags)) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--docs", "-5"], "--docs -5"), (["--docs", "0"], "--docs 0"), (["--dtypes", "fp64"], "unknown fp64"),
    (["--dtypes", "fp32,bf8"], "unknown bf8"), (["--repeats", "0"], "--repeats 0"),
])  # fmt: skip
def test_out_of_range_bench_flag_is_named(flags, needle, tiny_backbone, tmp_path, capsys):
    from lab import bench

    out = tmp_path / "b.json"
    assert exits(bench.main, ["models", "--model_name_or_path", str(tiny_backbone), "--output", str(out), *flags]) == 2
    one_line_error(capsys, needle)
    assert not out.exists()


def test_runner_flags_are_range_checked(tmp_path, capsys):
    assert exits(experiment.main, ["experiments/table1.toml", "--parallel", "0"]) == 2
    one_line_error(capsys, "--parallel 0")
    assert exits(experiment.main, ["experiments/table1.toml", "--report", "--extra", "fp16"]) == 2
    one_line_error(capsys, "--extra: 'fp16' is not a flag")


# --------------------------------------------------------------------------------------------
# Experiment files, type-checked before anything runs

BASE = 'name = "x"\ndataset = "tiny"\n'
RUNS = '[runs.bm25]\nkind = "bm25"\n[runs.baseline]\nkind = "baseline"\n'


@pytest.mark.parametrize("text, needle", [
    ('seeds = "42"\n' + RUNS, "seeds must be a list of integers"),
    ("seeds = []\n" + RUNS, "seeds must not be empty"),
    ("seeds = [4.2]\n" + RUNS, "seeds must be a list of integers"),
    ("seeds = [true]\n" + RUNS, "seeds must be a list of integers"),
    ("seeds = [42, 42]\n" + RUNS, "repeats a seed"),
    ('splits = "test"\n' + RUNS, "splits must be a list of strings"),
    ("splits = []\n" + RUNS, "splits must not be empty"),
    ("splits = { test = 1 }\n" + RUNS, "splits must be a list of strings"),
    ('recipe = "--num_train_epochs 2"\n' + RUNS, "recipe must be a table of flag = value"),
    ('recipe = ["--num_train_epochs", "2", "--lr", "1e-3"]\n' + RUNS, "x.toml:3: recipe is a list of command-line "
     "flags; settings are a table now: recipe = { num_train_epochs = 2, lr = 1e-3 }"),
    ('recipe = { "--num_train_epochs" = 2 }\n' + RUNS, "recipe.--num_train_epochs: not a flag name"),
    ("recipe = { a = { b = 1 } }\n" + RUNS, "recipe.a must be a string, a number, true/false or a list of them"),
    (RUNS + 'eval = ["--inference_mode", "all"]\n', "x.toml:7: runs.baseline.eval is a list of command-line flags; "
     'settings are a table now: eval = { inference_mode = "all" }'),
    ("trec_depth = { test = 0 }\n" + RUNS, "trec_depth must be a table"),
    ('trec_depth = { train = 10 }\nsplits = ["test"]\n' + RUNS, "trec_depth names a split not in splits"),
    ("model = 3\n" + RUNS, "model must be a string"),
    ('frozen = "yes"\n' + RUNS, "frozen must be true or false"),
    (RUNS + 'train = "--fp16"\n', "runs.baseline.train must be a table of flag = value"),
    (RUNS + 'seeds = "43"\n', "runs.baseline.seeds must be a list of integers"),
    (RUNS + "reference = 3\n", "runs.baseline.reference must be a run name"),
    (RUNS + 'reference = "baseline"\n', "runs.baseline.reference names the run itself"),
    (RUNS + 'reference = ["bm25", "bm25"]\n', "runs.baseline.reference names a run twice"),
    ('splits = ["test", "dev"]\n' + RUNS, "splits ['dev'] have no qrels"),
    ("[runs]\n", "no [runs.NAME] tables"),
])  # fmt: skip
def test_malformed_experiment_file_fails_before_anything_runs(text, needle, tiny_backbone, tiny_beir, tmp_path,
                                                              monkeypatch, capsys):  # fmt: skip
    monkeypatch.setenv("BEIR_DATA_DIR", str(tiny_beir.parent))
    (tmp_path / "x.toml").write_text(BASE + text)
    argv = [str(tmp_path / "x.toml"), "--model_name_or_path", str(tiny_backbone), "--results", str(tmp_path / "res"),
            "--ckpt_root", str(tmp_path / "ck"), "--in_process"]  # fmt: skip
    assert exits(experiment.main, argv) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "res").exists() and not (tmp_path / "ck").exists()


# --------------------------------------------------------------------------------------------
# Models and checkpoints: what they claim, or one line


@pytest.fixture(scope="module")
def checkpoints(tiny_backbone, tmp_path_factory):
    """A baseline and an SB-MoE checkpoint of the tiny backbone, untrained (the loader only checks)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("ckpts")
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    for name, model in (("baseline", BiEncoder.from_backbone(str(tiny_backbone))),
                        ("sbmoe", TinyBERTWithMoE.from_backbone(str(tiny_backbone), num_experts=4, top_k=1))):  # fmt: skip
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _set_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _weights_of_another_variant(ckpts, tmp):
    folder = _copy(ckpts / "baseline", tmp / "ck")
    _set_config(folder, kind="sbmoe", num_experts=4, top_k=1)
    return "sbmoe", folder, "weights do not match its config (sbmoe, num_experts=4"


def _other_settings(ckpts, tmp):
    folder = _copy(ckpts / "sbmoe", tmp / "ck")
    _set_config(folder, num_experts=6)
    return "sbmoe", folder, "missing 8: moe.experts.4"


def _baseline_as_sbmoe(ckpts, tmp):
    return "sbmoe", ckpts / "baseline", "holds a baseline checkpoint, not sbmoe"


def _truncated_weights(ckpts, tmp):
    folder = _copy(ckpts / "sbmoe", tmp / "ck")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    return "sbmoe", folder, "model.safetensors: unreadable weights, truncated"


def _no_weights(ckpts, tmp):
    folder = _copy(ckpts / "sbmoe", tmp / "ck")
    (folder / "model.safetensors").unlink()
    return "sbmoe", folder, "model.safetensors: missing"


def _no_tokenizer(ckpts, tmp):
    folder = _copy(ckpts / "sbmoe", tmp / "ck")
    for f in folder.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            f.unlink()
    return "sbmoe", folder, "no usable tokenizer"


def _config_not_json(ckpts, tmp):
    folder = _copy(ckpts / "sbmoe", tmp / "ck")
    (folder / "config.json").write_text("{not json")
    return "sbmoe", folder, "config.json: not a readable checkpoint config"


@pytest.mark.parametrize("break_it", [_weights_of_another_variant, _other_settings, _baseline_as_sbmoe,
                                      _truncated_weights, _no_weights, _no_tokenizer, _config_not_json],
                         ids=lambda f: f.__name__.strip("_"))  # fmt: skip
def test_checkpoint_that_is_not_what_it_claims_is_one_line(break_it, checkpoints, tiny_beir, tmp_path, capsys):
    name, folder, needle = break_it(checkpoints, tmp_path)
    out = tmp_path / "out"
    argv = ["--model", name, "--checkpoint", str(folder), "--data_dir", str(tiny_beir), "--output_dir", str(out)]
    assert exits(evaluation.main, argv) == 2
    one_line_error(capsys, needle, str(folder))
    assert not out.exists()


@pytest.fixture
def transformers_log(caplog, monkeypatch):
    """What transformers logs (its logger does not propagate to pytest's handler by default)."""
    import logging

    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    caplog.set_level(logging.INFO, logger="transformers")
    return caplog


def test_a_matching_checkpoint_loads_silently(checkpoints, transformers_log):
    from sbmoe.hub import load_tokenizer

    assert type(load_model(checkpoints / "sbmoe")) is TinyBERTWithMoE
    load_tokenizer(checkpoints / "sbmoe")
    assert "LOAD REPORT" not in transformers_log.text and "to instantiate a model of type" not in transformers_log.text


def test_only_the_pooler_is_silenced_in_the_backbone_load_report(tiny_backbone, tmp_path, transformers_log):
    from safetensors.torch import load_file, save_file

    BiEncoder.from_backbone(str(tiny_backbone))  # the pooler's weights are left over: expected, not reported
    assert "LOAD REPORT" not in transformers_log.text
    other = _copy(tiny_backbone, tmp_path / "extra")
    weights = load_file(other / "model.safetensors")
    weights["encoder.layer.5.output.dense.weight"] = weights["pooler.dense.weight"].clone()  # a layer too many
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    BiEncoder.from_backbone(str(other))
    text = transformers_log.text
    assert "LOAD REPORT" in text and "encoder.layer.5.output.dense.weight" in text and "pooler.dense" not in text


@pytest.mark.parametrize("name, needle", [
    ("./no/such/model", "./no/such/model: no such model folder"),
    ("../shared/models/not-here", "not-here: no such model folder"),
    ("huawei-noah/TinyBERT_General_6L_768D", "not available from the hub (HF_HUB_OFFLINE is set"),
])  # fmt: skip
def test_model_found_neither_locally_nor_online_is_one_line(name, needle, tiny_beir, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "ck"
    argv = ["--model_name_or_path", name, "--data_dir", str(tiny_beir), "--output_dir", str(out)]
    assert exits(train.main, "baseline", argv) == 2
    one_line_error(capsys, needle)
    assert not out.exists()
    assert exits(evaluation.main, eval_zeroshot(name, tiny_beir, tmp_path / "ev")) == 2
    one_line_error(capsys, needle)


def test_runner_without_model_or_data_says_so_and_creates_nothing(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants


    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # as a fresh clone: no ./data, no ../shared
    (tmp_path / "t.toml").write_text('name = "t"\ndataset = "scifact"\n' + RUNS)
    argv = ["t.toml", "--model_name_or_path", "../shared/models/all-minilm-l6-v2"]
    assert exits(experiment.main, argv) == 2
    one_line_error(capsys, "../shared/models/all-minilm-l6-v2: no such model folder")
    argv = ["t.toml", "--model_name_or_path", "huawei-noah/TinyBERT_General_6L_768D"]
    assert exits(experiment.main, argv) == 2
    one_line_error(capsys, "HF_HUB_OFFLINE")

    def offline(url, out_dir):  # what BEIR's downloader does without a network, after making its folder
        Path(out_dir, "scifact.zip").write_bytes(b"partial")
        raise ConnectionError("Name or service not known")

    import beir.util

    monkeypatch.setattr(beir.util, "download_and_unzip", offline)
    monkeypatch.setenv("BEIR_DATA_DIR", str(tmp_path / "outside" / "beir"))
    argv = ["t.toml", "--model_name_or_path", str(ROOT / "tests")]  # a folder, but not a model
    assert exits(experiment.main, argv) == 2
    one_line_error(capsys, "a folder without config.json")
    with pytest.raises(DataError, match=r"dataset 'scifact' is not there and BEIR's download failed \(Name or"):
        sbmoe.data.resolve_data_dir("scifact", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.toml"]  # no results/, checkpoints/, outside/, data/


# --------------------------------------------------------------------------------------------
# Output folders, checked before any work


def test_eval_output_folder_that_is_a_file_fails_before_encoding(tiny_backbone, tiny_beir, tmp_path, monkeypatch,
                                                                 capsys):  # fmt: skip
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(sbmoe.retrieval, "encode_texts", lambda *a, **k: pytest.fail("encoded before checking"))
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        assert exits(evaluation.main, eval_zeroshot(tiny_backbone, tiny_beir, out)) == 2
        one_line_error(capsys, "--output_dir", "is a file, not a folder")
    assert exits(evaluation.main, eval_zeroshot(tiny_backbone, tiny_beir, tmp_path / "ok", "--embedding_cache",
                                                tmp_path / "file")) == 2  # fmt: skip
    one_line_error(capsys, "--embedding_cache")


def test_train_output_folder_that_is_a_file_fails_before_loading(tiny_backbone, tiny_beir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    argv = ["--model_name_or_path", str(tiny_backbone), "--data_dir", str(tmp_path / "nowhere"), "--output_dir",
            str(tmp_path / "file")]  # fmt: skip
    assert exits(train.main, "baseline", argv) == 2
    one_line_error(capsys, "--output_dir", "is a file")  # the output folder is checked before the data


# --------------------------------------------------------------------------------------------
# compare.py


def test_compare_with_nan_scores_is_an_error(tmp_path, capsys):
    a = {f"q{i}": {"NDCG@10": i / 10} for i in range(5)}
    b = {**a, "q3": {"NDCG@10": math.nan}}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert exits(compare.main, [str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    one_line_error(capsys, "b.json", "query 'q3' is nan")


# --------------------------------------------------------------------------------------------
# Nothing written where it does not belong


def test_written_files_have_the_users_usual_mode(tmp_path):
    old = os.umask(0o022)
    os.umask(old)
    atomic_write_text(tmp_path / "f.json", "{}")
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o666 & ~old


def test_negatives_cache_is_outside_the_dataset_and_keyed_by_content(tmp_path, monkeypatch):
    data = write_tiny_beir(tmp_path / "tiny")
    monkeypatch.setenv("RETRIEVAL_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir(data) == tmp_path / "c" / "negatives" / "tiny"
    before = corpus_digest(load_corpus(data))
    lines = (data / "corpus.jsonl").read_text().splitlines()
    (data / "corpus.jsonl").write_text("\n".join([lines[0].replace('"text": "', '"text": "edited '), *lines[1:]]))
    assert corpus_digest(load_corpus(data)) != before  # same document count, other content: another key


def test_final_checkpoint_is_staged(tmp_path):
    def full_disk(folder):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    trainer = SimpleNamespace(args=SimpleNamespace(should_save=True), save_model=full_disk)
    with pytest.raises(OSError):
        train.save_final(trainer, str(tmp_path / "ck"))
    assert not (tmp_path / "ck" / "config.json").exists()  # no config without its weights

    def fine(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            (Path(folder) / name).write_text(name)

    train.save_final(SimpleNamespace(args=SimpleNamespace(should_save=True), save_model=fine), str(tmp_path / "ck"))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]


def test_a_second_writer_into_a_checkpoint_folder_is_refused(tiny_backbone, tiny_beir, tmp_path, capsys):
    out = tmp_path / "ck"
    argv = ["--model_name_or_path", str(tiny_backbone), "--data_dir", str(tiny_beir), "--output_dir", str(out),
            "--cache_dir", str(tmp_path / "neg")]  # fmt: skip
    with FolderLock(out):  # another live process writing there
        assert exits(train.main, "baseline", argv) == 2
    one_line_error(capsys, str(out), "another process is writing into this folder")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_train_saves_to_checkpoints_kind_without_output_dir(tiny_backbone, tiny_beir):
    for kind in ("baseline", "sbmoe", "moe"):
        _, _, targs = train.parse(kind, ["--model_name_or_path", str(tiny_backbone), "--data_dir", str(tiny_beir)])
        assert targs.output_dir == f"checkpoints/{kind}"
    _, _, targs = train.parse("sbmoe", ["--output_dir=elsewhere"])
    assert targs.output_dir == "elsewhere"


def test_runner_child_dies_with_the_runner(tmp_path):
    """kill -9 of the runner: its training child gets SIGTERM from the kernel, no orphan keeps training."""
    script = ("import subprocess, sys, time; from lab import jobs\n"
              "cmd = jobs.child_command([sys.executable], '-c', ['import time; time.sleep(120)'])\n"
              "child = subprocess.Popen(cmd); print(child.pid, flush=True); child.wait()")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runner = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    child = int(runner.stdout.readline())
    time.sleep(0.5)
    os.kill(child, 0)  # running
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{child}/stat") as fh:  # a zombie awaiting its new parent's wait counts as gone
            if fh.read().split(")")[-1].split()[0] == "Z":
                return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the child outlived the runner")


def test_smoke_slice_is_small_and_loads(tmp_path):
    data = write_tiny_beir(tmp_path / "tiny", n_docs=60, n_queries=24)
    out = stages.smoke_slice(data, tmp_path / "slice", n_queries=5, n_docs=30)
    corpus, queries, qrels = load_beir(out, "train")
    assert len(corpus) == 30 and len(qrels) == 5
    assert len(load_beir(out, "test")[2]) == 5


def test_runner_prints_each_jobs_start_end_and_progress(tiny_beir, tiny_backbone, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BEIR_DATA_DIR", str(tiny_beir.parent))
    (tmp_path / "x.toml").write_text(BASE + '[runs.bm25]\nkind = "bm25"\n')
    experiment.main([str(tmp_path / "x.toml"), "--model_name_or_path", str(tiny_backbone), "--results",
                     str(tmp_path / "res"), "--ckpt_root", str(tmp_path / "ck"), "--in_process"])  # fmt: skip
    out = capsys.readouterr().out
    assert "[1/1] start bm25" in out and "[1/1 done] bm25: " in out


# --------------------------------------------------------------------------------------------
# Issue 32: ids, lengths, exports, transfer data, references, interrupts (one test per class)


def _dup_doc(folder: Path) -> str:
    with open(folder / "corpus.jsonl", "a") as fh:
        fh.write(json.dumps({"_id": "d3", "title": "", "text": "protein again"}) + "\n")
    return "corpus.jsonl:61: document id 'd3' repeats line 4"


def _dup_query(folder: Path) -> str:
    with open(folder / "queries.jsonl", "a") as fh:
        fh.write(json.dumps({"_id": "q2", "text": "gene"}) + "\n")
    return "queries.jsonl:25: query id 'q2' repeats line 3"


def _space_in_doc_id(folder: Path) -> str:
    path = folder / "corpus.jsonl"
    path.write_text(path.read_text().replace('"_id": "d5"', '"_id": "d 5"'))
    return "corpus.jsonl:6: document id 'd 5' contains ' '"


def _tab_in_doc_id(folder: Path) -> str:  # once reported as a qrels document missing from the corpus
    path = folder / "corpus.jsonl"
    path.write_text(path.read_text().replace('"_id": "d7"', '"_id": "d\\t7"'))
    return "corpus.jsonl:8: document id 'd\\t7' contains '\\t'"


def _control_in_query_id(folder: Path) -> str:
    path = folder / "queries.jsonl"
    path.write_text(path.read_text().replace('"_id": "q1"', '"_id": "q\\u00071"'))
    return "queries.jsonl:2: query id 'q\\x071' contains '\\x07'"


def _space_in_qrels_id(folder: Path) -> str:
    path = folder / "qrels" / "test.tsv"
    rows = path.read_text().splitlines()
    qid, did, score = rows[1].split("\t")
    path.write_text("\n".join([rows[0], f"{qid}\t{did} x\t{score}", *rows[2:]]) + "\n")
    return f"test.tsv:2: document id '{did} x' contains ' '"


def _empty_doc_id(folder: Path) -> str:
    with open(folder / "corpus.jsonl", "a") as fh:
        fh.write(json.dumps({"_id": "", "text": "sleep"}) + "\n")
    return "corpus.jsonl:61: document id '' is empty"


@pytest.mark.parametrize("break_it", [_dup_doc, _dup_query, _space_in_doc_id, _tab_in_doc_id, _control_in_query_id,
                                      _space_in_qrels_id, _empty_doc_id], ids=lambda f: f.__name__.strip("_"))  # fmt: skip
def test_ids_that_repeat_or_cannot_be_a_trec_column_are_one_line(break_it, tiny_backbone, tmp_path, capsys):
    data = write_tiny_beir(tmp_path / "tiny")
    expected = break_it(data)
    out = tmp_path / "out"
    assert exits(evaluation.main, eval_zeroshot(tiny_backbone, data, out, "--hybrid", "bm25", "--hybrid_weight", 0.5)) == 2
    one_line_error(capsys, expected)
    assert not out.exists()
    with pytest.raises(DataError, match="id"):  # the library's loaders (BM25, the runner, training) say the same
        load_beir(data, "test")


def test_an_empty_query_is_scored_with_a_warning(tiny_backbone, tmp_path, capsys):
    data = write_tiny_beir(tmp_path / "tiny")
    path = data / "queries.jsonl"
    lines = path.read_text().splitlines()
    lines[20] = json.dumps({"_id": "q20", "text": "  "})
    path.write_text("\n".join(lines) + "\n")
    evaluation.main(eval_zeroshot(tiny_backbone, data, tmp_path / "out"))
    assert "warning: " + str(path) + ":21: 1 empty query" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_a_length_beyond_the_backbones_positions_is_one_line(backend, tiny_backbone, tiny_beir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = eval_zeroshot(tiny_backbone, tiny_beir, out, "--backend", backend)
    assert exits(evaluation.main, [*argv, "--doc_max_length", "65"]) == 2  # the tiny backbone has 64 positions
    one_line_error(capsys, "--doc_max_length 65: the backbone has 64 positions")
    assert not out.exists()
    settings = evaluation.main(argv)["settings"]["zeroshot"]  # the default (256) is cut to the positions, recorded
    assert settings["doc_max_length"] == 64 and settings["query_max_length"] == 64
    assert settings["backend"] == backend and settings["precision"] == "fp32"


@pytest.fixture
def export_mod():
    from lab import export

    return export


def test_output_that_is_an_input_or_unusable_fails_before_any_work(checkpoints, tiny_backbone, tiny_beir, tmp_path,
                                                                   monkeypatch, export_mod, capsys):  # fmt: skip
    from lab import bench

    ckpt = _copy(checkpoints / "baseline", tmp_path / "ck")
    before = sorted(p.name for p in ckpt.iterdir())
    monkeypatch.setattr(export_mod, "load_checkpoint", lambda *a: pytest.fail("loaded before checking the output"))
    (tmp_path / "file").write_text("x")
    for out, needle in ((ckpt, "is the input"), (ckpt / "st", "is inside the input"), (tmp_path, "holds the input"),
                        (tmp_path / "file" / "st", "is a file, not a folder"),
                        (tmp_path / ("n" * 250), "bytes; the file system takes")):  # fmt: skip
        assert exits(export_mod.main, [str(ckpt), str(out), "--overwrite"]) == 2
        one_line_error(capsys, "OUT_DIR", needle)
    assert sorted(p.name for p in ckpt.iterdir()) == before  # the checkpoint is untouched
    monkeypatch.setattr(sbmoe.retrieval, "encode_texts", lambda *a, **k: pytest.fail("encoded before checking"))
    argv = ["--model", "baseline", "--checkpoint", str(ckpt), "--data_dir", str(tiny_beir), "--output_dir"]
    assert exits(evaluation.main, [*argv, str(ckpt / "eval")]) == 2
    one_line_error(capsys, "--output_dir", "is inside the input")
    monkeypatch.setattr(bench, "bench_models", lambda args: pytest.fail("measured before checking --output"))
    for out, needle in ((tmp_path, "is a folder, not a file"), (tmp_path / "file" / "b.json", "is a file, not a folder")):
        assert exits(bench.main, ["models", "--model_name_or_path", str(tiny_backbone), "--output", str(out)]) == 2
        one_line_error(capsys, "--output", needle)
    assert exits(bench.main, ["models", "--model_name_or_path", str(tmp_path / "nomodel"), "--output",
                              str(tmp_path / "b.json")]) == 2  # fmt: skip
    one_line_error(capsys, "nomodel: no such model folder")
    (tmp_path / "x.toml").write_text(BASE + RUNS)
    monkeypatch.setenv("BEIR_DATA_DIR", str(tiny_beir.parent))
    assert exits(experiment.main, [str(tmp_path / "x.toml"), "--model_name_or_path", str(tiny_backbone), "--results",
                                   str(tiny_beir / "res"), "--in_process"]) == 2  # fmt: skip
    one_line_error(capsys, "--results", "is inside the input")
    assert not (tiny_beir / "res").exists()


def test_export_leaves_nothing_behind_and_follows_the_umask(checkpoints, tmp_path, export_mod):
    ckpt = checkpoints / "baseline"
    out = tmp_path / "st"
    stale = [tmp_path / ".st.tmp-999999999-abcdefgh", tmp_path / ".st.old-999999999"]  # a SIGKILLed export's
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_text("half")
    stale[1].write_text("old")
    (tmp_path / "other").write_text("x")
    out.write_text("a file in the way")
    export_mod.export(ckpt, out, overwrite=True, query_max_length=8, doc_max_length=64)  # --overwrite onto a file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "st"]
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p: p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert {p.name: oct(m) for p, m in modes.items() if m != (0o777 if p.is_dir() else 0o666) & ~umask} == {}


def _sigint_default():
    """A child's SIGINT as at a terminal, whatever launched the suite (a background job or nohup ignores it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigterm_or_sigint_during_an_export_cleans_up_in_one_line(checkpoints, tmp_path):
    ckpt = checkpoints / "baseline"
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        out = tmp_path / f"st{code}"
        cmd = [sys.executable, "export.py", str(ckpt), str(out), "--onnx", "--query_max_length", "8",
               "--doc_max_length", "64"]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                preexec_fn=_sigint_default)  # fmt: skip
        for _ in range(600):  # until the temporary folder exists: the export is under way
            if list(tmp_path.glob(f".{out.name}.tmp-*")) or proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.send_signal(sig)
        err = proc.communicate(timeout=120)[1]
        assert proc.returncode == code, err
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert "Traceback" not in err and len(lines) == 1 and sig.name in lines[0], err
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*"))


class _SwallowsAnInterrupt:
    def __del__(self):  # a signal landing while a finaliser runs: Python prints "Exception ignored" and goes on
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):  # (the handler runs here, between bytecodes)
            pass


@pytest.mark.parametrize("where", ["before the write", "after the write"])
def test_an_interrupt_a_finaliser_swallowed_still_stops_the_command(where, tmp_path, capsys, monkeypatch):
    from sbmoe.files import atomic_write_text
    from utils import entry_point

    @entry_point
    def command(path):
        if where == "before the write":
            _SwallowsAnInterrupt()  # freed at once
        atomic_write_text(path, "done")
        if where == "after the write":
            _SwallowsAnInterrupt()
        return "finished"

    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))
    launched = signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, whatever ran the suite
    try:
        with pytest.raises(SystemExit) as exc:
            command(tmp_path / "out.txt")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # started ignoring it (nohup): the signal stays ignored
        assert entry_point(lambda: signal.getsignal(signal.SIGINT))() is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, launched)
    assert dropped == [KeyboardInterrupt] and exc.value.code == 130  # swallowed once, and still the exit of an interrupt
    assert "error: interrupted by SIGINT" in capsys.readouterr().err
    assert (tmp_path / "out.txt").exists() == (where == "after the write")  # before: nothing published
    assert entry_point(lambda path: atomic_write_text(path, "done") or "finished")(tmp_path / "next.txt") == "finished"


def test_metrics_of_another_checkpoint_or_no_file_are_refused_by_export(checkpoints, tiny_beir, tmp_path, export_mod,
                                                                        capsys):  # fmt: skip
    base = ["--data_dir", str(tiny_beir), "--doc_max_length", "64", "--query_max_length", "8"]
    row = evaluation.main(["--model", "baseline", "--checkpoint", str(checkpoints / "baseline"), *base,
                           "--output_dir", str(tmp_path / "ev")])  # fmt: skip
    from sbmoe.hub import checkpoint_digest

    assert row["settings"]["baseline"]["checkpoint_sha1"] == checkpoint_digest(checkpoints / "baseline")
    metrics = tmp_path / "ev" / "metrics.json"
    for ckpt, metrics_file, needle in ((checkpoints / "sbmoe", metrics, "were measured on other checkpoints"),
                                       (checkpoints / "baseline", tmp_path / "none.json", "none.json: no such file")):
        out = tmp_path / "st"
        argv = [str(ckpt), str(out), "--metrics", str(metrics_file), "--query_max_length", "8", "--doc_max_length", "64"]
        assert exits(export_mod.main, argv) == 2
        one_line_error(capsys, "--metrics", needle)
        assert not out.exists() and not list(tmp_path.glob(".st*"))
    moved = _copy(checkpoints / "baseline", tmp_path / "moved")  # the same checkpoint by content, elsewhere: its row
    export_mod.main([str(moved), str(tmp_path / "st"), "--metrics", str(metrics), "--query_max_length", "8",
                     "--doc_max_length", "64"])  # fmt: skip
    assert "model-index:" in (tmp_path / "st" / "README.md").read_text()


@pytest.fixture(scope="module")
def sbmoe_export(checkpoints, tmp_path_factory):
    from lab import export

    out = tmp_path_factory.mktemp("exports") / "sbmoe"
    export.export(checkpoints / "sbmoe", out, onnx=True, int8=True, query_max_length=8, doc_max_length=32)
    return out


def test_an_export_is_evaluated_with_its_own_settings_and_a_change_is_recorded(sbmoe_export, checkpoints, tiny_beir,
                                                                              tmp_path, capsys):  # fmt: skip
    from sbmoe.hub import checkpoint_digest

    argv = ["--model", "sbmoe", "--checkpoint", str(sbmoe_export), "--data_dir", str(tiny_beir), "--output_dir"]
    got = evaluation.main([*argv, str(tmp_path / "a"), "--backend", "onnx-int8"])["settings"]["sbmoe"]
    assert (got["doc_max_length"], got["query_max_length"], got["inference_mode"]) == (32, 8, "top1")
    assert got["precision"].startswith("int8") and got["checkpoint_sha1"] == checkpoint_digest(checkpoints / "sbmoe")
    assert "changed_from_export" not in got
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())["settings"]["sbmoe"]
    assert saved == got
    got = evaluation.main([*argv, str(tmp_path / "b"), "--backend", "onnx", "--doc_max_length", "16"])["settings"]
    assert got["sbmoe"]["changed_from_export"] == {"doc_max_length": {"export": 32, "used": 16}}
    assert exits(evaluation.main, [*argv, str(tmp_path / "c"), "--backend", "onnx", "--inference_mode", "all"]) == 2
    one_line_error(capsys, "--inference_mode all", "traced with inference mode top1")
    assert not (tmp_path / "c").exists()


def _no_onnx(folder: Path) -> str:
    import shutil

    shutil.rmtree(folder / "onnx")
    return "an export without onnx/export.json"


def _corrupt_graph(folder: Path) -> str:
    path = folder / "onnx" / "encoder.onnx"
    path.write_bytes(path.read_bytes()[:2000])
    return "encoder.onnx: not a loadable ONNX graph"


def _corrupt_info(folder: Path) -> str:
    (folder / "onnx" / "export.json").write_text('{"config": ')
    return "export.json: not export.py's export.json"


@pytest.mark.parametrize("break_it", [_no_onnx, _corrupt_graph, _corrupt_info], ids=lambda f: f.__name__.strip("_"))
def test_a_broken_export_folder_is_one_line(break_it, sbmoe_export, tiny_beir, tmp_path, capsys):
    folder = _copy(sbmoe_export, tmp_path / "exp")
    needle = break_it(folder)
    out = tmp_path / "out"
    argv = ["--model", "sbmoe", "--checkpoint", str(folder), "--data_dir", str(tiny_beir), "--backend", "onnx",
            "--output_dir", str(out)]  # fmt: skip
    assert exits(evaluation.main, argv) == 2
    one_line_error(capsys, needle)
    assert not out.exists()


def test_hybrid_without_dev_queries_says_why_before_encoding(tiny_backbone, tmp_path, monkeypatch, capsys):
    data = write_tiny_beir(tmp_path / "tiny")  # 16 train queries: a 1% slice has none
    monkeypatch.setattr(sbmoe.retrieval, "encode_texts", lambda *a, **k: pytest.fail("encoded before checking"))
    out = tmp_path / "out"
    assert exits(evaluation.main, eval_zeroshot(tiny_backbone, data, out, "--hybrid", "bm25", "--dev_fraction", 0.01)) == 2
    one_line_error(capsys, "train.tsv: the dev slice of train", "has no queries", "--hybrid_weight")
    (data / "qrels" / "train.tsv").unlink()
    assert exits(evaluation.main, eval_zeroshot(tiny_backbone, data, out, "--hybrid", "bm25")) == 2
    one_line_error(capsys, "neither dev.tsv nor train.tsv", "--hybrid_weight")
    assert not out.exists()


def test_transfer_data_that_is_the_training_data_or_missing_is_refused(tiny_backbone, tiny_beir, tmp_path,
                                                                       monkeypatch, capsys):  # fmt: skip
    import shutil

    monkeypatch.setenv("BEIR_DATA_DIR", str(tiny_beir.parent))
    copy = tmp_path / "renamed"
    shutil.copytree(tiny_beir, copy)
    (copy / "corpus.jsonl").write_bytes((copy / "corpus.jsonl").read_bytes().replace(b"\n", b"\r\n"))  # same records
    other = write_tiny_beir(tmp_path / "other", seed=1)
    twin = shutil.copytree(other, tmp_path / "twin")
    for transfer, needle in ((f'["{other}", "{copy}"]', "renamed: the same corpus and queries as the training dataset"),
                             (f'["{other}", "{twin}"]', "twin: the same corpus and queries as transfer dataset other"),
                             (f'["{tmp_path / "gone"}"]', "gone: no such folder")):  # fmt: skip
        (tmp_path / "x.toml").write_text(f"{BASE}transfer = {transfer}\n{RUNS}")
        argv = [str(tmp_path / "x.toml"), "--model_name_or_path", str(tiny_backbone), "--results",
                str(tmp_path / "res"), "--ckpt_root", str(tmp_path / "ck"), "--in_process"]  # fmt: skip
        assert exits(experiment.main, argv) == 2
        one_line_error(capsys, needle)
        assert not (tmp_path / "res").exists()


def test_a_data_error_inside_verify_or_a_runner_job_is_one_line(tiny_backbone, tiny_beir, tmp_path, monkeypatch,
                                                                 capsys):  # fmt: skip
    def unreadable(path):
        raise DataError(f"{path}:1: expected 6 columns in a TREC run, got 7")

    monkeypatch.setattr(sbmoe.results, "read_trec", unreadable)
    assert exits(evaluation.main, eval_zeroshot(tiny_backbone, tiny_beir, tmp_path / "out", "--verify")) == 2
    one_line_error(capsys, "zeroshot.trec.gz:1: expected 6 columns")
    assert not (tmp_path / "out" / "metrics.json").exists()
    monkeypatch.setenv("BEIR_DATA_DIR", str(tiny_beir.parent))
    monkeypatch.setattr(runner.Runner, "bm25", lambda self, run: unreadable("bm25.trec.gz"))
    (tmp_path / "x.toml").write_text(BASE + '[runs.bm25]\nkind = "bm25"\n')
    argv = [str(tmp_path / "x.toml"), "--model_name_or_path", str(tiny_backbone), "--results", str(tmp_path / "res"),
            "--ckpt_root", str(tmp_path / "ck"), "--in_process"]  # fmt: skip
    assert exits(experiment.main, argv) == 2
    one_line_error(capsys, "1 job(s) failed: bm25: FAILED: bm25.trec.gz:1: expected 6 columns")


def test_ctrl_c_during_evaluation_is_one_line(tiny_backbone, tiny_beir, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "retrieve_topk", interrupted)
    assert exits(evaluation.main, eval_zeroshot(tiny_backbone, tiny_beir, tmp_path / "out")) == 130
    one_line_error(capsys, "interrupted by SIGINT")
    assert not (tmp_path / "out" / "metrics.json").exists()

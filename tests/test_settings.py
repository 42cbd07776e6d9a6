"""Typed settings: an experiment file's tables become command-line flags in one place; checkpoints are shared by
settings compared as values; finished cells are compared by value; a job's outcome is a value, not a message."""

import argparse
import sys

import pytest
from conftest import ROOT

from lab import jobs
from lab.cells import differing_field
from lab.jobs import Outcome, Status, Step
from lab.layout import Layout
from lab.runner import Runner
from lab.settings import flags, from_flags, merge, number_text, toml_text
from lab.spec import load_experiment


@pytest.mark.parametrize("value, text", [(1e-3, "1e-3"), (5e-5, "5e-5"), (1e-6, "1e-6"), (0.02, "0.02"),
                                         (0.25, "0.25"), (1.0, "1"), (2e5, "2e5"), (0.1, "0.1")])  # fmt: skip
def test_a_float_is_written_as_its_shortest_text(value, text):
    assert number_text(value) == text and float(text) == value


def test_tables_become_flags_in_order_a_later_table_winning():
    recipe = {"num_train_epochs": 10, "moe_learning_rate": 1e-3, "normalize": False, "sampling": "query"}
    run = {"num_train_epochs": 3, "frozen": True, "eval_splits": ["test", "train"]}
    assert flags(recipe, run) == ["--num_train_epochs", "10", "--moe_learning_rate", "1e-3", "--normalize", "false",
                                  "--sampling", "query", "--num_train_epochs", "3", "--frozen", "--eval_splits",
                                  "test", "train"]  # fmt: skip
    assert merge(recipe, run)["num_train_epochs"] == 3
    assert from_flags(flags(recipe, run)) == merge(recipe, run)  # read back as the same values
    assert toml_text(from_flags(["--lr", "5e-5", "--design", "sokli", "--learn_scale", "false"])) == (
        '{ lr = 5e-5, design = "sokli", learn_scale = false }')


FILE = """
name = "x"
seeds = [42]
recipe = { num_train_epochs = 2, doc_max_length = 128 }
[runs.a]
kind = "sbmoe"
train = { design = "sokli", moe_learning_rate = 1e-3 }
[runs.b]  # the same settings, in another order and spelling, evaluated otherwise: a's checkpoint
kind = "sbmoe"
train = { moe_learning_rate = 0.001, design = "sokli" }
eval = { inference_mode = "all" }
[runs.c]  # the recipe's value said again: a's checkpoint
kind = "sbmoe"
train = { design = "sokli", moe_learning_rate = 1e-3, doc_max_length = 128 }
[runs.d]  # another value: its own
kind = "sbmoe"
train = { design = "sokli", moe_learning_rate = 1e-4 }
[runs.e]  # frozen: its own
kind = "sbmoe"
frozen = true
train = { design = "sokli", moe_learning_rate = 1e-3 }
"""


def args(tmp_path, **over) -> argparse.Namespace:
    return argparse.Namespace(**{"results": tmp_path / "res", "ckpt_root": tmp_path / "ck", "model_name_or_path": "m",
                                 "fp16": False, "bf16": False, "smoke": False, "extra": [], "in_process": True,
                                 "parallel": 1, "rerun": [], **over})  # fmt: skip


def test_checkpoints_are_shared_by_settings_compared_as_values(tmp_path):
    (tmp_path / "x.toml").write_text(FILE)
    exp = load_experiment(tmp_path / "x.toml")
    runs = list(exp.runs.values())
    layout = Layout(exp, tmp_path / "res", tmp_path / "ck")
    assert {r.name: layout.checkpoint(r, runs, 42).parent.name for r in runs} == {
        "a": "a", "b": "a", "c": "a", "d": "d", "e": "e"}  # fmt: skip


def test_the_runner_writes_a_runs_settings_as_the_command_line_and_records_them(tmp_path):
    (tmp_path / "x.toml").write_text(FILE)
    exp = load_experiment(tmp_path / "x.toml")
    runner = Runner(exp, args(tmp_path, smoke=True, extra=["--fp16_full_eval", "--seed_x", "3"]), tmp_path)
    b, e = exp.runs["b"], exp.runs["e"]
    assert runner.train_argv(b, 42, tmp_path / "ck")[10:] == [
        "--num_train_epochs", "2", "--doc_max_length", "128", "--moe_learning_rate", "1e-3", "--design", "sokli",
        "--max_steps", "2", "--doc_max_length", "32", "--per_device_train_batch_size", "8", "--eval_strategy", "no",
        "--load_best_model_at_end", "false", "--save_strategy", "no", "--fp16_full_eval", "--seed_x", "3"]  # fmt: skip
    assert runner.train_flags(e)[-1] == "--frozen" and "--frozen" not in runner.train_argv(e, 42, tmp_path)
    assert runner.eval_flags(b) == ["--inference_mode", "all", "--doc_max_length", "32"]


def test_a_finished_cell_is_compared_by_value_not_by_string():
    recorded = {"inputs": {"kind": "sbmoe", "train": ["--lr", "0.001", "--epochs", "2", "--epochs", "3"],
                           "eval": ["--inference_mode", "all"]}}  # fmt: skip
    now = {"kind": "sbmoe", "train": ["--epochs", "3", "--lr", "1e-3"], "eval": ["--inference_mode", "all"]}
    assert differing_field(recorded, now) is None
    assert differing_field(recorded, {**now, "train": ["--epochs", "2", "--lr", "1e-3"]}).startswith("train (")
    assert differing_field(recorded, {**now, "eval": []}).startswith("eval (--inference_mode all there")


def test_a_jobs_outcome_is_a_value_whatever_its_names(tmp_path, monkeypatch):
    (tmp_path / "x.toml").write_text('seeds = [42]\n[runs.FAILED-bm25]\nkind = "bm25"\n[runs.other]\nkind = "bm25"\n')
    exp = load_experiment(tmp_path / "x.toml")
    outcomes = {"FAILED-bm25": Outcome("FAILED-bm25", Status.MADE, seconds=2.4),
                "other": Outcome.failure("other", "evaluation", ", see eval.log")}  # fmt: skip
    monkeypatch.setattr(Runner, "job", lambda self, runs, seed, all_runs: outcomes[runs[0].name])
    failed = Runner(exp, args(tmp_path), tmp_path).run_stage(list(exp.runs.values()))
    assert failed == [outcomes["other"]] and str(failed[0]) == "other: evaluation FAILED, see eval.log"
    assert str(outcomes["FAILED-bm25"]) == "FAILED-bm25: 2 s" and not outcomes["FAILED-bm25"].failed
    assert str(Outcome("a seed 42", Status.DONE_EARLIER)) == "a seed 42: done earlier"
    assert str(Outcome.failure("a", "", ": bad file")) == "a: FAILED: bad file"


def test_a_step_is_dispatched_by_its_kind_and_logged_as_the_command_a_user_types(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(Step, "run_here", lambda self, argv: ran.append((self, argv)))
    for step in Step:
        assert jobs.run_step(step, ["--x", "1"], tmp_path / "log", [sys.executable], in_process=True)
    assert ran == [(step, ["--x", "1"]) for step in Step]
    logged = (tmp_path / "log").read_text().splitlines()
    assert logged == ["+ python train.py --x 1", "+ python eval.py --x 1", "+ python frozen.py --x 1"]
    assert all((ROOT / step.script).is_file() for step in Step)  # what the log says can be typed

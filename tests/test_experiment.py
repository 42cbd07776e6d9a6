"""The experiment runner, the variant registry and the files they hand each other."""

import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import ROOT, ZEROSHOT_AND_BASELINE, one_line_error

from lab import stages
from lab.layout import Layout
from lab.stats import mean_std, significant, subset_mean
from sbmoe import results as an
from sbmoe.data import load_beir, unseen_document_queries
from sbmoe.files import read_trec

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
TINY = ["--per_device_train_batch_size", "4", "--num_experts", "4", "--dev_fraction", "0.2"]

TABLE = """
name = "tiny-table"
dataset = "tiny"
seeds = [42, 43]
splits = ["test", "train"]
trec_depth = { train = 10 }
subsets = ["unseen", "seen"]
recipe = { num_train_epochs = 1 }

[runs.bm25]
kind = "bm25"
label = "BM25"
""" + ZEROSHOT_AND_BASELINE + """
[runs.sbmoe]
kind = "sbmoe"
reference = "baseline"

[runs.sbmoe-all]
kind = "sbmoe"
eval = { inference_mode = "all" }
reference = "sbmoe"
"""


def runner(args, env, check=True):
    proc = subprocess.run([sys.executable, "experiment.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_runner_trains_evaluates_reports_and_skips_finished_runs(tiny_backbone, tiny_beir, tmp_path, monkeypatch,
                                                                 capsys):  # fmt: skip
    from lab import experiment

    (tmp_path / "tiny.toml").write_text(TABLE)
    monkeypatch.setenv("BEIR_DATA_DIR", str(tiny_beir.parent))
    monkeypatch.chdir(ROOT)
    args = [tmp_path / "tiny.toml", "--model_name_or_path", tiny_backbone, "--results", tmp_path / "res",
            "--ckpt_root", tmp_path / "ck", "--smoke", "--seeds", 42, 43, "--in_process", "--extra", *TINY]  # fmt: skip
    experiment.main(list(map(str, args)))
    root = tmp_path / "res" / "tiny-table"
    assert sorted(p.name for p in (tmp_path / "ck" / "tiny-table").iterdir()) == ["baseline", "sbmoe"]  # shared
    for run in ("baseline", "sbmoe", "sbmoe-all"):
        for seed in (42, 43):
            for split in ("test", "train"):
                assert an.per_query_path(root / run / f"seed{seed}" / split, run).is_file()
    train_run = read_trec(an.run_path(root / "sbmoe" / "seed42" / "train", "sbmoe"))
    assert max(len(docs) for docs in train_run.values()) == 10  # the leakage run keeps only its top 10
    assert "--inference_mode all" in (root / "sbmoe-all" / "seed42" / "eval.log").read_text()
    report = json.loads((root / "report.json").read_text())
    rows = report["stages"][0]["rows"]
    tests = {t["run"]: t for t in report["stages"][0]["tests"]}
    assert list(rows) == ["bm25", "zeroshot", "baseline", "sbmoe", "sbmoe-all"]
    _, _, train_qrels = load_beir(tiny_beir, "train")
    _, _, test_qrels = load_beir(tiny_beir, "test")
    unseen = unseen_document_queries(train_qrels, test_qrels)
    assert report["subsets"]["unseen"] == unseen and unseen
    assert sorted(report["subsets"]["seen"] + unseen) == sorted(test_qrels)
    bm25 = an.read_per_query(root / "bm25" / "test", "bm25")
    assert rows["bm25"]["unseen NDCG@10"][0] == pytest.approx(subset_mean(bm25, unseen))
    per_seed = [an.read_per_query(root / "sbmoe" / f"seed{s}" / "test", "sbmoe") for s in (42, 43)]
    assert rows["sbmoe"]["NDCG@10"] == pytest.approx(mean_std([subset_mean(r, sorted(r)) for r in per_seed]))
    assert tests["sbmoe"]["seeds"] == [42, 43] and len(tests["sbmoe"]["per_seed"]) == 2
    assert tests["sbmoe-all"]["reference"] == "sbmoe" and tests["sbmoe"]["unseen"] is not None
    assert json.loads((root / "sbmoe" / "summary.json").read_text())["seeds"] == [42, 43]
    md = (root / "report.md").read_text()
    for text in ("| BM25 |", "| zeroshot |", "| baseline |", "| sbmoe", "train NDCG@10", "randomisation p",
                 "Per seed: seed 42 ", f"the {len(unseen)} test queries", "unseen-document queries"):  # fmt: skip
        assert text in md, text
    per_seed_unseen = [subset_mean(r, unseen) - subset_mean(b, unseen) for r, b in zip(
        per_seed, [an.read_per_query(root / "baseline" / f"seed{s}" / "test", "baseline") for s in (42, 43)])]  # fmt: skip
    assert ("Per seed, unseen-document queries: " + ", ".join(
        f"seed {s} {d:+.4f}" for s, d in zip((42, 43), per_seed_unseen))) in md  # fmt: skip
    t = tests["sbmoe"]  # the differences table: unseen-document queries first, each seed's own in brackets
    unseen_cell = f"{t['unseen']['mean_diff']:+.4f}" + (" †" if significant(t["unseen"]) else "")
    unseen_cell += " (" + ", ".join(f"{d:+.4f}" for d in per_seed_unseen) + ")"
    row = next(line for line in md.splitlines() if line.startswith("| sbmoe | baseline | 42, 43 | "))
    assert row.split(" | ")[3] == unseen_cell and md.index("| run | against |") < md.index("| run | change |")
    capsys.readouterr()
    experiment.main(list(map(str, args)))
    assert capsys.readouterr().out.count("done earlier") == 6  # 2 untrained runs + 2 checkpoints x 2 seeds
    (root / "report.md").unlink()
    experiment.main(list(map(str, ["--report", *args])))  # the same command with --report: nothing runs
    assert (root / "report.md").read_text() == md  # rebuilt from the results alone


def test_runner_subprocesses_in_parallel_resume_an_interrupted_checkpoint(tiny_backbone, tiny_beir, tmp_path):
    (tmp_path / "one.toml").write_text('name = "one"\nseeds = [42]\nrecipe = { save_strategy = "steps", '
                                       'save_steps = 1, eval_strategy = "no", load_best_model_at_end = false, '
                                       'max_steps = 2 }\n[runs.sbmoe]\nkind = "sbmoe"\n'
                                       '[runs.moe]\nkind = "moe"\n')  # fmt: skip
    args = [tmp_path / "one.toml", "--model_name_or_path", tiny_backbone, "--data_dir", tiny_beir, "--results",
            tmp_path / "res", "--ckpt_root", tmp_path / "ck", "--parallel", "2", "--extra", *TINY]  # fmt: skip
    ckpt = tmp_path / "ck" / "one" / "sbmoe" / "seed42"
    (ckpt / "checkpoint-1").mkdir(parents=True)  # an interrupted run: a complete checkpoint, no final model
    (ckpt / "checkpoint-1" / "trainer_state.json").write_text("{}")
    proc = runner(args, ENV, check=False)
    log = (tmp_path / "res" / "one" / "sbmoe" / "seed42" / "train.log").read_text()
    assert "--resume_from_checkpoint last" in log.splitlines()[0]  # the runner resumed rather than restarted
    assert (tmp_path / "res" / "one" / "moe" / "seed42" / "test" / "moe.perquery.json.gz").is_file()
    assert proc.returncode != 0 and "1 job(s) failed: sbmoe seed 42: training FAILED" in proc.stderr


def test_runner_rejects_bad_experiment_files_in_one_line(tmp_path, tiny_beir, capsys):
    from lab import experiment

    cases = {
        "runs = 3\n": "no [runs.NAME] tables",
        "[runs.a]\nkind = 'nope'\n": "kind 'nope' is not one of",
        "[runs.a]\nkind = 'baseline'\nreference = 'b'\n": "runs.a.reference 'b' is not a run",
        "colour = 1\n[runs.a]\nkind = 'baseline'\n": "unknown key(s) ['colour']",
        "[runs.a\n": "cannot read an experiment file",
    }
    for text, message in cases.items():
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(experiment.DataError, match=re.escape(message)):
            experiment.load_experiment(tmp_path / "bad.toml")
    with pytest.raises(SystemExit) as exc:  # the command's entry point: exit 2, one line naming the file
        experiment.main(list(map(str, [tmp_path / "bad.toml", "--data_dir", tiny_beir])))
    assert exc.value.code == 2 and "bad.toml" in one_line_error(capsys)


def test_choose_takes_the_best_option_of_each_group_only_if_it_beats_the_reference_on_dev(tmp_path):
    from lab import experiment

    text = "seeds = [42]\n" + "".join(
        f"[runs.{name}]\nkind = 'baseline'\ntrain = {{ x = '{name}' }}\n" + (f"group = '{group}'\n" if group else "")
        for name, group in (("base", None), ("e5", "epochs"), ("e10", "epochs"), ("n3", "neg"), ("t2", "temp"))
    ) + "[select]\nreference = 'base'\n"  # fmt: skip
    (tmp_path / "x.toml").write_text(text)
    exp = experiment.load_experiment(tmp_path / "x.toml")
    layout = Layout(exp, tmp_path / "res", tmp_path / "ck")
    dev = {"base": 0.5, "e5": 0.6, "e10": 0.7, "n3": 0.4, "t2": 0.5}
    for name, score in dev.items():
        folder = layout.run_dir(exp.runs[name], 42)
        folder.mkdir(parents=True)
        an.write_log_history(folder, [{"epoch": 1.0, an.DEV_KEY: score - 0.1}, {"epoch": 2.0, an.DEV_KEY: score}])
    assert stages.choose(exp, layout) == {"x": "e10"}  # best of its group, and only if above the reference
    stage2 = stages.chosen_runs(exp, {"x": "e10"})
    assert list(stage2) == ["chosen/base"] and stage2["chosen/base"].train == {"x": "e10"}  # the chosen value wins
    cut = experiment.restrict_seeds(replace(exp, select={**exp.select, "seeds": [42, 43, 44]}), [43])
    assert cut.runs["e5"].seeds == [] and cut.select["seeds"] == [43] and exp.runs["e5"].seeds == [42]


def test_figures_are_drawn_from_the_histories_written_whole_and_linked_from_the_report(tmp_path):
    from lab import experiment, report

    (tmp_path / "f.toml").write_text("seeds = [42, 43]\n[runs.base]\nkind = 'baseline'\n[runs.moe]\nkind = 'sbmoe'\n")
    exp = experiment.load_experiment(tmp_path / "f.toml")
    layout = Layout(exp, tmp_path / "res", tmp_path / "ck")
    for name in ("base", "moe"):
        for seed in (42, 43):
            history = [{"epoch": 1.0, "contrastive_loss": 1.0}, {"epoch": 1.0, an.DEV_KEY: 0.4}]
            if name == "moe":  # only a run with more than one expert gets a share panel
                history[0] |= {an.expert_share_key(0, 0): 0.75, an.expert_share_key(0, 1): 0.25}
            an.write_log_history(layout.run_dir(exp.runs[name], seed), history)
    drawn = report.figures(exp, layout, [exp.runs])
    assert [f["file"] for f in drawn] == ["fig_training.png", "fig_experts.png"]
    for f in drawn:
        assert (layout.root / f["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in layout.root.iterdir() if p.name.startswith(".")]  # no temp file left behind
    result = {"experiment": "f", "description": "", "splits": ["test"], "recipe": [], "subsets": {}, "stages": [],
              "figures": drawn}  # fmt: skip
    md = report.render(result)
    assert "## Figures" in md and "(fig_training.png)" in md and "(fig_experts.png)" in md
    assert "## Figures" not in report.render({**result, "figures": []})
    drawn = report.figures(experiment.load_experiment(tmp_path / "f.toml"), layout, [{"base": exp.runs["base"]}])
    assert [f["file"] for f in drawn] == ["fig_training.png"]  # one expert: no share figure


def test_readers_parse_what_training_writes():
    history = [{"epoch": 0.5, "contrastive_loss": 2.0, an.expert_share_key(0, 0): 0.75, an.expert_share_key(0, 1): 0.25},
               {"epoch": 1.0, "contrastive_loss": 1.0, an.expert_share_key(0, 0): 0.25, an.expert_share_key(0, 1): 0.75,
                an.expert_share_key(1, 0): 1.0},
               {"epoch": 1.0, an.DEV_KEY: 0.4}, {"epoch": 2.0, "contrastive_loss": 0.5}, {"epoch": 2.0, an.DEV_KEY: 0.3}]  # fmt: skip
    assert an.dev_curve(history) == [(1.0, 0.4), (2.0, 0.3)] and an.best_dev(history) == 0.4
    assert an.epoch_losses(history) == [1.5, 0.5]
    assert an.expert_shares(history) == {0: [0.5, 0.5], 1: [1.0]}
    assert an.best_dev([{"loss": 1.0}]) is None


# --------------------------------------------------------------------------------------------
# A new variant is one class


@pytest.fixture
def throwaway_variant():
    """A variant defined here alone: a learned scale on the pooled vector. Unregistered afterwards."""
    from model import VARIANTS, BiEncoder

    class ScaledBiEncoder(BiEncoder):
        kind = "throwaway"

        def add_moe(self, config):
            self.scale = torch.nn.Parameter(torch.ones(1))

        def embed(self, input_ids, attention_mask):
            out = super().embed(input_ids, attention_mask)
            out.reps = out.reps * self.scale
            return out

    assert VARIANTS["throwaway"] is ScaledBiEncoder
    yield ScaledBiEncoder
    del VARIANTS["throwaway"]


def test_a_variant_is_one_class(throwaway_variant, tiny_backbone, tiny_beir, tmp_path, monkeypatch):
    import train
    from lab import experiment
    from model import BiEncoder, load_model

    out = tmp_path / "ck"
    train.main(None, ["--kind", "throwaway", "--model_name_or_path", str(tiny_backbone), "--data_dir", str(tiny_beir),
                      "--output_dir", str(out), "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no",
                      "--load_best_model_at_end", "false", *TINY])  # fmt: skip
    model = load_model(out)
    assert type(model) is throwaway_variant and model.scale.item() != 1.0  # trained, saved, rebuilt
    base = BiEncoder.from_backbone(str(tiny_backbone)).count_parameters()
    assert model.count_parameters() == {"total": base["total"] + 1, "active_per_token": base["total"] + 1}
    assert model.moe_parameter_names() == {"scale"}  # outside the backbone: trained at the head's rate
    (tmp_path / "two.toml").write_text('name = "two"\nseeds = [42]\n[runs.baseline]\nkind = "baseline"\n'
                                       '[runs.scaled]\nkind = "throwaway"\nreference = "baseline"\n')  # fmt: skip
    monkeypatch.chdir(ROOT)
    result = experiment.main([str(tmp_path / "two.toml"), "--model_name_or_path", str(tiny_backbone), "--data_dir",
                              str(tiny_beir), "--results", str(tmp_path / "res"), "--ckpt_root", str(tmp_path / "ck2"),
                              "--in_process", "--smoke", "--extra", *TINY])  # fmt: skip
    rows = result["stages"][0]["rows"]
    assert rows["scaled"]["kind"] == "throwaway" and result["stages"][0]["tests"][0]["run"] == "scaled"
    assert load_model(tmp_path / "ck2" / "two" / "scaled" / "seed42").__class__ is throwaway_variant


@pytest.fixture
def variant_with_settings():
    """A variant with two settings, defined here alone: a scale on the pooled vector, its starting value and
    whether it trains. The settings are declared once, on the class; nothing else is edited."""
    from model import VARIANTS, BiEncoder
    from sbmoe.config import POSITIVE, Setting

    class KnobBiEncoder(BiEncoder):
        kind = "knob"
        settings = {
            "init_scale": Setting(float, 1.0, "starting value of the scale", **POSITIVE),
            "learn_scale": Setting(bool, True, "train the scale (false: it stays at --init_scale)"),
        }

        def add_moe(self, config):
            self.scale = torch.nn.Parameter(torch.full((1,), float(config.init_scale)),
                                            requires_grad=config.learn_scale)  # fmt: skip

        def embed(self, input_ids, attention_mask):
            out = super().embed(input_ids, attention_mask)
            out.reps = out.reps * self.scale
            return out

    yield KnobBiEncoder
    del VARIANTS["knob"]


def test_a_variants_settings_reach_its_flags_config_and_checkpoint(variant_with_settings, tiny_backbone, tiny_beir,
                                                                   tmp_path, capsys):  # fmt: skip
    import train
    from model import load_model

    with pytest.raises(SystemExit) as exc:
        train.main(None, ["--kind", "knob", "--help"])
    assert exc.value.code == 0
    usage = capsys.readouterr().out
    assert "--init_scale" in usage and "--learn_scale" in usage and "starting value of the scale" in usage
    assert "sbmoe | moe | baseline | knob" in usage  # --kind lists it too
    margs, *_ = train.parse(None, ["--kind", "knob", "--init_scale", "2.5", "--learn_scale", "false"])
    assert (margs.init_scale, margs.learn_scale) == (2.5, False)
    margs, *_ = train.parse(None, ["--kind", "knob"])
    assert (margs.init_scale, margs.learn_scale) == (1.0, True)  # the declared defaults
    with pytest.raises(SystemExit) as exc:
        train.parse(None, ["--kind", "knob", "--init_scale", "-1"])
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert lines == ["error: --init_scale -1.0: must be a number > 0"]
    out = tmp_path / "ck"
    train.main(None, ["--kind", "knob", "--model_name_or_path", str(tiny_backbone), "--data_dir", str(tiny_beir),
                      "--output_dir", str(out), "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no",
                      "--load_best_model_at_end", "false", "--init_scale", "2.5", "--learn_scale", "false", *TINY])  # fmt: skip
    saved = json.loads((out / "config.json").read_text())
    assert (saved["kind"], saved["init_scale"], saved["learn_scale"]) == ("knob", 2.5, False)
    assert "num_experts" not in saved or saved["num_experts"] == 8  # another variant's flag (TINY) stays out
    model = load_model(out)
    assert type(model) is variant_with_settings and (model.config.init_scale, model.config.learn_scale) == (2.5, False)
    assert model.scale.item() == 2.5  # started at --init_scale and, with --learn_scale false, did not train


def test_runner_frozen_runs_share_the_head_across_evaluation_flags(tiny_backbone, tiny_beir, tmp_path, monkeypatch):
    from lab import experiment

    (tmp_path / "f.toml").write_text('name = "f"\nseeds = [42]\nfrozen = true\nrecipe = { num_train_epochs = 1 }\n'
                                     '[runs.none]\nkind = "baseline"\n[runs.bm25]\nkind = "bm25"\n'
                                     '[runs.sokli]\nkind = "sbmoe"\ntrain = { design = "sokli" }\nreference = "none"\n'
                                     '[runs.all]\nkind = "sbmoe"\ntrain = { design = "sokli" }\n'
                                     'eval = { inference_mode = "all" }\nreference = ["none", "sokli"]\n')  # fmt: skip
    monkeypatch.chdir(ROOT)
    result = experiment.main(list(map(str, [tmp_path / "f.toml", "--model_name_or_path", tiny_backbone, "--data_dir",
                                            tiny_beir, "--results", tmp_path / "res", "--ckpt_root", tmp_path / "ck",
                                            "--in_process", "--extra", *TINY, "--embedding_cache",
                                            tmp_path / "cache"])))  # fmt: skip
    root = tmp_path / "res" / "f"
    assert sorted(p.name for p in (tmp_path / "ck" / "f").iterdir()) == ["none", "sokli"]  # "all" reuses the head
    assert "head loaded from" in (root / "all" / "seed42" / "train.log").read_text()
    assert an.per_query_path(root / "sokli" / "seed42" / "test", "sokli").is_file()
    assert an.dev_curve(an.read_log_history(root / "sokli" / "seed42"))  # the dev curve came along
    rows = result["stages"][0]["rows"]
    assert set(rows) == {"none", "bm25", "sokli", "all"} and not rows["bm25"]["seeds"]
    assert [(t["run"], t["reference"]) for t in result["stages"][0]["tests"]] == [
        ("sokli", "none"), ("all", "none"), ("all", "sokli")]


def test_transfer_evaluates_every_checkpoint_bm25_and_zeroshot_on_other_datasets_without_training(
        tiny_backbone, tiny_beir, tmp_path, monkeypatch, capsys):  # fmt: skip
    from conftest import write_tiny_beir

    from lab import experiment
    from lab.scripts.transfer_demo import TRANSFER  # the demo runs the same experiment file
    from sbmoe.metrics import mean_metrics, per_query_metrics
    from sbmoe.retrieval import bm25_search

    other = write_tiny_beir(tmp_path / "elsewhere" / "other-set", n_docs=40, n_queries=15, seed=7)
    monkeypatch.setenv("BEIR_DATA_DIR", str(tiny_beir.parent))
    monkeypatch.chdir(ROOT)
    args = ["--model_name_or_path", tiny_backbone, "--results", tmp_path / "res", "--ckpt_root", tmp_path / "ck",
            "--smoke", "--in_process", "--extra", *TINY]  # fmt: skip
    (tmp_path / "bad.toml").write_text(TRANSFER.format(other=tmp_path / "nowhere"))
    with pytest.raises(SystemExit):
        experiment.main(list(map(str, [tmp_path / "bad.toml", *args])))
    err = capsys.readouterr().err
    assert "nowhere" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "ck").exists()  # before training
    (tmp_path / "t.toml").write_text(TRANSFER.format(other=other))
    experiment.main(list(map(str, [tmp_path / "t.toml", *args])))
    assert sorted(p.name for p in (tmp_path / "ck" / "tiny-transfer").iterdir()) == ["baseline", "sbmoe"]
    for run in ("baseline", "sbmoe"):  # trained once, on the experiment's dataset only
        log = (tmp_path / "res" / "tiny-transfer" / run / "seed42" / "train.log").read_text()
        assert log.count("train.py") == 1 and str(tiny_beir) in log and str(other) not in log
    tx = tmp_path / "res" / "tiny-transfer" / "transfer" / "other-set"
    for run, folder in (("bm25", tx / "bm25"), ("zeroshot", tx / "zeroshot"), ("baseline", tx / "baseline" / "seed42"),
                        ("sbmoe", tx / "sbmoe" / "seed42")):  # fmt: skip
        assert an.per_query_path(folder / "test", run).is_file(), run
    assert str(other) in (tx / "sbmoe" / "seed42" / "eval.log").read_text()
    corpus, queries, qrels = load_beir(other, "test")
    expected = mean_metrics(per_query_metrics(qrels, bm25_search(corpus, queries, top_k=100)))
    report = json.loads((tmp_path / "res" / "tiny-transfer" / "report.json").read_text())
    rows = report["transfer"]["other-set"]["rows"]
    assert list(rows) == ["bm25", "zeroshot", "baseline", "sbmoe"]
    assert rows["bm25"]["NDCG@10"][0] == pytest.approx(expected["NDCG@10"])
    tests = {t["run"]: t["reference"] for t in report["transfer"]["other-set"]["tests"]}
    assert tests == {"bm25": "baseline", "zeroshot": "baseline", "sbmoe": "baseline"}
    md = (tmp_path / "res" / "tiny-transfer" / "report.md").read_text()
    assert "## Transfer: other-set" in md and md.count("| BM25 |") == 1
    trained = report["stages"][0]["rows"]["baseline"]
    history = an.read_log_history(tmp_path / "res" / "tiny-transfer" / "baseline" / "seed42")
    assert trained["train_seconds"][0] == pytest.approx(an.train_seconds(history)) and trained["eval_seconds"][0] > 0
    assert "| baseline | " in md.split("Wall-clock minutes")[1]  # the cost table
    capsys.readouterr()
    experiment.main(list(map(str, [tmp_path / "t.toml", *args])))
    assert capsys.readouterr().out.count("done earlier") == 6  # nothing trained or evaluated twice
    (tmp_path / "res" / "tiny-transfer" / "report.md").unlink()
    experiment.main(list(map(str, ["--report", tmp_path / "t.toml", *args])))
    assert (tmp_path / "res" / "tiny-transfer" / "report.md").read_text() == md

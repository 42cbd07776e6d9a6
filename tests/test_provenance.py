"""Every cell says what made it; a finished cell made by other inputs is never reused in silence; a report is made
from the files alone; --recheck makes a cell again and gives a verdict."""

import json
import shutil

import pytest
from conftest import ROOT, ZEROSHOT_AND_BASELINE, write_tiny_backbone

from lab import experiment
from model import VARIANTS
from sbmoe import provenance as prov

TOML = """
name = "tiny-prov"
dataset = "tiny"
seeds = [42]
subsets = ["unseen", "seen"]
recipe = { num_train_epochs = 1 }
""" + ZEROSHOT_AND_BASELINE + """
[runs.sbmoe]
kind = "sbmoe"
train = { routing = "random" }
reference = "baseline"
"""
TINY = ["--per_device_train_batch_size", "4", "--num_experts", "4", "--dev_fraction", "0.2"]


@pytest.fixture
def made(tiny_backbone, tiny_beir, tmp_path, monkeypatch):
    """A finished tiny experiment and the arguments that made it."""
    (tmp_path / "tiny.toml").write_text(TOML)
    monkeypatch.setenv("BEIR_DATA_DIR", str(tiny_beir.parent))
    monkeypatch.chdir(ROOT)
    args = [tmp_path / "tiny.toml", "--model_name_or_path", tiny_backbone, "--results", tmp_path / "res",
            "--ckpt_root", tmp_path / "ck", "--smoke", "--in_process"]  # fmt: skip
    args = list(map(str, args))
    experiment.main([*args, "--extra", *TINY])
    return args, tmp_path / "res" / "tiny-prov"


def exits_with_one_line(capsys, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        experiment.main(argv)
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_every_cell_records_its_inputs_and_maker(made, tiny_backbone, tiny_beir):
    _, root = made
    for cell in (root / "zeroshot", root / "baseline" / "seed42", root / "sbmoe" / "seed42"):
        rec = prov.read(cell)
        assert rec["inputs"]["backbone"] == prov.backbone_identity(str(tiny_backbone))
        assert rec["inputs"]["dataset"] == prov.dataset_identity(tiny_beir)
        assert rec["inputs"]["precision"] == "fp32" and rec["made_by"]["machine"] == prov.machine()
        assert set(rec["made_by"]) >= {"commit", "dirty", "versions", "date"}
    assert "--routing" in prov.read(root / "sbmoe" / "seed42")["inputs"]["train"]
    md = (root / "report.md").read_text()
    assert f"- Backbone: {tiny_backbone.name} (sha256 {prov.backbone_identity(str(tiny_backbone))['sha256'][:12]})" in md
    assert "- Machine: " in md and "- Dataset: tiny (sha256 " in md


def test_another_backbone_recipe_or_precision_is_an_error_naming_run_seed_and_field(made, tmp_path, capsys):
    args, root = made
    other = write_tiny_backbone(tmp_path / "other", layers=1)
    before = {p: p.stat().st_mtime for p in root.rglob("*.json")}
    argv = [*args, "--extra", *TINY]
    err = exits_with_one_line(capsys, [*argv[:2], str(other), *argv[3:]])
    assert "run zeroshot:" in err and "another backbone (" in err and "--rerun zeroshot" in err
    err = exits_with_one_line(capsys, [*args, "--extra", *TINY, "--learning_rate", "1e-3"])
    assert "run baseline, seed 42:" in err and "another train (" in err and "--results" in err
    err = exits_with_one_line(capsys, [*args, "--bf16", "--extra", *TINY])
    assert "another precision (fp32 there, bf16 now)" in err
    assert before == {p: p.stat().st_mtime for p in root.rglob("*.json")}  # nothing ran, nothing was rewritten
    capsys.readouterr()
    experiment.main([*args[:2], str(other), *args[3:], "--rerun", "zeroshot", "baseline", "sbmoe", "--extra", *TINY])
    assert prov.read(root / "baseline" / "seed42")["inputs"]["backbone"] == prov.backbone_identity(str(other))


def test_another_commit_or_machine_is_reported_not_refused(made, capsys):
    args, root = made
    rec = prov.read(root / "baseline" / "seed42")
    prov.write(root / "baseline" / "seed42", rec["inputs"], {**rec["made_by"], "commit": "0123456789abcdef",
                                                            "dirty": False})
    capsys.readouterr()
    experiment.main([*args, "--extra", *TINY])
    out = capsys.readouterr().out
    assert "note: 1 finished cell(s) made at commit 0123456789" in out and out.count("done earlier") == 3
    assert "- Commit: 0123456789 (1 cell); " in (root / "report.md").read_text()


def test_report_renders_the_same_bytes_without_the_data(made, tiny_beir, monkeypatch):
    args, root = made
    md = (root / "report.md").read_text()
    assert "unseen" in json.loads((root / "subsets.json").read_text())["subsets"]
    shutil.rmtree(tiny_beir)
    monkeypatch.delenv("BEIR_DATA_DIR")
    (root / "report.md").unlink()
    experiment.main([*args, "--report"])
    assert (root / "report.md").read_text() == md
    (root / "subsets.json").unlink()  # what it needs is gone: the report says so instead of dropping the columns
    experiment.main([*args, "--report"])
    assert "are not stored with these results (subsets.json)" in (root / "report.md").read_text()


def test_recheck_makes_a_cell_again_and_gives_a_verdict(made, capsys):
    args, root = made
    capsys.readouterr()
    out = experiment.main([*args, "--recheck", "baseline:42", "--extra", *TINY])
    printed = capsys.readouterr().out
    assert out["verdict"] == "REPRODUCED" and "| all NDCG@10 |" in printed and "| unseen NDCG@10 |" in printed
    assert "equal to the last digit" in printed
    per_query = root / "baseline" / "seed42" / "test" / "baseline.perquery.json.gz"
    from sbmoe import results as an

    scores = an.read_per_query_file(per_query)
    an.write_per_query(per_query.parent, "baseline", {q: {**m, "NDCG@10": m["NDCG@10"] / 2} for q, m in scores.items()})
    err = exits_with_one_line(capsys, [*args, "--recheck", "baseline", "--extra", *TINY])
    assert "--recheck baseline: NOT REPRODUCED: largest NDCG@10 difference" in err


def test_random_routing_made_by_the_old_hash_is_refused_and_rerun_reevaluates_it_alone(made, tmp_path, capsys):
    """The evaluation routing of a random control shapes its numbers: a cell evaluated with the old float hash is
    another input; --rerun evaluates it again on the same checkpoint (training unchanged) and, resumed, redoes
    nothing that already matches."""
    args, root = made
    cell = root / "sbmoe" / "seed42"
    rec = prov.read(cell)
    assert rec["inputs"]["random_routing"] == VARIANTS["sbmoe"].random_routing
    assert "random_routing" not in prov.read(root / "baseline" / "seed42")["inputs"]
    prov.write(cell, {**rec["inputs"], "random_routing": "float hash of the hidden state"}, rec["made_by"])
    err = exits_with_one_line(capsys, [*args, "--extra", *TINY])
    assert "run sbmoe, seed 42:" in err and "another random_routing (float hash" in err
    weights = tmp_path / "ck" / "tiny-prov" / "sbmoe" / "seed42" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    capsys.readouterr()
    experiment.main([*args, "--rerun", "sbmoe", "--extra", *TINY])
    assert prov.read(cell)["inputs"]["random_routing"] == VARIANTS["sbmoe"].random_routing
    assert weights.stat().st_mtime_ns == stamp  # not trained again
    capsys.readouterr()
    experiment.main([*args, "--rerun", "sbmoe", "--extra", *TINY])
    assert capsys.readouterr().out.count("done earlier") == 3

"""Contracts the other test files leave open: variant defaults and counts, the runner's pairing and stages,
the statistics, reproducible files, and the frozen study's training and caches."""
import json
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from lab import layout, spec, stages
from lab.stats import paired_tests, significant
from model import VARIANTS
from sbmoe import results as an


def build(kind, backbone, **kw):
    return VARIANTS[kind].from_backbone(str(backbone), pooling="mean", **kw).eval()


def test_variant_defaults_reach_the_command_line():
    import train
    m, _, t = train.parse("moe", ["--learning_rate", "2e-5"])
    assert m.top_k == 2 and m.moe_learning_rate == 2e-5
    m, *_ = train.parse("sbmoe", [])
    assert (m.top_k, m.moe_learning_rate) == (1, 1e-4)
    m, *_ = train.parse("sbmoe", ["--design", "seed", "--top_k", "1", "--moe_learning_rate", "3e-3"])
    assert (m.top_k, m.gate_temperature, m.moe_learning_rate) == (1, 5.0, 3e-3)  # the user's flags win


def test_a_subclass_without_its_own_kind_does_not_replace_its_parent():
    from model import TinyBERTWithMoE
    class Tweaked(TinyBERTWithMoE):
        pass
    assert VARIANTS["sbmoe"] is TinyBERTWithMoE


def test_active_parameters_follow_inference_mode_and_routing(tiny_backbone):
    per_expert = 32 * 16 + 16 + 16 * 32 + 32
    sb = build("sbmoe", tiny_backbone, num_experts=4)
    sb.config.inference_mode = "all"
    c = sb.count_parameters()
    assert c["active_per_token"] == c["total"]
    r = build("sbmoe", tiny_backbone, num_experts=4, routing="random", top_k=2).count_parameters()
    assert r["active_per_token"] == r["total"] - 2 * per_expert


def test_extra_flops(tiny_backbone):
    H, inner, T, E = 32, 64, 10, 4
    assert build("moe", tiny_backbone, num_experts=E, top_k=2).extra_flops(T) == 4 * T * H * inner + 2 * T * H * E
    assert build("sbmoe", tiny_backbone, num_experts=E).extra_flops(T) == 2 * H * E + 4 * H * (H // 2)
    seed = build("sbmoe", tiny_backbone, num_experts=E, design="seed", top_k=2)
    assert seed.extra_flops(T) == T * (2 * H * E + 2 * 4 * H * (2 * H))


def test_seed_expert_dropout_is_applied_in_training(tiny_backbone):
    e = build("sbmoe", tiny_backbone, num_experts=4, design="seed", top_k=2).moe.experts[0].train()
    x = torch.randn(64, 32)
    assert not torch.equal(e(x), e(x))
    assert torch.equal(e.eval()(x), e(x))


def test_no_hooks_left_on_the_routers(tiny_backbone):
    model = build("moe", tiny_backbone, num_experts=4, top_k=2)
    model.embed(torch.tensor([[2, 5, 6, 3]]), torch.ones(1, 4, dtype=torch.long))
    assert all(not b.router._forward_hooks for b in model.moe_blocks())


def test_the_scheduler_keeps_the_moe_rate(tiny_backbone, tmp_path):
    from sbmoe.trainer import ContrastiveTrainer
    from train import RetrievalTrainingArguments
    model = VARIANTS["sbmoe"].from_backbone(str(tiny_backbone), num_experts=4)
    args = RetrievalTrainingArguments(output_dir=str(tmp_path), use_cpu=True, learning_rate=2e-5, eval_strategy="no",
                                      save_strategy="no", load_best_model_at_end=False)
    trainer = ContrastiveTrainer(model=model, args=args, moe_learning_rate=1e-3)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert sorted(set(trainer.lr_scheduler.base_lrs)) == [2e-5, 1e-3]


def test_checkpoints_are_shared_only_across_evaluation_flags_and_evaluated_needs_every_split(tmp_path):
    from lab import experiment
    (tmp_path / "x.toml").write_text("splits = ['test', 'train']\n[runs.a]\nkind = 'sbmoe'\n[runs.b]\nkind = 'sbmoe'\n"
                                     "eval = { inference_mode = 'all' }\n[runs.c]\nkind = 'sbmoe'\ntrain = { design = 'sokli' }\n")
    exp = experiment.load_experiment(tmp_path / "x.toml")
    lay = layout.Layout(exp, tmp_path / "r", tmp_path / "c")
    runs = list(exp.runs.values())
    assert {r.name: lay.checkpoint(r, runs, 42).parent.name for r in runs} == {"a": "a", "b": "a", "c": "c"}
    an.write_per_query(lay.split_dir(exp.runs["a"], 42, "test"), "a", {"q": {"NDCG@10": 1.0}})
    assert not lay.evaluated(exp.runs["a"], 42)


def test_stage2_keeps_references_inside_the_stage_else_compare_to():
    R = spec.Run
    runs = {"base": R("base", "baseline", seeds=[42]), "e5": R("e5", "baseline", seeds=[42], references=["n3"]),
            "n3": R("n3", "baseline", seeds=[42], references=["e5"])}
    exp = spec.Experiment("x", "", None, None, None, [42], ["test"], [], {}, {}, {}, runs,
                                {"reference": "base", "runs": ["base", "e5", "n3"]}, [])
    s2 = stages.chosen_runs(exp, {})
    assert [s2[f"chosen/{n}"].references for n in ("base", "e5", "n3")] == [[], ["chosen/n3"], ["chosen/e5"]]
    s2 = stages.chosen_runs(replace(exp, select={"reference": "base", "runs": ["base", "e5"]}), {})
    assert s2["chosen/e5"].references == ["chosen/base"]


def test_compare_pairs_each_seed_with_the_same_seed_and_averages_over_seeds():
    from lab import report
    q = [f"q{i}" for i in range(6)]
    a = {42: {x: {"NDCG@10": 0.1 * i} for i, x in enumerate(q)}, 43: {x: {"NDCG@10": 0.5} for x in q}}
    b = {43: {x: {"NDCG@10": 0.2} for x in q}, 42: {x: {"NDCG@10": 0.1 * i} for i, x in enumerate(q)}}
    t = report.compare("a", "b", a, b, {"unseen": ["q1", "q5"]})
    assert t["seeds"] == [42, 43] and [r["mean_diff"] for r in t["per_seed"]] == pytest.approx([0.0, 0.3])
    assert t["mean_diff"] == pytest.approx(0.15)
    assert t["unseen"]["mean_diff"] == pytest.approx(0.15)  # the subset's queries, each seed with its own
    assert [r["mean_diff"] for r in t["unseen"]["per_seed"]] == pytest.approx([0.0, 0.3])
    b[43]["q5"]["NDCG@10"] = 0.4
    t = report.compare("a", "b", a, b, {"unseen": ["q1", "q5"]})
    assert [r["mean_diff"] for r in t["unseen"]["per_seed"]] == pytest.approx([0.0, 0.2])
    assert t["per_seed"][1]["mean_diff"] == pytest.approx(0.3 - 0.2 / 6)


def test_randomisation_test_is_two_sided_and_significance_needs_both_tests():
    p = paired_tests(np.ones(5), np.zeros(5))["rand_pvalue"]
    assert 0.05 < p < 0.075  # exact two-sided p = 2/32
    assert not significant({"t_pvalue": 0.01, "rand_pvalue": 0.2})


def test_verify_covers_every_metric_the_file_is_deep_enough_for(tmp_path):
    from sbmoe.data import DataError
    from sbmoe.files import write_trec
    from sbmoe.metrics import mean_metrics, per_query_metrics
    from sbmoe.results import verify_run
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"c": 1}}
    run = {"q1": {d: float(100 - i) for i, d in enumerate(["x", "a"] + [f"z{i}" for i in range(98)])}, "q2": {"c": 1.0}}
    write_trec(tmp_path / "r.trec.gz", run, "t", 100)
    for name in ("MAP@100", "Recall@100"):
        means = mean_metrics(per_query_metrics(qrels, run))
        means[name] += 0.01
        with pytest.raises(DataError, match="metrics differ"):
            verify_run(tmp_path / "r.trec.gz", qrels, means, depth=100)


def test_gzip_files_are_byte_reproducible(tmp_path, monkeypatch):
    from sbmoe.files import write_trec
    write_trec(tmp_path / "a.trec.gz", {"q": {"d": 1.0}}, "t", 10)
    an.write_per_query(tmp_path / "a", "t", {"q": {"NDCG@10": 1.0}})
    monkeypatch.setattr(time, "time", lambda: 1e9)
    write_trec(tmp_path / "b.trec.gz", {"q": {"d": 1.0}}, "t", 10)
    an.write_per_query(tmp_path / "b", "t", {"q": {"NDCG@10": 1.0}})
    assert (tmp_path / "a.trec.gz").read_bytes() == (tmp_path / "b.trec.gz").read_bytes()
    assert (tmp_path / "a" / "t.perquery.json.gz").read_bytes() == (tmp_path / "b" / "t.perquery.json.gz").read_bytes()


FROZEN = ["--kind", "sbmoe", "--design", "residual-zero", "--num_experts", "4", "--per_device_train_batch_size", "4",
          "--dev_fraction", "0.2", "--num_train_epochs", "3", "--moe_learning_rate", "1e-2", "--pooling", "mean"]


def test_frozen_head_trains_at_the_head_rate_keeps_its_best_dev_epoch_on_dev_queries(tiny_backbone, tiny_beir, tmp_path,
                                                                                       monkeypatch):
    from safetensors.torch import load_file

    from lab import frozen
    snaps, qids, groups, scores = [], [], set(), iter([0.9, 0.1, 0.2])
    real_retrieve, real_create = frozen.retrieve_cached, frozen.FrozenTrainer.create_optimizer

    def spy(model, doc_feats, doc_ids, q_feats, q_rows, ids, **kw):
        snaps.append({n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("moe.")})
        qids.append(sorted(ids))
        return real_retrieve(model, doc_feats, doc_ids, q_feats, q_rows, ids, **kw)

    monkeypatch.setattr(frozen, "retrieve_cached", spy)
    monkeypatch.setattr(frozen, "mean_metrics", lambda per_query: {"NDCG@10": next(scores)})
    def create(trainer, model=None):
        opt = real_create(trainer, model)
        groups.update((g["name"], g["initial_lr"]) for g in opt.param_groups)
        return opt

    monkeypatch.setattr(frozen.FrozenTrainer, "create_optimizer", create)
    frozen.main([*FROZEN, "--model_name_or_path", str(tiny_backbone), "--data_dir", str(tiny_beir), "--output_dir",
                 str(tmp_path / "ck"), "--embedding_cache", str(tmp_path / "cache")])
    head = load_file(tmp_path / "ck" / "head.safetensors")
    assert groups == {("moe", 1e-2)}  # the Trainer's optimizer holds the head alone, at the head's rate
    assert all(torch.equal(head[n], snaps[0][n]) for n in snaps[0])  # epoch 1 was best on dev
    assert not all(torch.equal(snaps[0][n], snaps[-1][n]) for n in snaps[0])  # and training moved on after it
    torch.manual_seed(42)  # frozen.main's initialisation
    start = VARIANTS["sbmoe"].from_backbone(str(tiny_backbone), pooling="mean", num_experts=4).state_dict()
    changed = {k for k, v in snaps[0].items() if not torch.equal(v, start[k])}
    assert any(".router." in k for k in changed) and any(".experts." in k for k in changed)  # gate and experts train
    from sbmoe.data import load_data
    _, _, train_qrels, dev_qrels, _ = load_data(tiny_beir, dev_fraction=0.2, seed=42)
    assert qids[0] == sorted(dev_qrels)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # documents and queries cached apart


def test_frozen_query_cache_is_per_dataset(tiny_backbone, tmp_path):
    from conftest import write_tiny_beir

    from lab import frozen
    out = []
    for name, seed in (("a", 0), ("b", 1)):  # the same query ids, other texts
        data = write_tiny_beir(tmp_path / name, seed=seed)
        frozen.main(["--kind", "baseline", "--pooling", "mean", "--model_name_or_path", str(tiny_backbone), "--data_dir",
                     str(data), "--output_dir", str(tmp_path / f"ck{name}"), "--embedding_cache", str(tmp_path / "c"),
                     "--eval_output_dir", str(tmp_path / f"res{name}")])
        out.append(json.loads((tmp_path / "resb" / "test" / "metrics.json").read_text()) if name == "b" else None)
    frozen.main(["--kind", "baseline", "--pooling", "mean", "--model_name_or_path", str(tiny_backbone), "--data_dir",
                 str(tmp_path / "b"), "--output_dir", str(tmp_path / "ckb2"), "--embedding_cache", str(tmp_path / "c2"),
                 "--eval_output_dir", str(tmp_path / "resb2")])
    fresh = json.loads((tmp_path / "resb2" / "test" / "metrics.json").read_text())
    assert out[1]["baseline"] == fresh["baseline"]

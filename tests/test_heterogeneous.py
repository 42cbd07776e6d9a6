"""Training on several datasets: batches never mix datasets, colliding ids stay apart, the domain-oracle control
routes by dataset, the per-domain routing's mutual information, and the reuse of the dev pass's embeddings."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, one_line_error, torchrun, write_tiny_beir

import eval as eval_cli
import sbmoe.device
import sbmoe.trainer
import train
from lab import experiment, report, stages
from lab.layout import Layout
from lab.spec import load_experiment
from lab.stages import cell_units
from model import TinyBERTWithMoE, load_model
from sbmoe import results as an
from sbmoe.config import RetrieverConfig
from sbmoe.encoding import REUSE_DIR, model_domain, routing_counts
from sbmoe.hub import load_tokenizer

COMMON = ["--per_device_train_batch_size", "4", "--logging_steps", "1", "--use_cpu", "--dev_fraction", "0.25",
          "--num_train_epochs", "1", "--save_strategy", "no", "--load_best_model_at_end", "false",
          "--eval_batch_size", "16"]  # fmt: skip


@pytest.fixture
def two_datasets(tmp_path):
    """Two BEIR folders whose document and query ids collide (d0.., q0..) but whose texts differ."""
    return [write_tiny_beir(tmp_path / "beir" / name, seed=seed) for name, seed in (("alpha", 0), ("beta", 1))]


def record_batches(monkeypatch) -> list:
    """Every collated batch as (domains, query ids, [(query text, positive text)], [[(document id, text)]])."""
    seen = []

    class Recording(sbmoe.trainer.ContrastiveCollator):
        def __call__(self, examples):
            out = super().__call__(examples)
            pairs = [(self.queries[e["qid"]], self.corpus[e["docs"][0]]["text"]) for e in examples]
            docs = [[(x, self.corpus[x]["text"]) for x in e["docs"]] for e in examples]  # positive, hard negatives
            seen.append((out["domains"].tolist(), [e["qid"] for e in examples], pairs, docs))
            return out

    monkeypatch.setattr(train, "ContrastiveCollator", Recording)
    return seen


def part(n: int, tag: str, seed: int = 0) -> sbmoe.trainer.ContrastiveDataset:
    qrels = {f"{tag}{i}": {f"{tag}d{i}": 1} for i in range(n)}
    negs = {q: [f"{tag}n{k}" for k in range(5)] for q in qrels}
    return sbmoe.trainer.ContrastiveDataset({}, qrels, negs, 1, seed)


def test_mixed_batches_come_from_one_dataset_in_proportion_and_are_seeded():
    parts = [part(30, "a"), part(10, "b")]
    mixed, draws = sbmoe.trainer.MixedDataset(parts, batch=4, seed=7), []
    assert len(mixed) == (30 // 4 + 10 // 4) * 4
    for epoch in (0, 1):
        mixed.set_epoch(epoch)
        items = [mixed[i] for i in range(len(mixed))]
        blocks = [items[i : i + 4] for i in range(0, len(items), 4)]
        assert all(len({x["domain"] for x in b}) == 1 for b in blocks)  # never mixed
        assert all(x["qid"].startswith("ab"[x["domain"]]) for x in items)
        assert [sum(b[0]["domain"] == d for b in blocks) for d in (0, 1)] == [7, 2]  # in proportion
        assert len({x["qid"] for x in items}) == len(items)  # no example twice in an epoch
        draws.append({x["qid"]: x["docs"] for x in items})
    assert sum(draws[0][q] != draws[1][q] for q in draws[0].keys() & draws[1].keys()) > 10  # each epoch: its own negatives
    again = sbmoe.trainer.MixedDataset([part(30, "a"), part(10, "b")], batch=4, seed=7)
    again.set_epoch(1)
    assert [again[i] for i in range(len(again))] == items  # a pure function of (seed, epoch)
    mixed.set_epoch(0)
    assert [mixed[i] for i in range(len(mixed))] != items
    orders = []  # the blocks themselves are shuffled (dataset b's not all last), and by the seed
    for seed in range(8):
        other = sbmoe.trainer.MixedDataset([part(30, "a"), part(10, "b")], batch=4, seed=seed)
        orders.append(tuple(other[i]["domain"] for i in range(0, len(other), 4)))
    assert len(set(orders)) > 3 and any(order[-2:] != (1, 1) for order in orders)


def test_colliding_ids_stay_apart_and_every_training_batch_is_one_dataset(tiny_backbone, two_datasets, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    seen, mined, made = record_batches(monkeypatch), [], []
    mine = train.mine_negatives
    monkeypatch.setattr(train, "mine_negatives", lambda model, tok, corpus, queries, *a: mined.append(
        (corpus, queries)) or mine(model, tok, corpus, queries, *a))  # fmt: skip
    build = train.training_data
    monkeypatch.setattr(train, "training_data", lambda *a: made.append(build(*a)) or made[-1])
    out, qrels = tmp_path / "ckpt", two_datasets[1] / "qrels"
    header, *rows = (qrels / "train.tsv").read_text().splitlines()  # beta: an official dev split of 3 queries
    dev_ids = list(dict.fromkeys(r.split("\t")[0] for r in rows))[-3:]
    for name, keep in (("train", False), ("dev", True)):
        (qrels / f"{name}.tsv").write_text("\n".join([header, *(r for r in rows if (r.split("\t")[0] in dev_ids) == keep)]))
    train.main("sbmoe", [*map(str, ["--model_name_or_path", tiny_backbone, "--dataset", *two_datasets,
                                    "--output_dir", out, "--design", "sokli", "--routing", "domain",
                                    "--num_experts", "2", "--eval_strategy", "epoch"]), *COMMON])  # fmt: skip
    texts = []
    for folder in two_datasets:
        queries = {json.loads(x)["_id"]: json.loads(x)["text"] for x in (folder / "queries.jsonl").read_text().split("\n") if x}
        docs = {json.loads(x)["_id"]: json.loads(x)["text"] for x in (folder / "corpus.jsonl").read_text().split("\n") if x}
        texts.append((queries, docs))
    assert seen and {d for domains, *_ in seen for d in domains} == {0, 1}
    assert texts[0][0]["q0"] != texts[1][0]["q0"] and texts[0][1]["d0"] != texts[1][1]["d0"]  # ids collide
    for domains, qids, pairs, docs in seen:
        assert len(set(domains)) == 1  # every batch from one dataset
        for d, (ns, qid), (q_text, d_text), example in zip(domains, qids, pairs, docs):
            assert ns == d and texts[d][0][qid] == q_text  # the query of its own dataset
            assert d_text in texts[d][1].values()
            assert len(example) == 2 and all(x[0] == d and texts[d][1][x[1]] == t for x, t in example)  # negatives too
    devs = made[0][2]
    assert [dev.name for dev in devs] == ["alpha", "beta"] and len(mined) == 2
    for d, ((queries, docs), (corpus, mined_queries), dev) in enumerate(zip(texts, mined, devs)):
        assert {k: v["text"] for k, v in corpus.items()} == docs  # negatives mined on the dataset's own corpus
        assert {k: v["text"] for k, v in dev.corpus.items()} == docs  # each dev set: its own corpus and queries
        assert mined_queries and mined_queries.items() <= queries.items()  # (its training and dev queries)
        assert dev.queries == {q: queries[q] for q in dev.qrels} and dev.domain == d
    info = json.loads((out / "run_info.json").read_text())
    assert info["datasets"] == ["alpha", "beta"] and set(info["dev"]) == {"alpha", "beta"}
    assert info["dev"]["beta"]["source"] == "split dev" and info["dev"]["beta"]["queries"] == 3
    assert info["dev"]["alpha"]["queries"] == 4  # (unequal: each dataset counts once in the selection metric)
    assert info["dev"]["alpha"]["source"] != "split dev"  # (no dev.tsv: the seeded slice of train)
    assert not {qid for _, qids, _, _ in seen for ns, qid in qids if ns == 1} & set(dev_ids)  # dev never trains
    history = json.loads((out / "log_history.json").read_text())
    dev = next(h for h in history if an.DEV_KEY in h)
    per = an.dev_by_dataset(history)
    assert set(per) == {"alpha", "beta"} and dev[an.DEV_KEY] == pytest.approx(np.mean(list(per.values())))
    assert load_model(out).config.domains == ["alpha", "beta"]


DDP_SCRIPT = """
import os, sys
sys.path.insert(0, sys.argv[1])
import sbmoe.trainer
import train
collate = sbmoe.trainer.ContrastiveCollator.__call__
log = open(os.path.join(sys.argv[2], "rank" + os.environ["RANK"] + ".log"), "w")
def logged(self, examples):
    log.write(" ".join(str(e["domain"]) for e in examples) + "\\n")
    log.flush()
    return collate(self, examples)
sbmoe.trainer.ContrastiveCollator.__call__ = logged
train.main("baseline", sys.argv[3:])
"""


def test_every_global_batch_comes_from_one_dataset_under_torchrun(tiny_backbone, two_datasets, tmp_path):
    """Under DDP a block is the global batch (per-device batch x processes): the processes' batches of one step
    come from the same dataset."""
    script = tmp_path / "ddp_domains.py"
    script.write_text(DDP_SCRIPT)
    args = ["--model_name_or_path", tiny_backbone, "--dataset", *two_datasets, "--output_dir", tmp_path / "out",
            *COMMON, "--per_device_train_batch_size", 2, "--num_train_epochs", 2]  # fmt: skip
    proc = torchrun(script, ROOT, tmp_path, *args, timeout=180)
    assert (tmp_path / "out" / "run_info.json").is_file(), proc.stderr[-3000:]  # (not the exit code: gloo at exit)
    ranks = [[line.split() for line in (tmp_path / f"rank{r}.log").read_text().splitlines()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) >= 10 and {d for b in ranks[0] for d in b} == {"0", "1"}
    for step in zip(*ranks):  # each step's two per-process batches: one dataset between them
        assert len({d for batch in step for d in batch}) == 1, step


def tiny_sbmoe(backbone, routing: str, experts: int = 2) -> TinyBERTWithMoE:
    torch.manual_seed(0)
    return TinyBERTWithMoE.from_backbone(str(backbone), design="sokli", routing=routing, num_experts=experts,
                                         top_k=1).eval()  # fmt: skip


def test_domain_control_routes_each_input_to_its_datasets_expert(tiny_backbone):
    model = tiny_sbmoe(tiny_backbone, "domain")
    tok = load_tokenizer(tiny_backbone)
    batch = tok(["protein gene", "virus immune brain", "drug trial"], return_tensors="pt", padding=True)
    args = (batch["input_ids"], batch["attention_mask"])
    domains = torch.tensor([1, 0, 1])
    emb = model.embed(*args, domains)
    assert emb.routings[0].indices[:, 0].tolist() == [1, 0, 1]
    pooled = model.pool(model.hidden_states(*args), batch["attention_mask"])
    for row, d in enumerate(domains.tolist()):  # exactly the pooled vector plus its own expert's output
        mixed = torch.nn.functional.normalize(model.moe.experts[d](pooled[row : row + 1]), dim=-1, eps=1e-6)
        assert torch.allclose(emb.reps[row], (pooled[row : row + 1] + mixed)[0], atol=1e-5)
    unknown = model.embed(*args).routings[0]  # a dataset no expert trained on: every expert at 1/E
    assert unknown.weights.tolist() == [[0.5, 0.5]] * 3
    model.config.inference_mode = "all"  # all experts at inference: 1/E each, whatever the dataset
    assert model.embed(*args, domains).routings[0].weights.tolist() == [[0.5, 0.5]] * 3
    model.train()
    with pytest.raises(ValueError, match="domains"):
        model.embed(*args)  # training without the datasets is an error, never a silent mixture


def test_evaluation_finds_a_training_datasets_expert_by_name_and_none_for_another(tiny_backbone, tmp_path, capsys):
    model = tiny_sbmoe(tiny_backbone, "domain")
    model.config.domains = ["alpha", "beta"]
    assert [model_domain(model, tmp_path / name) for name in ("alpha", "beta")] == [0, 1]
    assert model_domain(model, tmp_path / "gamma") is None  # zero-shot transfer: no expert of its own
    assert "gamma: not one of the training datasets ['alpha', 'beta']" in capsys.readouterr().out


def test_dev_scores_per_dataset_are_read_at_the_best_mean_not_the_last_evaluation():
    history = [{an.DEV_KEY: 0.5, "eval_alpha/ndcg@10": 0.6, "eval_beta/ndcg@10": 0.4, "epoch": 1.0},
               {"loss": 1.0, "epoch": 1.5},
               {an.DEV_KEY: 0.45, "eval_alpha/ndcg@10": 0.7, "eval_beta/ndcg@10": 0.2, "epoch": 2.0}]  # fmt: skip
    assert an.dev_by_dataset(history) == {"alpha": 0.6, "beta": 0.4}
    assert an.dev_by_dataset(history[1:2]) == {}


def test_domain_routing_needs_several_datasets_and_one_expert_each(tiny_backbone, two_datasets, tmp_path, capsys):
    base = ["--model_name_or_path", tiny_backbone, "--output_dir", tmp_path / "x", "--routing", "domain"]
    for extra, needle in (([*two_datasets[:1], "--num_experts", "1"], "several --dataset"),
                          ([*two_datasets, "--num_experts", "3"], "must equal the number of datasets (2)")):  # fmt: skip
        with pytest.raises(SystemExit):
            train.main("sbmoe", list(map(str, [*base, "--dataset", *extra])))
        one_line_error(capsys, needle)


def test_routing_shares_are_per_dataset_over_queries_and_documents():
    records = {"alpha": {"queries": [[2, 0]], "documents": [[6, 2]]}, "beta": {"queries": [[0, 1]], "documents": [[1, 0]]}}
    summary = an.routing_summary(records)  # alpha 8 and 2 units, beta 1 and 1
    assert summary["blocks"][0]["shares"] == {"alpha": [0.8, 0.2], "beta": [0.5, 0.5]}
    assert summary["units"] == {"alpha": 10, "beta": 2}
    assert summary["blocks"][0]["nmi"] == pytest.approx(an.normalized_mutual_info([[8, 2], [1, 1]]))


def test_routing_section_averages_every_seed(monkeypatch):
    split = lambda run, seed, name: seed  # noqa: E731  (a layout whose split folder is the seed)
    layouts = {n: SimpleNamespace(split_dir=split) for n in ("alpha", "beta")}
    oracle, mixed = [[5, 0], [0, 5]], [[3, 2], [2, 3]]  # NMI 1, and below 1
    tables = {42: oracle, 43: mixed}
    calls = iter([0, 1, 0, 1])  # alpha's record, then beta's, for each seed
    monkeypatch.setattr(report.an, "read_routing", lambda seed, tag: {"queries": [[0, 0]], "unit": "inputs",
                                                                       "documents": [tables[seed][next(calls)]]})
    run = SimpleNamespace(name="r", label="r", tag="r", seeds=[42, 43], datasets=None)
    (out,) = report.routing_section(SimpleNamespace(splits=["test"]), layouts, [run])
    nmis = [1.0, an.normalized_mutual_info(mixed)]
    assert out["seeds"] == [42, 43] and out["blocks"][0]["nmi"] == pytest.approx([np.mean(nmis), np.std(nmis, ddof=1)])
    assert out["blocks"][0]["shares"] == {"alpha": [0.8, 0.2], "beta": [0.2, 0.8]}


def test_nmi_matches_sklearns_definition():
    assert an.normalized_mutual_info(an.contingency([0, 0, 1, 1], [0, 0, 1, 2])) == pytest.approx(0.8)
    assert an.normalized_mutual_info([[5, 0], [0, 7]]) == pytest.approx(1.0)
    assert an.normalized_mutual_info([[4, 4], [3, 3]]) == pytest.approx(0.0)
    assert an.normalized_mutual_info([[9]]) == 1.0  # one label on each side (sklearn's convention)


@pytest.mark.parametrize("routing", ["domain", "random"])
def test_routing_nmi_is_one_for_the_oracle_and_near_zero_for_random_routing(tiny_backbone, two_datasets, routing):
    model = tiny_sbmoe(tiny_backbone, routing)
    tok = load_tokenizer(tiny_backbone)
    records = {}
    for d, folder in enumerate(two_datasets):
        texts = [json.loads(x)["text"] for x in (folder / "corpus.jsonl").read_text().split("\n") if x]
        texts = [f"{t} {w}" for t in texts for w in ("cell", "risk", "dose", "sleep", "diet")]  # 300 inputs
        counts = routing_counts(model, tok, texts, 32, batch_size=64, domain=d)
        records[folder.name] = {"queries": np.zeros_like(counts).tolist(), "documents": counts.tolist()}
    summary = an.routing_summary(records)
    nmi = summary["blocks"][0]["nmi"]
    if routing == "domain":
        assert nmi == pytest.approx(1.0) and summary["blocks"][0]["shares"]["alpha"] == [1.0, 0.0]
    else:
        assert nmi < 0.02, nmi
        assert all(0.35 < s[0] < 0.65 for s in summary["blocks"][0]["shares"].values())


def test_routing_record_counts_tokens_at_the_retrievals_lengths(tiny_backbone, tiny_beir, tmp_path):
    torch.manual_seed(0)
    TinyBERTWithMoE.from_backbone(str(tiny_backbone), design="seed").save_pretrained(tmp_path / "ckpt")
    load_tokenizer(tiny_backbone).save_pretrained(tmp_path / "ckpt")
    eval_cli.main(list(map(str, ["--model", "sbmoe", "--checkpoint", tmp_path / "ckpt", "--data_dir", tiny_beir,
                                 "--output_dir", tmp_path / "out", "--routing_docs", "20", "--query_max_length", "6",
                                 "--doc_max_length", "8"])))  # fmt: skip
    record = an.read_routing(tmp_path / "out", "sbmoe")
    assert record["unit"] == "tokens" and record["lengths"] == [6, 8]
    tokens = {k: np.asarray(record[k])[0].sum() for k in ("queries", "documents")}  # block 0: one expert per token
    assert tokens["documents"] == 8 * record["n_documents"]  # every sampled document is longer than 8 tokens
    assert 0 < tokens["queries"] <= 6 * record["n_queries"] and record["n_documents"] == 20
    eval_cli.main(list(map(str, ["--model", "sbmoe", "--checkpoint", tmp_path / "ckpt", "--data_dir", tiny_beir,
                                 "--output_dir", tmp_path / "default", "--routing_docs", "20"])))  # fmt: skip
    record = an.read_routing(tmp_path / "default", "sbmoe")  # no length flags: the lengths it retrieved at
    used = json.loads((tmp_path / "default" / "metrics.json").read_text())["settings"]["sbmoe"]
    assert record["lengths"] == [used["query_max_length"], used["doc_max_length"]] == [64, 64]  # (64 positions)


def test_test_evaluation_reuses_the_dev_pass_only_when_weights_and_lengths_match(tiny_backbone, tiny_beir, tmp_path,
                                                                                 capsys):  # fmt: skip
    out = tmp_path / "ckpt"
    train.main("baseline", list(map(str, ["--model_name_or_path", tiny_backbone, "--data_dir", tiny_beir,
                                          "--output_dir", out, "--eval_strategy", "epoch", "--doc_max_length", "24",
                                          "--eval_doc_max_length", "32",
                                          "--per_device_train_batch_size", "4", "--use_cpu", "--num_train_epochs", "2",
                                          "--save_strategy", "no", "--load_best_model_at_end", "false",
                                          "--eval_batch_size", "16"])))  # fmt: skip
    assert len(list((out / REUSE_DIR).glob("*/key.json"))) == 1  # the earlier epoch's entry is pruned

    def evaluate(ckpt, length, dest, data=tiny_beir, *extra):
        capsys.readouterr()
        metrics = eval_cli.main(list(map(str, ["--model", "baseline", "--checkpoint", ckpt, "--data_dir", data,
                                               "--output_dir", tmp_path / dest, "--doc_max_length", length,
                                               "--batch_size", "16", *extra])))  # fmt: skip
        return metrics["baseline"], capsys.readouterr().out

    reused, log = evaluate(out, 32, "a")  # the dev passes' length (--eval_doc_max_length), not training's
    assert "1 cached chunk(s) read, 0 encoded (the checkpoint's dev-pass embeddings)" in log
    other, log = evaluate(out, 24, "b")  # another truncation: encoded again
    assert "0 cached chunk(s) read, 1 encoded" in log
    _, log = evaluate(out, 32, "bf16", tiny_beir, "--bf16")  # another precision
    assert "0 cached chunk(s) read, 1 encoded" in log
    twin = write_tiny_beir(tmp_path / "beir-twin", seed=5)  # another corpus of the same size
    _, log = evaluate(out, 32, "twin", twin)
    assert "0 cached chunk(s) read, 1 encoded" in log
    changed = tmp_path / "changed"
    shutil.copytree(out, changed)
    model = load_model(changed)
    with torch.no_grad():
        model.encoder.embeddings.word_embeddings.weight[5] += 0.01
    model.save_pretrained(changed)
    _, log = evaluate(changed, 32, "c")  # other weights: encoded again
    assert "0 cached chunk(s) read, 1 encoded" in log
    shutil.rmtree(out / REUSE_DIR)
    fresh, log = evaluate(out, 32, "d")
    assert "cached" not in log and fresh == reused  # what was reused is what encoding gives


def test_bf16_detection_reads_the_cpu_flags(monkeypatch, tmp_path):
    monkeypatch.setattr(sbmoe.device.torch.backends.mkldnn, "is_bf16_supported", None, raising=False)
    monkeypatch.setattr(sbmoe.device.torch.cuda, "is_available", lambda: False)
    for flags, expected in (("fpu avx512f avx512_bf16", "bf16"), ("fpu amx_bf16", "bf16"), ("fpu avx2", "fp32")):
        monkeypatch.setattr(sbmoe.device.Path, "read_text", lambda self, *a, f=flags, **k: f"flags\t: {f}\n")
        assert sbmoe.device.auto_precision() == expected
    assert RetrieverConfig().domains is None


HETERO = """
name = "tiny-hetero"
datasets = ["alpha", "beta"]
transfer = ["gamma"]
seeds = [42]
subsets = ["unseen", "seen"]
precision = "fp32"
recipe = { num_train_epochs = 1, per_device_train_batch_size = 4, dev_fraction = 0.25 }

[runs.baseline]
kind = "baseline"

[runs.baseline-alpha]
kind = "baseline"
datasets = ["alpha"]
reference = "baseline"

[runs.domain]
kind = "sbmoe"
train = { design = "sokli", num_experts = 2, routing = "domain" }
reference = "baseline"

[runs.random]
kind = "sbmoe"
train = { design = "sokli", num_experts = 2, routing = "random" }
reference = ["baseline", "domain"]
"""


def test_cells_are_made_seed_by_seed_each_checkpoint_with_the_runs_that_share_it(tmp_path):
    path = tmp_path / "h.toml"
    path.write_text(HETERO.replace("seeds = [42]", "seeds = [42, 43]") + '[runs.zeroshot]\nkind = "zeroshot"\n'
                    '[runs.domain-all]\nkind = "sbmoe"\neval = { inference_mode = "all" }\n'
                    'train = { design = "sokli", num_experts = 2, routing = "domain" }\n')  # fmt: skip
    exp = load_experiment(path)
    units = [[(r.name, r.seeds) for r in unit] for unit in cell_units(exp, Layout(exp, tmp_path, tmp_path))]
    trained = ["baseline", "baseline-alpha", ["domain", "domain-all"], "random"]
    assert units == [[("zeroshot", exp.runs["zeroshot"].seeds)]] + [[(n, [s]) for n in ([t] if isinstance(t, str) else t)]
                                            for s in (42, 43) for t in trained]  # fmt: skip


def test_runner_trains_on_several_datasets_and_reports_each_with_its_routing(tiny_backbone, two_datasets, tmp_path,
                                                                             monkeypatch, capsys):  # fmt: skip
    write_tiny_beir(two_datasets[0].parent / "gamma", seed=2)
    (tmp_path / "h.toml").write_text(HETERO)
    monkeypatch.setenv("BEIR_DATA_DIR", str(two_datasets[0].parent))
    args = [tmp_path / "h.toml", "--model_name_or_path", tiny_backbone, "--results", tmp_path / "res",
            "--ckpt_root", tmp_path / "ck", "--in_process"]  # fmt: skip
    result = experiment.main(list(map(str, args)))
    assert set(result["datasets"]) == {"alpha", "beta"} and set(result["transfer"]) == {"gamma"}
    for name in ("alpha", "beta"):
        rows = result["datasets"][name]["stages"][0]["rows"]
        assert set(rows) == {"baseline", "baseline-alpha", "domain", "random"}
        assert result["datasets"][name]["subsets"]["unseen"] is not None
    ckpts, res = tmp_path / "ck" / "tiny-hetero", tmp_path / "res" / "tiny-hetero"
    history = an.read_log_history(res / "datasets" / "alpha" / "domain" / "seed42")
    for name in ("alpha", "beta"):  # each table's dev column: that dataset's dev score at the selected epoch
        rows = result["datasets"][name]["stages"][0]["rows"]
        assert rows["domain"]["dev NDCG@10"][0] == pytest.approx(an.dev_by_dataset(history)[name])
    assert result["datasets"]["beta"]["stages"][0]["rows"]["baseline-alpha"]["dev NDCG@10"] is None
    assert result["datasets"]["alpha"]["stages"][0]["rows"]["baseline-alpha"]["dev NDCG@10"] is not None
    trained = ["baseline", "baseline-alpha", "domain", "random"]  # each evaluated everywhere before the next trains
    made = [(ckpts / n / "seed42" / "run_info.json").stat().st_mtime_ns for n in trained]
    for name, next_made in zip(trained, made[1:]):
        evaluated = [p.stat().st_mtime_ns for p in res.glob(f"*/*/{name}/seed42/provenance.json")]
        assert len(evaluated) == 3 and max(evaluated) < next_made, name
    assert json.loads((ckpts / "baseline-alpha" / "seed42" / "run_info.json").read_text()).get("datasets") is None
    assert json.loads((ckpts / "domain" / "seed42" / "run_info.json").read_text())["datasets"] == ["alpha", "beta"]
    pairs = {("baseline-alpha", "baseline"), ("domain", "baseline"), ("random", "baseline"), ("random", "domain")}
    for tests in (*(d["stages"][0]["tests"] for d in result["datasets"].values()), result["transfer"]["gamma"]["tests"]):
        assert {(t["run"], t["reference"]) for t in tests} == pairs  # the file's paired tests on every dataset
    routing = {r["run"]: r for r in result["routing"]}
    assert set(routing) == {"domain", "random"}
    assert routing["domain"]["blocks"][0]["nmi"][0] == pytest.approx(1.0)
    assert routing["random"]["blocks"][0]["nmi"][0] < 0.1
    markdown = (tmp_path / "res" / "tiny-hetero" / "report.md").read_text()
    for needle in ("## alpha", "## beta", "## Transfer: gamma", "## Per-domain routing", "fig_routing.png",
                   "precision fp32"):  # fmt: skip
        assert needle in markdown, needle
    assert (tmp_path / "res" / "tiny-hetero" / "fig_routing.png").stat().st_size > 1000
    stored = res / "datasets" / "beta" / "subsets.json"  # a dataset no test query of which is unseen (NFCorpus)
    stored.write_text(json.dumps({**json.loads(stored.read_text()), "subsets": {"unseen": [], "seen": ["q20"]}}))
    again = experiment.main(list(map(str, [*args, "--report"])))["datasets"]
    assert "unseen NDCG@10" not in again["beta"]["stages"][0]["rows"]["baseline"]
    assert "unseen NDCG@10" in again["alpha"]["stages"][0]["rows"]["baseline"]
    assert "*unseen*: no test query falls in it" in (res / "report.md").read_text()
    (tmp_path / "h.toml").write_text(HETERO.replace('"fp32"', '"bf16"'))  # one precision for every run
    with pytest.raises(SystemExit):
        experiment.main(list(map(str, args)))
    one_line_error(capsys, "another precision")


def test_each_cell_is_evaluated_on_every_dataset_for_its_own_seed_only(tiny_backbone, two_datasets, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    write_tiny_beir(two_datasets[0].parent / "gamma", seed=2)
    (tmp_path / "h.toml").write_text(HETERO.replace("seeds = [42]", "seeds = [42, 43]"))
    monkeypatch.setenv("BEIR_DATA_DIR", str(two_datasets[0].parent))
    calls = []
    monkeypatch.setattr(stages.Runner, "run_stage", lambda self, runs: calls.append(
        (self.layout.root.name, [(r.name, r.seeds) for r in runs])) or [])  # fmt: skip
    monkeypatch.setattr(experiment, "report", lambda *a: {})
    experiment.main(list(map(str, [tmp_path / "h.toml", "--model_name_or_path", tiny_backbone, "--in_process",
                                   "--results", tmp_path / "res", "--ckpt_root", tmp_path / "ck"])))  # fmt: skip
    trained = [runs for where, runs in calls if where == "alpha" and runs[0][0] != "bm25"]
    assert len(trained) == 8 and all(len(seeds) == 1 for runs in trained for _, seeds in runs)
    for runs in trained:  # the next datasets' calls, transfer gamma's included: the same cell (and no other seed)
        beta, gamma = calls[calls.index(("alpha", runs)) + 1:][:2]
        assert beta == ("beta", runs) and gamma[0] == "gamma"
        assert [r for r in gamma[1] if r[0] not in ("bm25", "zeroshot")] == runs  # (BM25, zero-shot: with the first)


def test_a_cell_that_fails_on_one_dataset_is_not_tried_on_the_next_and_the_next_cell_goes_on(tiny_backbone, two_datasets,
                                                                                             tmp_path, monkeypatch):  # fmt: skip
    write_tiny_beir(two_datasets[0].parent / "gamma", seed=2)
    (tmp_path / "h.toml").write_text(HETERO)
    monkeypatch.setenv("BEIR_DATA_DIR", str(two_datasets[0].parent))
    calls = []

    def run_stage(self, runs):
        calls.append((self.layout.root.name, runs[0].name))
        return ["lost"] if (self.layout.root.name, runs[0].name) == ("alpha", "domain") else []

    monkeypatch.setattr(stages.Runner, "run_stage", run_stage)
    monkeypatch.setattr(experiment, "report", lambda *a: {})
    with pytest.raises(SystemExit) as stop:  # (a failed cell: the command exits non-zero at the end)
        experiment.main(list(map(str, [tmp_path / "h.toml", "--model_name_or_path", tiny_backbone, "--in_process",
                                       "--results", tmp_path / "res", "--ckpt_root", tmp_path / "ck"])))  # fmt: skip
    assert stop.value.code != 0
    after = calls[calls.index(("alpha", "domain")) + 1 :]
    assert after[0] == ("alpha", "random") and [w for w, _ in after] == ["alpha", "beta", "gamma"]

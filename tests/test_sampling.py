"""Query-level epochs (one sampled positive per training query), pair sampling, seeded draws that survive a
resume, and the official dev split: on a graded BEIR folder with many positives and queries without any."""

import json
from types import SimpleNamespace

import pytest
from conftest import ROOT, torchrun, write_graded_beir

import sbmoe.trainer
import train
from sbmoe.data import load_beir

COMMON = ["--per_device_train_batch_size", "4", "--logging_steps", "1", "--use_cpu", "--dev_fraction", "0.2",
          "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false"]  # fmt: skip


@pytest.fixture
def graded(tmp_path):
    return write_graded_beir(tmp_path / "beir" / "graded")


def positives(qrels):
    return {q: {d for d, r in docs.items() if r >= 1} for q, docs in qrels.items()}


def run_main(backbone, data, out, *extra):
    train.main(None, ["--model_name_or_path", str(backbone), "--data_dir", str(data), "--output_dir", str(out),
                      *COMMON, *map(str, extra)])  # fmt: skip
    history = json.loads((out / "log_history.json").read_text())
    return json.loads((out / "run_info.json").read_text()), history[-1]["step"]


def record_batches(monkeypatch) -> list:
    """Every collated batch, as [(qid, (positive, *negatives)), ...]."""
    seen = []

    class Recording(sbmoe.trainer.ContrastiveCollator):
        def __call__(self, examples):
            seen.append([(e["qid"], tuple(e["docs"])) for e in examples])
            return super().__call__(examples)

    monkeypatch.setattr(train, "ContrastiveCollator", Recording)
    return seen


def dataset(qrels, seed=0, sampling="query", negatives=2):
    negs = {q: [f"n{q}_{k}" for k in range(10)] for q in qrels}
    return sbmoe.trainer.ContrastiveDataset({}, qrels, negs, negatives, seed, sampling=sampling)


def epoch_draws(ds, epoch):
    ds.set_epoch(epoch)
    return [ds[i] for i in range(len(ds))]


def test_query_epoch_has_one_example_per_query_with_a_positive_and_never_a_relevance_0_positive(graded):
    _, _, qrels = load_beir(graded, "train")
    pos = positives(qrels)
    ds = dataset(qrels)
    with_pos = sorted(q for q, docs in pos.items() if docs)
    assert len(with_pos) < len(qrels) and sum(map(len, pos.values())) > len(with_pos)  # the folder is as promised
    assert len(ds) == len(with_pos) and ds.skipped == sorted(set(qrels) - set(with_pos))
    drawn = {q: set() for q in with_pos}
    for epoch in range(30):
        examples = epoch_draws(ds, epoch)
        assert sorted(e["qid"] for e in examples) == with_pos  # each query once per epoch
        for e in examples:
            assert e["docs"][0] in pos[e["qid"]]  # relevance >= 1, never a judged-0 document
            assert len(e["docs"]) == 3 and not set(e["docs"][1:]) & pos[e["qid"]]
            drawn[e["qid"]].add(e["docs"][0])
    assert drawn == {q: pos[q] for q in with_pos}  # over epochs every positive turns up


def test_draws_are_a_function_of_seed_epoch_and_index(graded):
    _, _, qrels = load_beir(graded, "train")
    a, b = dataset(qrels, seed=1), dataset(qrels, seed=1)
    assert epoch_draws(a, 0) == epoch_draws(b, 0) and epoch_draws(a, 3) == epoch_draws(b, 3)
    assert epoch_draws(a, 0) != epoch_draws(a, 1)  # a new epoch draws new positives and negatives
    assert epoch_draws(a, 0) != epoch_draws(dataset(qrels, seed=2), 0)  # and so does a new seed
    a.set_epoch(2)
    out_of_order = [a[i] for i in reversed(range(len(a)))][::-1]  # no hidden state: order and repeats don't matter
    assert out_of_order == epoch_draws(b, 2) and a[5] == a[5]


def test_epoch_callback_follows_the_trainer_epoch_also_mid_epoch_after_a_resume(graded):
    _, _, qrels = load_beir(graded, "train")
    ds = dataset(qrels)
    callback = sbmoe.trainer.EpochCallback(ds)
    for state_epoch, expected in ((0, 0), (None, 0), (1.0, 1), (1.5, 1), (2.0, 2), (2 + 2 / 3, 2)):
        callback.on_epoch_begin(None, SimpleNamespace(epoch=state_epoch), None)
        assert ds.epoch == expected


def test_pair_sampling_has_one_example_per_query_positive_pair(graded):
    _, _, qrels = load_beir(graded, "train")
    ds = dataset(qrels, sampling="pair")
    pairs = sorted((q, d) for q, docs in positives(qrels).items() for d in docs)
    assert len(ds) == len(pairs) and sorted((e["qid"], e["docs"][0]) for e in epoch_draws(ds, 0)) == pairs


def test_steps_per_epoch_count_queries_or_pairs_and_run_info_records_them(tiny_backbone, graded, tmp_path):
    _, _, qrels = load_beir(graded, "train")
    pos = positives(qrels)
    n_queries, n_pairs = sum(1 for d in pos.values() if d), sum(map(len, pos.values()))
    info, steps = run_main(tiny_backbone, graded, tmp_path / "q", "--num_train_epochs", 1)
    assert steps == n_queries // 4  # drop_last: whole batches of 4 queries
    assert info["sampling"] == "query" and info["examples_per_epoch"] == n_queries
    assert info["skipped_queries"] == len(qrels) - n_queries and info["train_queries"] == n_queries
    info, steps = run_main(tiny_backbone, graded, tmp_path / "p", "--num_train_epochs", 1, "--sampling", "pair")
    assert steps == n_pairs // 4 and info["sampling"] == "pair" and info["examples_per_epoch"] == n_pairs


def test_resumed_run_sees_the_same_examples(tiny_backbone, graded, tmp_path, monkeypatch):
    seen = record_batches(monkeypatch)
    run_main(tiny_backbone, graded, tmp_path / "full", "--num_train_epochs", 2)
    full = list(seen)
    steps = len(full) // 2  # 2 epochs
    epoch0, epoch1 = (dict(e for b in full[k * steps : (k + 1) * steps] for e in b) for k in (0, 1))
    assert any(epoch0[q][0] != epoch1[q][0] for q in epoch0.keys() & epoch1.keys())  # epoch 1 draws new positives
    seen.clear()  # stop mid-epoch 0, then resume into epoch 1
    out = tmp_path / "resumed"
    run_main(tiny_backbone, graded, out, "--num_train_epochs", 2, "--max_steps", 3, "--save_strategy", "steps",
             "--save_steps", 3)  # fmt: skip
    assert seen[:3] == full[:3]  # (the dataloader collates one batch ahead: a 4th may be there, unused)
    seen.clear()
    run_main(tiny_backbone, graded, out, "--num_train_epochs", 2, "--resume_from_checkpoint", out / "checkpoint-3")
    assert seen == full[3:]


def test_official_dev_split_is_used_and_recorded(tiny_backbone, graded, tmp_path, monkeypatch, capsys):
    evaluated = []

    def fake_evaluate(model, tokenizer, corpus, queries, qrels, **kwargs):
        evaluated.append((sorted(queries), sorted(qrels)))
        return {"NDCG@10": 0.5}

    monkeypatch.setattr(sbmoe.trainer, "evaluate_model", fake_evaluate)
    _, _, train_qrels = load_beir(graded, "train")
    _, dev_queries, dev_qrels = load_beir(graded, "dev")
    dev_run = ("--max_steps", 1, "--eval_strategy", "steps", "--eval_steps", 1)
    info, _ = run_main(tiny_backbone, graded, tmp_path / "dev", *dev_run)
    assert info["dev"] == {"source": "split dev", "queries": len(dev_qrels)}
    assert evaluated == [(sorted(dev_queries), sorted(dev_qrels))]  # selection on the official dev queries
    assert info["train_queries"] + info["skipped_queries"] == len(train_qrels)  # and every train query trains
    assert "(split dev)" in capsys.readouterr().out
    evaluated.clear()
    info, _ = run_main(tiny_backbone, graded, tmp_path / "slice", *dev_run, "--dev_split", "none")
    n_dev = round(0.2 * len(train_qrels))
    assert info["dev"] == {"source": "slice of train (20%, seed 42)", "queries": n_dev}
    ((_, qids),) = evaluated
    assert len(qids) == n_dev and set(qids) <= set(train_qrels)
    assert info["train_queries"] + info["skipped_queries"] == len(train_qrels) - n_dev
    both = sorted(q for q, docs in train_qrels.items() if any(r >= 1 for r in docs.values()))[:2]
    with open(graded / "qrels" / "dev.tsv", "a") as fh:  # dev queries that the train split also judges
        fh.writelines(f"{q}\t{d}\t{r}\n" for q in both for d, r in train_qrels[q].items())
    info, _ = run_main(tiny_backbone, graded, tmp_path / "overlap", "--max_steps", 1)
    assert info["dev"] == {"source": "split dev", "queries": len(dev_qrels) + 2, "left_out_of_training": 2}
    assert info["train_queries"] + info["skipped_queries"] == len(train_qrels) - 2  # they stay held out
    (graded / "qrels" / "dev.tsv").unlink()  # no official dev split: the slice, as before
    info, _ = run_main(tiny_backbone, graded, tmp_path / "nodev", "--max_steps", 1)
    assert info["dev"]["source"] == "slice of train (20%, seed 42)"


def test_named_dev_split_must_exist(tiny_backbone, graded, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_main(tiny_backbone, graded, tmp_path / "x", "--max_steps", 1, "--dev_split", "validation")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--dev_split validation" in err and "validation.tsv does not exist" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(SystemExit):
        run_main(tiny_backbone, graded, tmp_path / "y", "--max_steps", 1, "--sampling", "passage")
    assert "--sampling 'passage'" in capsys.readouterr().err


DDP_SCRIPT = """
import os, sys
sys.path.insert(0, sys.argv[1])
import sbmoe.trainer
import train
get = sbmoe.trainer.ContrastiveDataset.__getitem__
log = open(os.path.join(sys.argv[2], "rank" + os.environ["RANK"] + ".log"), "w")
def logged(self, i):
    log.write(f"{self.epoch} {i}\\n")
    log.flush()
    return get(self, i)
sbmoe.trainer.ContrastiveDataset.__getitem__ = logged
train.main(None, sys.argv[3:])
"""


def test_every_rank_draws_from_the_current_epoch_under_torchrun(tiny_backbone, graded, tmp_path):
    """accelerate forwards set_epoch to the dataset in one process only; under DDP EpochCallback does it."""
    script = tmp_path / "ddp_epochs.py"
    script.write_text(DDP_SCRIPT)
    args = ["--model_name_or_path", tiny_backbone, "--data_dir", graded, "--output_dir", tmp_path / "out",
            *COMMON, "--num_train_epochs", 3]  # fmt: skip
    proc = torchrun(script, ROOT, tmp_path, *args)
    # training finished (not the exit code: gloo on CPU now and then aborts a rank at exit, after the work)
    assert (tmp_path / "out" / "run_info.json").is_file(), proc.stderr[-3000:]
    for rank in (0, 1):
        epochs = [int(line.split()[0]) for line in (tmp_path / f"rank{rank}.log").read_text().splitlines()]
        per_epoch = len(epochs) // 3  # each rank takes its share of every epoch, in order
        assert epochs == [0] * per_epoch + [1] * per_epoch + [2] * per_epoch

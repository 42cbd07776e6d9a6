"""Training: exact cross-device InfoNCE, false-negative masking, end-to-end runs, faults and resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, one_line_error, torchrun

import sbmoe.trainer
from sbmoe.data import load_beir
from sbmoe.loss import info_nce

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def run(script, *args, timeout=300):
    """A training script as a command; it must succeed."""
    proc = subprocess.run(
        [sys.executable, script, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def train_fails(kind, capsys, *args, needles=()):
    """train.main in-process (the commands' own entry point): exit 2 with one error line naming every needle."""
    import train

    with pytest.raises(SystemExit) as exc:
        train.main(kind, list(map(str, args)))
    assert exc.value.code == 2
    return one_line_error(capsys, *needles)


def train_args(backbone, data, out, *extra):
    return ["--model_name_or_path", backbone, "--data_dir", data, "--output_dir", out, "--per_device_train_batch_size",
            4, "--num_experts", 4, "--logging_steps", 1, "--use_cpu", "--dev_fraction", 0.2, *extra]  # fmt: skip


def test_same_query_twice_masks_its_positive_as_negative():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)  # (B*(1+N)) with N = 1
    doc_ids = torch.tensor([10, 11, 12, 13, 10, 14])  # queries 0 and 2 share positive 10 (same query twice)
    pos_ids = torch.tensor([[10], [12], [10]])
    loss, logits = info_nce(q, d, 0.05, doc_ids, pos_ids)
    floor = torch.finfo(logits.dtype).min
    assert logits[0, 4] == floor and logits[2, 0] == floor  # the other copy is not a negative
    assert logits[0, 0] > floor and logits[2, 4] > floor  # each keeps its own target
    assert (logits > floor).sum() == 18 - 2
    raw = q @ d.T / 0.05  # expected: cross-entropy over each row without its masked entries
    keep = logits > floor
    expected = torch.stack([torch.logsumexp(raw[i][keep[i]], 0) - raw[i, 2 * i] for i in range(3)]).mean()
    assert torch.allclose(loss, expected, atol=1e-5)


def test_torchrun_two_processes_equal_one_process_step(tiny_backbone, tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from ddp_batch import global_batch, tiny_model

    out = tmp_path / "ddp.pt"
    proc = torchrun(ROOT / "tests" / "ddp_check.py", tiny_backbone, out, ROOT / "tests", env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    model = tiny_model(str(tiny_backbone))
    ref = model(**global_batch())
    ref.loss.backward()
    assert ddp["world"] == 2  # (one process would match the one-process step trivially)
    assert ddp["logits_shape"] == (4, 8)  # world*B queries against world*B*(1+N) documents
    assert torch.allclose(ddp["loss"], ref.loss.detach(), atol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(ddp["grads"]) == set(grads)
    for name, g in grads.items():
        assert torch.allclose(ddp["grads"][name], g, atol=1e-5), name


@pytest.mark.parametrize("script", ["train.py", "train_sbmoe.py", "train_moe.py"])
def test_two_steps_evaluate_and_resume(tiny_backbone, tiny_beir, tmp_path, script, capsys):
    # Each script runs once as a command; evaluating and resuming call the same entry points in-process.
    from transformers import AutoTokenizer

    import eval as eval_cli
    import train
    from model import load_model
    from sbmoe.retrieval import evaluate_model

    out = tmp_path / "ckpt"
    args = train_args(tiny_backbone, tiny_beir, out, "--max_steps", 2, "--eval_strategy", "steps", "--eval_steps",
                      2, "--save_strategy", "steps", "--save_steps", 2)  # fmt: skip
    run(script, *args)
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    saved = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["best_model_checkpoint"] == str(out / "checkpoint-2")  # the renamed folder, not the staging one
    history = json.loads((out / "log_history.json").read_text())
    assert any("eval_ndcg@10" in h for h in history) and any("contrastive_loss" in h for h in history)
    if script != "train.py":
        assert any(k.startswith("expert_share/") for h in history for k in h)
    kind = {"train.py": "baseline", "train_sbmoe.py": "sbmoe", "train_moe.py": "moe"}[script]
    capsys.readouterr()
    eval_cli.main(list(map(str, ["--model", kind, "--checkpoint", out, "--data_dir", tiny_beir, "--output_dir",
                                 tmp_path / "ev"])))  # fmt: skip
    assert "NDCG@10" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    corpus, queries, qrels = load_beir(tiny_beir, "test")  # the saved checkpoint scores as the in-memory evaluation
    expected = evaluate_model(load_model(out), AutoTokenizer.from_pretrained(out), corpus, queries, qrels,
                              show_progress=False)  # fmt: skip
    assert metrics[kind] == pytest.approx(expected, abs=1e-6) and metrics["split"] == "test"
    args[args.index("--max_steps") + 1] = 4
    train.main(kind, list(map(str, [*args, "--resume_from_checkpoint", out / "checkpoint-2"])))
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and f"resuming from {out / 'checkpoint-2'} at step 2" in capsys.readouterr().out


def test_non_finite_loss_stops_with_step_and_saves_nothing(tiny_backbone, tiny_beir, tmp_path, capsys):
    out = tmp_path / "nan"
    # a temperature > 0 (0 is refused at parse time) so small that the logits overflow float32
    train_fails("baseline", capsys, *train_args(tiny_backbone, tiny_beir, out, "--temperature", "1e-45"),
                needles=("non-finite loss", "at step 1"))  # fmt: skip
    assert not (out / "model.safetensors").exists() and not list(out.glob("checkpoint-*"))


def test_unknown_flag_and_empty_training_set_are_one_line_errors(tiny_backbone, tiny_beir, tmp_path, capsys):
    train_fails("baseline", capsys, *train_args(tiny_backbone, tiny_beir, tmp_path / "x", "--no_such_flag", 1),
                needles=("--no_such_flag",))  # fmt: skip
    (tiny_beir / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n")
    train_fails("baseline", capsys, *train_args(tiny_backbone, tiny_beir, tmp_path / "y"),
                needles=("train.tsv: no judgments",))  # fmt: skip


def test_killed_mid_run_resumes_and_finishes(tiny_backbone, tiny_beir, tmp_path):
    import train

    out = tmp_path / "kill"
    args = train_args(tiny_backbone, tiny_beir, out, "--max_steps", 400, "--save_strategy", "steps", "--save_steps",
                      1, "--eval_strategy", "no", "--load_best_model_at_end", "false", "--save_total_limit", 3)  # fmt: skip
    proc = subprocess.Popen([sys.executable, "train.py", *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("checkpoint-*"))) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(out.glob("checkpoint-*")), "no checkpoint before the kill"
    for ckpt in out.glob("checkpoint-*"):  # every visible checkpoint is complete
        assert (ckpt / "trainer_state.json").is_file() and (ckpt / "model.safetensors").is_file()
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    shutil.rmtree(out / ".staging", ignore_errors=True)
    args[args.index("--max_steps") + 1] = last + 2
    train.main("baseline", list(map(str, [*args, "--resume_from_checkpoint", "last"])))
    assert (out / f"checkpoint-{last + 2}" / "trainer_state.json").is_file()
    assert (out / "model.safetensors").is_file()


def test_dense_negatives_are_the_starting_models_top_documents_minus_positives(tiny_backbone, tiny_beir, tmp_path,
                                                                                capsys):  # fmt: skip
    from transformers import AutoTokenizer

    import train
    from model import BiEncoder
    from sbmoe.data import load_beir, split_dev
    from sbmoe.retrieval import retrieve

    args = train_args(tiny_backbone, tiny_beir, tmp_path / "dense", "--negative_source", "dense", "--negative_depth",
                      5, "--max_steps", 1, "--eval_strategy", "no", "--save_strategy", "no",
                      "--load_best_model_at_end", "false", "--seed", 7)  # fmt: skip
    # SB-MoE starts as the pretrained retriever: it mines the baseline's negatives
    train.main("sbmoe", list(map(str, args)))
    (cached,) = (Path(os.environ["RETRIEVAL_CACHE_DIR"]) / "negatives" / "tiny").glob("dense_negatives_*.json")
    assert not (tiny_beir / "cache").exists()  # nothing written into the dataset folder
    negatives = json.loads(cached.read_text())
    _, queries, qrels = load_beir(tiny_beir, "train")
    train_qrels, _ = split_dev(qrels, 0.2, 7)
    assert set(negatives) == set(train_qrels)
    model = BiEncoder.from_backbone(str(tiny_backbone))
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    corpus, _, _ = load_beir(tiny_beir, "train")
    run_ = retrieve(model, tok, corpus, {q: queries[q] for q in train_qrels}, top_k=25, show_progress=False)
    for qid, negs in negatives.items():
        ranked = [d for d, _ in sorted(run_[qid].items(), key=lambda x: -x[1]) if d not in train_qrels[qid]]
        assert negs == ranked[:5] and not set(negs) & set(train_qrels[qid])
    train_fails("baseline", capsys, *train_args(tiny_backbone, tiny_beir, tmp_path / "x", "--negative_source", "tfidf"),
                needles=("--negative_source 'tfidf'",))  # fmt: skip


def test_dev_evaluation_truncates_at_eval_doc_max_length(tiny_backbone, tiny_beir, tmp_path, monkeypatch):
    import train

    seen = []

    def fake_evaluate(model, tokenizer, corpus, queries, qrels, **kwargs):
        seen.append(kwargs["doc_max_length"])
        return {"NDCG@10": 0.5}

    monkeypatch.setattr(sbmoe.trainer, "evaluate_model", fake_evaluate)
    common = ["--max_steps", 1, "--eval_strategy", "steps", "--eval_steps", 1, "--save_strategy", "no",
              "--load_best_model_at_end", "false", "--doc_max_length", 16]  # fmt: skip
    train.main("baseline", list(map(str, train_args(tiny_backbone, tiny_beir, tmp_path / "a", *common))))
    train.main("baseline", list(map(str, train_args(tiny_backbone, tiny_beir, tmp_path / "b", *common,
                                                    "--eval_doc_max_length", 48))))  # fmt: skip
    assert seen == [16, 48]  # the training length unless the flag says otherwise


def test_collator_ids_match_the_qrels(tiny_backbone, tiny_beir):
    from transformers import AutoTokenizer

    from sbmoe.trainer import ContrastiveCollator

    corpus, queries, qrels = load_beir(tiny_beir, "train")
    qrels = {q: dict(d) for q, d in qrels.items()}
    first = sorted(qrels)[0]
    qrels[first]["d59"] = 0  # a judged non-relevant document is not a positive
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    collator = ContrastiveCollator(tok, corpus, queries, qrels, 16, 16)
    qids = sorted(qrels)[:4]
    examples = [{"qid": q, "docs": [next(d for d, r in qrels[q].items() if r > 0), "d0"]} for q in qids]
    batch = collator(examples)
    order = list(corpus)
    assert [order[i] for i in batch["doc_ids"].tolist()] == [d for e in examples for d in e["docs"]]
    for row, q in enumerate(qids):
        known = {order[i] for i in batch["pos_ids"][row].tolist() if i >= 0}
        assert known == {d for d, r in qrels[q].items() if r > 0} and known  # every positive, nothing else
        assert order[batch["doc_ids"][2 * row]] in known  # the target sits first in its group
    assert batch["pos_ids"].shape[1] == max(sum(r > 0 for r in d.values()) for d in qrels.values())


@pytest.mark.parametrize("kind", ["sbmoe", "moe"])
def test_optimizer_groups_cover_every_trainable_parameter(tiny_backbone, tmp_path, kind):
    from model import VARIANTS
    from sbmoe.trainer import ContrastiveTrainer
    from train import RetrievalTrainingArguments

    model = VARIANTS[kind].from_backbone(str(tiny_backbone), num_experts=4, top_k=2 if kind == "moe" else 1)
    args = RetrievalTrainingArguments(output_dir=str(tmp_path), use_cpu=True, learning_rate=2e-5, eval_strategy="no",
                                      save_strategy="no", load_best_model_at_end=False)
    trainer = ContrastiveTrainer(model=model, args=args, moe_learning_rate=1e-3)
    groups = trainer.create_optimizer().param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(n for n, p in model.named_parameters() if p.requires_grad)  # each exactly once
    lr = {names[id(p)]: g["lr"] for g in groups for p in g["params"]}
    moe = [n for n in lr if ".router." in f".{n}" or ".experts." in f".{n}"]
    assert moe and all(lr[n] == 1e-3 for n in moe)
    assert all(v == 2e-5 for n, v in lr.items() if n.startswith("encoder.") and n not in moe)
    assert {g["name"] for g in groups} == {"backbone", "moe"}


def test_bf16_without_a_gpu_trains_on_the_cpu(tiny_backbone, tiny_beir, tmp_path):
    import train

    args = train_args(tiny_backbone, tiny_beir, tmp_path / "bf16", "--bf16", "--max_steps", 1, "--eval_strategy",
                      "no", "--save_strategy", "no", "--load_best_model_at_end", "false")  # fmt: skip
    args.remove("--use_cpu")
    train.main("baseline", list(map(str, args)))  # the Trainer would refuse bf16 here without --use_cpu
    assert (tmp_path / "bf16" / "model.safetensors").is_file()


@pytest.mark.parametrize("argv,named", [
    (["eval.py", "--model", "zeroshot", "--model_name_or_path", "/no/such/dir"], "/no/such/dir"),
    (["bench.py", "params", "--model_name_or_path", "/no/such/dir"], "/no/such/dir"),
    (["bench.py", "encode", "--model_name_or_path", "/no/such/dir", "--dataset", "no-such-dataset"],
     "/no/such/dir"),  # the backbone is checked before any benchmark reads data
    (["train.py", "--model_name_or_path", "/no/such/dir", "--kind", "nope"], "--kind 'nope'"),
])  # fmt: skip
def test_bad_paths_are_one_line_errors(tiny_beir, monkeypatch, capsys, argv, named):
    import importlib

    monkeypatch.setenv("BEIR_DATA_DIR", str(tiny_beir.parent))
    module = importlib.import_module(argv[0].removesuffix(".py"))
    extra = ["--data_dir", str(tiny_beir)] if argv[0] == "eval.py" else []
    with pytest.raises(SystemExit) as exc:
        module.main(*([None] if argv[0] == "train.py" else []), argv[1:] + extra)  # train.main(kind, argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars may come first
    assert exc.value.code == 2 and err.startswith("error: ") and named in err  # the first bad input, by name

"""The frozen-backbone study: the head on cached backbone outputs equals the model on the texts."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from lab.stats import subset_mean
from model import VARIANTS
from sbmoe import results as an

TEXTS = ["protein gene cell", "cancer virus immune brain heart drug", "trial", "mouse dose risk blood lung liver insulin"]


@pytest.mark.parametrize("design", ["residual-zero", "sokli", "seed", None])
def test_head_on_cached_features_equals_the_model_on_the_texts(tiny_backbone, tmp_path, design):
    from lab import frozen

    kind = "baseline" if design is None else "sbmoe"
    settings = {} if design is None else {"design": design, "num_experts": 4, "top_k": 2 if design == "seed" else 1}
    model = VARIANTS[kind].from_backbone(str(tiny_backbone), pooling="mean", **settings).eval()
    for m in model.modules():
        if getattr(m, "zero_init", False):
            torch.nn.init.normal_(m.weight, std=0.3)
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    feats = frozen.cached_features(tmp_path, ["k"], lambda: frozen.encode_features(model, tok, TEXTS, 16, batch_size=3))
    assert isinstance(feats.tokens, np.memmap)  # read back from the cache, memory-mapped
    again = frozen.cached_features(tmp_path, ["k"], lambda: pytest.fail("the cache was not used"))
    assert np.array_equal(again.pooled, feats.pooled)
    batch = tok(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        direct = model.encode(batch["input_ids"], batch["attention_mask"]).numpy()
    cached = frozen.encode_all(model, feats, batch_size=2)
    tol = 5e-3 if design == "seed" else 1e-5  # token states are cached in fp16
    np.testing.assert_allclose(cached, direct, atol=tol)
    from sbmoe.retrieval import Dense

    corpus = {f"d{i}": {"title": "", "text": t} for i, t in enumerate(TEXTS)}
    queries = {"q0": TEXTS[1], "q1": TEXTS[3]}
    q_feats = frozen.encode_features(model, tok, list(queries.values()), 16)
    head = frozen.CachedHead(model, list(corpus), feats, q_feats, {"q0": 0, "q1": 1})
    run = head.search(corpus, queries, top_k=3)
    text_run = Dense(model, tok, query_max_length=16, doc_max_length=16).search(corpus, queries, top_k=3)
    assert {q: list(d) for q, d in run.items()} == {q: list(d) for q, d in text_run.items()}
    for q in run:
        np.testing.assert_allclose(list(run[q].values()), list(text_run[q].values()), atol=2 * tol)
    with pytest.raises(frozen.DataError, match="'q9'"):
        head.search(corpus, {"q9": "trial"})
    with pytest.raises(frozen.DataError, match="not the one"):
        head.search({"d0": corpus["d0"]}, queries)


def test_frozen_run_trains_only_the_head_and_reuses_it(tiny_backbone, tiny_beir, tmp_path, capsys):
    from safetensors.torch import load_file

    from lab import frozen

    common = ["--kind", "sbmoe", "--design", "sokli", "--num_experts", "4", "--model_name_or_path", str(tiny_backbone),
              "--data_dir", str(tiny_beir), "--output_dir", str(tmp_path / "ck"), "--per_device_train_batch_size", "4",
              "--dev_fraction", "0.2", "--num_train_epochs", "2", "--moe_learning_rate", "1e-2",
              "--embedding_cache", str(tmp_path / "cache"), "--eval_output_dir", str(tmp_path / "out"),
              "--eval_splits", "test", "train", "--trec_depth", "train=10"]  # fmt: skip
    frozen.main(common)
    head = load_file(tmp_path / "ck" / "head.safetensors")
    assert head and all(k.startswith("moe.") for k in head)  # the backbone is not saved: it never changed
    torch.manual_seed(42)  # frozen.py's seed: the head it started from
    start = VARIANTS["sbmoe"].from_backbone(str(tiny_backbone), design="sokli", num_experts=4).state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in head.items() if ".experts." in k)  # the experts trained
    history = an.read_log_history(tmp_path / "ck")
    assert [e for e, _ in an.dev_curve(history)] == [1.0, 2.0] and an.expert_shares(history)
    test = an.read_per_query(tmp_path / "out" / "test", "sbmoe")
    metrics = json.loads((tmp_path / "out" / "test" / "metrics.json").read_text())
    assert metrics["sbmoe"]["NDCG@10"] == pytest.approx(subset_mean(test, sorted(test)))
    capsys.readouterr()
    frozen.main([*common, "--inference_mode", "all", "--eval_output_dir", str(tmp_path / "all")])
    assert "head loaded from" in capsys.readouterr().out  # evaluated with the saved head, not trained again
    assert (tmp_path / "all" / "train" / "metrics.json").is_file()
    with pytest.raises(SystemExit):  # a head trained with another routing is not reused as this one
        frozen.main([*common, "--routing", "random", "--eval_output_dir", str(tmp_path / "random")])
    err = capsys.readouterr().err
    assert "holds a head trained with other settings (routing='learned' there, 'random' here)" in err
    assert "Traceback" not in err and not (tmp_path / "random").exists()


def test_frozen_refuses_a_moe_inside_the_backbone(tiny_backbone, tiny_beir, tmp_path, capsys):
    from lab import frozen

    with pytest.raises(SystemExit):
        frozen.main(["--kind", "moe", "--model_name_or_path", str(tiny_backbone), "--data_dir", str(tiny_beir),
                     "--output_dir", str(tmp_path), "--embedding_cache", str(tmp_path / "c")])  # fmt: skip
    assert "cannot be frozen" in capsys.readouterr().err


@pytest.mark.parametrize("design", ["sokli", "seed"])
def test_the_trainers_model_on_cached_features_gives_the_loss_of_the_model_on_the_texts(tiny_backbone, design):
    from lab import frozen

    model = VARIANTS["sbmoe"].from_backbone(str(tiny_backbone), pooling="mean", design=design, num_experts=4)
    for m in model.modules():
        if getattr(m, "zero_init", False):
            torch.nn.init.normal_(m.weight, std=0.3)
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    feats = frozen.encode_features(model, tok, TEXTS, 16)
    wrapped = frozen.HeadOnFeatures(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in wrapped.named_parameters()} == model.moe_parameter_names()  # the head alone
    assert wrapped.train() and model.training  # the model's routing and auxiliary loss follow the Trainer's mode
    wrapped.eval()
    ids = [f"t{i}" for i in range(len(TEXTS))]
    qrels = {"t0": {"t1": 1}, "t2": {"t3": 1, "t1": 1}}
    examples = [{"qid": "t0", "docs": ["t1", "t2"]}, {"qid": "t2", "docs": ["t3", "t0"]}]
    batch = frozen.FeatureCollator(feats, {t: i for i, t in enumerate(ids)}, feats, ids, qrels,
                                   model.head_on_tokens())(examples)  # fmt: skip
    q, d = (tok([TEXTS[i] for i in rows], padding=True, truncation=True, max_length=16, return_tensors="pt")
            for rows in ([0, 2], [1, 2, 3, 0]))  # fmt: skip
    with torch.no_grad():
        cached = wrapped(**batch).contrastive_loss
        direct = model(q["input_ids"], q["attention_mask"], d["input_ids"], d["attention_mask"], batch["doc_ids"],
                       batch["pos_ids"]).contrastive_loss  # fmt: skip
    assert cached.item() == pytest.approx(direct.item(), abs=5e-3 if design == "seed" else 1e-5)

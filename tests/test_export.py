"""export.py: sentence-transformers folders and ONNX graphs that encode as eval.py does; eval.py --backend."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import write_tiny_beir
from transformers import AutoTokenizer

import eval as evaluation
import sbmoe.onnx
from lab import export
from model import VARIANTS
from sbmoe.data import Corpus
from sbmoe.encoding import encode_texts
from sbmoe.hub import checkpoint_digest

TEXTS = ["protein gene cell", "cancer virus immune brain heart drug trial mouse dose risk blood lung liver " * 3,
         "sleep", "insulin vitamin neuron receptor enzyme tumor therapy"]  # fmt: skip
LENGTHS = dict(query_max_length=8, doc_max_length=64)  # the tiny backbone has 64 positions
FLAGS = [f"--{k}={v}" for k, v in LENGTHS.items()]
SETTINGS = {"baseline": {}, "sbmoe": dict(num_experts=4), "moe": dict(num_experts=4, top_k=2)}
INT8_MIN_COSINE = 0.99  # int8 weights (per channel) against fp32, per embedding, on the tiny random BERT


def make_checkpoint(folder, backbone, kind: str, **settings):
    torch.manual_seed(0)
    model = VARIANTS[kind].from_backbone(str(backbone), pooling="mean", **{**SETTINGS[kind], **settings}).eval()
    with torch.no_grad():  # SB-MoE's zero-initialised experts made live, so the head changes the output, and the
        for name, module in model.named_modules():  # token-level MoE's copies of the FFN made distinct, as in training
            if getattr(module, "zero_init", False):
                torch.nn.init.normal_(module.weight, std=0.2)
            elif ".experts." in name and isinstance(module, torch.nn.Linear):
                module.weight.add_(torch.randn_like(module.weight) * 0.02)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(backbone).save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def checkpoints(tiny_backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {kind: (root / kind, make_checkpoint(root / kind, tiny_backbone, kind)) for kind in SETTINGS}


def project_embeddings(model, folder, length):
    return encode_texts(model, AutoTokenizer.from_pretrained(folder), TEXTS, length, batch_size=2, show_progress=False)


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_exported_folder_encodes_like_eval(kind, checkpoints, tmp_path):
    from sentence_transformers import SentenceTransformer

    ckpt, model = checkpoints[kind]
    out = tmp_path / "st"
    export.export(ckpt, out, **LENGTHS)
    modules = json.loads((out / "modules.json").read_text())
    remote = kind != "baseline"
    assert all(m["type"].startswith("sentence_transformers.") for m in modules) != remote
    if remote:
        with pytest.raises(ValueError, match="trust_remote_code"):
            SentenceTransformer(str(out), device="cpu")
    st = SentenceTransformer(str(out), device="cpu", trust_remote_code=remote, local_files_only=True)
    docs = st.encode_document(TEXTS, batch_size=3, convert_to_numpy=True)
    assert np.abs(docs - project_embeddings(model, ckpt, LENGTHS["doc_max_length"])).max() < export.TOLERANCE
    if remote:  # the MoE module truncates queries at the query length, as eval.py does
        queries = st.encode_query(TEXTS, batch_size=3, convert_to_numpy=True)
        assert np.abs(queries - project_embeddings(model, ckpt, LENGTHS["query_max_length"])).max() < export.TOLERANCE
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers\n")
    assert ("trust_remote_code=True" in card) == remote
    assert not any(p.name.startswith(".st.") for p in tmp_path.iterdir())  # no temporary folder left behind


def test_sbmoe_designs_and_controls_export_exactly(tiny_backbone, tmp_path):
    from sentence_transformers import SentenceTransformer

    every = [dict(design=d, routing=r) for d in ("residual-zero", "sokli", "seed") for r in ("learned", "dense", "random")]
    for i, settings in enumerate([*every, dict(design="seed", top_k=2), dict(design="sokli", inference_mode="all"),
                                  dict(design="sokli", routing="random", inference_mode="all")]):  # fmt: skip
        ckpt = tmp_path / f"ckpt{i}"
        model = make_checkpoint(ckpt, tiny_backbone, "sbmoe", **settings)
        export.export(ckpt, tmp_path / f"st{i}", **LENGTHS)
        st = SentenceTransformer(str(tmp_path / f"st{i}"), device="cpu", trust_remote_code=True, local_files_only=True)
        diff = np.abs(st.encode_document(TEXTS, convert_to_numpy=True) - project_embeddings(model, ckpt, 64)).max()
        assert diff < export.TOLERANCE, settings


def test_model_card_states_the_test_metrics(checkpoints, tmp_path):
    ckpt, _ = checkpoints["sbmoe"]
    metrics = tmp_path / "eval" / "metrics.json"
    metrics.parent.mkdir()
    metrics.write_text(json.dumps({"sbmoe": {"NDCG@10": 0.61234, "Recall@100": 0.9}, "split": "test",
                                   "dataset": str(tmp_path / "beir" / "scifact"), "checkpoints": {"sbmoe": str(ckpt)},
                                   "settings": {"sbmoe": {"checkpoint_sha1": checkpoint_digest(ckpt)}}}))  # fmt: skip
    (ckpt / "run_info.json").write_text(json.dumps({"seed": 42, "sampling": "query"}))
    export.main([str(ckpt), str(tmp_path / "st"), "--metrics", str(metrics), "--query_max_length", "8",
                 "--doc_max_length", "64"])  # fmt: skip
    card = (tmp_path / "st" / "README.md").read_text()
    assert "value: 0.6123" in card and "| seed | 42 |" in card and "design `residual-zero`" in card
    assert "name: scifact" in card and str(tmp_path) not in card  # the dataset's name, not the machine's path


def test_onnx_graph_and_int8_agree_with_the_model(checkpoints, tmp_path):
    ckpt, model = checkpoints["moe"]
    out = tmp_path / "st"
    report = export.export(ckpt, out, onnx=True, int8=True, **LENGTHS)
    assert report["onnx"]["fp32_max_abs_diff_vs_torch"] < sbmoe.onnx.ONNX_TOLERANCE
    tok = AutoTokenizer.from_pretrained(ckpt)
    ref = project_embeddings(model, ckpt, 64)
    fp32 = encode_texts(sbmoe.onnx.load_onnx_retriever(out, "onnx"), tok, TEXTS, 64, 2, show_progress=False)
    int8 = encode_texts(sbmoe.onnx.load_onnx_retriever(out, "onnx-int8"), tok, TEXTS, 64, 2, show_progress=False)
    assert np.abs(fp32 - ref).max() < sbmoe.onnx.ONNX_TOLERANCE
    assert (int8 * ref).sum(1).min() > INT8_MIN_COSINE
    assert np.abs(int8 - ref).max() > 0  # it is quantised
    q = report["onnx"]["int8"]
    assert q["recipe_name"] == sbmoe.onnx.INT8_BY_KIND["moe"] and q["chosen_on"] == sbmoe.onnx.INT8_CHOSEN_ON
    card = (out / "README.md").read_text()  # the card names the recipe and the CPU it was chosen on
    assert f"recipe `{q['recipe_name']}`" in card and sbmoe.onnx.INT8_CHOSEN_ON in card


OPENVINO_MIN_COSINE = 0.999  # bf16 inference on a CPU with bf16 units (fp32 elsewhere: far closer)


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_openvino_backend_encodes_like_the_model(kind, checkpoints, tmp_path):
    """eval.py --backend openvino: the exported fp32 graph compiled by OpenVINO, from the folder and on the fly,
    encodes as the model does (to bf16 precision where OpenVINO chooses bf16) and says which precision it ran."""
    pytest.importorskip("openvino")
    ckpt, model = checkpoints[kind]
    out = tmp_path / "st"
    export.export(ckpt, out, onnx=True, **LENGTHS)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ref = project_embeddings(model, ckpt, 64)
    graph = sbmoe.onnx.load_onnx_retriever(out, "openvino")
    fly = sbmoe.onnx.onnx_retriever(model, "openvino")
    assert graph.precision in ("OpenVINO bf16", "OpenVINO fp32") and fly.precision == graph.precision
    for encoder in (graph, fly):
        emb = encode_texts(encoder, tok, TEXTS, 64, 2, show_progress=False)
        assert (emb * ref).sum(1).min() > OPENVINO_MIN_COSINE
        if graph.precision == "OpenVINO fp32":
            assert np.abs(emb - ref).max() < 1e-4


def int8_nodes(path):
    """The graph's int8 weight products by op, and its float weight MatMuls, read straight from the ONNX file."""
    import onnx

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    integer = [n for n in graph.node if n.op_type == "MatMulInteger" and n.input[1] in inits]
    scores = [n for n in graph.node if n.op_type == "MatMulInteger" and n.input[1] not in inits]
    qattention = [n for n in graph.node if n.op_type == "QAttention"]
    float_weights = [n for n in graph.node if n.op_type in ("MatMul", "Attention") and n.input[1] in inits]
    zero_points = [int(np.prod(inits[n.input[3]].dims)) for n in integer] + \
                  [int(np.prod(inits[n.input[7]].dims)) for n in qattention if len(n.input) > 7 and n.input[7] in inits]  # fmt: skip
    return {"ops": {n.op_type for n in graph.node}, "integer": integer, "scores": scores, "qattention": qattention,
            "float_weights": float_weights, "zero_points": zero_points}  # fmt: skip


def calibrates(name: str) -> bool:
    return sbmoe.onnx.needs_calibration(sbmoe.onnx.INT8_RECIPES[name])


@pytest.mark.parametrize("name", list(sbmoe.onnx.INT8_RECIPES))
def test_int8_graph_is_the_recipe_export_json_records(name, checkpoints, tiny_beir, tmp_path):
    """What export.json (and so the model card) says of the int8 graph is what the graph holds: each recipe key
    checked against the graph's own ops and scales here, independently of sbmoe.onnx.graph_recipe."""
    import onnx

    ckpt, model = checkpoints["moe"]
    out = tmp_path / "st"
    calibration = [str(tiny_beir)] if calibrates(name) else None
    report = export.export(ckpt, out, int8=True, int8_recipe=name, calibration=calibration, **LENGTHS)
    recorded = json.loads((out / sbmoe.onnx.ONNX_INFO).read_text())["int8"]
    assert recorded == json.loads(json.dumps(report["onnx"]["int8"]))
    recipe, wanted = recorded["recipe"], sbmoe.onnx.INT8_RECIPES[name]
    assert recorded["recipe_name"] == name and {k: v for k, v in recipe.items() if k != "fp32"} == \
        {k: v for k, v in wanted.items() if k != "fp32"}  # fmt: skip
    assert recipe["fp32"] == sorted(wanted["fp32"])  # this MoE has both a first layer and routers
    g = int8_nodes(out / sbmoe.onnx.ONNX_INT8)
    layers = model.config.backbone_config["num_hidden_layers"]
    assert recipe["fusions"] == ("SkipLayerNormalization" in g["ops"])
    assert recipe["attention"] == bool(g["qattention"])
    if recipe["attention"]:
        assert len(g["qattention"]) == layers - ("first_layer" in recipe["fp32"])
    assert recipe["scores"] == bool(g["scores"])
    assert g["zero_points"] and all((z > 1) == (recipe["weights"] == "per-channel") for z in g["zero_points"])
    assert recipe["activations"] == "dynamic" and "DynamicQuantizeLinear" in g["ops"]
    kept = {n.name for n in g["float_weights"]}
    assert any("/router/" in n for n in kept) == ("routers" in recipe["fp32"])
    assert any("/layer.0/" in n for n in kept) == ("first_layer" in recipe["fp32"])
    for group in recipe["fp32"]:
        assert not any(sbmoe.onnx.FP32_GROUPS[group] in n.name for n in g["integer"] + g["qattention"])
    assert recorded["fp32_nodes"] == len(kept)
    # smoothing: every int8 weight product reads its activations through a Mul by a constant vector of the input's
    # width, and the graph's metadata holds the alpha; no such Mul without it
    int8_model = onnx.load(str(out / sbmoe.onnx.ONNX_INT8))
    producers = {o: n for n in int8_model.graph.node for o in n.output}
    inits = {t.name: t for t in int8_model.graph.initializer}

    def smoothed(node) -> bool:
        mul = producers[producers[node.input[0]].input[0]]  # MatMulInteger <- DynamicQuantizeLinear <- ?
        width = inits[node.input[1]].dims[0]
        return mul.op_type == "Mul" and mul.input[1] in inits and list(inits[mul.input[1]].dims) == [width]

    through_mul = [smoothed(n) for n in g["integer"]]
    meta = {m.key: m.value for m in int8_model.metadata_props}
    if recipe["smoothing"] is None:
        assert not any(through_mul) and "calibration" not in recorded
    else:
        assert all(through_mul) and float(meta["smoothing_alpha"]) == recipe["smoothing"]
        assert recorded["calibration"] == {"source": "tiny corpus", "documents": 60}  # all 60 documents (256 asked)
    assert sbmoe.onnx.graph_recipe(out / sbmoe.onnx.ONNX_INT8) == recipe


def test_smoothing_keeps_the_function_and_brings_int8_closer_to_fp32(tiny_backbone, tiny_beir, tmp_path):
    """SmoothQuant's migration leaves the fp32 graph the same function; with an outlier channel in the hidden
    states (what trained BERTs have), the smoothed int8 graph is nearer fp32 than the unsmoothed one."""
    model = make_checkpoint(tmp_path / "ckpt", tiny_backbone, "baseline")
    last = f"layer.{model.config.backbone_config['num_hidden_layers'] - 1}.output.LayerNorm"
    with torch.no_grad():  # one hidden channel 40x the others after every layer norm inside (the embedding unchanged)
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.LayerNorm) and not name.endswith(last):
                module.weight[3] *= 40
            elif isinstance(module, torch.nn.Linear) and ".layer." in name:  # layers that move the embedding
                module.weight.mul_(10)
    model.save_pretrained(tmp_path / "ckpt")
    fp32 = tmp_path / "fp32.onnx"
    sbmoe.onnx.export_onnx(model, fp32)
    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    batches = sbmoe.onnx.calibration_batches(tok, sbmoe.onnx.calibration_texts([Corpus(tiny_beir)]) + TEXTS, 32)
    smoothed = tmp_path / "smoothed.onnx"
    assert sbmoe.onnx.smooth_graph(fp32, smoothed, 0.7, batches, skip=[]) > 0
    ids, mask = sbmoe.onnx.probe_batch(model.config.backbone_config["vocab_size"], batch=6, length=20, seed=5)
    with torch.no_grad():
        ref = model.encode(ids, mask).numpy()
    same = sbmoe.onnx.OnnxRetriever(smoothed, model.config).encode(ids, mask).numpy()
    assert np.abs(same - ref).max() < 1e-4

    def int8_error(name):  # every layer int8: ||int8 - fp32|| / ||fp32||
        path = tmp_path / f"{name}.onnx"
        recipe = dict(sbmoe.onnx.INT8_RECIPES[name], fp32=[])
        sbmoe.onnx.quantize_int8(fp32, path, model.config, recipe, batches)
        out = sbmoe.onnx.OnnxRetriever(path, model.config).encode(ids, mask).numpy()
        return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))

    plain, smooth = int8_error("unfused-l0fp32"), int8_error("smooth-l0fp32")
    assert smooth < 0.75 * plain, (plain, smooth)  # about half, measured


def test_a_recipe_that_calibrates_needs_documents(checkpoints, tmp_path, capsys):
    """export.py --int8 with a smoothing recipe and no corpus to calibrate on: one error line naming the flag."""
    ckpt, _ = checkpoints["baseline"]
    with pytest.raises(SystemExit) as exc:
        export.main([str(ckpt), str(tmp_path / "st"), "--int8", "--int8_recipe", "smooth-l0fp32", *FLAGS])
    assert exc.value.code != 0 and not (tmp_path / "st").exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--calibration" in err.strip().splitlines()[-1]
    with pytest.raises(SystemExit):
        export.main([str(ckpt), str(tmp_path / "st"), "--int8", "--int8_recipe", "smooth-l0fp32", *FLAGS,
                     "--calibration", str(tmp_path / "no-such-folder")])  # fmt: skip
    assert "no-such-folder" in capsys.readouterr().err and not (tmp_path / "st").exists()


def test_a_graph_that_is_not_its_recorded_recipe_is_refused(checkpoints, tiny_beir, tmp_path, capsys):
    """A graph swapped or a record edited after export: eval.py will not evaluate it under the wrong name."""
    ckpt, _ = checkpoints["sbmoe"]
    names = list(sbmoe.onnx.INT8_RECIPES)
    a, b = tmp_path / "a", tmp_path / "b"
    export.export(ckpt, a, int8=True, int8_recipe=names[0], **LENGTHS)
    export.export(ckpt, b, int8=True, int8_recipe=names[1], **LENGTHS)
    sbmoe.onnx.load_onnx_retriever(a, "onnx-int8")  # as written: accepted
    (a / sbmoe.onnx.ONNX_INT8).write_bytes((b / sbmoe.onnx.ONNX_INT8).read_bytes())
    with pytest.raises(export.DataError, match="is not the recipe"):
        sbmoe.onnx.load_onnx_retriever(a, "onnx-int8")
    info = json.loads((b / sbmoe.onnx.ONNX_INFO).read_text())
    info["int8"]["recipe"]["weights"] = "per-tensor"  # the record edited, the graph per-channel
    (b / sbmoe.onnx.ONNX_INFO).write_text(json.dumps(info))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        evaluation.main(["--model", "sbmoe", "--checkpoint", str(b), "--backend", "onnx-int8", "--data_dir", str(tiny_beir),
                 "--output_dir", str(tmp_path / "eval")])
    assert exc.value.code != 0
    err = capsys.readouterr().err  # (progress bars of the libraries aside) one error line, no traceback
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1
    assert "weights 'per-tensor' recorded, 'per-channel' in the graph" in lines[0]


@pytest.mark.parametrize("kind,design", [("sbmoe", "seed"), ("sbmoe", "sokli"), ("moe", None)])
def test_random_routing_controls_trace_to_onnx_exactly(kind, design, tiny_backbone, tmp_path):
    """The routing keys are integer arithmetic on input_ids inside the graph: ONNX picks the same experts."""
    settings = dict(routing="random", **({"design": design} if design else {}))
    model = make_checkpoint(tmp_path / "ckpt", tiny_backbone, kind, **settings)
    report = export.export(tmp_path / "ckpt", tmp_path / "st", onnx=True, **LENGTHS)
    assert report["onnx"]["fp32_max_abs_diff_vs_torch"] < sbmoe.onnx.ONNX_TOLERANCE
    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    got = encode_texts(sbmoe.onnx.load_onnx_retriever(tmp_path / "st", "onnx"), tok, TEXTS, 64, 3, show_progress=False)
    ref = project_embeddings(model, tmp_path / "ckpt", 64)
    assert np.abs(got - ref).max() < sbmoe.onnx.ONNX_TOLERANCE
    pytest.importorskip("openvino")  # its CPU plugin computes int64 in int32: the keys would differ, so it is refused
    with pytest.raises(sbmoe.onnx.DataError, match="int64 in int32"):
        sbmoe.onnx.load_onnx_retriever(tmp_path / "st", "openvino")


def test_eval_backends_give_the_same_metrics(checkpoints, tmp_path):
    beir = write_tiny_beir(tmp_path / "beir")
    ckpt, _ = checkpoints["baseline"]
    export.export(ckpt, tmp_path / "exported", onnx=True, **LENGTHS)
    common = ["--model", "baseline", "--data_dir", str(beir), "--doc_max_length", "64", "--query_max_length", "8"]
    import eval as ev

    torch_row = ev.main([*common, "--checkpoint", str(ckpt), "--output_dir", str(tmp_path / "t")])["baseline"]
    fly_row = ev.main([*common, "--checkpoint", str(ckpt), "--backend", "onnx", "--output_dir", str(tmp_path / "o")])
    exp_row = ev.main([*common, "--checkpoint", str(tmp_path / "exported"), "--backend", "onnx",
                       "--output_dir", str(tmp_path / "e")])  # fmt: skip
    assert fly_row["backend"] == "onnx"
    for row in (fly_row["baseline"], exp_row["baseline"]):
        assert row["NDCG@10"] == pytest.approx(torch_row["NDCG@10"], abs=1e-6)
    pytest.importorskip("openvino")
    ov_row = ev.main([*common, "--checkpoint", str(tmp_path / "exported"), "--backend", "openvino",
                      "--output_dir", str(tmp_path / "v")])  # fmt: skip
    settings = json.loads((tmp_path / "v" / "metrics.json").read_text())["settings"]["baseline"]
    assert ov_row["backend"] == "openvino" and settings["precision"] in ("OpenVINO bf16", "OpenVINO fp32")
    assert ov_row["baseline"]["NDCG@10"] == pytest.approx(torch_row["NDCG@10"], abs=0.05)  # bf16 may reorder a tie


def one_line_error(capsys, fn, *args) -> str:
    with pytest.raises(SystemExit) as exc:
        fn(*args)
    assert exc.value.code != 0
    err = "\n".join(x for x in capsys.readouterr().err.strip().splitlines() if "it/s]" not in x)  # progress bars
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_inputs_fail_in_one_line(checkpoints, tiny_backbone, tmp_path, capsys):
    import eval as ev

    ckpt, _ = checkpoints["baseline"]
    assert "no such checkpoint" in one_line_error(capsys, export.main, [str(tmp_path / "nope"), str(tmp_path / "o")])
    err = one_line_error(capsys, export.main, [str(tiny_backbone), str(tmp_path / "o")])
    assert "not a checkpoint of this project" in err
    (tmp_path / "taken").mkdir()
    assert "--overwrite" in one_line_error(capsys, export.main, [str(ckpt), str(tmp_path / "taken")])
    assert "positions" in one_line_error(capsys, export.main, [str(ckpt), str(tmp_path / "o")])  # 256 > 64
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exc:  # argparse: usage and one error line
        ev.parse_args(["--model", "baseline", "--backend", "tensorrt"])
    assert exc.value.code == 2 and "invalid choice: 'tensorrt'" in capsys.readouterr().err
    ev_err = one_line_error(capsys, ev.main, ["--model", "baseline", "--checkpoint", str(tmp_path / "taken"),
                                              "--backend", "onnx", "--data_dir", str(write_tiny_beir(tmp_path / "b")),
                                              "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert "no checkpoint" in ev_err


def test_a_failed_export_leaves_nothing_and_overwrite_replaces(checkpoints, tmp_path, monkeypatch):
    ckpt, _ = checkpoints["baseline"]
    out = tmp_path / "st"
    export.export(ckpt, out, **LENGTHS)
    (out / "stale.txt").write_text("old")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "model_card", broken)
    with pytest.raises(RuntimeError):
        export.export(ckpt, out, overwrite=True, **LENGTHS)
    assert (out / "stale.txt").is_file()  # the old folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st"]  # no temporary folder left
    monkeypatch.undo()
    export.export(ckpt, out, overwrite=True, **LENGTHS)
    assert not (out / "stale.txt").exists() and (out / "modules.json").is_file()


SHIPPED = """import importlib.util, json, sys, torch
sys.path.insert(0, sys.argv[1])
assert importlib.util.find_spec("sbmoe") is None and importlib.util.find_spec("model") is None
import modeling_moe_retriever as m
ids = torch.tensor([[1, 5, 7, 9, 2], [1, 6, 2, 0, 0]])
mask = (ids > 0).long()
out = []
for path in sys.argv[2:]:
    with torch.no_grad():
        out.append(m.load_model(path).eval().encode(ids, mask).tolist())
print(json.dumps(out))
"""


def test_the_exported_modeling_file_runs_without_the_project(checkpoints, tmp_path):
    """modeling_moe_retriever.py travels alone: in a process that cannot import the project it rebuilds every
    variant's checkpoint and encodes as the project does."""
    from model import load_model

    folder = tmp_path / "shipped"
    folder.mkdir()
    (folder / "modeling_moe_retriever.py").write_text(export.modeling_source(), encoding="utf-8")
    paths = [str(p) for p, _ in checkpoints.values()]
    proc = subprocess.run([sys.executable, "-I", "-c", SHIPPED, str(folder), *paths], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = torch.tensor([[1, 5, 7, 9, 2], [1, 6, 2, 0, 0]])
    for path, theirs in zip(paths, json.loads(proc.stdout.splitlines()[-1])):
        with torch.no_grad():
            ours = load_model(path).eval().encode(ids, (ids > 0).long())
        assert torch.allclose(ours, torch.tensor(theirs), atol=1e-6), path

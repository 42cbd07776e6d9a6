"""Take a trained retriever away: a sentence-transformers folder, and ONNX graphs of the whole encoder.

    python export.py CHECKPOINT OUT_DIR [--onnx] [--int8] [--overwrite] [--metrics DIR/metrics.json]

OUT_DIR loads with `SentenceTransformer(OUT_DIR)` and encodes as eval.py does (same pooling,
normalisation and lengths; embeddings equal to float rounding, checked before the folder appears):
- the baseline with stock modules only (Transformer, Pooling, Normalize), no remote code;
- every MoE variant with `trust_remote_code=True`: `sentence_moe.py` (one module that runs the project's
  own `embed`, since stock modules cannot hold a head between backbone and output or MoE FFNs inside
  the backbone) and a copy of model.py travel in the folder, then a stock Normalize.
The folder's README.md is a model card (hub metadata header): backbone, design and settings, the
training recipe (the checkpoint's run_info.json and log_history.json) and, with `--metrics`, the
test metrics of that checkpoint and their unseen-document subset (the per-query file beside it).

`--onnx` adds `onnx/encoder.onnx`: ids and attention mask in, the normalised embedding out (backbone,
pooling, head and normalisation in one graph; dynamic batch and length), traced from the same model,
MoE blocks dispatching densely (`sbmoe.layers.dispatch` while traced). `--int8` adds `onnx/encoder_int8.onnx`: its MatMul
weights quantised to int8 per output channel with onnxruntime (dynamic quantisation: activations
quantised per call); see `INT8` for the settings and results/export/ for how they were chosen. `eval.py --backend onnx | onnx-int8` evaluates through these graphs.

Nothing is half-written: the folder is built next to OUT_DIR and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from transformers import AutoTokenizer

from model import BiEncoder, load_model
from sbmoe.config import RetrieverConfig
from sbmoe.data import DataError
from sbmoe.files import atomic_write_text, follow_umask, make_temp_dir, remove_stale_temps, temp_prefix
from sbmoe.hub import checkpoint_digest
from utils import check_output, entry_point, fail

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ONNX_FP32, ONNX_INT8, ONNX_INFO = "onnx/encoder.onnx", "onnx/encoder_int8.onnx", "onnx/export.json"
FILES = {"onnx": ONNX_FP32, "onnx-int8": ONNX_INT8}
BACKENDS = ("torch", "onnx", "onnx-int8")
# Dynamic int8 quantisation, chosen by measurement on an AVX2 CPU without VNNI (results/export/int8_choice.log):
# signed int8 weights per output channel (per-tensor loses too much: min cosine 0.90 against 0.99), MatMul only
# (embedding tables stay fp32); reduce_range and uint8 weights were slower. Not fused: traced with
# eager attention, onnxruntime's BERT optimizer fuses attention and the embeddings and the int8 graph encodes
# 1.13x sentence-transformers' int8, but it lost 0.018 NDCG@10 on SciFact's unseen-document queries (paired
# p = 0.01; the unfused graph -0.002, inside the noise): results/export/zeroshot-onnx-int8-fused.log.
# Only MatMuls with a constant B (the weights; onnxruntime's dynamic default, pinned here): quantising the attention
# scores (activation x activation) too lowered the minimum cosine to fp32 of a fine-tuned SB-MoE from 0.989 to 0.981
# on 64 SciFact documents, for about a tenth of the multiply-adds at 256 tokens.
# The first encoder layer's MatMuls stay fp32: quantising every layer cost a fine-tuned SB-MoE 0.0086 NDCG@10 on
# SciFact test (unseen-document queries 0.0109), outside the 0.005 bound; excluding one group at a time showed the
# first layer carries most of the loss (results/export/int8_layers.log), and with it in fp32 the loss is 0.0033
# (unseen 0.0038) at the all-int8 speed (results/export/int8_first_layer.log). The MoE routers stay fp32 too (a
# hidden x experts product, a few thousandths of the work): an int8 router could pick other experts than fp32's.
INT8 = dict(optimize=False, per_channel=True, reduce_range=False, weight_type="QInt8", const_b_only=True,
            fp32_nodes=("/encoder/layer.0/", "/router/"))
TOLERANCE = 1e-5  # max |difference| per embedding coordinate, export vs eval.py, fp32
ONNX_TOLERANCE = 1e-4  # onnxruntime fp32 vs torch (another summation order; fused kernels)


# --------------------------------------------------------------------------------------------
# Loading a checkpoint


def load_checkpoint(path: str | Path) -> BiEncoder:
    """A trained retriever of this project, or a one-line DataError saying why not."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such checkpoint folder")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise DataError(f"{path}: not a checkpoint (no config.json)")
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError):
        raise DataError(f"{cfg}: not a JSON config") from None
    if model_type != RetrieverConfig.model_type:
        raise DataError(f"{path}: not a checkpoint of this project (model_type {model_type!r}, expected "
                        f"{RetrieverConfig.model_type!r}; export.py takes what train.py writes)")  # fmt: skip
    try:
        return load_model(path).eval()
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise DataError(f"{path}: cannot load the checkpoint ({str(exc).splitlines()[0]})") from None


# --------------------------------------------------------------------------------------------
# The sentence-transformers folder


def modeling_source() -> str:
    """model.py for the exported folder as one self-contained file: the library modules it imports (sbmoe/...)
    inlined above it, each after its own, and the training loss replaced by a stub (inference needs no loss)."""
    parts, seen = [], {"loss"}

    def inline(path: Path) -> None:
        src = path.read_text(encoding="utf-8")
        for name in re.findall(r"^from sbmoe\.(\w+) import", src, flags=re.M):
            if name not in seen:
                seen.add(name)
                inline(REPO / "sbmoe" / f"{name}.py")
        src = re.sub(r"^from sbmoe\.\w+ import (?:\((?:.|\n)*?\)|.*)\n", "", src, flags=re.M)
        parts.append(src.replace("from __future__ import annotations\n", ""))

    inline(REPO / "model.py")
    stub = ("def info_nce(*args, **kwargs):  # exported copy: encoding only, the loss lives in the project's sbmoe/loss.py\n"
            "    raise NotImplementedError('train with the moe-retrieval project, not from an exported folder')\n")  # fmt: skip
    return "from __future__ import annotations\n\n" + stub + "\n\n".join(parts)


def build_sentence_transformer(model: BiEncoder, tokenizer, query_max_length: int, doc_max_length: int, work: Path):
    """The SentenceTransformer equal to eval.py's encoder; `work` holds the baseline's backbone files."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    if type(model) is BiEncoder:  # stock modules express the baseline exactly
        model.encoder.save_pretrained(work)
        tokenizer.save_pretrained(work)
        modules = [Transformer(str(work), max_seq_length=doc_max_length),
                   Pooling(model.config.backbone_config["hidden_size"], pooling_mode=model.config.pooling)]  # fmt: skip
    else:
        from lab.sentence_moe import MoEEncoder

        modules = [MoEEncoder(model, tokenizer, max_seq_length=doc_max_length, query_max_length=query_max_length)]
    if model.config.normalize:
        modules.append(Normalize())
    return SentenceTransformer(modules=modules, device="cpu")


def write_sentence_transformer(st, model: BiEncoder, folder: Path) -> None:
    st.save(str(folder), create_model_card=False)
    if type(model) is not BiEncoder:
        (folder / "modeling_moe_retriever.py").write_text(modeling_source(), encoding="utf-8")
        shutil.copyfile(HERE / "sentence_moe.py", folder / "sentence_moe.py")


def check_sentence_transformer(folder: Path, model: BiEncoder, tokenizer, query_max_length: int,
                               doc_max_length: int, texts: list[str]) -> float:  # fmt: skip
    """Max |difference| between the written folder, loaded fresh, and eval.py's encoder (queries and documents)."""
    from sentence_transformers import SentenceTransformer

    from sbmoe.encoding import encode_texts

    st = SentenceTransformer(str(folder), device="cpu", trust_remote_code=type(model) is not BiEncoder,
                             local_files_only=True)  # fmt: skip
    worst = 0.0
    for length, encode in ((doc_max_length, st.encode_document), (query_max_length, st.encode_query)):
        if type(model) is BiEncoder:
            st.max_seq_length = length  # stock Transformer: one length (see the model card)
        ours = encode_texts(model, tokenizer, texts, length, batch_size=8, show_progress=False)
        theirs = encode(texts, batch_size=8, convert_to_numpy=True, show_progress_bar=False)
        worst = max(worst, float(np.abs(ours - theirs).max()))
    return worst


# --------------------------------------------------------------------------------------------
# ONNX: the whole encoder in one graph, and its int8 version


class EncoderGraph(nn.Module):
    """What the graph computes: eval.py's `model.encode(input_ids, attention_mask)`."""

    def __init__(self, model: BiEncoder):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode(input_ids, attention_mask)


def probe_batch(vocab_size: int, batch: int = 3, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (special ids 0..4 avoided) with ragged right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for r in range(1, batch):
        mask[r, length - 3 * r :] = 0
    return ids.masked_fill(mask == 0, 0), mask


def export_onnx(model: BiEncoder, path: Path, opset: int = 17) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ids, mask = probe_batch(model.config.backbone_config["vocab_size"], batch=4, length=16)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "sentence_embedding": {0: "batch"}}  # fmt: skip
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():  # traced: MoE blocks dispatch densely
        warnings.simplefilter("ignore")  # tracer notes on Python values: the checks after export are what count
        torch.onnx.export(EncoderGraph(model).eval(), (ids, mask), str(path), dynamo=False, opset_version=opset,
                          input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                          dynamic_axes=axes, do_constant_folding=True)  # fmt: skip


def fp32_matmuls(path: Path, patterns) -> list[str]:
    """The MatMul nodes of the traced graph whose names contain one of `patterns` (as `/encoder/layer.0/`)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(p in n.name for p in patterns)]


def quantize_int8(src: Path, dst: Path, config: RetrieverConfig, optimize: bool = True, per_channel: bool = True,
                  reduce_range: bool = True, weight_type: str = "QInt8", const_b_only: bool = True,
                  fp32_nodes=()) -> list[str]:  # fmt: skip
    """Dynamic int8 quantisation of the MatMul weights, after onnxruntime's BERT graph fusions when `optimize`;
    `const_b_only`: only MatMuls whose B is a weight (False: the attention scores' MatMuls too); the MatMuls whose
    names contain one of `fp32_nodes` stay fp32 (not with `optimize`: the fusions rename them); returns their names."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if fp32_nodes and optimize:
        raise ValueError("fp32_nodes: not with optimize (the fusions rename the nodes)")
    keep = fp32_matmuls(src, fp32_nodes)

    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        source = src
        if optimize:
            from onnxruntime.transformers.optimizer import optimize_model

            c = config.backbone_config
            opt = optimize_model(str(src), model_type="bert", num_heads=c["num_attention_heads"],
                                 hidden_size=c["hidden_size"], opt_level=1)  # fmt: skip
            source = Path(tmp) / "optimized.onnx"
            opt.save_model_to_file(str(source))
        quantize_dynamic(str(source), str(dst), weight_type=getattr(QuantType, weight_type), per_channel=per_channel,
                         reduce_range=reduce_range, op_types_to_quantize=["MatMul"], nodes_to_exclude=keep,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT,  # fused ops lack shape inference
                                        "MatMulConstBOnly": const_b_only})  # fmt: skip
    return keep


def session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxRetriever(nn.Module):
    """An exported graph behind the interface eval.py's `encode_texts` uses: `encode`, `config`, a device."""

    def __init__(self, path: Path, config: RetrieverConfig, threads: int | None = None):
        super().__init__()
        self.config = config
        self.device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)  # the device encode_texts reads (CPU)
        self.session = session(path, threads)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feed = {"input_ids": input_ids.cpu().numpy().astype(np.int64),
                "attention_mask": attention_mask.cpu().numpy().astype(np.int64)}  # fmt: skip
        return torch.from_numpy(self.session.run(None, feed)[0])


def check_onnx(path: Path, model: BiEncoder) -> float:
    """Max |difference| between the graph and `model.encode` on ragged batches of other shapes than the trace's."""
    graph = OnnxRetriever(path, model.config)
    worst = 0.0
    for batch, length, seed in ((1, 5, 1), (3, 12, 2), (7, 33, 3)):
        ids, mask = probe_batch(model.config.backbone_config["vocab_size"], batch, length, seed)
        with torch.no_grad():
            ref = model.encode(ids, mask)
        worst = max(worst, float((graph.encode(ids, mask) - ref).abs().max()))
    return worst


def export_graphs(model: BiEncoder, folder: Path, int8: bool, texts: list[str] | None = None, tokenizer=None,
                  length: int = 256, settings: dict | None = None) -> dict:
    """onnx/encoder.onnx (+ encoder_int8.onnx) under `folder`, checked; returns what onnx/export.json records,
    `settings` (what eval.py evaluates the folder with: lengths, the checkpoint's identity) among it."""
    fp32 = folder / ONNX_FP32
    export_onnx(model, fp32)
    info = {"config": model.config.to_dict(), "inputs": ["input_ids", "attention_mask"], "output": "sentence_embedding",
            **(settings or {}), "fp32_max_abs_diff_vs_torch": check_onnx(fp32, model)}  # fmt: skip
    if info["fp32_max_abs_diff_vs_torch"] > ONNX_TOLERANCE:
        raise RuntimeError(f"ONNX graph differs from the model by {info['fp32_max_abs_diff_vs_torch']:.1e}")
    if int8:
        kept = quantize_int8(fp32, folder / ONNX_INT8, model.config, **INT8)
        info["int8"] = dict(INT8, fp32_matmuls=len(kept))
        if texts and tokenizer is not None:  # agreement on real text: cosine of each int8 embedding to fp32
            from sbmoe.encoding import encode_texts

            a = encode_texts(OnnxRetriever(fp32, model.config), tokenizer, texts, length, 16, show_progress=False)
            b = encode_texts(OnnxRetriever(folder / ONNX_INT8, model.config), tokenizer, texts, length, 16,
                             show_progress=False)  # fmt: skip
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            info["int8"]["min_cosine_to_fp32"] = float(cos.min())
            info["int8"]["mean_cosine_to_fp32"] = float(cos.mean())
    atomic_write_text(folder / ONNX_INFO, json.dumps(info, indent=1, default=str))
    return info


def is_export(folder: str | Path) -> bool:
    """export.py's folder (a sentence-transformers folder, with or without onnx/), not a checkpoint."""
    return (Path(folder) / "modules.json").is_file() or (Path(folder) / ONNX_INFO).is_file()


def read_export_info(folder: str | Path) -> dict:
    """onnx/export.json of an export folder, or a one-line DataError naming what is missing or broken."""
    folder = Path(folder)
    path = folder / ONNX_INFO
    if not path.is_file():
        raise DataError(f"{folder}: an export without {ONNX_INFO} (export it with export.py --onnx to evaluate it)")
    info = _read_json(path)
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise DataError(f"{path}: not export.py's export.json (unreadable JSON or no config)")
    try:
        RetrieverConfig(**info["config"])
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: its config does not build a model ({str(exc).splitlines()[0]})") from None
    return info


def load_onnx_retriever(folder: str | Path, backend: str) -> OnnxRetriever:
    """The graph of an export folder for `eval.py --backend onnx | onnx-int8`."""
    folder = Path(folder)
    info = read_export_info(folder)
    path = folder / FILES[backend]
    if not path.is_file():
        raise DataError(f"{folder}: no {FILES[backend]} (export it with export.py {'--int8' if 'int8' in backend else '--onnx'})")
    try:
        return OnnxRetriever(path, RetrieverConfig(**info["config"]))
    except Exception as exc:  # onnxruntime raises its own types for a corrupt or truncated graph
        raise DataError(f"{path}: not a loadable ONNX graph ({str(exc).splitlines()[0][:200]})") from None


def onnx_retriever(model: BiEncoder, backend: str) -> OnnxRetriever:
    """Export `model` on the fly (a temporary folder, gone once the session holds the graph; one left by a
    process killed with SIGKILL is removed by the next)."""
    anchor = Path(tempfile.gettempdir()) / "moe-retrieval-onnx"
    remove_stale_temps(anchor)
    tmp = make_temp_dir(anchor)
    try:
        export_graphs(model, tmp, int8=backend == "onnx-int8")
        return OnnxRetriever(tmp / FILES[backend], model.config)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The model card


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def training_recipe(checkpoint: Path) -> dict:
    """What the checkpoint folder says about its training (run_info.json, log_history.json, training_args.bin)."""
    recipe: dict = {}
    run_info = _read_json(checkpoint / "run_info.json")
    if isinstance(run_info, dict):
        recipe.update(run_info)
    history = _read_json(checkpoint / "log_history.json")
    if isinstance(history, list) and history:
        from sbmoe.results import best_dev, train_seconds

        recipe["epochs"] = max((h.get("epoch", 0) for h in history), default=None)
        recipe["steps"] = max((h.get("step", 0) for h in history), default=None)
        recipe["best_dev_ndcg@10"] = best_dev(history)
        recipe["train_seconds"] = train_seconds(history)
    args_file = checkpoint / "training_args.bin"
    if args_file.is_file():
        try:
            targs = torch.load(args_file, weights_only=False)  # the project's own Trainer arguments
            for key in ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "warmup_ratio",
                        "weight_decay", "lr_scheduler_type", "seed", "fp16", "bf16"):  # fmt: skip
                recipe.setdefault(key, getattr(targs, key, None))
            for key in ("moe_learning_rate", "query_max_length", "doc_max_length", "hard_negatives"):
                if hasattr(targs, key):
                    recipe.setdefault(key, getattr(targs, key))
        except Exception:  # an unreadable pickle only costs the card these lines
            pass
    return {k: v for k, v in recipe.items() if v is not None}


def checkpoint_metrics(path: Path, checkpoint: Path) -> dict:
    """The row of `path` (eval.py's metrics.json) measured on this very checkpoint (by the content digest eval.py
    records, never by name or by being the only row), plus its unseen-document NDCG@10/Recall@100 from the
    per-query file beside it when the dataset's qrels are at hand."""
    if not path.is_file():
        raise DataError(f"--metrics {path}: no such file")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"--metrics {path}: not eval.py's metrics.json (not a JSON object)")
    rows = {k: v for k, v in data.items() if isinstance(v, dict) and "NDCG@10" in v}
    if not rows:
        raise DataError(f"--metrics {path}: no model rows")
    digest = checkpoint_digest(checkpoint)
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    tags = [t for t in rows if isinstance(settings.get(t), dict) and settings[t].get("checkpoint_sha1") == digest]
    if not tags:
        known = sorted(t for t in rows if isinstance(settings.get(t), dict) and settings[t].get("checkpoint_sha1"))
        why = (f"its rows {known} were measured on other checkpoints" if known else
               "it records no checkpoint identity (re-evaluate the checkpoint with eval.py)")  # fmt: skip
        raise DataError(f"--metrics {path}: no row of {checkpoint}: {why}")
    tag = tags[0]
    # the dataset's name, never the folder it was read from (a path of the machine that evaluated it)
    out = {"tag": tag, "split": data.get("split"), "dataset": Path(str(data.get("dataset"))).name, "all": rows[tag]}
    try:
        from lab.stats import subset_mean
        from sbmoe.data import query_subsets, resolve_data_dir, split_qrels
        from sbmoe.results import read_per_query

        per_query = read_per_query(path.parent, tag)
        data_dir = resolve_data_dir(data["dataset"], None, download=False) if not Path(str(data["dataset"])).is_dir() \
            else Path(data["dataset"])  # fmt: skip
        subsets = query_subsets(*split_qrels(data_dir, data.get("split", "test")))
        out["unseen"] = {m: subset_mean(per_query, subsets["unseen"], m) for m in ("NDCG@10", "Recall@100")}
        out["unseen_queries"] = len(subsets["unseen"])
    except (OSError, KeyError, ValueError, DataError, TypeError):
        pass  # no per-query file or no qrels here: the card gives the all-query figures only
    return out


def _name(source: str) -> str:
    """A hub name as it is; a local folder by its last part (cards name no machine paths)."""
    return source if source.count("/") == 1 and not Path(source).exists() else Path(source).name


def _card_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(f"`{x}`" for x in v)
    return str(v)


def model_card(model: BiEncoder, recipe: dict, metrics: dict | None, query_max_length: int, doc_max_length: int,
               onnx: dict | None) -> str:  # fmt: skip
    c = model.config
    remote = type(model) is not BiEncoder
    base = _name(c.backbone)
    params = model.count_parameters()
    header = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
              "tags:", "- sentence-transformers", "- feature-extraction", "- sentence-similarity", "- dense-retrieval"]  # fmt: skip
    if remote:
        header += ["- mixture-of-experts", "- custom_code"]
    if "/" in base:
        header.append(f"base_model: {base}")
    if metrics:
        header += ["model-index:", f"- name: {c.kind}", "  results:", "  - task:", "      type: retrieval",
                   "    dataset:", f"      name: {metrics['dataset']}", f"      type: {metrics['dataset']}",
                   f"      split: {metrics['split']}", "    metrics:"]  # fmt: skip
        for key, value in metrics["all"].items():
            header += [f"    - type: {key.lower()}", f"      value: {value:.4f}"]
    header.append("---")
    design = {"baseline": "the backbone's pooled output, no MoE",
              "sbmoe": f"SB-MoE: one MoE block after the last layer, design `{c.design}`, routing `{c.routing}`, "
                       f"{c.num_experts} experts, top-{c.top_k}, inference mode `{c.inference_mode}`",
              "moe": f"token-level MoE in the FFN of layers {c.resolved_moe_layers()}, {c.num_experts} experts, "
                     f"top-{c.top_k}, routing `{c.routing}`, experts upcycled from the dense FFN"}.get(c.kind, c.kind)  # fmt: skip
    load = "SentenceTransformer(path, trust_remote_code=True)" if remote else "SentenceTransformer(path)"
    lines = [*header, "", f"# {c.kind} retriever on {base}", "",
             f"A dense bi-encoder from the moe-retrieval project: {design}. {c.pooling} pooling"
             f"{', L2-normalised' if c.normalize else ''}, {c.backbone_config['hidden_size']} dimensions, "
             f"{params['total']:,} parameters ({params['active_per_token']:,} active per input).", "",
             "## Use", "", "```python", "from sentence_transformers import SentenceTransformer", "",
             f"model = {load}", "q = model.encode_query(['...'])", "d = model.encode_document(['...'])", "```", ""]  # fmt: skip
    if remote:
        lines += ["This folder ships its own module code (`sentence_moe.py`, and `modeling_moe_retriever.py`, a copy of "
                  "the project's model.py): loading it needs `trust_remote_code=True`, which runs that code.", ""]  # fmt: skip
    else:
        lines += ["Stock sentence-transformers modules only (Transformer, Pooling, Normalize); no remote code.", ""]
    lines += [f"Lengths as in the project's eval.py: documents truncated at {doc_max_length} tokens, queries at "
              f"{query_max_length}."
              + ("" if remote else f" A stock Transformer has one length ({doc_max_length}); for queries longer than "
                 f"{query_max_length} tokens set `model.max_seq_length = {query_max_length}` before `encode_query`."),
              ""]  # fmt: skip
    lines += ["## Settings", "", "| setting | value |", "|---|---|", f"| backbone | {base} |", f"| kind | {c.kind} |"]
    keys = ["pooling", "normalize", "temperature"]
    if c.kind != "baseline":
        keys += ["num_experts", "top_k", "routing", "aux_loss_coef", "z_loss_coef"]
    if c.kind == "sbmoe":
        keys += ["design", "gate_temperature", "expert_dim", "noise_std", "inference_mode"]
    lines += [f"| {k} | {getattr(c, k)} |" for k in keys]
    lines += ["", "## Training", ""]
    if recipe:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in recipe.items()]
    else:
        lines.append("No training record in the checkpoint folder (run_info.json, log_history.json).")
    lines += ["", "## Evaluation", ""]
    if metrics:
        lines.append(f"{metrics['dataset']} / {metrics['split']}, the project's eval.py (pytrec_eval):")
        lines += ["", "| queries | " + " | ".join(metrics["all"]) + " |", "|---" * (len(metrics["all"]) + 1) + "|",
                  "| all | " + " | ".join(f"{v:.4f}" for v in metrics["all"].values()) + " |"]  # fmt: skip
        if "unseen" in metrics:
            lines += ["", f"Unseen-document subset ({metrics['unseen_queries']} test queries none of whose relevant "
                      "documents is a training positive): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics["unseen"].items())]  # fmt: skip
    else:
        lines.append("No test metrics were given at export (`export.py --metrics metrics.json`).")
    if onnx:
        lines += ["", "## ONNX", "", f"`{ONNX_FP32}`: the whole encoder (ids and mask in, normalised embedding out), "
                  f"max |difference| to PyTorch {onnx['fp32_max_abs_diff_vs_torch']:.1e}."]  # fmt: skip
        if "int8" in onnx:
            settings = "; ".join(f"{k} {_card_value(v)}" for k, v in onnx["int8"].items())
            lines.append(f"`{ONNX_INT8}`: dynamic int8 quantisation of the MatMul weights with onnxruntime ({settings}); "
                         "the MatMuls whose names contain one of fp32_nodes stay fp32.")  # fmt: skip
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line


SAMPLE_TEXTS = [
    "Vitamin D deficiency is associated with an increased risk of tuberculosis.",
    "The protein binds the receptor and the enzyme blocks the tumor pathway in mouse liver cells " * 12,
    "sleep", "A randomised trial of exercise therapy for heart failure.",
]  # fmt: skip


def export(checkpoint: Path, out: Path, onnx: bool = False, int8: bool = False, overwrite: bool = False,
           metrics: Path | None = None, query_max_length: int = 64, doc_max_length: int = 256) -> dict:  # fmt: skip
    """Build the whole folder beside `out`, check it, then rename it into place."""
    extra = len(temp_prefix(out)) - len(out.name) + 8  # the temporary sibling's longer name (mkdtemp adds 8)
    check_output(out, "OUT_DIR", inputs=[checkpoint, metrics], file=out.is_file(), extra_name=extra)  # a file: --overwrite
    if out.exists() and not overwrite:
        raise DataError(f"{out} exists (pass --overwrite to replace it)")
    model = load_checkpoint(checkpoint)
    limit = model.config.backbone_config.get("max_position_embeddings")
    for flag, value in (("query_max_length", query_max_length), ("doc_max_length", doc_max_length)):
        if limit and value > limit:
            raise DataError(f"--{flag} {value}: the backbone has {limit} positions")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    facts = checkpoint_metrics(metrics, checkpoint) if metrics else None
    settings = {"query_max_length": query_max_length, "doc_max_length": doc_max_length,
                "checkpoint_sha1": checkpoint_digest(checkpoint)}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # what an export killed with SIGKILL left
    tmp = make_temp_dir(out)
    try:
        with tempfile.TemporaryDirectory() as work:
            st = build_sentence_transformer(model, tokenizer, query_max_length, doc_max_length, Path(work))
            write_sentence_transformer(st, model, tmp)
        report = {"sentence_transformers_max_abs_diff": check_sentence_transformer(
            tmp, model, tokenizer, query_max_length, doc_max_length, SAMPLE_TEXTS)}  # fmt: skip
        if report["sentence_transformers_max_abs_diff"] > TOLERANCE:
            raise RuntimeError(f"the exported folder encodes {report['sentence_transformers_max_abs_diff']:.1e} away "
                               "from eval.py")  # fmt: skip
        graphs = export_graphs(model, tmp, int8, SAMPLE_TEXTS, tokenizer, doc_max_length, settings) \
            if onnx or int8 else None  # fmt: skip
        if graphs:
            report["onnx"] = graphs
        card = model_card(model, training_recipe(checkpoint), facts, query_max_length, doc_max_length, graphs)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        follow_umask(tmp)
        old = None
        if out.exists() or out.is_symlink():  # --overwrite: the old one leaves only once the new one is complete
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


@entry_point
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint folder written by train.py")
    p.add_argument("out_dir", help="the sentence-transformers folder to write (must not exist, unless --overwrite)")
    p.add_argument("--onnx", action="store_true", help="also onnx/encoder.onnx: the whole encoder, fp32")
    p.add_argument("--int8", action="store_true", help="also onnx/encoder_int8.onnx (implies --onnx)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--metrics", default=None, help="eval.py's metrics.json of this checkpoint, for the model card")
    p.add_argument("--query_max_length", type=int, default=64)
    p.add_argument("--doc_max_length", type=int, default=256)
    args = p.parse_args(argv)
    for flag in ("query_max_length", "doc_max_length"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    try:
        report = export(Path(args.checkpoint), Path(args.out_dir), args.onnx, args.int8, args.overwrite,
                        Path(args.metrics) if args.metrics else None, args.query_max_length, args.doc_max_length)  # fmt: skip
    except DataError as exc:
        fail(str(exc))
    except RuntimeError as exc:
        fail(f"export of {args.checkpoint} failed: {str(exc).splitlines()[0]}")
    except OSError as exc:  # the disk filled up, or the folder went away while writing
        fail(f"{args.out_dir}: cannot write the export ({exc.strerror or exc})")
    parts = [f"sentence-transformers max |diff| {report['sentence_transformers_max_abs_diff']:.1e}"]
    if "onnx" in report:
        parts.append(f"ONNX fp32 max |diff| {report['onnx']['fp32_max_abs_diff_vs_torch']:.1e}")
        if "min_cosine_to_fp32" in report["onnx"].get("int8", {}):
            parts.append(f"int8 min cosine to fp32 {report['onnx']['int8']['min_cosine_to_fp32']:.4f}")
    print(f"wrote {args.out_dir} ({'; '.join(parts)})")
    return report


if __name__ == "__main__":
    main()

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
MoE blocks dispatching densely (`model.traceable`). `--int8` adds `onnx/encoder_int8.onnx`, built with onnxruntime by
the recipe chosen for the checkpoint's kind (`INT8_BY_KIND`; `--int8_recipe` names another of `INT8_RECIPES`);
onnx/export.json records the recipe as applied and the CPU it was chosen on, and the recipe read back from the graph
(`graph_recipe`) must equal it, at export and whenever `eval.py --backend onnx-int8` loads the folder.

Nothing is half-written: the folder is built next to OUT_DIR and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from transformers import AutoTokenizer

from model import BiEncoder, RetrieverConfig, checkpoint_digest, load_model, traceable
from utils import (
    DataError,
    atomic_write_text,
    check_output,
    entry_point,
    fail,
    follow_umask,
    make_temp_dir,
    remove_stale_temps,
    temp_prefix,
)

HERE = Path(__file__).resolve().parent
ONNX_FP32, ONNX_INT8, ONNX_INFO = "onnx/encoder.onnx", "onnx/encoder_int8.onnx", "onnx/export.json"
FILES = {"onnx": ONNX_FP32, "onnx-int8": ONNX_INT8}
BACKENDS = ("torch", "onnx", "onnx-int8")
# The int8 recipes (see `check_recipe` for what each key means) and the one each variant gets, chosen by
# measurement on INT8_CHOSEN_ON: speed side by side and agreement with fp32 (scripts/int8_recipes.py,
# results/export/int8_recipes_*.log), then SciFact test NDCG@10 and Recall@100 of the candidates against fp32
# for the zero-shot backbone and a fine-tuned baseline, SB-MoE and token-level MoE (results/export/int8_quality/).
INT8_RECIPES = {
    # the earlier recipe, chosen on an AVX2 CPU without VNNI: unfused, the first layer (and routers) fp32
    "unfused-l0fp32": {"fusions": False, "attention": False, "scores": False, "weights": "per-channel",
                       "activations": "dynamic", "fp32": ["first_layer", "routers"]},
    # every weight MatMul int8 (routers aside), unfused
    "unfused": {"fusions": False, "attention": False, "scores": False, "weights": "per-channel",
                "activations": "dynamic", "fp32": ["routers"]},
    # sentence-transformers' own int8 export: also the attention scores' products (routers aside)
    "unfused-scores": {"fusions": False, "attention": False, "scores": True, "weights": "per-channel",
                       "activations": "dynamic", "fp32": ["routers"]},
    # onnxruntime's BERT fusions, then every weight MatMul int8, the fused attention's QKV too (QAttention)
    "fused": {"fusions": True, "attention": True, "scores": False, "weights": "per-channel",
              "activations": "dynamic", "fp32": ["routers"]},
    "fused-l0fp32": {"fusions": True, "attention": True, "scores": False, "weights": "per-channel",
                     "activations": "dynamic", "fp32": ["first_layer", "routers"]},
}  # fmt: skip
# Chosen: unfused-l0fp32 for every variant. On INT8_CHOSEN_ON it encodes at 1.01x sentence-transformers' own
# int8 (results/bench/encode_int8.log), SB-MoE at the baseline's speed; every layer int8 is 1.10x but moved SciFact
# unseen-document NDCG@10 by up to -0.0145 (zero-shot, p = 0.03), the fusions add no speed on this CPU, per-tensor
# weights and static activations lose more or run slower (results/export/int8_recipes_*.log, int8_quality/).
INT8_BY_KIND = {"baseline": "unfused-l0fp32", "sbmoe": "unfused-l0fp32", "moe": "unfused-l0fp32"}
INT8_CHOSEN_ON = "AMD EPYC (family 26), 2 CPUs, avx2 avx512f avx512_vnni avx_vnni avx512_bf16 (no AMX)"
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
    """model.py for the exported folder: the training loss' import is replaced (inference needs no utils.py)."""
    src = (HERE / "model.py").read_text(encoding="utf-8")
    line = "from utils import info_nce\n"
    if src.count(line) != 1:
        raise RuntimeError("model.py: expected exactly one `from utils import info_nce` line to replace")
    stub = ("def info_nce(*args, **kwargs):  # exported copy: encoding only, the loss lives in the project's utils.py\n"
            "    raise NotImplementedError('train with the moe-retrieval project, not from an exported folder')\n")  # fmt: skip
    return src.replace(line, stub)


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
        from sentence_moe import MoEEncoder

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

    from encode import encode_texts

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
    """Traced with eager attention: the pattern onnxruntime's transformer optimizer fuses into `Attention` (traced
    from SDPA it finds none); the fp32 graph is the same function either way (checked after export)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ids, mask = probe_batch(model.config.backbone_config["vocab_size"], batch=4, length=16)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "sentence_embedding": {0: "batch"}}  # fmt: skip
    model.eval()
    backbone = model.encoder.config
    attention = backbone._attn_implementation
    backbone._attn_implementation = "eager"
    try:
        with torch.no_grad(), traceable(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on Python values: the checks after export are what count
            torch.onnx.export(EncoderGraph(model).eval(), (ids, mask), str(path), dynamo=False, opset_version=opset,
                              input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                              dynamic_axes=axes, do_constant_folding=True)  # fmt: skip
    finally:
        backbone._attn_implementation = attention


# An int8 recipe: what `quantize_int8` builds and `graph_recipe` reads back from a graph.
#   fusions     onnxruntime.transformers.optimizer's BERT fusions first (Attention, EmbedLayerNormalization,
#               SkipLayerNormalization, BiasGelu), or the traced graph as it is
#   attention   with fusions: the fused Attention's QKV weights int8 too (QAttention), or Attention kept fp32
#   scores      the attention scores' MatMuls (activation x activation: QK^T and softmax x V) int8 too, as
#               sentence-transformers' int8 export does (only without fusions: a fused Attention computes them)
#   weights     per-channel (one scale per output column) or per-tensor
#   activations dynamic (quantised per call from their own range) or static (ranges calibrated on corpus documents)
#   fp32        groups of weight MatMuls kept in fp32: "first_layer" (encoder layer 0), "routers" (MoE routers)
# Weights are signed int8, activations unsigned (results/export/int8_choice.log: reduce_range and uint8 weights
# were slower).
RECIPE_KEYS = ("fusions", "attention", "scores", "weights", "activations", "fp32")
FP32_GROUPS = {"first_layer": "/layer.0/", "routers": "/router/"}


def check_recipe(recipe: dict) -> dict:
    """The recipe with its keys in order, or a ValueError naming what is wrong."""
    if set(recipe) != set(RECIPE_KEYS):
        raise ValueError(f"int8 recipe {recipe}: expected the keys {', '.join(RECIPE_KEYS)}")
    if recipe["weights"] not in ("per-channel", "per-tensor") or recipe["activations"] not in ("dynamic", "static"):
        raise ValueError(f"int8 recipe {recipe}: weights per-channel|per-tensor, activations dynamic|static")
    if not set(recipe["fp32"]) <= set(FP32_GROUPS):
        raise ValueError(f"int8 recipe {recipe}: fp32 groups are among {', '.join(FP32_GROUPS)}")
    if recipe["attention"] and not recipe["fusions"]:
        raise ValueError(f"int8 recipe {recipe}: attention int8 needs the fusions (no Attention op without them)")
    if recipe["scores"] and (recipe["fusions"] or recipe["activations"] == "static"):
        raise ValueError(f"int8 recipe {recipe}: int8 scores only unfused and dynamic")
    if recipe["attention"] and recipe["activations"] == "static":
        raise ValueError(f"int8 recipe {recipe}: a fused Attention is quantised dynamically only (QAttention)")
    return {k: (sorted(recipe[k]) if k == "fp32" else recipe[k]) for k in RECIPE_KEYS}


def fuse_bert(src: Path, dst: Path, config: RetrieverConfig) -> None:
    """onnxruntime's transformer optimizer (BERT fusions, no approximate GELU); each fused Attention renamed after
    its encoder layer (the i-th in graph order is layer i), so that names still say where a node sits."""
    from onnxruntime.transformers.optimizer import optimize_model

    c = config.backbone_config
    opt = optimize_model(str(src), model_type="bert", num_heads=c["num_attention_heads"], hidden_size=c["hidden_size"],
                         opt_level=0)  # fmt: skip
    attention = [n for n in opt.model.graph.node if n.op_type == "Attention"]
    for layer, node in enumerate(attention):
        node.name = f"/encoder/encoder/layer.{layer}/attention/Attention"
    opt.save_model_to_file(str(dst))


def fp32_nodes(path: Path, groups, weights_only: bool = False) -> list[str]:
    """The MatMuls (and fused Attentions) of a float graph that the fp32 `groups` keep out of int8; with
    `weights_only`, only those whose B is a weight (the attention scores' products have none)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    patterns = [FP32_GROUPS[g] for g in groups]
    return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm", "Attention") and any(p in n.name for p in patterns)
            and (not weights_only or n.op_type == "Attention" or n.input[1] in inits)]  # fmt: skip


class Calibration:
    """onnxruntime's CalibrationDataReader over tokenised corpus documents, a batch at a time."""

    def __init__(self, batches: list[tuple[np.ndarray, np.ndarray]]):
        self.feeds = iter([{"input_ids": i.astype(np.int64), "attention_mask": m.astype(np.int64)} for i, m in batches])

    def get_next(self):
        return next(self.feeds, None)


def calibration_batches(tokenizer, texts: list[str], length: int, batch_size: int = 16) -> list:
    """Tokenised batches of `texts`, sorted by length as eval.py encodes them."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = []
    for s in range(0, len(order), batch_size):
        enc = tokenizer([texts[i] for i in order[s : s + batch_size]], padding=True, truncation=True,
                        max_length=length, return_tensors="np")  # fmt: skip
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def quantize_int8(src: Path, dst: Path, config: RetrieverConfig, recipe: dict,
                  calibration: list | None = None) -> tuple[dict, list[str]]:  # fmt: skip
    """The int8 graph of `recipe` from the fp32 graph `src`; returns the recipe as applied (its fp32 groups those
    the graph has: a baseline has no routers) and the names of the weight MatMuls (and Attentions) kept fp32.
    Static activations need `calibration` (`calibration_batches` of corpus documents)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    recipe = check_recipe(recipe)
    if recipe["activations"] == "static" and not calibration:
        raise ValueError("static int8 activations: no calibration documents")
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        source = src
        if recipe["fusions"]:
            source = Path(tmp) / "fused.onnx"
            fuse_bert(src, source, config)
        keep = fp32_nodes(source, recipe["fp32"])
        keep += [f"{name}_MatMul" for name in keep if name.endswith("/Gemm")]  # onnxruntime's Gemm -> MatMul + Add
        weights = fp32_nodes(source, recipe["fp32"], weights_only=True)
        recipe["fp32"] = [g for g in recipe["fp32"] if any(FP32_GROUPS[g] in name for name in weights)]
        ops = ["MatMul", "Attention"] if recipe["attention"] else ["MatMul"]
        extra = {"DefaultTensorType": onnx.TensorProto.FLOAT,  # fused ops lack shape inference
                 "MatMulConstBOnly": not recipe["scores"]}  # fmt: skip
        common = dict(per_channel=recipe["weights"] == "per-channel", reduce_range=False, weight_type=QuantType.QInt8,
                      op_types_to_quantize=ops, nodes_to_exclude=keep, extra_options=extra)  # fmt: skip
        if recipe["activations"] == "dynamic":
            quantize_dynamic(str(source), str(dst), **common)
        else:
            quantize_static(str(source), str(dst), Calibration(calibration), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax,
                            **common)  # fmt: skip
    return recipe, weights


def graph_recipe(path: Path) -> dict:
    """The recipe an int8 graph was built with, read from the graph itself (ops, scales, which nodes stay float)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    ops = {n.op_type for n in graph.node}
    fused = bool(ops & {"Attention", "QAttention", "SkipLayerNormalization", "EmbedLayerNormalization"})
    static = "QuantizeLinear" in ops and "DynamicQuantizeLinear" not in ops and "MatMulInteger" not in ops
    scales = []  # the weights' scales: one value (per-tensor) or one per output column (per-channel)
    int8_names, float_names, scores = [], [], False
    producers = {o: n for n in graph.node for o in n.output}
    for n in graph.node:
        if n.op_type == "MatMulInteger" and n.input[1] not in inits:
            scores = True
        elif n.op_type == "MatMulInteger":
            int8_names.append(n.name)
            zero_point = n.input[3] if len(n.input) > 3 else ""
            scales.append(int(np.prod(inits[zero_point].dims)) if zero_point in inits else 1)
        elif n.op_type == "QAttention":
            int8_names.append(n.name)
            scales.append(int(np.prod(inits[n.input[4]].dims)) if n.input[4] in inits else 1)
        elif n.op_type in ("MatMul", "Gemm", "Attention"):
            weight = n.input[1]
            dq = producers.get(weight)
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:  # static QDQ: int8 weight
                if numpy_helper.to_array(inits[dq.input[0]]).dtype == np.int8:
                    int8_names.append(n.name)
                    scales.append(int(np.prod(inits[dq.input[1]].dims)) if dq.input[1] in inits else 1)
                    continue
            if weight in inits:
                float_names.append(n.name)
    if not int8_names:
        raise ValueError(f"{path}: no int8 weight MatMul")
    groups = sorted(g for g, p in FP32_GROUPS.items()
                    if any(p in x for x in float_names) and not any(p in x for x in int8_names))  # fmt: skip
    return {"fusions": fused, "attention": "QAttention" in ops, "scores": scores, "weights": "per-channel" if max(scales) > 1 else "per-tensor",
            "activations": "static" if static else "dynamic", "fp32": groups}


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


def cpu_description() -> str:
    """This CPU as the int8 choice cares about: its name and the vector and matrix extensions it has."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((x.split(":", 1)[1].strip() for x in info.splitlines() if x.startswith("model name")), None)
    flags = set(next((x.split(":", 1)[1].split() for x in info.splitlines() if x.startswith("flags")), []))
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16") if f in flags]
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {' '.join(isa) or 'no AVX2'}"


def int8_recipe(kind: str, name: str | None = None) -> tuple[str, dict]:
    """The named recipe, or the one chosen for `kind`."""
    name = name or INT8_BY_KIND.get(kind, INT8_BY_KIND["baseline"])
    if name not in INT8_RECIPES:
        raise DataError(f"int8 recipe {name!r}: not one of {', '.join(INT8_RECIPES)}")
    return name, dict(INT8_RECIPES[name])


def check_int8(folder: str | Path, info: dict | None = None) -> dict:
    """The recipe onnx/export.json records for the int8 graph, checked against the graph itself; a DataError when
    they disagree (a graph replaced or a record edited after export)."""
    folder = Path(folder)
    info = info if info is not None else read_export_info(folder)
    recorded = info.get("int8", {}).get("recipe")
    if not isinstance(recorded, dict):
        raise DataError(f"{folder / ONNX_INFO}: records no int8 recipe (export it again with export.py --int8)")
    try:
        found = graph_recipe(folder / ONNX_INT8)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if found != recorded:
        diff = ", ".join(f"{k} {recorded.get(k)!r} recorded, {found[k]!r} in the graph" for k in found
                         if recorded.get(k) != found[k])  # fmt: skip
        raise DataError(f"{folder / ONNX_INT8}: the graph is not the recipe {ONNX_INFO} records ({diff})")
    return found


def export_graphs(model: BiEncoder, folder: Path, int8: bool, texts: list[str] | None = None, tokenizer=None,
                  length: int = 256, settings: dict | None = None, recipe: str | None = None) -> dict:
    """onnx/encoder.onnx (+ encoder_int8.onnx, by `recipe` or the one chosen for the model's kind) under `folder`,
    checked; returns what onnx/export.json records, `settings` (what eval.py evaluates the folder with: lengths,
    the checkpoint's identity) among it, and the int8 recipe with the CPU it was chosen on and this one."""
    fp32 = folder / ONNX_FP32
    export_onnx(model, fp32)
    info = {"config": model.config.to_dict(), "inputs": ["input_ids", "attention_mask"], "output": "sentence_embedding",
            **(settings or {}), "fp32_max_abs_diff_vs_torch": check_onnx(fp32, model)}  # fmt: skip
    if info["fp32_max_abs_diff_vs_torch"] > ONNX_TOLERANCE:
        raise RuntimeError(f"ONNX graph differs from the model by {info['fp32_max_abs_diff_vs_torch']:.1e}")
    if int8:
        name, wanted = int8_recipe(model.config.kind, recipe)
        applied, kept = quantize_int8(fp32, folder / ONNX_INT8, model.config, wanted)
        info["int8"] = {"recipe_name": name, "recipe": applied, "chosen_on": INT8_CHOSEN_ON,
                        "exported_on": cpu_description(), "fp32_nodes": len(kept)}  # fmt: skip
        check_int8(folder, info)  # the graph is the recipe recorded
        if texts and tokenizer is not None:  # agreement on real text: cosine of each int8 embedding to fp32
            from encode import encode_texts

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
        if backend == "onnx-int8":
            check_int8(folder, info)
        return OnnxRetriever(path, RetrieverConfig(**info["config"]))
    except DataError:
        raise
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
        from analysis import best_dev, train_seconds

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
        from analysis import query_subsets, read_per_query, split_qrels, subset_mean
        from utils import resolve_data_dir

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
            q = onnx["int8"]
            recipe = "; ".join(f"{k} {_card_value(v) if v != [] else 'none'}" for k, v in q["recipe"].items())
            lines.append(f"`{ONNX_INT8}`: int8 with onnxruntime, recipe `{q['recipe_name']}` ({recipe}; "
                         f"{q['fp32_nodes']} weight MatMuls kept fp32), chosen by measurement on {q['chosen_on']}; "
                         f"exported on {q['exported_on']}."
                         + (f" Cosine of int8 to fp32 embeddings on sample texts: min {q['min_cosine_to_fp32']:.4f}, "
                            f"mean {q['mean_cosine_to_fp32']:.4f}." if "min_cosine_to_fp32" in q else ""))  # fmt: skip
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line


SAMPLE_TEXTS = [
    "Vitamin D deficiency is associated with an increased risk of tuberculosis.",
    "The protein binds the receptor and the enzyme blocks the tumor pathway in mouse liver cells " * 12,
    "sleep", "A randomised trial of exercise therapy for heart failure.",
]  # fmt: skip


def export(checkpoint: Path, out: Path, onnx: bool = False, int8: bool = False, overwrite: bool = False,
           metrics: Path | None = None, query_max_length: int = 64, doc_max_length: int = 256,
           int8_recipe: str | None = None) -> dict:  # fmt: skip
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
        graphs = export_graphs(model, tmp, int8, SAMPLE_TEXTS, tokenizer, doc_max_length, settings, int8_recipe) \
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
    p.add_argument("--int8_recipe", default=None, choices=list(INT8_RECIPES),
                   help="with --int8: this recipe instead of the one chosen for the checkpoint's kind (INT8_BY_KIND)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--metrics", default=None, help="eval.py's metrics.json of this checkpoint, for the model card")
    p.add_argument("--query_max_length", type=int, default=64)
    p.add_argument("--doc_max_length", type=int, default=256)
    args = p.parse_args(argv)
    if args.int8_recipe and not args.int8:
        p.error("--int8_recipe: only with --int8")
    for flag in ("query_max_length", "doc_max_length"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    try:
        report = export(Path(args.checkpoint), Path(args.out_dir), args.onnx, args.int8, args.overwrite,
                        Path(args.metrics) if args.metrics else None, args.query_max_length, args.doc_max_length,
                        args.int8_recipe)  # fmt: skip
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

"""ONNX graphs of the encoder: the whole encoder traced into one graph (MoE blocks dispatching densely), its int8 versions built by a named recipe and the recipe read back from a graph, onnxruntime sessions, and the encoder behind `eval.py --backend onnx | onnx-int8`."""

from __future__ import annotations

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

from sbmoe.config import RetrieverConfig
from sbmoe.data import DataError
from sbmoe.files import atomic_write_text, make_temp_dir, read_json, remove_stale_temps

ONNX_FP32 = "onnx/encoder.onnx"


ONNX_INT8 = "onnx/encoder_int8.onnx"


ONNX_INFO = "onnx/export.json"


FILES = {"onnx": ONNX_FP32, "onnx-int8": ONNX_INT8, "openvino": ONNX_FP32}  # openvino compiles the fp32 graph


BACKENDS = ("torch", "onnx", "onnx-int8", "openvino")


# The int8 recipes (see `check_recipe` for what each key means) and the one each variant gets, chosen by
# measurement on INT8_CHOSEN_ON: speed side by side and agreement with fp32 (lab/scripts/int8_recipes.py,
# results/export/int8_recipes_*.log), then SciFact test NDCG@10 and Recall@100 of the candidates against fp32
# for the zero-shot backbone and a fine-tuned baseline, SB-MoE and token-level MoE (results/export/int8_quality/).
INT8_RECIPES = {
    # the earlier recipe, chosen on an AVX2 CPU without VNNI: unfused, the first layer (and routers) fp32
    "unfused-l0fp32": {"fusions": False, "attention": False, "scores": False, "weights": "per-channel",
                       "activations": "dynamic", "fp32": ["first_layer", "routers"], "smoothing": None},
    # every weight MatMul int8 (routers aside), unfused
    "unfused": {"fusions": False, "attention": False, "scores": False, "weights": "per-channel",
                "activations": "dynamic", "fp32": ["routers"], "smoothing": None},
    # sentence-transformers' own int8 export: also the attention scores' products (routers aside)
    "unfused-scores": {"fusions": False, "attention": False, "scores": True, "weights": "per-channel",
                       "activations": "dynamic", "fp32": ["routers"], "smoothing": None},
    # onnxruntime's BERT fusions, then every weight MatMul int8, the fused attention's QKV too (QAttention)
    "fused": {"fusions": True, "attention": True, "scores": False, "weights": "per-channel",
              "activations": "dynamic", "fp32": ["routers"], "smoothing": None},
    "fused-l0fp32": {"fusions": True, "attention": True, "scores": False, "weights": "per-channel",
                     "activations": "dynamic", "fp32": ["first_layer", "routers"], "smoothing": None},
    # unfused-l0fp32 with SmoothQuant's migration of activation outliers into the weights (alpha 0.7), calibrated
    "smooth-l0fp32": {"fusions": False, "attention": False, "scores": False, "weights": "per-channel",
                      "activations": "dynamic", "fp32": ["first_layer", "routers"], "smoothing": 0.7},
}  # fmt: skip


# Chosen: unfused-l0fp32 for every variant. On INT8_CHOSEN_ON it encodes at 1.01x sentence-transformers' own
# int8 (results/bench/encode_int8.log), SB-MoE at the baseline's speed; every layer int8 is 1.10x but moved SciFact
# unseen-document NDCG@10 by up to -0.0145 (zero-shot, p = 0.03), the fusions add no speed on this CPU, per-tensor
# weights and static activations lose more or run slower (results/export/int8_recipes_*.log, int8_quality/).
INT8_BY_KIND = {"baseline": "unfused-l0fp32", "sbmoe": "unfused-l0fp32", "moe": "unfused-l0fp32"}


INT8_CHOSEN_ON = "AMD EPYC (family 26), 2 CPUs, avx2 avx512f avx512_vnni avx_vnni avx512_bf16 (no AMX)"


ONNX_TOLERANCE = 1e-4  # onnxruntime fp32 vs torch (another summation order; fused kernels)


class EncoderGraph(nn.Module):
    """What the graph computes: eval.py's `model.encode(input_ids, attention_mask)`."""

    def __init__(self, model):
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


def export_onnx(model, path: Path, opset: int = 17) -> None:
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
        with torch.no_grad(), warnings.catch_warnings():  # traced: MoE blocks dispatch densely
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
#   smoothing   None, or SmoothQuant's alpha: before quantising, each int8 MatMul's input is divided per channel by
#               s = max|x|^alpha / max|W row|^(1 - alpha) (x's range measured on calibration documents) and W's rows
#               are multiplied by s, the same function in fp32 with the activations' outlier channels moved into
#               the per-channel weights, so that one per-tensor activation scale loses less (Xiao et al., 2023)
# Weights are signed int8, activations unsigned (results/export/int8_choice.log: reduce_range and uint8 weights
# were slower).
RECIPE_KEYS = ("fusions", "attention", "scores", "weights", "activations", "fp32", "smoothing")


FP32_GROUPS = {"first_layer": "/layer.0/", "routers": "/router/"}


def needs_calibration(recipe: dict) -> bool:
    """Whether a recipe reads activation ranges off corpus documents: static activations, or smoothing."""
    return recipe["activations"] == "static" or recipe.get("smoothing") is not None


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
    alpha = recipe["smoothing"]
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1):
        raise ValueError(f"int8 recipe {recipe}: smoothing is None or an alpha strictly between 0 and 1")
    if alpha is not None and recipe["fusions"]:
        raise ValueError(f"int8 recipe {recipe}: smoothing only unfused (a fused Attention hides its QKV input)")
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


CALIBRATION_DOCS = 256  # corpus documents whose activation ranges calibrate a smoothed or static int8 graph


def calibration_texts(corpora: list, n: int = CALIBRATION_DOCS) -> list[str]:
    """`n` documents spread evenly over `corpora` (sbmoe.data.Corpus), the same ones on every call; only those
    records are parsed (the others are skipped by line)."""
    texts = []
    for i, corpus in enumerate(corpora):
        want = min(n // len(corpora) + (i < n % len(corpora)), len(corpus))
        picks = sorted(set(np.linspace(0, len(corpus) - 1, num=want).round().astype(int).tolist())) if want else []
        read = corpus.reader()
        texts += [read(j, j + 1)[0] for j in picks]
    return texts


def calibration_batches(tokenizer, texts: list[str], length: int, batch_size: int = 16) -> list:
    """Tokenised batches of `texts`, sorted by length as eval.py encodes them."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = []
    for s in range(0, len(order), batch_size):
        enc = tokenizer([texts[i] for i in order[s : s + batch_size]], padding=True, truncation=True,
                        max_length=length, return_tensors="np")  # fmt: skip
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


SMOOTH_SUFFIX = "/Smooth"  # the name of each Mul that `smooth_graph` puts before a group of MatMuls


SMOOTH_META = "smoothing_alpha"  # the graph's metadata entry for the alpha the Muls were built with


def weight_matmuls(graph) -> list:
    """The MatMuls and Gemms of `graph` whose B is a weight (an initializer), as (node, transposed B)."""
    inits = {t.name for t in graph.initializer}
    out = []
    for n in graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits:
            out.append((n, False))
        elif n.op_type == "Gemm" and n.input[1] in inits:
            attrs = {a.name: a.i for a in n.attribute if a.name in ("transA", "transB")}
            if not attrs.get("transA"):
                out.append((n, bool(attrs.get("transB"))))
    return out


def input_ranges(path: Path, names: list[str], batches: list) -> dict[str, np.ndarray]:
    """max |x| per channel (last axis) of the tensors `names` of the graph at `path`, over `batches`."""
    import onnx

    model = onnx.load(str(path))
    outputs = {o.name for o in model.graph.output}
    for name in names:
        if name not in outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ranges: dict[str, np.ndarray] = {}
    for ids, mask in batches:
        values = sess.run(names, {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)})
        for name, v in zip(names, values):
            r = np.abs(v).reshape(-1, v.shape[-1]).max(0)
            ranges[name] = np.maximum(ranges[name], r) if name in ranges else r
    return ranges


def smooth_graph(src: Path, dst: Path, alpha: float, batches: list, skip: list[str]) -> int:
    """SmoothQuant's migration (see RECIPE_KEYS) on the weight MatMuls of `src` not named in `skip`: those that
    read the same tensor share one Mul by 1/s, named <tensor>/Smooth; each one's weight rows are multiplied by s.
    The fp32 function is unchanged up to rounding. Returns the number of Muls put in."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for n in graph.node:
        for x in n.input:
            uses[x] = uses.get(x, 0) + 1
    groups: dict[str, list] = {}
    for node, transposed in weight_matmuls(graph):
        if node.name not in skip:
            groups.setdefault(node.input[0], []).append((node, transposed))
    ranges = input_ranges(src, list(groups), batches)
    nodes = list(graph.node)
    for name, members in groups.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n, _ in members]
        rows = np.max([np.abs(w.T if t else w).max(1) for w, (_, t) in zip(weights, members)], axis=0)
        scale = np.clip(ranges[name], 1e-5, None) ** alpha / np.clip(rows, 1e-5, None) ** (1 - alpha)
        scale = scale.astype(np.float32)
        mul = onnx.helper.make_node("Mul", [name, name + SMOOTH_SUFFIX + "/inverse"], [name + SMOOTH_SUFFIX],
                                    name=name + SMOOTH_SUFFIX)  # fmt: skip
        graph.initializer.append(numpy_helper.from_array((1 / scale).astype(np.float32), mul.input[1]))
        for (node, transposed), w in zip(members, weights):
            scaled = (w * scale[None, :]) if transposed else (w * scale[:, None])
            if uses[node.input[1]] > 1:  # a weight shared with another node gets a copy of its own
                node.input[1] = node.input[1] + SMOOTH_SUFFIX
                graph.initializer.append(numpy_helper.from_array(scaled.astype(w.dtype), node.input[1]))
            else:
                inits[node.input[1]].CopyFrom(numpy_helper.from_array(scaled.astype(w.dtype), node.input[1]))
            node.input[0] = mul.output[0]
        nodes.insert(min(i for i, n in enumerate(nodes) if mul.output[0] in n.input), mul)
    del graph.node[:]
    graph.node.extend(nodes)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {SMOOTH_META: repr(float(alpha))})
    onnx.save(model, str(dst))
    return len(groups)


def quantize_int8(src: Path, dst: Path, config: RetrieverConfig, recipe: dict,
                  calibration: list | None = None) -> tuple[dict, list[str]]:  # fmt: skip
    """The int8 graph of `recipe` from the fp32 graph `src`; returns the recipe as applied (its fp32 groups those
    the graph has: a baseline has no routers) and the names of the weight MatMuls (and Attentions) kept fp32.
    Static activations and smoothing need `calibration` (`calibration_batches` of corpus documents)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    recipe = check_recipe(recipe)
    if needs_calibration(recipe) and not calibration:
        raise ValueError("static int8 activations or smoothing: no calibration documents")
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        source = src
        if recipe["fusions"]:
            source = Path(tmp) / "fused.onnx"
            fuse_bert(src, source, config)
        keep = fp32_nodes(source, recipe["fp32"])
        keep += [f"{name}_MatMul" for name in keep if name.endswith("/Gemm")]  # onnxruntime's Gemm -> MatMul + Add
        weights = fp32_nodes(source, recipe["fp32"], weights_only=True)
        recipe["fp32"] = [g for g in recipe["fp32"] if any(FP32_GROUPS[g] in name for name in weights)]
        if recipe["smoothing"] is not None:
            smoothed = Path(tmp) / "smoothed.onnx"
            smooth_graph(source, smoothed, recipe["smoothing"], calibration, keep)
            source = smoothed
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

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
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
    smoothed = any(n.op_type == "Mul" and n.name.endswith(SMOOTH_SUFFIX) for n in graph.node)
    alpha = {p.key: p.value for p in model.metadata_props}.get(SMOOTH_META)
    if smoothed != (alpha is not None):
        raise ValueError(f"{path}: smoothing Muls {'without' if smoothed else 'but none, with'} the {SMOOTH_META} entry")
    return {"fusions": fused, "attention": "QAttention" in ops, "scores": scores, "weights": "per-channel" if max(scales) > 1 else "per-tensor",
            "activations": "static" if static else "dynamic", "fp32": groups, "smoothing": float(alpha) if smoothed else None}


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
        self.open(path, threads)

    def open(self, path: Path, threads: int | None) -> None:
        self.session = session(path, threads)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feed = {"input_ids": input_ids.cpu().numpy().astype(np.int64),
                "attention_mask": attention_mask.cpu().numpy().astype(np.int64)}  # fmt: skip
        return torch.from_numpy(self.session.run(None, feed)[0])


class OpenVinoRetriever(OnnxRetriever):
    """The fp32 graph compiled by OpenVINO's CPU plugin at its default inference precision: bf16 on a CPU with bf16
    units (AVX512-BF16, AMX), fp32 elsewhere; `precision` says which it chose."""

    def open(self, path: Path, threads: int | None) -> None:
        import openvino as ov

        if self.config.routing == "random":  # found by tests/test_export.py: Sokli et al.'s design routed 3 of 4 texts elsewhere
            raise DataError("--backend openvino: OpenVINO's CPU plugin computes int64 in int32, so the random-routing "
                            "keys (int64 arithmetic) would pick other experts; evaluate this model with --backend onnx")  # fmt: skip
        properties = {"PERFORMANCE_HINT": "LATENCY", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        core = ov.Core()
        try:
            compiled = core.compile_model(str(path), "CPU", properties)
        except RuntimeError:  # bf16 kernels this process cannot run (oneDNN held to AVX2, ONEDNN_MAX_CPU_ISA): fp32
            compiled = core.compile_model(str(path), "CPU", {**properties, "INFERENCE_PRECISION_HINT": "f32"})
        chosen = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "bf16" or "f32"
        self.precision = f"OpenVINO {'fp32' if chosen == 'f32' else chosen}"
        self.request = compiled.create_infer_request()

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feed = [input_ids.cpu().numpy().astype(np.int64), attention_mask.cpu().numpy().astype(np.int64)]
        return torch.from_numpy(self.request.infer(feed)[0].copy())


RETRIEVERS = {"onnx": OnnxRetriever, "onnx-int8": OnnxRetriever, "openvino": OpenVinoRetriever}


def check_onnx(path: Path, model) -> float:
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
    recorded = {"smoothing": None, **recorded}  # exports from before smoothing existed record no such key
    try:
        found = graph_recipe(folder / ONNX_INT8)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if found != recorded:
        diff = ", ".join(f"{k} {recorded.get(k)!r} recorded, {found[k]!r} in the graph" for k in found
                         if recorded.get(k) != found[k])  # fmt: skip
        raise DataError(f"{folder / ONNX_INT8}: the graph is not the recipe {ONNX_INFO} records ({diff})")
    return found


def export_graphs(model, folder: Path, int8: bool, texts: list[str] | None = None, tokenizer=None,
                  length: int = 256, settings: dict | None = None, recipe: str | None = None,
                  calibration: tuple[str, list[str]] | None = None) -> dict:  # fmt: skip
    """onnx/encoder.onnx (+ encoder_int8.onnx, by `recipe` or the one chosen for the model's kind) under `folder`,
    checked; returns what onnx/export.json records, `settings` (what eval.py evaluates the folder with: lengths,
    the checkpoint's identity) among it, and the int8 recipe with the CPU it was chosen on and this one.
    `calibration`: (where they come from, documents), for a recipe that calibrates (smoothing, static)."""
    fp32 = folder / ONNX_FP32
    export_onnx(model, fp32)
    info = {"config": model.config.to_dict(), "inputs": ["input_ids", "attention_mask"], "output": "sentence_embedding",
            **(settings or {}), "fp32_max_abs_diff_vs_torch": check_onnx(fp32, model)}  # fmt: skip
    if info["fp32_max_abs_diff_vs_torch"] > ONNX_TOLERANCE:
        raise RuntimeError(f"ONNX graph differs from the model by {info['fp32_max_abs_diff_vs_torch']:.1e}")
    if int8:
        name, wanted = int8_recipe(model.config.kind, recipe)
        calibrates = needs_calibration(wanted)
        if calibrates and not (calibration and calibration[1]):
            raise DataError(f"int8 recipe {name} calibrates on corpus documents: none given (export.py --calibration "
                            "DATASET)")  # fmt: skip
        batches = calibration_batches(tokenizer, calibration[1], length) if calibrates else None
        applied, kept = quantize_int8(fp32, folder / ONNX_INT8, model.config, wanted, batches)
        info["int8"] = {"recipe_name": name, "recipe": applied, "chosen_on": INT8_CHOSEN_ON,
                        "exported_on": cpu_description(), "fp32_nodes": len(kept),
                        **({"calibration": {"source": calibration[0], "documents": len(calibration[1])}}
                           if calibrates else {})}  # fmt: skip
        check_int8(folder, info)  # the graph is the recipe recorded
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
    info = read_json(path)
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
        return RETRIEVERS[backend](path, RetrieverConfig(**info["config"]))
    except DataError:
        raise
    except Exception as exc:  # onnxruntime raises its own types for a corrupt or truncated graph
        raise DataError(f"{path}: not a loadable ONNX graph ({str(exc).splitlines()[0][:200]})") from None


def onnx_retriever(model, backend: str, tokenizer=None, calibration: tuple[str, list[str]] | None = None) -> OnnxRetriever:
    """Export `model` on the fly (a temporary folder, gone once the session holds the graph; one left by a
    process killed with SIGKILL is removed by the next); `calibration` and `tokenizer` for a recipe that calibrates."""
    anchor = Path(tempfile.gettempdir()) / "moe-retrieval-onnx"
    remove_stale_temps(anchor)
    tmp = make_temp_dir(anchor)
    try:
        export_graphs(model, tmp, int8=backend == "onnx-int8", tokenizer=tokenizer, calibration=calibration)
        return RETRIEVERS[backend](tmp / FILES[backend], model.config)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)



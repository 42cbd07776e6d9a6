"""Where an int8 graph spends its time on this CPU: onnxruntime's profiler, time summed by operator type.

    python -m lab.scripts.int8_profile BACKBONE --recipe fused [--docs 64] [--output results/export/int8_profile.json]

The zero-shot backbone (mean pooling) exported by export.py, its int8 graph built by the named recipe
(sbmoe.onnx.INT8_RECIPES) and, for comparison, the fp32 graph; the first --docs SciFact documents (judged first, as
bench.py) at <= 256 tokens, batch 32, two passes (the first warms up and is not counted). Writes JSON and a log.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import onnxruntime as ort
from transformers import AutoTokenizer

import sbmoe.onnx
from lab.bench import sample_corpus
from model import BiEncoder
from sbmoe.data import doc_text, load_beir, resolve_data_dir
from sbmoe.encoding import encode_texts
from sbmoe.files import atomic_write_text
from utils import entry_point


def profile(path: Path, config, tok, texts: list[str], length: int, batch: int, tmp: Path) -> dict[str, float]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    retriever = sbmoe.onnx.OnnxRetriever(path, config)
    encode_texts(retriever, tok, texts, length, batch, show_progress=False)  # warm-up, unprofiled
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp / path.stem)
    retriever.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    encode_texts(retriever, tok, texts, length, batch, show_progress=False)  # first profiled pass: warm-up
    retriever.session.end_profiling()
    retriever.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    encode_texts(retriever, tok, texts, length, batch, show_progress=False)
    trace = json.loads(Path(retriever.session.end_profiling()).read_text())
    by_op: dict[str, float] = collections.Counter()
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"] / 1e6
    return dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


@entry_point
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("backbone")
    p.add_argument("--recipe", nargs="+", default=["fused"], choices=list(sbmoe.onnx.INT8_RECIPES))
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--output", default="results/export/int8_profile.json")
    args = p.parse_args(argv)
    corpus, _, qrels = load_beir(resolve_data_dir("scifact", None), "test")
    texts = [doc_text(d) for d in sample_corpus(corpus, qrels, args.docs).values()]
    model = BiEncoder.from_backbone(args.backbone, pooling="mean").eval()
    tok = AutoTokenizer.from_pretrained(args.backbone)
    log = [f"$ python -m lab.scripts.int8_profile {Path(args.backbone).name} --recipe {' '.join(args.recipe)} --docs {args.docs}",
           f"{len(texts)} SciFact docs at <= 256 tokens, batch 32; CPU {sbmoe.onnx.cpu_description()}; seconds by operator "
           "type (onnxruntime profiler, one pass after a warm-up)"]  # fmt: skip
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sbmoe.onnx.export_onnx(model, tmp / "fp32.onnx")
        graphs = {"fp32": tmp / "fp32.onnx"}
        for name in args.recipe:
            sbmoe.onnx.quantize_int8(tmp / "fp32.onnx", tmp / f"{name}.onnx", model.config, sbmoe.onnx.INT8_RECIPES[name])
            graphs[name] = tmp / f"{name}.onnx"
        for name, path in graphs.items():
            ops = profile(path, model.config, tok, texts, 256, 32, tmp)
            total = sum(ops.values())
            report[name] = {"total_s": total, "by_op_s": ops}
            log.append(f"{name}: {total:.2f} s in kernels; " + ", ".join(f"{k} {v:.2f} ({v / total:.0%})"
                                                                        for k, v in list(ops.items())[:10]))  # fmt: skip
    print("\n".join(log))
    out = Path(args.output)
    atomic_write_text(out, json.dumps({"log": log, "graphs": report}, indent=1))
    atomic_write_text(out.with_suffix(".log"), "\n".join(log) + "\n")
    return report


if __name__ == "__main__":
    main()

"""Which int8 recipe for onnx/encoder_int8.onnx: speed and agreement with fp32 on real SciFact documents.

    python -m lab.scripts.int8_choice    # from the repository root, BEIR_DATA_DIR=../shared/data/beir

Zero-shot MiniLM (mean pooling), 48 SciFact documents at 256 tokens, batch 32, onnxruntime on the CPU.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

import sbmoe.onnx
from model import BiEncoder
from sbmoe.data import doc_text, load_corpus, resolve_data_dir
from sbmoe.encoding import encode_texts

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

M = "../shared/models/all-minilm-l6-v2"
model = BiEncoder.from_backbone(M, pooling="mean").eval()
tok = AutoTokenizer.from_pretrained(M)
corpus = load_corpus(resolve_data_dir("scifact", None, download=False))
texts = [doc_text(d) for d in list(corpus.values())[:48]]
tmp = Path(tempfile.mkdtemp())
fp32 = tmp / "fp32.onnx"
sbmoe.onnx.export_onnx(model, fp32)


def quantize(src: Path, dst: Path, optimize: bool, per_channel: bool, reduce_range: bool, weight_type: str) -> None:
    """Dynamic int8 of every weight MatMul, after onnxruntime's BERT fusions when `optimize`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if optimize:
        sbmoe.onnx.fuse_bert(src, dst.with_suffix(".fused.onnx"), model.config)
        src = dst.with_suffix(".fused.onnx")
    quantize_dynamic(str(src), str(dst), per_channel=per_channel, reduce_range=reduce_range,
                     weight_type=getattr(QuantType, weight_type), op_types_to_quantize=["MatMul"],
                     extra_options={"MatMulConstBOnly": True})  # fmt: skip


recipes = {
    "plain per-tensor S8": dict(optimize=False, per_channel=False, reduce_range=False, weight_type="QInt8"),
    "plain per-channel S8": dict(optimize=False, per_channel=True, reduce_range=False, weight_type="QInt8"),
    "plain per-channel S8 reduce_range": dict(optimize=False, per_channel=True, reduce_range=True, weight_type="QInt8"),
    "fused per-tensor S8": dict(optimize=True, per_channel=False, reduce_range=False, weight_type="QInt8"),
    "fused per-channel S8": dict(optimize=True, per_channel=True, reduce_range=False, weight_type="QInt8"),
    "fused per-channel S8 reduce_range": dict(optimize=True, per_channel=True, reduce_range=True, weight_type="QInt8"),
    "fused per-channel U8": dict(optimize=True, per_channel=True, reduce_range=False, weight_type="QUInt8"),
}
paths = {"fp32": fp32}
for name, r in recipes.items():
    paths[name] = tmp / (name.replace(" ", "_") + ".onnx")
    quantize(fp32, paths[name], **r)
from onnxruntime.transformers.optimizer import optimize_model  # noqa: E402

c = model.config.backbone_config
opt = optimize_model(str(fp32), model_type="bert", num_heads=c["num_attention_heads"], hidden_size=c["hidden_size"], opt_level=1)
opt.save_model_to_file(str(tmp / "fused_fp32.onnx"))
paths["fused fp32"] = tmp / "fused_fp32.onnx"
print("fused graph ops:", json.dumps(opt.get_fused_operator_statistics()))
print("quantised", flush=True)
encs = {k: sbmoe.onnx.OnnxRetriever(p, model.config) for k, p in paths.items()}
ref = encode_texts(model, tok, texts, 256, 32, show_progress=False)
rows = {}
for k, e in encs.items():
    emb = encode_texts(e, tok, texts, 256, 32, show_progress=False)
    print(k, flush=True)
    rows[k] = {"min_cos": float((emb * ref).sum(1).min()), "mean_cos": float((emb * ref).sum(1).mean()), "t": []}
for _ in range(2):  # interleaved repeats
    for k, e in encs.items():
        t = time.perf_counter()
        encode_texts(e, tok, texts, 256, 32, show_progress=False)
        rows[k]["t"].append(time.perf_counter() - t)
print(f"{len(texts)} SciFact docs, 256 tokens, batch 32; cosine to PyTorch fp32")
print("| graph | docs/s | min cosine | mean cosine |\n|---|---:|---:|---:|")
for k, r in rows.items():
    r["docs_per_s"] = len(texts) / float(np.median(r["t"]))
    print(f"| {k} | {r['docs_per_s']:.1f} | {r['min_cos']:.5f} | {r['mean_cos']:.5f} |")
Path("results/export/int8_choice.json").write_text(json.dumps(rows, indent=1))

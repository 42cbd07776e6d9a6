"""Which MatMuls of a fine-tuned checkpoint to keep in fp32 under dynamic int8: minimum and mean cosine to the fp32 graph on
64 SciFact documents (256 tokens), each group of MatMuls excluded in turn, with and without onnxruntime's MatMulConstBOnly.

    python -m lab.scripts.int8_layers EXPORT/onnx/encoder.onnx EXPORT   # EXPORT: export.py's folder of the checkpoint

The times it prints were taken while a training job shared the CPU: noise, not used.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from transformers import AutoTokenizer

import sbmoe.onnx
from sbmoe.data import doc_text, load_corpus, resolve_data_dir

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("graph", help="the fp32 graph, EXPORT/onnx/encoder.onnx")
p.add_argument("tokenizer", help="a folder with the checkpoint's tokenizer (EXPORT)")
a = p.parse_args()
src = Path(a.graph)
tok = AutoTokenizer.from_pretrained(a.tokenizer)
corpus = load_corpus(resolve_data_dir("scifact", None, download=False))
texts = [doc_text(d) for d in list(corpus.values())[100:164]]
batches = [tok(texts[i : i + 32], truncation=True, max_length=256, padding=True, return_tensors="np")
           for i in range(0, 64, 32)]  # fmt: skip


def run(path):
    s = sbmoe.onnx.session(path, 2)
    names = [i.name for i in s.get_inputs()]
    t = time.perf_counter()
    feeds = [{names[0]: x["input_ids"].astype(np.int64), names[1]: x["attention_mask"].astype(np.int64)} for x in batches]
    out = np.concatenate([s.run(None, f)[0] for f in feeds])
    return out, time.perf_counter() - t


ref, tr = run(src)
mm = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node if n.op_type == "MatMul"]
groups = {"all": [],
          "no attention-score matmuls": [n for n in mm if n.endswith("self/MatMul") or n.endswith("self/MatMul_1")],
          "keep FFN out fp32": [n for n in mm if "output/dense" in n and "attention" not in n],
          "keep FFN in fp32": [n for n in mm if "intermediate" in n],
          "keep last layer fp32": [n for n in mm if "layer.5" in n],
          "keep first layer fp32": [n for n in mm if "layer.0" in n]}  # fmt: skip
tmp = Path(tempfile.mkdtemp())
print(f"fp32: {tr:.2f}s")
for g, ex in groups.items():
    for cb in (False, True):
        dst = tmp / "q.onnx"
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=False,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=ex,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": cb})  # fmt: skip
        out, t = run(dst)
        run(dst)
        cos = (out * ref).sum(1)
        print(f"{g} constBonly={cb}: min cos {cos.min():.4f} mean {cos.mean():.4f} time {t:.2f}s", flush=True)

"""int8 with the first encoder layer kept in fp32, on export.py's folder of a fine-tuned checkpoint: builds the variant
graph into a copy of the folder, then measures speed and minimum cosine to fp32 on bench.py's 96 SciFact documents
(256 tokens, batch 32, 2 threads, 3 interleaved repeats) against the fp32 graph and the folder's own int8 graph.

    python -m lab.scripts.int8_first_layer EXPORT OUT     # EXPORT: export.py's folder; OUT: a new folder
    python eval.py --model sbmoe --checkpoint OUT --backend onnx-int8 --output_dir DIR --tag T   # then compare.py
"""

import argparse
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from transformers import AutoTokenizer

import sbmoe.onnx
from lab import bench, export
from sbmoe.data import doc_text

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("export_dir")
p.add_argument("out")
a = p.parse_args()
src, out = Path(a.export_dir), Path(a.out)
shutil.copytree(src, out)
fp32 = src / export.ONNX_FP32
names = [n.name for n in onnx.load(str(fp32), load_external_data=False).graph.node if n.op_type == "MatMul"]
keep = [n for n in names if "/layer.0/" in n]
quantize_dynamic(str(fp32), str(out / export.ONNX_INT8), weight_type=QuantType.QInt8, per_channel=True,
                 reduce_range=False, op_types_to_quantize=["MatMul"], nodes_to_exclude=keep,
                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True})  # fmt: skip
print(f"kept in fp32: {len(keep)} MatMuls of the first layer")
tok = AutoTokenizer.from_pretrained(src)
corpus, _, _ = bench.load_data(argparse.Namespace(dataset="scifact", data_dir=None, docs=96, split="test"))
texts = [doc_text(d) for d in corpus.values()]
batches = [tok(texts[i : i + 32], truncation=True, max_length=256, padding=True, return_tensors="np")
           for i in range(0, len(texts), 32)]  # fmt: skip


def runner(path):
    s = sbmoe.onnx.session(path, 2)
    ids, mask = (i.name for i in s.get_inputs())
    feeds = [{ids: b["input_ids"].astype(np.int64), mask: b["attention_mask"].astype(np.int64)} for b in batches]
    return lambda: np.concatenate([s.run(None, f)[0] for f in feeds])


fns = {"fp32": runner(fp32), "int8 (the export's graph)": runner(src / export.ONNX_INT8),
       "int8, first layer fp32": runner(out / export.ONNX_INT8)}  # fmt: skip
ref = fns["fp32"]()
times = {k: [] for k in fns}
for k, f in fns.items():
    print(f"{k}: min cosine to fp32 {float((f() * ref).sum(1).min()):.4f}")
for _ in range(3):
    for k, f in fns.items():
        t = time.perf_counter()
        f()
        times[k].append(time.perf_counter() - t)
for k, v in times.items():
    print(f"{k}: {len(texts) / statistics.median(v):.1f} docs/s")

"""Speed of the chosen int8 recipe (export.INT8: first encoder layer and routers in fp32) against the same recipe
with every layer in int8, side by side in one run: both graphs quantised from the fp32 graph of export.py's folder,
timed on bench.py's SciFact documents (256 tokens, batch 32, 2 threads, interleaved repeats, median).

    python results/export/int8_recipe_speed.py EXPORT [--repeats 5]    # EXPORT: export.py's folder (--onnx)
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, ".")
from transformers import AutoTokenizer  # noqa: E402

import bench  # noqa: E402
import export  # noqa: E402
from model import RetrieverConfig  # noqa: E402
from utils import doc_text  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("export_dir")
p.add_argument("--repeats", type=int, default=5)
a = p.parse_args()
src = Path(a.export_dir)
config = RetrieverConfig(**__import__("json").loads((src / export.ONNX_INFO).read_text())["config"])
tok = AutoTokenizer.from_pretrained(src)
corpus, _, _ = bench.load_data(argparse.Namespace(dataset="scifact", data_dir=None, docs=96, split="test"))
texts = [doc_text(d) for d in corpus.values()]
batches = [tok(texts[i : i + 32], truncation=True, max_length=256, padding=True, return_tensors="np")
           for i in range(0, len(texts), 32)]  # fmt: skip


def runner(path):
    s = export.session(path, 2)
    ids, mask = (i.name for i in s.get_inputs())
    feeds = [{ids: b["input_ids"].astype(np.int64), mask: b["attention_mask"].astype(np.int64)} for b in batches]
    return lambda: np.concatenate([s.run(None, f)[0] for f in feeds])


with tempfile.TemporaryDirectory() as tmp:
    every = Path(tmp) / "every_layer.onnx"
    chosen = Path(tmp) / "chosen.onnx"
    export.quantize_int8(src / export.ONNX_FP32, every, config, **{**export.INT8, "fp32_nodes": ()})
    kept = export.quantize_int8(src / export.ONNX_FP32, chosen, config, **export.INT8)
    print(f"chosen recipe keeps {len(kept)} MatMuls in fp32 ({', '.join(export.INT8['fp32_nodes'])})")
    fns = {"fp32": runner(src / export.ONNX_FP32), "int8, every layer": runner(every), "int8, export.INT8": runner(chosen)}
    ref = fns["fp32"]()
    times = {k: [] for k in fns}
    for k, f in fns.items():
        print(f"{k}: min cosine to fp32 {float((f() * ref).sum(1).min()):.4f}")
    for _ in range(a.repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
rate = {k: len(texts) / statistics.median(v) for k, v in times.items()}
for k, r in rate.items():
    print(f"{k}: {r:.1f} docs/s ({r / rate['int8, every layer']:.2f}x int8 every layer)")

"""Speed of the int8 recipe unfused-l0fp32 (first encoder layer and routers in fp32) against the same recipe
with every layer in int8, side by side in one run: both graphs quantised from the fp32 graph of export.py's folder,
timed on bench.py's SciFact documents through encode_texts (256 tokens, batch 32, 2 threads; bench.interleaved).

    python -m lab.scripts.int8_recipe_speed EXPORT [--repeats 5]    # EXPORT: export.py's folder (--onnx)
"""

import argparse
import json
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

import sbmoe.onnx
from lab import bench
from sbmoe.config import RetrieverConfig
from sbmoe.data import doc_text
from sbmoe.encoding import encode_texts

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("export_dir")
p.add_argument("--repeats", type=int, default=5)
a = p.parse_args()
src = Path(a.export_dir)
config = RetrieverConfig(**json.loads((src / sbmoe.onnx.ONNX_INFO).read_text())["config"])
tok = AutoTokenizer.from_pretrained(src)
corpus, _, _ = bench.load_data(argparse.Namespace(dataset="scifact", data_dir=None, docs=96, split="test"))
texts = [doc_text(d) for d in corpus.values()]
with tempfile.TemporaryDirectory() as tmp:
    paths = {"fp32": src / sbmoe.onnx.ONNX_FP32, "int8, every layer": Path(tmp) / "every.onnx",
             "int8, unfused-l0fp32": Path(tmp) / "chosen.onnx"}  # fmt: skip
    recipes = sbmoe.onnx.INT8_RECIPES
    sbmoe.onnx.quantize_int8(paths["fp32"], paths["int8, every layer"], config, recipes["unfused"])
    _, kept = sbmoe.onnx.quantize_int8(paths["fp32"], paths["int8, unfused-l0fp32"], config, recipes["unfused-l0fp32"])
    print(f"unfused-l0fp32 keeps {len(kept)} MatMuls in fp32 ({', '.join(recipes['unfused-l0fp32']['fp32'])})")
    graphs = {k: sbmoe.onnx.OnnxRetriever(path, config, threads=2) for k, path in paths.items()}
    fns = {k: (lambda g=g: encode_texts(g, tok, texts, 256, 32, show_progress=False)) for k, g in graphs.items()}
    ref = fns["fp32"]()
    for k, f in fns.items():
        print(f"{k}: min cosine to fp32 {float((f() * ref).sum(1).min()):.4f}")
    seconds = bench.interleaved(fns, a.repeats)
rate = {k: len(texts) / s for k, s in seconds.items()}
for k, r in rate.items():
    print(f"{k}: {r:.1f} docs/s ({r / rate['int8, every layer']:.2f}x int8 every layer)")

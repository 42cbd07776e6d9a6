"""Int8 recipes side by side on this CPU: speed (interleaved repeats in one process) and agreement with fp32.

    python -m lab.scripts.int8_recipes MODEL [--docs 64] [--calibration_docs 256] [--repeats 5] [--output JSON]

MODEL: a checkpoint folder train.py wrote, or a backbone (evaluated as the zero-shot mean-pooled encoder).
The fp32 graph is export.py's; every recipe is built from it with `sbmoe.onnx.quantize_int8` and read back with
`sbmoe.onnx.graph_recipe`. Documents: the first --docs SciFact corpus documents by sampling seed 0 (judged first, as
bench.py), cut at --doc_max_length; static and smoothed recipes calibrate on --calibration_docs other corpus
documents.
Each row: docs/s (median of the repeats), its ratio to the first int8 row, and the cosine of each int8 embedding
to the ONNX fp32 one (min and mean). Writes JSON and a log beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

import sbmoe.onnx
from lab import export
from lab.bench import interleaved, sample_corpus
from model import BiEncoder
from sbmoe.data import DataError, doc_text, load_beir, resolve_data_dir
from sbmoe.encoding import encode_texts
from sbmoe.files import atomic_write_text
from utils import entry_point, fail

F, T = False, True
RECIPES = {  # name: (fusions, attention int8, scores int8, weights, activations, fp32 groups[, smoothing alpha])
    "plain per-channel, layer 0 + routers fp32 (before)": (F, F, F, "per-channel", "dynamic", ("first_layer", "routers")),
    "plain per-channel, all": (F, F, F, "per-channel", "dynamic", ("routers",)),
    "plain per-tensor, all": (F, F, F, "per-tensor", "dynamic", ("routers",)),
    "fused, attention fp32, per-channel, all": (T, F, F, "per-channel", "dynamic", ("routers",)),
    "fused, attention int8, per-channel, all": (T, T, F, "per-channel", "dynamic", ("routers",)),
    "fused, attention int8, per-channel, layer 0 + routers fp32": (T, T, F, "per-channel", "dynamic", ("first_layer", "routers")),
    "fused, attention int8, per-tensor, all": (T, T, F, "per-tensor", "dynamic", ("routers",)),
    "fused, static per-channel, all": (T, F, F, "per-channel", "static", ("routers",)),
    "plain, static per-channel, all": (F, F, F, "per-channel", "static", ("routers",)),
    "plain per-channel, all, scores int8 (sentence-transformers' recipe)": (F, F, T, "per-channel", "dynamic", ()),
    "plain per-channel, layer 0 + routers fp32, smoothed 0.7": (F, F, F, "per-channel", "dynamic", ("first_layer", "routers"), 0.7),
    "plain per-channel, all, smoothed 0.7": (F, F, F, "per-channel", "dynamic", ("routers",), 0.7),
    "plain per-channel, all, smoothed 0.5": (F, F, F, "per-channel", "dynamic", ("routers",), 0.5),
}  # fmt: skip


def recipe(spec) -> dict:
    return dict(zip(sbmoe.onnx.RECIPE_KEYS, (*spec[:5], list(spec[5]), spec[6] if len(spec) > 6 else None)))


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(info.get("Flags", "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16") if f in flags]
    return f"{info.get('Model name', '?').strip()}, {info.get('CPU(s)', '?').strip()} CPUs, {' '.join(isa)}"


def load(source: str):
    path = Path(source)
    if (path / "config.json").is_file() and "moe_retriever" in (path / "config.json").read_text():
        return export.load_checkpoint(path), AutoTokenizer.from_pretrained(path), source
    return BiEncoder.from_backbone(source, pooling="mean").eval(), AutoTokenizer.from_pretrained(source), "zero-shot"


@entry_point
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--dataset", default="scifact")
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--calibration_docs", type=int, default=256)
    p.add_argument("--doc_max_length", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    try:
        corpus, _, qrels = load_beir(resolve_data_dir(args.dataset, None), "test")
        model, tok, name = load(args.model)
    except (DataError, OSError, ValueError) as exc:
        fail(f"{args.model}: {str(exc).splitlines()[0]}")
    docs = sample_corpus(corpus, qrels, args.docs)
    texts = [doc_text(d) for d in docs.values()]
    others = sorted(set(corpus) - set(docs))
    calib = [doc_text(corpus[d]) for d in random.Random(1).sample(others, args.calibration_docs)]
    L, B = args.doc_max_length, args.batch_size
    out = Path(args.output)
    log = [f"$ python -m lab.scripts.int8_recipes {' '.join(argv if argv is not None else sys.argv[1:])}",
           f"{name}; {len(texts)} {args.dataset} docs at <= {L} tokens, batch {B}, {args.repeats} interleaved repeats "
           f"(median), {torch.get_num_threads()} threads; static and smoothed recipes calibrated on {len(calib)} other corpus docs; "
           f"CPU: {cpu()}"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = tmp / "fp32.onnx"
        sbmoe.onnx.export_onnx(model, fp32)
        graphs = {"onnx fp32": fp32}
        fused = tmp / "fused.onnx"
        sbmoe.onnx.fuse_bert(fp32, fused, model.config)
        graphs["onnx fp32, fused"] = fused
        batches = sbmoe.onnx.calibration_batches(tok, calib, L)
        built = {}
        for r in args.recipes:
            path = tmp / f"r{len(graphs)}.onnx"
            start = time.perf_counter()
            applied, kept = sbmoe.onnx.quantize_int8(fp32, path, model.config, recipe(RECIPES[r]), batches)
            graphs[r] = path
            built[r] = {"recipe": applied, "read_back": sbmoe.onnx.graph_recipe(path), "fp32_nodes": len(kept),
                        "build_s": time.perf_counter() - start}  # fmt: skip
        encoders = {k: sbmoe.onnx.OnnxRetriever(v, model.config) for k, v in graphs.items()}
        fns = {k: (lambda e=e: encode_texts(e, tok, texts, L, B, show_progress=False)) for k, e in encoders.items()}
        ref = fns["onnx fp32"]()
        rows = {}
        for k, fn in fns.items():
            emb = fn()
            cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
            rows[k] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), **built.get(k, {})}
        t = interleaved(fns, args.repeats)
    first = next((k for k in rows if k in built), "onnx fp32")
    for k, row in rows.items():
        row["docs_per_s"] = len(texts) / t[k]
        row["ratio"] = t[first] / t[k]
    log += [f"| graph | docs/s | ratio to '{first}' | min cosine to fp32 | mean cosine |", "|---|---:|---:|---:|---:|"]
    log += [f"| {k} | {r['docs_per_s']:.1f} | {r['ratio']:.2f} | {r['min_cosine']:.5f} | {r['mean_cosine']:.5f} |"
            for k, r in rows.items()]  # fmt: skip
    print("\n".join(log))
    report = {"model": name, "cpu": cpu(), "docs": len(texts), "calibration_docs": len(calib), "max_length": L,
              "batch_size": B, "repeats": args.repeats, "rows": rows, "log": log}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=1))
    atomic_write_text(out.with_suffix(".log"), "\n".join(log) + "\n")
    return report


if __name__ == "__main__":
    main()

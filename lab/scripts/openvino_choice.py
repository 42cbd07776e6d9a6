"""OpenVINO against onnxruntime for the exported encoder: speed and agreement with fp32 on real SciFact documents.

    python -m lab.scripts.openvino_choice --ov_python OV/bin/python   # repository root, BEIR_DATA_DIR=../shared/data/beir

OV is a venv of its own with `pip install openvino nncf onnxruntime numpy` (kept out of the project's: this only
measures whether OpenVINO would serve better on this CPU). This interpreter exports the project's ONNX graphs of the
zero-shot MiniLM (fp32 and the chosen int8, as `bench.py encode` does) and tokenizes bench.py's 96 documents at 256
tokens in batches of 32; the OV interpreter then measures, with interleaved repeats: onnxruntime fp32 and int8,
OpenVINO on the fp32 graph, on the onnxruntime int8 graph, and on NNCF's int8 models (static post-training
quantisation of weights and activations, calibrated on 64 other corpus documents and 64 train queries; and int8
weight compression), each against onnxruntime fp32 by cosine.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path("results/export/openvino_choice.json")


def prepare(work: Path) -> None:
    import argparse as ap

    from transformers import AutoTokenizer

    from lab import bench, export
    from model import BiEncoder
    from sbmoe.data import doc_text, load_beir, resolve_data_dir

    m = "../shared/models/all-minilm-l6-v2"
    model = BiEncoder.from_backbone(m, pooling="mean").eval()
    export.export_graphs(model, work, int8=True)
    tok = AutoTokenizer.from_pretrained(m)
    corpus, _, _ = bench.load_data(ap.Namespace(dataset="scifact", data_dir=None, docs=96, split="test"))
    full, queries, _ = load_beir(resolve_data_dir("scifact", None), "train")
    others = [doc_text(d) for k, d in full.items() if k not in corpus][:64]
    arrays = {}

    def add(prefix: str, texts: list[str]) -> None:
        for i in range(0, len(texts), 32):
            b = tok(texts[i : i + 32], truncation=True, max_length=256, padding=True, return_tensors="np")
            arrays[f"{prefix}_ids_{i // 32}"] = b["input_ids"].astype(np.int64)
            arrays[f"{prefix}_mask_{i // 32}"] = b["attention_mask"].astype(np.int64)

    add("bench", [doc_text(d) for d in corpus.values()])
    add("cal", others + list(queries.values())[:64])
    np.savez(work / "batches.npz", **arrays)


def batches(d, prefix: str) -> list:
    n = sum(1 for k in d.files if k.startswith(f"{prefix}_ids_"))
    return [(d[f"{prefix}_ids_{i}"], d[f"{prefix}_mask_{i}"]) for i in range(n)]


def measure(work: Path, out: Path = OUT) -> None:
    import nncf
    import onnxruntime as ort
    import openvino as ov

    d = np.load(work / "batches.npz")
    bench, cal = batches(d, "bench"), batches(d, "cal")
    fp32, int8 = work / "onnx/encoder.onnx", work / "onnx/encoder_int8.onnx"

    def ort_run(path):
        o = ort.SessionOptions()
        o.intra_op_num_threads, o.inter_op_num_threads = 2, 1
        s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
        names = [i.name for i in s.get_inputs()]
        return lambda ids, mask: s.run(None, {names[0]: ids, names[1]: mask})[0]

    core = ov.Core()

    def ov_run(model):
        c = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY"})
        r = c.create_infer_request()
        return lambda ids, mask: r.infer([ids, mask])[0].copy()

    samples = [[ids[j : j + 4], mask[j : j + 4]] for ids, mask in cal for j in range(0, len(ids), 4)]
    static = nncf.quantize(core.read_model(fp32), nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                           subset_size=len(samples))  # fmt: skip
    weights = nncf.compress_weights(core.read_model(fp32))
    fns = {"onnxruntime fp32": ort_run(fp32), "onnxruntime int8 (chosen)": ort_run(int8),
           "OpenVINO fp32": ov_run(str(fp32)), "OpenVINO on the onnxruntime int8 graph": ov_run(str(int8)),
           "OpenVINO NNCF static int8 (transformer preset)": ov_run(static),
           "OpenVINO NNCF int8 weight compression": ov_run(weights)}  # fmt: skip
    n = sum(len(ids) for ids, _ in bench)
    ref = np.concatenate([fns["onnxruntime fp32"](*b) for b in bench])
    rows = {}
    for k, f in fns.items():
        emb = np.concatenate([f(*b) for b in bench])
        cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
        rows[k] = {"min_cos": float(cos.min()), "mean_cos": float(cos.mean()), "t": []}
    for _ in range(3):  # interleaved repeats, after the warm-up pass above
        for k, f in fns.items():
            t = time.perf_counter()
            for b in bench:
                f(*b)
            rows[k]["t"].append(time.perf_counter() - t)
    versions = {"openvino": ov.__version__, "nncf": nncf.__version__, "onnxruntime": ort.__version__}
    print(f"{n} SciFact docs, 256 tokens, batch 32, 2 threads; cosine to onnxruntime fp32; {json.dumps(versions)}")
    print("| backend | docs/s | ratio to onnxruntime int8 | min cosine | mean cosine |\n|---|---:|---:|---:|---:|")
    for r in rows.values():
        r["docs_per_s"] = n / float(np.median(r["t"]))
    best = rows["onnxruntime int8 (chosen)"]["docs_per_s"]
    for k, r in rows.items():
        print(f"| {k} | {r['docs_per_s']:.1f} | {r['docs_per_s'] / best:.2f} | {r['min_cos']:.5f} | {r['mean_cos']:.5f} |")
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"versions": versions, "docs": n, "rows": rows}, indent=1))
    tmp.replace(out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ov_python", help="interpreter of a venv with openvino, nncf, onnxruntime and numpy")
    p.add_argument("--output", default=str(OUT), help="the JSON to write (default: %(default)s)")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # the second phase, in the OV interpreter
    a = p.parse_args()
    if a.measure:
        measure(Path(a.measure), Path(a.output))
    else:
        if not a.ov_python:
            sys.exit("error: --ov_python is required (a venv with openvino, nncf, onnxruntime and numpy)")
        work = Path(tempfile.mkdtemp(prefix="openvino-choice-"))
        prepare(work)
        sys.exit(subprocess.call([a.ov_python, __file__, "--measure", str(work), "--output", a.output]))

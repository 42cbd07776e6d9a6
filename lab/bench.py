"""Efficiency benchmarks: every ratio is measured side by side in one run (interleaved repeats, median).

    python bench.py encode   --model_name_or_path M    # ours (torch, ONNX fp32/int8) vs sentence-transformers
        [--anchor_python PY]                           # + its onnx and onnx-int8, in a venv with sentence-transformers[onnx]
    python bench.py models   --model_name_or_path M    # baseline / SB-MoE / MoE: params, FLOPs, speed, memory
    python bench.py latency  --model_name_or_path M    # baseline / SB-MoE / MoE: batch-1 query p50, batched docs/s
        [--backend onnx|onnx-int8]                     # through export.py's graphs (onnxruntime) instead of PyTorch
    python bench.py pipeline --model_name_or_path M    # our eval pipeline vs BEIR's DenseRetrievalExactSearch
    python bench.py params   --model_name_or_path M    # parameter counts, also on the TinyBERT-6L shape
    python bench.py scale --sizes 10000 100000 1000000 # eval.py's chunked retrieval: time and peak memory by size

Each writes a JSON next to its printed table (--output). On a subset of the corpus (--docs N) the
numbers are per-document rates, so they compare across subset sizes.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

import sbmoe.onnx
from eval import load_retriever
from model import VARIANTS, BiEncoder
from sbmoe.config import backbone_flops
from sbmoe.data import DataError, doc_text, load_beir, resolve_data_dir
from sbmoe.device import autocast
from sbmoe.encoding import encode_texts
from sbmoe.files import atomic_write_text, temp_prefix
from sbmoe.hub import check_source
from sbmoe.metrics import evaluate_run
from sbmoe.retrieval import retrieve
from sbmoe.search import search
from utils import check_output, entry_point, fail


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {gpu}"


def interleaved(fns: dict, repeats: int, raw: dict | None = None) -> dict[str, float]:
    """Median seconds of each callable, run in turns so drifting machine load hits all alike.
    Every repeat's seconds go into `raw` when given."""
    times = {} if raw is None else raw
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times.setdefault(name, []).append(time.perf_counter() - start)
    return {k: statistics.median(times[k]) for k in fns}


def sample_corpus(corpus: dict, qrels: dict, n: int | None, seed: int = 0) -> dict:
    """All judged documents plus random others, n in total (None: the whole corpus)."""
    if not n or n >= len(corpus):
        return corpus
    judged = {d for docs in qrels.values() for d in docs}
    others = [d for d in corpus if d not in judged]
    keep = sorted(judged)[:n] + random.Random(seed).sample(others, max(0, n - len(judged)))
    return {d: corpus[d] for d in keep}


def load_data(args):
    corpus, queries, qrels = load_beir(resolve_data_dir(args.dataset, args.data_dir), args.split)
    return sample_corpus(corpus, qrels, args.docs), queries, qrels


def build(kind: str, backbone: str) -> BiEncoder:
    """A variant with its default settings, every zero-initialised weight made live (no path is free) and the
    token-level MoE's upcycled experts made distinct, as after training (an ONNX export would otherwise store
    identical copies once)."""
    settings = {k: v for k, v in VARIANTS[kind].defaults().items() if k != "moe_learning_rate" and v is not None}
    model = VARIANTS[kind].from_backbone(backbone, **settings).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if getattr(module, "zero_init", False):
                torch.nn.init.normal_(module.weight, std=0.02)
            elif ".experts." in name and isinstance(module, torch.nn.Linear):
                module.weight.add_(torch.randn(module.weight.shape, generator=gen) * 1e-3)
    return model


DTYPES = ("fp32", "bf16", "fp16")


def dtypes(args) -> list[str]:
    out = ["fp32", "bf16"] if args.dtypes == "cpu" else args.dtypes.split(",")
    if torch.cuda.is_available() and "fp16" not in out:
        out.append("fp16")
    return out


def flags(dtype: str) -> dict:
    return {"bf16": dtype == "bf16", "fp16": dtype == "fp16"}


# --------------------------------------------------------------------------------------------
# encode: eval.py's encoder vs sentence-transformers


def cpu_peaks() -> dict:
    """Rough peak rates of this CPU from its clock and ISA, per core and cycle: 2 FMA pipes of 8 fp32 lanes (AVX2)
    or 16 (AVX-512 at full width; CPUs that split 512-bit ops in two reach half); int8 multiply-adds: 32 on AVX2
    without VNNI (vpmaddubsw + vpmaddwd share those pipes), 64 with AVX-VNNI, 128 with AVX512-VNNI (vpdpbusd on two
    pipes of 64 lanes). One multiply-add counts as 2 operations."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    mhz = next((float(x.split(":")[1]) for x in info.splitlines() if x.startswith("cpu MHz")), float("nan"))
    flags = set(next((x.split(":", 1)[1].split() for x in info.splitlines() if x.startswith("flags")), []))
    cores = torch.get_num_threads()
    avx512, vnni = "avx512f" in flags, "avx512_vnni" in flags or "avx_vnni" in flags
    int8_macs = 128 if "avx512_vnni" in flags else 64 if "avx_vnni" in flags else 32
    fp32_fmas = 32 if avx512 else 16
    return {"mhz": mhz, "cores": cores, "vnni": vnni, "avx512": avx512, "avx512_vnni": "avx512_vnni" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_int8" in flags,
            "fp32_gflops": cores * mhz * 1e-3 * 2 * fp32_fmas, "int8_gops": cores * mhz * 1e-3 * 2 * int8_macs}  # fmt: skip


def int8_quality(path: Path, recipe: str, kind: str) -> dict | None:
    """The recipe's retrieval deltas to fp32 (lab/scripts/int8_quality.py's quality.json): for a baseline row the
    zero-shot backbone (SciFact, NFCorpus) and the fine-tuned baseline, for an SB-MoE row the fine-tuned SB-MoE;
    the largest |delta| of NDCG@10 and of Recall@100 over those (all and unseen-document queries), and where."""
    try:
        measured = json.loads(path.read_text()).get(recipe, {})
    except (OSError, ValueError, AttributeError):
        return None
    targets = ["zeroshot", "zeroshot-nfcorpus", "baseline"] if kind == "baseline" else [kind]
    out = {}
    for metric in ("NDCG@10", "Recall@100"):
        cells = [(t, k, v["delta"]) for t in targets if t in measured
                 for k, v in measured[t]["deltas"].items() if k.startswith(metric)]  # fmt: skip
        if cells:
            t, k, d = max(cells, key=lambda c: abs(c[2]))
            out[metric] = {"delta": d, "where": f"{t} {k.split()[-1]}", "of": sorted({c[0] for c in cells})}
    return out or None


ANCHOR_ONNX = ("sentence-transformers onnx", "sentence-transformers onnx-int8")
ANCHOR_HOWTO = ("measure it with --anchor_python PYTHON, the interpreter of a venv with sentence-transformers[onnx] "
                "(see USAGE.md)")  # fmt: skip


class AnchorError(RuntimeError):
    """The anchor worker did not start or did not answer."""


class AnchorWorker:
    """sentence-transformers' ONNX and ONNX-int8 backends in a process of another interpreter (bench_anchor.py),
    which stays alive and encodes all the documents once per request, so its repeats interleave with ours."""

    def __init__(self, python: str, model: str, texts: list[str], max_length: int, batch_size: int, device: str,
                 workdir: Path, quantization: str = "auto"):  # fmt: skip
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "texts.json").write_text(json.dumps(texts))
        local = Path(model)
        spec = {"model": str(local.resolve()) if local.is_dir() else model, "texts": str(workdir / "texts.json"),
                "max_length": max_length, "batch_size": batch_size, "device": device, "workdir": str(workdir),
                "quantization": quantization}  # fmt: skip
        (workdir / "spec.json").write_text(json.dumps(spec))
        self.log_path = workdir / "anchor.log"
        self.seconds: dict[str, list[float]] = {}
        self.info: dict | None = None
        with open(self.log_path, "w") as log:
            try:
                self.proc = subprocess.Popen([python, str(Path(__file__).with_name("bench_anchor.py")),
                                              str(workdir / "spec.json")], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
            except OSError as exc:
                raise AnchorError(f"cannot start ({exc.strerror or exc})") from None

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            tail = [x for x in self.log_path.read_text(errors="replace").splitlines() if x.strip()][-1:]
            raise AnchorError(f"the worker exited (code {self.proc.wait()}){': ' + tail[0][:200] if tail else ''}")
        answer = json.loads(line)
        if "error" in answer:
            raise AnchorError(answer["error"])
        return answer

    def ready(self) -> dict:
        """Waits for the worker to have loaded (and quantised) both models; what it reports about itself."""
        if self.info is None:
            self.info = self._answer()
        return self.info

    def encode(self, name: str, save: bool = False) -> np.ndarray | None:
        """One pass over all the documents in the worker; its embeddings when `save` (else nothing comes back)."""
        self.proc.stdin.write(json.dumps({"op": "encode", "name": name, "save": save}) + "\n")
        self.proc.stdin.flush()
        answer = self._answer()
        self.seconds.setdefault(name, []).append(answer["seconds"])
        return np.load(answer["embeddings"]) if save else None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def bench_encode(args) -> dict:
    """One interleaved run, same documents, lengths and batch: the project's encoder (torch fp32, bf16 if asked,
    its ONNX graph fp32 and int8) against sentence-transformers' torch backend and, with --anchor_python, its ONNX
    and ONNX-int8 backends: they need optimum, which this project never installs, so they run in a worker process
    of that interpreter (bench_anchor.py) whose repeats alternate with ours. Without it they are tried in-process
    and, where they do not load, noted as not measured."""
    import tempfile

    from sentence_transformers import SentenceTransformer

    corpus, _, _ = load_data(args)
    texts = [doc_text(d) for d in corpus.values()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = load_retriever("zeroshot", args.model_name_or_path, "mean").to(device).eval()
    tok = AutoTokenizer.from_pretrained(args.model_name_or_path)
    lengths = [len(x) for x in tok(texts, truncation=True, max_length=args.doc_max_length)["input_ids"]]
    L = args.doc_max_length
    fns = {"ours torch fp32": lambda: encode_texts(ours, tok, texts, L, args.batch_size, show_progress=False)}
    if "bf16" in dtypes(args):  # on CPUs without bf16 units (no AVX512-BF16 or AMX) ~6x slower than fp32
        fns["ours torch bf16"] = lambda: encode_texts(ours, tok, texts, L, args.batch_size, show_progress=False,
                                                      bf16=True)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    anchor = None
    if args.anchor_python:  # started first: it loads, exports and quantises while we export our graphs
        anchor = AnchorWorker(args.anchor_python, args.model_name_or_path, texts, L, args.batch_size, device,
                              tmp / "anchor")  # fmt: skip
    kinds = [k for k in (args.kinds or ["baseline", "sbmoe"]) if k != "baseline"]
    recipes = {"baseline": args.int8_recipes or [sbmoe.onnx.INT8_BY_KIND["baseline"]]}
    for kind in kinds:  # each MoE variant with its own chosen recipe and the baseline's (compared with it)
        recipes[kind] = list(dict.fromkeys([sbmoe.onnx.INT8_BY_KIND[kind], sbmoe.onnx.INT8_BY_KIND["baseline"]]))
    models = {"baseline": ours, **{k: build(k, args.model_name_or_path) for k in kinds}}
    graphs, row_recipe = {}, {}
    for kind, model in models.items():
        folder = tmp / kind
        sbmoe.onnx.export_graphs(model, folder, int8=False)
        prefix = "ours" if kind == "baseline" else f"ours {kind}"
        if kind == "baseline":
            graphs["ours onnx fp32"] = sbmoe.onnx.OnnxRetriever(folder / sbmoe.onnx.ONNX_FP32, model.config)
        try:  # the fp32 graph in OpenVINO, at the precision its CPU plugin picks here (bf16 where the CPU has it)
            ov = sbmoe.onnx.OpenVinoRetriever(folder / sbmoe.onnx.ONNX_FP32, model.config)
            graphs[f"{prefix} openvino ({ov.precision.split()[-1]})"] = ov
            row_recipe[f"{prefix} openvino ({ov.precision.split()[-1]})"] = ("openvino", kind)
        except ImportError:
            pass
        for name in recipes[kind]:
            path = folder / f"int8-{name}.onnx"
            recipe = sbmoe.onnx.INT8_RECIPES[name]  # one that calibrates does so on the timed documents
            batches = sbmoe.onnx.calibration_batches(tok, texts, L) \
                if sbmoe.onnx.needs_calibration(recipe) else None  # fmt: skip
            applied, _ = sbmoe.onnx.quantize_int8(folder / sbmoe.onnx.ONNX_FP32, path, model.config, recipe, batches)
            if sbmoe.onnx.graph_recipe(path) != applied:
                raise RuntimeError(f"the int8 graph of recipe {name} is not that recipe")
            graphs[f"{prefix} onnx int8 {name}"] = sbmoe.onnx.OnnxRetriever(path, model.config)
            row_recipe[f"{prefix} onnx int8 {name}"] = (name, kind)
    for name, g in graphs.items():
        fns[name] = lambda g=g: encode_texts(g, tok, texts, L, args.batch_size, show_progress=False)
    notes = []
    st_models = {"sentence-transformers torch": SentenceTransformer(args.model_name_or_path, device=device)}
    int8_file = next((f"onnx/{f.name}" for f in sorted(Path(args.model_name_or_path).glob("onnx/model_*int8_*.onnx"))),
                     "onnx/model_quint8_avx2.onnx")  # fmt: skip
    for backend, kw in (("onnx", {}), ("onnx-int8", {"file_name": int8_file})):
        if anchor is not None:  # the worker measures these
            break
        try:
            st_models[f"sentence-transformers {backend}"] = SentenceTransformer(
                args.model_name_or_path, device=device, backend="onnx", model_kwargs=kw)  # fmt: skip
        except Exception as exc:  # optimum missing, or no such file in the model folder
            notes.append(f"sentence-transformers {backend}: not measured here ({str(exc).splitlines()[0][:160]}); "
                         f"{ANCHOR_HOWTO}")  # fmt: skip
    for name, st in st_models.items():
        st.max_seq_length = L

        def run_st(st=st):
            with torch.inference_mode():
                return st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, show_progress_bar=False)

        fns[name] = run_st
    embedders = {}  # where a timed call returns no embeddings: the call that does
    if anchor is not None:
        try:
            info = anchor.ready()
        except AnchorError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for name in ANCHOR_ONNX:
            fns[name] = lambda name=name: anchor.encode(name)
            embedders[name] = lambda name=name: anchor.encode(name, save=True)
        notes.append(f"sentence-transformers onnx, onnx-int8: worker process {args.anchor_python} (sentence-transformers "
                     f"{info['versions']['sentence-transformers']}, transformers {info['versions']['transformers']}, "
                     f"optimum {info['versions']['optimum']}, onnxruntime {info['versions']['onnxruntime']}); int8: "
                     f"export_dynamic_quantized_onnx_model '{info['quantization']}' ({info['int8_file']})")  # fmt: skip
    ref = fns["ours torch fp32"]()
    agree = {}
    refs = {k: encode_texts(m, tok, texts, L, args.batch_size, show_progress=False) for k, m in models.items()}
    for name, fn in fns.items():  # warm-up, and agreement with the project's fp32 encoder (of the same variant)
        emb = np.asarray(embedders.get(name, fn)(), dtype=np.float32)
        r = refs[row_recipe[name][1]] if name in row_recipe else ref
        agree[name] = {"max_abs_diff": float(np.abs(emb - r).max()), "min_cosine": float((emb * r).sum(1).min())}
    t = interleaved(fns, args.repeats)
    peaks = cpu_peaks()
    flops = float(np.mean([backbone_flops(ours.config, n) for n in lengths]))
    rows = {k: {"docs_per_s": len(texts) / v, **agree[k]} for k, v in t.items()}
    anchors = [k for k in rows if k.startswith("sentence-transformers")]
    best = max(anchors, key=lambda k: rows[k]["docs_per_s"])
    for name, row in rows.items():
        row["ratio_to_fastest_anchor"] = row["docs_per_s"] / rows[best]["docs_per_s"]
        row["gops"] = row["docs_per_s"] * flops / 1e9
        row["fraction_of_int8_peak"] = row["gops"] / peaks["int8_gops"]
        if name in row_recipe:
            row["recipe"], row["kind"] = row_recipe[name]  # an int8 recipe, or openvino (its quality rows too)
            row["recipe_settings"] = sbmoe.onnx.INT8_RECIPES.get(row["recipe"])
            row["quality"] = int8_quality(Path(args.quality), *row_recipe[name])
    report = {"machine": machine(), "docs": len(texts), "max_length": L, "mean_tokens": float(np.mean(lengths)),
              "batch_size": args.batch_size, "gflop_per_doc": flops / 1e9, "peaks": peaks, "fastest_anchor": best,
              "rows": rows, "notes": notes}  # fmt: skip
    if anchor is not None:  # the worker's own encode times beside the round trips the table uses
        report["anchor"] = {"python": args.anchor_python, **{k: v for k, v in anchor.info.items() if k != "ready"},
                            "worker_median_s": {k: statistics.median(v[1:]) for k, v in anchor.seconds.items()},
                            "round_trip_median_s": {k: t[k] for k in ANCHOR_ONNX}}  # fmt: skip
        anchor.close()
    isa = ("AMX" if peaks["amx"] else "AVX-512 VNNI" + (" and BF16, no AMX" if peaks["avx512_bf16"] else ", no AMX")
           if peaks["avx512_vnni"] else "AVX-VNNI" if peaks["vnni"]
           else "AVX2 only, no VNNI (int8 dot products through vpmaddubsw/vpmaddwd)")  # fmt: skip
    report["cpu"] = sbmoe.onnx.cpu_description()
    lines = [f"{report['machine']}; {len(texts)} SciFact docs, max {L} tokens (mean {report['mean_tokens']:.0f}), batch "
             f"{args.batch_size}, {args.repeats} interleaved repeats (median); {flops / 1e9:.2f} GFLOP/doc",
             f"CPU: {report['cpu']}; {peaks['cores']} cores at {peaks['mhz']:.0f} MHz, {isa}; peak "
             f"~{peaks['fp32_gflops']:.0f} GFLOP/s fp32, ~{peaks['int8_gops']:.0f} GOP/s int8",
             "| encoder | docs/s | ratio to fastest anchor | GOP/s | fraction of int8 peak | max abs diff | min cosine "
             "| ΔNDCG@10 to fp32 (largest) | ΔRecall@100 (largest) |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]  # fmt: skip

    def delta(r, metric):
        q = (r.get("quality") or {}).get(metric)
        return f"{q['delta']:+.4f} ({q['where']})" if q else ("not measured" if "int8" in r.get("name", "") else "")

    for name, r in rows.items():
        r["name"] = name
        lines.append(f"| {name} | {r['docs_per_s']:.1f} | {r['ratio_to_fastest_anchor']:.2f} | {r['gops']:.1f} | "
                     f"{r['fraction_of_int8_peak']:.1%} | {r['max_abs_diff']:.1e} | {r['min_cosine']:.4f} | "
                     f"{delta(r, 'NDCG@10')} | {delta(r, 'Recall@100')} |")  # fmt: skip
        del r["name"]
    if row_recipe:
        lines.append(f"int8 rows: ours onnx int8 <recipe> (sbmoe.onnx.INT8_RECIPES; chosen per variant: "
                     f"{', '.join(f'{k} {v}' for k, v in sbmoe.onnx.INT8_BY_KIND.items())}, on {sbmoe.onnx.INT8_CHOSEN_ON}); "
                     f"openvino rows: the fp32 graph in OpenVINO at its CPU plugin's precision; "
                     f"SB-MoE rows: bench.build('sbmoe'), live experts; deltas: {args.quality}, largest |delta| over "
                     "the zero-shot backbone (SciFact, NFCorpus) and the fine-tuned baseline for baseline rows, the "
                     "fine-tuned SB-MoE for SB-MoE rows, all and unseen-document queries")  # fmt: skip
    lines += [f"fastest anchor: {best}", *notes]
    print("\n".join(lines), flush=True)
    report["table"] = lines
    shutil.rmtree(tmp, ignore_errors=True)
    return report


# --------------------------------------------------------------------------------------------
# models: baseline vs SB-MoE vs MoE


def flops_per_doc(model: BiEncoder, T: float) -> float:
    """Analytic forward FLOPs (2 per multiply-add) for one document of T tokens; embeddings ignored."""
    return backbone_flops(model.config, T) + model.extra_flops(T)


def rss_child(kind: str, backbone: str, n: int, length: int, dtype: str) -> float:
    """Peak RSS (MiB) of a fresh process that builds `kind` and encodes one batch: no cross-talk."""
    code = (
        "import resource, sys, torch; sys.path.insert(0, '.');"
        "from bench import build; from utils import autocast;"
        f"m = build('{kind}', '{backbone}'); x = torch.randint(1000, 2000, ({n}, {length}));"
        f"ctx = autocast('cpu', bf16={dtype == 'bf16'});"
        "ctx.__enter__(); torch.inference_mode().__enter__(); m.encode(x, torch.ones_like(x));"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_models(args) -> dict:
    corpus, queries, qrels = load_data(args)
    tok = AutoTokenizer.from_pretrained(args.model_name_or_path)
    texts = [doc_text(d) for d in corpus.values()]
    lengths = [len(x) for x in tok(texts, truncation=True, max_length=args.doc_max_length)["input_ids"]]
    mean_len = float(np.mean(lengths))
    torch.manual_seed(0)
    models = {k: build(k, args.model_name_or_path) for k in VARIANTS}
    report = {"machine": machine(), "docs": len(texts), "mean_doc_tokens": mean_len, "models": {}}
    for kind, m in models.items():
        report["models"][kind] = {**m.count_parameters(), "gflops_per_doc": flops_per_doc(m, mean_len) / 1e9}
    qids = list(queries)
    q_texts = [queries[q] for q in qids]
    for dtype in dtypes(args):
        f = flags(dtype)
        enc = {k: (lambda m=m, f=f: encode_texts(m, tok, texts, args.doc_max_length, args.batch_size,
                                                 show_progress=False, **f)) for k, m in models.items()}  # fmt: skip
        for fn in enc.values():
            fn()  # warm-up
        t = interleaved(enc, args.repeats)
        lat = {k: [] for k in models}
        one = [tok(q, return_tensors="pt") for q in q_texts[: args.latency_queries]]
        for batch in one:  # interleaved per query
            for kind, m in models.items():
                start = time.perf_counter()
                with torch.inference_mode(), autocast("cpu", **f):
                    m.encode(batch["input_ids"], batch["attention_mask"])
                lat[kind].append(time.perf_counter() - start)
        step = interleaved({k: (lambda m=m, f=f: train_step(m, tok, texts, q_texts, f)) for k, m in models.items()},
                           max(2, args.repeats))  # fmt: skip
        for kind in models:
            row = report["models"][kind].setdefault(dtype, {})
            row["docs_per_s"] = len(texts) / t[kind]
            row["latency_p50_ms"] = float(np.percentile(lat[kind], 50) * 1e3)
            row["latency_p95_ms"] = float(np.percentile(lat[kind], 95) * 1e3)
            row["train_step_s"] = step[kind]
            row["peak_rss_mib"] = rss_child(kind, args.model_name_or_path, 32, 256, dtype)
    d_emb = encode_texts(models["baseline"], tok, texts, args.doc_max_length, args.batch_size, show_progress=False)
    q_emb = encode_texts(models["baseline"], tok, q_texts, 64, args.batch_size, show_progress=False)
    t = interleaved({"faiss": lambda: search(q_emb, d_emb, list(corpus), qids, 100)}, 5)
    report["faiss_search_s_all_test_queries"] = t["faiss"]
    base = report["models"]["baseline"]
    for row in report["models"].values():
        for dtype in dtypes(args):
            row[dtype]["throughput_ratio"] = row[dtype]["docs_per_s"] / base[dtype]["docs_per_s"]
        row["flop_ratio"] = row["gflops_per_doc"] / base["gflops_per_doc"]
    print_models(report, dtypes(args))
    return report


def train_step(model: BiEncoder, tok, texts: list[str], q_texts: list[str], f: dict, B: int = 8) -> None:
    """One forward and backward of a (B queries, 2B documents) batch at 128 document tokens."""
    model.train()
    q = tok(q_texts[:B], padding=True, truncation=True, max_length=64, return_tensors="pt")
    d = tok(texts[: 2 * B], padding=True, truncation=True, max_length=128, return_tensors="pt")
    with autocast("cpu", **f):
        out = model(q["input_ids"], q["attention_mask"], d["input_ids"], d["attention_mask"])
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()


def print_models(report: dict, dts: list[str]) -> None:
    print(f"\n{report['machine']}; {report['docs']} docs, mean {report['mean_doc_tokens']:.0f} tokens")
    print("| model | params | active/token | GFLOPs/doc | FLOP ratio |"
          + "".join(f" {d} docs/s | {d} ratio | {d} p50 ms | {d} p95 ms | {d} step s | {d} RSS MiB |" for d in dts))  # fmt: skip
    print("|---" * (5 + 6 * len(dts)) + "|")
    for kind, r in report["models"].items():
        cells = [f"{r['total'] / 1e6:.2f}M", f"{r['active_per_token'] / 1e6:.2f}M", f"{r['gflops_per_doc']:.2f}",
                 f"{r['flop_ratio']:.3f}"]  # fmt: skip
        for d in dts:
            x = r[d]
            cells += [f"{x['docs_per_s']:.1f}", f"{x['throughput_ratio']:.3f}", f"{x['latency_p50_ms']:.1f}",
                      f"{x['latency_p95_ms']:.1f}", f"{x['train_step_s']:.2f}", f"{x['peak_rss_mib']:.0f}"]  # fmt: skip
        print(f"| {kind} | " + " | ".join(cells) + " |")
    print(f"FAISS exact search, all test queries: {report['faiss_search_s_all_test_queries'] * 1e3:.1f} ms")


# --------------------------------------------------------------------------------------------
# latency: one short query at a time (batch 1), and batched documents, per variant


def bench_latency(args) -> dict:
    """p50/p95 of one query at a time through `model.encode` (what a search service pays per request),
    interleaved per query over the variants, plus batched document throughput (batch --batch_size)."""
    corpus, queries, _ = load_data(args)
    tok = AutoTokenizer.from_pretrained(args.model_name_or_path)
    torch.manual_seed(0)
    models = {k: build(k, args.model_name_or_path) for k in (args.kinds or list(VARIANTS))}
    q_texts = list(queries.values())[: args.latency_queries]
    one = [tok(q, truncation=True, max_length=64, return_tensors="pt") for q in q_texts]
    diff = {}
    if args.backend != "torch":  # the graphs eval.py --backend runs (the token-level MoE's computes every expert)
        graphs = {k: sbmoe.onnx.onnx_retriever(m, args.backend) for k, m in models.items()}
        with torch.inference_mode():
            for k, m in models.items():
                ids, mask = one[0]["input_ids"], one[0]["attention_mask"]
                diff[k] = float((graphs[k].encode(ids, mask) - m.encode(ids, mask)).abs().max())
        models = graphs
    texts = [doc_text(d) for d in corpus.values()]
    report = {"machine": machine(), "backend": args.backend, "queries": len(one), "docs": len(texts),
              "doc_max_length": args.doc_max_length,
              "batch_size": args.batch_size, "query_tokens_mean": float(np.mean([b["input_ids"].shape[1] for b in one])),
              "models": {}}  # fmt: skip
    lat: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for batch in one[:10]:  # warm-up
            for m in models.values():
                m.encode(batch["input_ids"], batch["attention_mask"])
        for batch in one:
            for kind, m in models.items():
                start = time.perf_counter()
                m.encode(batch["input_ids"], batch["attention_mask"])
                lat[kind].append(time.perf_counter() - start)
    enc = {k: (lambda m=m: encode_texts(m, tok, texts, args.doc_max_length, args.batch_size, show_progress=False))
           for k, m in models.items()}  # fmt: skip
    t = interleaved(enc, args.repeats)
    base = "baseline" if "baseline" in models else next(iter(models))
    for kind in models:
        report["models"][kind] = {
            "latency_p50_ms": float(np.percentile(lat[kind], 50) * 1e3),
            "latency_p95_ms": float(np.percentile(lat[kind], 95) * 1e3),
            "docs_per_s": len(texts) / t[kind],
            "encoder": type(models[kind]).__name__,  # what was timed
            **({"max_abs_diff_vs_torch": diff[kind]} if diff else {}),
        }
    b = report["models"][base]
    lines = [f"{report['machine']}; {len(one)} queries at batch 1 (mean {report['query_tokens_mean']:.1f} tokens), "
             f"{len(texts)} docs at batch {args.batch_size} (max {args.doc_max_length} tokens), "
             + ("fp32" if args.backend == "torch" else f"ONNX ({args.backend}, onnxruntime)"),
             "| model | p50 ms | p95 ms | p50 ratio | docs/s | throughput ratio |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for kind, r in report["models"].items():
        r["p50_ratio"] = r["latency_p50_ms"] / b["latency_p50_ms"]
        r["throughput_ratio"] = r["docs_per_s"] / b["docs_per_s"]
        lines.append(f"| {kind} | {r['latency_p50_ms']:.2f} | {r['latency_p95_ms']:.2f} | {r['p50_ratio']:.3f} | "
                     f"{r['docs_per_s']:.1f} | {r['throughput_ratio']:.3f} |")  # fmt: skip
    print("\n".join(lines), flush=True)
    report["table"] = lines
    return report


# --------------------------------------------------------------------------------------------
# pipeline: ours vs BEIR + sentence-transformers


def bench_pipeline(args) -> dict:
    from beir.retrieval import models as beir_models
    from beir.retrieval.evaluation import EvaluateRetrieval
    from beir.retrieval.search.dense import DenseRetrievalExactSearch

    corpus, queries, qrels = load_data(args)
    ours = load_retriever("zeroshot", args.model_name_or_path, "mean").eval()
    tok = AutoTokenizer.from_pretrained(args.model_name_or_path)
    sbert = beir_models.SentenceBERT(args.model_name_or_path)
    sbert.q_model.max_seq_length = sbert.doc_model.max_seq_length = args.doc_max_length
    beir_corpus = {d: {"title": v["title"], "text": v["text"]} for d, v in corpus.items()}
    report = {"machine": machine(), "docs": len(corpus), "queries": len(queries), "rows": {}}
    for dtype in dtypes(args):
        f = flags(dtype)
        results: dict = {}

        def run_ours(f=f, results=results):
            run = retrieve(ours, tok, corpus, queries, top_k=100, doc_max_length=args.doc_max_length,
                           batch_size=args.batch_size, show_progress=False, **f)  # fmt: skip
            results["ours"] = evaluate_run(qrels, run)

        def run_beir(f=f, results=results):
            dres = DenseRetrievalExactSearch(sbert, batch_size=args.batch_size, show_progress_bar=False)
            with autocast("cpu", **f), torch.inference_mode():
                run = EvaluateRetrieval(dres, score_function="cos_sim", k_values=[1, 5, 10, 100]).retrieve(
                    beir_corpus, queries
                )
            ndcg, *_ = EvaluateRetrieval.evaluate(qrels, run, [10])
            results["beir"] = ndcg["NDCG@10"]

        run_ours(), run_beir()  # warm-up: first-call costs (thread pools, kernels) hit neither side
        raw: dict = {}
        t = interleaved({"ours": run_ours, "beir+sentence-transformers": run_beir}, args.repeats, raw)
        pairs = [b / a for a, b in zip(raw["ours"], raw["beir+sentence-transformers"])]
        row = {"seconds": t, "ratio": t["beir+sentence-transformers"] / t["ours"], "raw_seconds": raw,
               "ratio_per_repeat": pairs}  # fmt: skip
        row["ndcg@10"] = {"ours": results["ours"]["NDCG@10"], "beir": results["beir"]}
        report["rows"][dtype] = row
        per_repeat = ", ".join(f"{r:.2f}" for r in pairs)
        print(f"{dtype}: ours {t['ours']:.1f}s, BEIR+ST {t['beir+sentence-transformers']:.1f}s, speed-up "
              f"{row['ratio']:.2f}x (per repeat {per_repeat}); NDCG@10 ours {row['ndcg@10']['ours']:.4f} "
              f"BEIR {row['ndcg@10']['beir']:.4f}")  # fmt: skip
    return report


# --------------------------------------------------------------------------------------------
# params: total and active parameters on the given backbone and on the paper's TinyBERT-6L shape


TINYBERT_6L = dict(hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072,
                   vocab_size=30522)  # huawei-noah/TinyBERT_General_6L_768D  # fmt: skip


def bench_params(args) -> dict:
    import tempfile

    from transformers import BertConfig, BertModel

    report = {"backbones": {}}
    with tempfile.TemporaryDirectory() as tmp:
        BertModel(BertConfig(**TINYBERT_6L), add_pooling_layer=False).save_pretrained(tmp)  # random init
        for name, path in ((args.model_name_or_path, args.model_name_or_path), ("TinyBERT-6L shape", tmp)):
            rows = {k: build(k, path).count_parameters() for k in VARIANTS}
            report["backbones"][name] = rows
            print(f"\n{name}")
            for kind, c in rows.items():
                print(f"  {kind:9s} total {c['total']:>12,}  active/token {c['active_per_token']:>12,}")
    return report


# --------------------------------------------------------------------------------------------
# scale: eval.py's chunked, memory-bounded retrieval on synthetic corpora of growing size


SCALE_VOCAB = 2000  # made-up words w0 .. w1999, each one token of the synthetic backbone
QUERY_WORDS = 8
_SCALE_WORDS = [f"w{i}" for i in range(SCALE_VOCAB)]


def write_scale_backbone(folder: Path, hidden: int, layers: int, seed: int = 0) -> Path:
    """A randomly initialised BERT (hidden `hidden`, `layers` layers, 4 heads) over the made-up words."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(SCALE_VOCAB))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    if len(tokenizer) != len(vocab):  # transformers 5 ignores vocab_file here (every word would be [UNK])
        tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"))
    assert len(tokenizer) == len(vocab), "the synthetic vocabulary did not load"
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=512)  # fmt: skip
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


def synthetic_texts(start: int, stop: int, words: int, seed: int = 0) -> list[str]:
    """Documents start..stop-1 of a synthetic corpus: `words` random made-up words each (a pure function
    of the range's start, so any process can make any chunk)."""
    rows = np.random.default_rng([seed, start]).integers(0, SCALE_VOCAB, size=(stop - start, words))
    return [" ".join(map(_SCALE_WORDS.__getitem__, row.tolist())) for row in rows]  # no list of every row's ints


def scale_bound(chunk: int, n_queries: int, hidden: int, top_k: int, tokens: int, text_bytes: float, batch: int) -> dict:
    """What one eval process holds beyond its libraries and model, in MiB, whatever the corpus size."""
    from sbmoe.search import QUERY_BLOCK, TIE_MARGIN

    qb, mib = min(QUERY_BLOCK, n_queries), 2**20
    parts = {
        "chunk_embeddings_x2": 2 * chunk * hidden * 4,  # ours and the index's copy
        "query_embeddings": n_queries * hidden * 4,
        "topk_buffers": n_queries * top_k * 12,  # float32 score + int64 index
        "search_temporaries": qb * (top_k + TIE_MARGIN) * 12 + qb * 2 * top_k * (12 + 8) + qb * top_k * 12,
        "chunk_texts": chunk * text_bytes,
        "chunk_tokens": chunk * (tokens * 4 + 3 * 8),  # flat int32 ids, offsets, lengths, order
        # one batch through the encoder (rough): a few (B, T, H) and (B, T, 2H) tensors, the attention scores
        "batch_activations": batch * tokens * hidden * 4 * 12 + batch * 4 * tokens * tokens * 4 * 2,
    }
    out = {k: v / mib for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scale_one(backbone: str, size: int, n_queries: int, words: int, chunk: int, batch_size: int, top_k: int) -> dict:
    """One corpus size, measured in this (fresh) process: run by `bench.py scale` in a subprocess."""
    from sbmoe.retrieval import RetrieveOptions, retrieve_topk
    from sbmoe.search import make_searcher

    tok = AutoTokenizer.from_pretrained(backbone)
    model = load_retriever("zeroshot", backbone, "mean").eval()
    queries = {f"q{j}": t for j, t in enumerate(synthetic_texts(0, n_queries, QUERY_WORDS, seed=1))}
    warm = encode_texts(model, tok, synthetic_texts(0, 256, words, seed=2), words + 2, batch_size, show_progress=False)
    make_searcher(warm, "faiss", verbose=False).topk(warm[:8], 10)  # libraries loaded before the baseline
    del warm
    baseline, baseline_now = peak_mib(), rss_mib()
    generate = [0.0]

    def texts(a: int, b: int) -> list[str]:
        start = time.perf_counter()
        out = synthetic_texts(a, b, words)
        generate[0] += time.perf_counter() - start
        return out

    timings: dict[str, float] = {}
    start = time.perf_counter()
    options = RetrieveOptions(query_max_length=QUERY_WORDS + 2, doc_max_length=words + 2, batch_size=batch_size,
                              show_progress=False, encode_chunk=chunk, backend="faiss")
    tops = retrieve_topk(model, tok, size, texts, {"q": queries}, top_k, options, timings=timings)
    total = time.perf_counter() - start
    scores, index = tops["q"].result()
    assert scores.shape == (n_queries, min(top_k, size)) and (np.diff(scores, axis=1) <= 0).all()
    assert index.min() >= 0 and index.max() < size
    encode = timings["encode"] - generate[0]
    return {"docs": size, "chunk": min(chunk, size), "generate_s": generate[0], "encode_s": encode,
            "index_s": timings["index"], "search_s": timings["search"], "total_s": total,
            "docs_per_s_encode": size / encode, "baseline_peak_rss_mib": baseline, "baseline_rss_mib": baseline_now,
            "peak_rss_mib": peak_mib()}  # fmt: skip


def write_scale_beir(folder: Path, size: int, n_queries: int, words: int, step: int = 50_000) -> Path:
    """The synthetic corpus as a BEIR folder (ids d0.., empty titles), one judged document per query."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for a in range(0, size, step):
            texts = synthetic_texts(a, min(a + step, size), words)
            fh.write("".join(json.dumps({"_id": f"d{a + i}", "title": "", "text": t}) + "\n" for i, t in enumerate(texts)))
    queries = synthetic_texts(0, n_queries, QUERY_WORDS, seed=1)
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{j}", "text": t}) + "\n" for j, t in enumerate(queries)))
    (folder / "qrels").mkdir(exist_ok=True)
    rng = random.Random(0)
    rows = "".join(f"q{j}\td{rng.randrange(size)}\t1\n" for j in range(n_queries))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows)
    return folder


def scale_eval_cli(backbone: str, folder: Path, chunk: int, batch_size: int, out: Path) -> dict:
    """eval.py's command line on a synthetic BEIR folder, in a fresh process: wall time and peak RSS."""
    argv = ["--model", "zeroshot", "--model_name_or_path", backbone, "--pooling", "mean", "--data_dir", str(folder),
            "--doc_max_length", "64", "--query_max_length", str(QUERY_WORDS + 2), "--batch_size", str(batch_size),
            "--encode_chunk", str(chunk), "--output_dir", str(out)]  # fmt: skip
    code = (
        "import json, sys, time; sys.path.insert(0, '.'); import bench, encode, eval, search, transformers;"
        f"m = eval.BiEncoder.from_backbone({backbone!r}, pooling='mean').eval(); tok = transformers.AutoTokenizer.from_pretrained("
        f"{backbone!r}); w = encode.encode_texts(m, tok, bench.synthetic_texts(0, 256, 30, 2), 32, show_progress=False);"
        "search.make_searcher(w, 'faiss', verbose=False).topk(w[:8], 10); del m, w; base, now = bench.peak_mib(), "
        "bench.rss_mib();"
        f"t = time.perf_counter(); eval.main({argv!r}); print('SCALE ' + json.dumps({{'baseline_peak_rss_mib': base, "
        "'baseline_rss_mib': now, "
        "'peak_rss_mib': bench.peak_mib(), 'wall_s': time.perf_counter() - t}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"eval.py failed on {folder}: {proc.stderr[-2000:]}")
    lines = proc.stdout.splitlines()
    row = json.loads(next(line for line in lines if line.startswith("SCALE "))[6:])
    row["eval_line"] = next(line for line in lines if line.startswith("zeroshot: "))
    return row


def bench_scale(args) -> dict:
    import tempfile

    log: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        log.append(line)

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    backbone = str(write_scale_backbone(tmp / "backbone", args.hidden, args.layers))
    tok = AutoTokenizer.from_pretrained(backbone)
    sample = synthetic_texts(0, 1000, args.doc_words)
    tokens = max(len(x) for x in tok(sample)["input_ids"])
    text_bytes = float(np.mean([sys.getsizeof(t) for t in sample])) + 8
    report = {
        "machine": machine(), "model": f"random BERT, hidden {args.hidden}, {args.layers} layers, 4 heads, "
        f"{SCALE_VOCAB}-word vocabulary, mean pooling", "doc_tokens": tokens, "doc_words": args.doc_words,
        "queries": args.queries, "query_tokens": QUERY_WORDS + 2, "top_k": args.top_k, "encode_chunk": args.encode_chunk,
        "batch_size": args.batch_size, "search": "faiss IndexFlatIP (CPU), exact", "rows": [], "eval_cli": [],
    }  # fmt: skip
    say(f"{report['machine']}; {report['model']}; documents {args.doc_words} words = {tokens} tokens; "
        f"{args.queries} queries of {QUERY_WORDS + 2} tokens; top-{args.top_k}; chunks of {args.encode_chunk}")  # fmt: skip
    say("| docs | chunk | encode s | index s | search s | total s | docs/s | baseline RSS MiB | peak RSS MiB | peak - baseline | bound MiB |")  # fmt: skip
    say("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        code = (
            "import json, sys; sys.path.insert(0, '.'); import bench;"
            f"print('SCALE ' + json.dumps(bench.scale_one({backbone!r}, {size}, {args.queries}, {args.doc_words}, "
            f"{args.encode_chunk}, {args.batch_size}, {args.top_k})))"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"scale {size}: {proc.stderr[-2000:]}")
        row = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("SCALE "))[6:])
        row["bound_mib"] = scale_bound(row["chunk"], args.queries, args.hidden, args.top_k, tokens, text_bytes, args.batch_size)
        report["rows"].append(row)
        grown = row["peak_rss_mib"] - row["baseline_rss_mib"]
        say(f"| {size:,} | {row['chunk']:,} | {row['encode_s']:.1f} | {row['index_s']:.2f} | {row['search_s']:.1f} | "
            f"{row['total_s']:.1f} | {row['docs_per_s_encode']:,.0f} | {row['baseline_rss_mib']:.0f} | "
            f"{row['peak_rss_mib']:.0f} | {grown:.0f} | {row['bound_mib']['total']:.0f} |")  # fmt: skip
    bound = scale_bound(min(args.encode_chunk, max(args.sizes)), args.queries, args.hidden, args.top_k, tokens, text_bytes,
                        args.batch_size)  # fmt: skip
    say("\nbound per process, beyond libraries and model (MiB, any corpus size): "
        + ", ".join(f"{k} {v:.1f}" for k, v in bound.items()))  # fmt: skip
    say("  = 2 x chunk x hidden x 4 B (embeddings, ours and the index's copy) + queries x hidden x 4 B + queries x k x 12 B "
        "(top-k scores and indices) + one query block's search and merge temporaries + the chunk's texts and "
        "token ids (4 B a token) + one batch's activations (rough)")  # fmt: skip
    for size in args.eval_cli_sizes:
        folder = write_scale_beir(tmp / f"beir-{size}", size, args.queries, args.doc_words)
        row = scale_eval_cli(backbone, folder, args.eval_cli_chunk, args.batch_size, tmp / f"out-{size}")
        row.update(docs=size, chunk=args.eval_cli_chunk)
        row["bound_mib"] = scale_bound(min(args.eval_cli_chunk, size), args.queries, args.hidden, args.top_k, tokens,
                                       text_bytes + 60, args.batch_size)  # + the record's id and title # fmt: skip
        # beyond the chunk: the packed ids (utf-8 + an 8-byte end each) and, while the qrels are checked, a hash
        # and an order (16 B) per id; rank 0's results (a dict entry, id string and float per query and rank) and
        # the run file's text, bytes and gzip
        extra = {"corpus_ids": size * (len(f"d{size}") + 8), "id_lookup_while_loading": size * 16,
                 "results_and_run_file": args.queries * args.top_k * (150 + 3 * 45)}  # fmt: skip
        row["bound_mib"].update({k: v / 2**20 for k, v in extra.items()})
        row["bound_mib"]["total"] += sum(extra.values()) / 2**20
        report["eval_cli"].append(row)
        grown = row["peak_rss_mib"] - row["baseline_rss_mib"]
        say(f"\neval.py on the {size:,}-document synthetic BEIR folder, --encode_chunk {args.eval_cli_chunk}: "
            f"{row['wall_s']:.0f}s, peak RSS {row['peak_rss_mib']:.0f} MiB, baseline (libraries + model) "
            f"{row['baseline_rss_mib']:.0f} MiB, grown {grown:.0f} MiB against a bound of "
            f"{row['bound_mib']['total']:.0f} MiB (" + ", ".join(f"{k} {v:.1f}" for k, v in row["bound_mib"].items()
                                                              if k != "total") + ")")  # fmt: skip
        say(f"  {row['eval_line']}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.output or "results/bench/scale.json")
    atomic_write_text(out.with_suffix(".log"), "\n".join(log) + "\n")
    return report


@entry_point
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["encode", "models", "latency", "pipeline", "params", "scale"])
    p.add_argument("--model_name_or_path", default=None, help="the backbone (every benchmark but scale)")
    p.add_argument("--dataset", default="scifact")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--docs", type=int, default=None, help="corpus subset size (judged docs first); default all")
    p.add_argument("--doc_max_length", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--latency_queries", type=int, default=50)
    p.add_argument("--kinds", nargs="+", default=None, choices=list(VARIANTS),
                   help="latency: variants (default all); encode: the variants whose int8 graphs are timed beside the "
                        "baseline's (default baseline sbmoe)")  # fmt: skip
    p.add_argument("--int8_recipes", nargs="+", default=None, choices=list(sbmoe.onnx.INT8_RECIPES),
                   help="encode: the baseline's int8 recipes to time (default: its chosen one, sbmoe.onnx.INT8_BY_KIND); "
                        "the other variants are timed with their chosen recipe")
    p.add_argument("--quality", default="results/export/int8_quality/quality.json",
                   help="encode: lab/scripts/int8_quality.py's deltas to fp32, shown beside each int8 row")
    p.add_argument("--backend", default="torch", choices=sbmoe.onnx.BACKENDS,
                   help="latency: PyTorch, or the ONNX graphs export.py writes (fp32 or int8)")
    p.add_argument("--dtypes", default="cpu", help="'cpu' = fp32,bf16 (plus fp16 on a GPU), or a list")
    p.add_argument("--output", default=None, help="JSON report path (default results/bench/<what>.json)")
    p.add_argument("--anchor_python", default=None, metavar="PYTHON",
                   help="encode: the interpreter of a venv with sentence-transformers[onnx] (it brings optimum, kept out "
                        "of this one), which then measures sentence-transformers' onnx and onnx-int8 backends")  # fmt: skip
    scale = p.add_argument_group("scale")
    scale.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="synthetic corpus sizes")
    scale.add_argument("--queries", type=int, default=1000)
    scale.add_argument("--top_k", type=int, default=100)
    scale.add_argument("--encode_chunk", type=int, default=50_000)
    scale.add_argument("--doc_words", type=int, default=30, help="words per document (each one token, plus 2)")
    scale.add_argument("--hidden", type=int, default=32)
    scale.add_argument("--layers", type=int, default=2)
    scale.add_argument("--eval_cli_sizes", type=int, nargs="*", default=[], help="also run eval.py on these sizes")
    scale.add_argument("--eval_cli_chunk", type=int, default=20_000, help="eval.py's --encode_chunk there")
    args = p.parse_args(argv)
    if args.what != "scale" and not args.model_name_or_path:
        p.error(f"{args.what} needs --model_name_or_path")
    for flag in ("docs", "doc_max_length", "batch_size", "repeats", "latency_queries", "queries", "top_k",
                 "encode_chunk", "doc_words", "hidden", "layers"):  # fmt: skip
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    for flag in ("sizes", "eval_cli_sizes"):
        if any(n < 1 for n in getattr(args, flag)):
            p.error(f"--{flag} {' '.join(map(str, getattr(args, flag)))}: sizes must be at least 1")
    if args.dtypes != "cpu":
        unknown = [d for d in args.dtypes.split(",") if d not in DTYPES]
        if unknown:
            p.error(f"--dtypes {args.dtypes}: unknown {', '.join(unknown)} (expected 'cpu' or a list of {', '.join(DTYPES)})")
        if "fp16" in args.dtypes.split(",") and not torch.cuda.is_available():
            p.error("--dtypes fp16: fp16 autocast needs a GPU")
    if args.backend != "torch" and args.what != "latency":
        p.error(f"--backend {args.backend}: only for latency (encode measures every backend)")
    if args.anchor_python is not None:
        if args.what != "encode":
            p.error(f"--anchor_python: only for encode, not {args.what}")
        if not shutil.which(args.anchor_python):
            p.error(f"--anchor_python {args.anchor_python}: no such executable")
    out = Path(args.output or f"results/bench/{args.what}.json")
    try:  # before the benchmark runs: where it writes, and the backbone it measures
        check_output(out, "--output", [args.model_name_or_path, args.data_dir], file=True,
                     extra_name=len(temp_prefix(out)) - len(out.name) + 8)
        if args.model_name_or_path:
            check_source(args.model_name_or_path)
    except DataError as exc:
        fail(str(exc))
    except ValueError as exc:
        fail(f"--model_name_or_path {str(exc).splitlines()[0]}")
    bench = {"encode": bench_encode, "models": bench_models, "latency": bench_latency, "pipeline": bench_pipeline,
             "params": bench_params, "scale": bench_scale}  # fmt: skip
    try:
        report = bench[args.what](args)
    except DataError as exc:
        fail(str(exc))
    except AnchorError as exc:
        fail(f"--anchor_python {args.anchor_python}: {exc}")
    except (OSError, ValueError) as exc:  # a backbone folder or hub name that does not load (or is not there)
        fail(f"--model_name_or_path {args.model_name_or_path}: cannot load ({str(exc).splitlines()[0]})")
    report["command"] = "python bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report["peak_rss_mib_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    atomic_write_text(out, json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

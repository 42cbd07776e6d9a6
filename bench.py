"""Efficiency benchmarks: every ratio is measured side by side in one run (interleaved repeats, median).

    python bench.py encode   --model_name_or_path M    # eval.py's encoder vs sentence-transformers' encode
    python bench.py models   --model_name_or_path M    # baseline / SB-MoE / MoE: params, FLOPs, speed, memory
    python bench.py pipeline --model_name_or_path M    # our eval pipeline vs BEIR's DenseRetrievalExactSearch
    python bench.py params   --model_name_or_path M    # parameter counts, also on the TinyBERT-6L shape

Each writes a JSON next to its printed table (--output). On a subset of the corpus (--docs N) the
numbers are per-document rates, so they compare across subset sizes.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from eval import encode_texts, retrieve, search
from model import VARIANTS, BiEncoder, backbone_flops
from utils import DataError, atomic_write_text, autocast, doc_text, evaluate_run, fail, load_beir, resolve_data_dir


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
    """A variant with its default settings, every zero-initialised weight made live (no path is free)."""
    settings = {k: v for k, v in VARIANTS[kind].defaults().items() if k != "moe_learning_rate" and v is not None}
    model = VARIANTS[kind].from_backbone(backbone, **settings).eval()
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "zero_init", False):
                torch.nn.init.normal_(module.weight, std=0.02)
    return model


def dtypes(args) -> list[str]:
    out = ["fp32", "bf16"] if args.dtypes == "cpu" else args.dtypes.split(",")
    if torch.cuda.is_available() and "fp16" not in out:
        out.append("fp16")
    return out


def flags(dtype: str) -> dict:
    return {"bf16": dtype == "bf16", "fp16": dtype == "fp16"}


# --------------------------------------------------------------------------------------------
# encode: eval.py's encoder vs sentence-transformers


def bench_encode(args) -> dict:
    from sentence_transformers import SentenceTransformer

    corpus, _, _ = load_data(args)
    texts = [doc_text(d) for d in corpus.values()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = BiEncoder.from_backbone(args.model_name_or_path, pooling="mean").to(device).eval()
    tok = AutoTokenizer.from_pretrained(args.model_name_or_path)
    st = SentenceTransformer(args.model_name_or_path, device=device)
    st.max_seq_length = args.doc_max_length
    report = {"machine": machine(), "docs": len(texts), "max_length": args.doc_max_length, "rows": {}}
    for dtype in dtypes(args):
        f = flags(dtype)

        def run_ours(f=f):
            return encode_texts(ours, tok, texts, args.doc_max_length, args.batch_size, show_progress=False, **f)

        def run_st(f=f):
            with autocast(device, **f), torch.inference_mode():
                return st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, show_progress_bar=False)

        a, b = run_ours(), run_st()  # warm-up, and the two must agree
        agree = float(np.abs(a - b.astype(np.float32)).max())
        t = interleaved({"ours": run_ours, "sentence-transformers": run_st}, args.repeats)
        row = {k: len(texts) / v for k, v in t.items()}
        row["ratio"] = row["ours"] / row["sentence-transformers"]
        row["max_abs_diff"] = agree
        report["rows"][dtype] = row
        print(f"{dtype}: ours {row['ours']:.1f} docs/s, sentence-transformers {row['sentence-transformers']:.1f} "
              f"docs/s, ratio {row['ratio']:.3f} (max |diff| {agree:.1e})", flush=True)  # fmt: skip
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
# pipeline: ours vs BEIR + sentence-transformers


def bench_pipeline(args) -> dict:
    from beir.retrieval import models as beir_models
    from beir.retrieval.evaluation import EvaluateRetrieval
    from beir.retrieval.search.dense import DenseRetrievalExactSearch

    corpus, queries, qrels = load_data(args)
    ours = BiEncoder.from_backbone(args.model_name_or_path, pooling="mean").eval()
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["encode", "models", "pipeline", "params"])
    p.add_argument("--model_name_or_path", required=True)
    p.add_argument("--dataset", default="scifact")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--docs", type=int, default=None, help="corpus subset size (judged docs first); default all")
    p.add_argument("--doc_max_length", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--latency_queries", type=int, default=50)
    p.add_argument("--dtypes", default="cpu", help="'cpu' = fp32,bf16 (plus fp16 on a GPU), or a list")
    p.add_argument("--output", default=None, help="JSON report path (default results/bench/<what>.json)")
    args = p.parse_args(argv)
    bench = {"encode": bench_encode, "models": bench_models, "pipeline": bench_pipeline, "params": bench_params}
    try:
        report = bench[args.what](args)
    except DataError as exc:
        fail(str(exc))
    except OSError as exc:  # a backbone folder or hub name that does not load
        fail(f"--model_name_or_path {args.model_name_or_path}: cannot load ({str(exc).splitlines()[0]})")
    report["command"] = "python bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report["peak_rss_mib_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = Path(args.output or f"results/bench/{args.what}.json")
    atomic_write_text(out, json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

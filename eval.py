"""Evaluate retrievers on a BEIR split: encode, exact FAISS search, pytrec_eval metrics, run files.

    python eval.py --model sbmoe                          # checkpoint from checkpoints/sbmoe
    python eval.py --model baseline sbmoe moe             # one table, a row per model
    python eval.py --model zeroshot --model_name_or_path M --pooling mean
    python eval.py --model sbmoe --split test train --trec_depth train=10   # one corpus pass, two splits

Writes `<tag>.trec.gz` (the run), `<tag>.perquery.json` and `metrics.json` per split.

`retrieve` and `evaluate_model` are also what train.py calls for its dev evaluation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from analysis import run_path, write_per_query
from model import VARIANTS, BiEncoder, load_model
from utils import (
    MAX_CUTOFF,
    METRICS,
    TABLE_COLUMNS,
    DataError,
    atomic_write_text,
    autocast,
    doc_text,
    evaluate_run,
    fail,
    format_table,
    load_beir,
    mean_metrics,
    per_query_metrics,
    read_trec,
    resolve_data_dir,
    write_trec,
)

_INDEX_ANNOUNCED = False


@torch.inference_mode()
def encode_texts(
    model: BiEncoder,
    tokenizer,
    texts: list[str],
    max_length: int,
    batch_size: int = 128,
    bf16: bool = False,
    fp16: bool = False,
    desc: str = "encode",
    show_progress: bool = True,
) -> np.ndarray:
    """(N, H) float32 embeddings; batches sorted by length so padding stays small."""
    device = next(model.parameters()).device
    ids = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    order = np.argsort([-len(x) for x in ids], kind="stable")
    out = np.empty((len(texts), model.config.backbone_config["hidden_size"]), dtype=np.float32)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_progress, leave=False):
        rows = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
        with autocast(device, bf16=bf16, fp16=fp16):
            reps = model.encode(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        out[rows] = reps.float().cpu().numpy()
    model.train(was_training)
    return out


def build_index(dim: int, verbose: bool = True):
    """Exact inner product: on every GPU faiss sees (sharded), else CPU IndexFlatIP."""
    global _INDEX_ANNOUNCED
    import faiss

    index = faiss.IndexFlatIP(dim)
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n_gpus > 0:
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True
        index = faiss.index_cpu_to_all_gpus(index, co=options)
        choice = f"FAISS: exact inner product on {n_gpus} GPU(s), sharded"
    else:
        choice = "FAISS: exact inner product on CPU (IndexFlatIP)"
    if verbose and not _INDEX_ANNOUNCED:
        print(choice, flush=True)
        _INDEX_ANNOUNCED = True
    return index


def search(q_emb: np.ndarray, d_emb: np.ndarray, doc_ids: list[str], qids: list[str], top_k: int) -> dict:
    index = build_index(d_emb.shape[1])
    index.add(np.ascontiguousarray(d_emb, dtype=np.float32))
    scores, idx = index.search(np.ascontiguousarray(q_emb, dtype=np.float32), min(top_k, len(doc_ids)))
    return {
        qid: {doc_ids[j]: float(s) for j, s in zip(idx[r], scores[r]) if j >= 0} for r, qid in enumerate(qids)
    }


def retrieve(
    model: BiEncoder,
    tokenizer,
    corpus: dict,
    queries: dict,
    top_k: int = 100,
    query_max_length: int = 64,
    doc_max_length: int = 256,
    batch_size: int = 128,
    bf16: bool = False,
    fp16: bool = False,
    show_progress: bool = True,
) -> dict[str, dict[str, float]]:
    """results[qid][doc_id] = score, top-k by exact inner product."""
    kw = dict(batch_size=batch_size, bf16=bf16, fp16=fp16, show_progress=show_progress)
    d_emb = encode_texts(model, tokenizer, [doc_text(d) for d in corpus.values()], doc_max_length, desc="corpus", **kw)
    return search_queries(model, tokenizer, d_emb, list(corpus), queries, top_k, query_max_length, **kw)


def search_queries(model, tokenizer, d_emb, doc_ids, queries, top_k, query_max_length, **kw) -> dict:
    """Encode the queries and search an already encoded corpus (one corpus pass serves many splits)."""
    qids = list(queries)
    q_emb = encode_texts(model, tokenizer, [queries[q] for q in qids], query_max_length, desc="queries", **kw)
    return search(q_emb, d_emb, doc_ids, qids, top_k)


def evaluate_model(model, tokenizer, corpus, queries, qrels, **kwargs) -> dict[str, float]:
    """The one evaluation function: train.py's dev evaluation and eval.py both call it."""
    return evaluate_run(qrels, retrieve(model, tokenizer, corpus, queries, **kwargs))


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", required=True, choices=[*VARIANTS, "zeroshot"],
                   help="trained variants to evaluate, or zeroshot: a plain encoder without training")  # fmt: skip
    p.add_argument("--model_name_or_path", help="backbone for --model zeroshot (hub name or local folder)")
    p.add_argument("--pooling", default="auto", choices=["auto", "cls", "mean"], help="zeroshot pooling")
    p.add_argument("--checkpoint", nargs="+", help="checkpoint dir per model (default checkpoints/<model>)")
    p.add_argument("--dataset", default=None, help="BEIR dataset under $BEIR_DATA_DIR (default scifact)")
    p.add_argument("--data_dir", default=None, help="a BEIR folder (overrides --dataset)")
    p.add_argument("--split", nargs="+", default=["test"], help="one split, or several (corpus encoded once)")
    p.add_argument("--output_dir", default="results/eval")
    p.add_argument("--top_k", type=int, default=100, help="documents retrieved and scored per query")
    p.add_argument("--trec_depth", nargs="+", default=[], metavar="SPLIT=K",
                   help="write only the top K of SPLIT's run file (e.g. train=10); metrics use --top_k")  # fmt: skip
    p.add_argument("--query_max_length", type=int, default=64)
    p.add_argument("--doc_max_length", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--inference_mode", choices=["top1", "all"], help="SB-MoE routing at inference")
    p.add_argument("--ignore_identical_ids", action="store_true", help="drop docs whose id equals the query id")
    p.add_argument("--verify", action="store_true", help="re-score the written .trec with pytrec_eval and compare")
    p.add_argument("--tag", default=None, help="name of the row and the run file (default: the model name)")
    dtype = p.add_mutually_exclusive_group()
    dtype.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU or GPU)")
    dtype.add_argument("--fp16", action="store_true", help="fp16 autocast (GPU)")
    args = p.parse_args(argv)
    if args.checkpoint and len(args.checkpoint) != len(args.model):
        p.error("--checkpoint needs one folder per --model")
    if "zeroshot" in args.model and not args.model_name_or_path:
        p.error("--model zeroshot needs --model_name_or_path")
    if args.top_k < MAX_CUTOFF:
        p.error(f"--top_k must be at least {MAX_CUTOFF}, the deepest metric cutoff")
    try:
        args.trec_depth = {k: int(v) for k, v in (x.split("=") for x in args.trec_depth)}
    except ValueError:
        p.error(f"--trec_depth {' '.join(args.trec_depth)}: expected SPLIT=K entries")
    if args.dataset is None and args.data_dir is None:
        args.dataset = "scifact"
    return args


def load_for_eval(name: str, checkpoint: str | None, args) -> tuple[BiEncoder, object, str]:
    if name == "zeroshot":
        source = args.model_name_or_path
        try:
            model = BiEncoder.from_backbone(source, pooling=args.pooling)
        except OSError as exc:
            raise DataError(f"--model_name_or_path {source}: cannot load an encoder ({str(exc).splitlines()[0]})") from None
    else:
        source = checkpoint or f"checkpoints/{name}"
        if not (Path(source) / "config.json").is_file():
            raise DataError(f"{source}: no checkpoint (config.json missing); train it first or pass --checkpoint")
        try:
            model = load_model(source)
        except (OSError, ValueError) as exc:
            raise DataError(str(exc).splitlines()[0]) from None
    if args.inference_mode:
        model.config.inference_mode = args.inference_mode
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), AutoTokenizer.from_pretrained(source), source


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        data_dir = resolve_data_dir(args.dataset, args.data_dir)
        splits = {split: load_beir(data_dir, split) for split in args.split}
    except DataError as exc:
        fail(str(exc))
    corpus = next(iter(splits.values()))[0]
    dataset = args.dataset or str(data_dir)
    dtype = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    rows = {split: {} for split in splits}
    checkpoints, seconds = {}, {}
    for i, name in enumerate(args.model):
        try:
            model, tokenizer, source = load_for_eval(name, args.checkpoint[i] if args.checkpoint else None, args)
        except DataError as exc:
            fail(str(exc))
        tag = args.tag if args.tag and len(args.model) == 1 else name
        checkpoints[tag] = str(source)
        kw = dict(batch_size=args.batch_size, bf16=args.bf16, fp16=args.fp16)
        start = time.perf_counter()
        texts = [doc_text(d) for d in corpus.values()]
        d_emb = encode_texts(model, tokenizer, texts, args.doc_max_length, desc="corpus", **kw)
        for split, (_, queries, qrels) in splits.items():
            results = search_queries(
                model, tokenizer, d_emb, list(corpus), queries, args.top_k, args.query_max_length, **kw
            )
            per_query = per_query_metrics(qrels, results, ignore_identical_ids=args.ignore_identical_ids)
            rows[split][tag] = mean_metrics(per_query)
            out_dir = split_dir(args, split)
            depth = args.trec_depth.get(split, args.top_k)
            write_trec(run_path(out_dir, tag), results, tag, depth)
            if args.verify:
                worst = verify_trec(run_path(out_dir, tag), qrels, rows[split][tag], depth)
                print(f"{tag}/{split}: metrics match pytrec_eval on the run file (max |diff| {worst:.1e})")
            write_per_query(out_dir, tag, per_query)
        elapsed = seconds[tag] = time.perf_counter() - start
        print(f"{tag}: {len(corpus)} docs, splits {', '.join(splits)}, retrieval {elapsed:.1f}s", flush=True)
    summaries = {}
    for split, split_rows in rows.items():
        # retrieval_seconds: encoding the corpus and the queries of every split, search and metrics
        summary = {**split_rows, "split": split, "dataset": dataset, "checkpoints": checkpoints, "dtype": dtype}
        summary["retrieval_seconds"] = seconds
        atomic_write_text(split_dir(args, split) / "metrics.json", json.dumps(summary, indent=2))
        print(f"\n{dataset} / {split} ({len(splits[split][2])} judged queries, {dtype})")
        print(format_table(split_rows, TABLE_COLUMNS))
        summaries[split] = summary
    return summaries[args.split[0]] if len(summaries) == 1 else summaries


def verify_trec(path: Path, qrels: dict, metrics: dict[str, float], depth: int, tol: float = 1e-6) -> float:
    """Re-read the written run and score it again; fail if any metric the file is deep enough for differs."""
    again = mean_metrics(per_query_metrics(qrels, read_trec(path)))
    names = [m.name for m in METRICS if m.cutoff <= depth]
    worst = max(abs(again[m] - metrics[m]) for m in names)
    if worst > tol:
        fail(f"{path}: metrics differ from pytrec_eval on the run file by {worst:.2e}")
    return worst


def split_dir(args, split: str) -> Path:
    """--output_dir itself for one split; a subfolder per split when several are evaluated at once."""
    return Path(args.output_dir) if len(args.split) == 1 else Path(args.output_dir) / split


if __name__ == "__main__":
    main()

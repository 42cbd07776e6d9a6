"""Evaluate retrievers on a BEIR split: encode, exact search, pytrec_eval metrics, run files.

    python eval.py --model sbmoe                          # checkpoint from checkpoints/sbmoe
    python eval.py --model baseline sbmoe moe             # one table, a row per model
    python eval.py --model zeroshot --model_name_or_path M --pooling mean
    python eval.py --model sbmoe --split test train --trec_depth train=10   # one corpus pass, two splits
    torchrun --nproc_per_node N eval.py --model sbmoe ... # the corpus sharded over N processes
    python eval.py --model sbmoe --backend onnx-int8      # encode through an ONNX graph (onnxruntime, CPU)

`--backend onnx | onnx-int8` encodes through export.py's graph of the whole encoder (fp32, or int8
weights): from `--checkpoint DIR` when DIR is an export folder (`export.py CKPT DIR --onnx --int8`),
otherwise exported on the fly from the checkpoint (or the zero-shot backbone) into a temporary
folder for this run. Search and metrics are the same either way.

Writes `<tag>.trec.gz` (the run), `<tag>.perquery.json.gz` and `metrics.json` per split
(sbmoe.results.write_evaluation).

`--hybrid bm25` also writes `<tag>+bm25`: the model's run fused with BM25's (sbmoe.retrieval.Hybrid), the
model's weight chosen on dev (`--split dev` means the official dev split, else training's seeded slice of the
train queries, sbmoe.data.dev_qrels; its queries are searched in the same corpus pass) unless `--hybrid_weight`
fixes it.

The library does the work: encoding and the embedding cache in sbmoe/encoding.py, exact chunked search in
sbmoe/search.py, the retrieval loop over both in sbmoe/retrieval.py (`retrieve_topk`; its `evaluate_model` is
also train.py's dev evaluation). This file is the command line and `load_retriever`, the one way a model is
loaded for evaluation.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import sbmoe.onnx
from model import VARIANTS, BiEncoder, load_model
from sbmoe.data import (
    DEV_FRACTION,
    DEV_SEED,
    Corpus,
    DataError,
    dev_fraction_error,
    load_corpus,
    load_eval_data,
    resolve_data_dir,
)
from sbmoe.device import init_distributed
from sbmoe.encoding import (
    BATCH_SIZE,
    DOC_MAX_LENGTH,
    QUERY_MAX_LENGTH,
    REUSE_DIR,
    EmbeddingCache,
    cache_key,
    content_key,
    model_domain,
    routing_record,
)
from sbmoe.hub import checkpoint_digest, load_tokenizer
from sbmoe.metrics import MAX_CUTOFF, TABLE_COLUMNS, format_table
from sbmoe.results import trec_depths, verify_run, write_evaluation, write_metrics, write_routing
from sbmoe.retrieval import BM25, FUSIONS, Hybrid, RetrieveOptions, Runs, retrieve_topk
from sbmoe.search import ENCODE_CHUNK, to_results
from utils import check_output, entry_point, fail

# --------------------------------------------------------------------------------------------
# Command line

DEFAULT_LENGTHS = {"query_max_length": QUERY_MAX_LENGTH, "doc_max_length": DOC_MAX_LENGTH}


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
    p.add_argument("--query_max_length", type=int, default=None,
                   help=f"default: an export folder's, else {DEFAULT_LENGTHS['query_max_length']} (at most the "
                        "backbone's positions)")  # fmt: skip
    p.add_argument("--doc_max_length", type=int, default=None,
                   help=f"default: an export folder's, else {DEFAULT_LENGTHS['doc_max_length']} (at most the "
                        "backbone's positions)")  # fmt: skip
    p.add_argument("--batch_size", type=int, default=BATCH_SIZE)
    p.add_argument("--encode_chunk", type=int, default=ENCODE_CHUNK,
                   help="documents encoded and searched at a time (memory bound); the same value gives the same "
                        "run with any number of processes")  # fmt: skip
    p.add_argument("--embedding_cache", default=None, metavar="DIR",
                   help="keep the encoded corpus chunks here (.npy, memory-mapped) and reuse them (same model files, "
                        "corpus, --doc_max_length, dtype, --batch_size, device and --encode_chunk)")  # fmt: skip
    p.add_argument("--search", default="auto", choices=["auto", "faiss", "torch"],
                   help="exact search: faiss IndexFlatIP, or torch matmul + top-k (auto: torch only where torch "
                        "sees a GPU and faiss does not)")  # fmt: skip
    p.add_argument("--inference_mode", choices=["top1", "all"], help="SB-MoE routing at inference: top1, or all (every expert, at the gate's softmax weight; "
                        "at 1/E for random routing)")  # fmt: skip
    p.add_argument("--routing_docs", type=int, default=0, metavar="N",
                   help="MoE checkpoints: also record which expert each block chooses first (top-1 mode) for the "
                        "first split's queries and a seeded sample of N documents (all when fewer): "
                        "<output>/<tag>.routing.json, read by the experiment report's per-domain routing")  # fmt: skip
    p.add_argument("--ignore_identical_ids", action="store_true", help="drop docs whose id equals the query id")
    p.add_argument("--verify", action="store_true", help="re-score the written .trec with pytrec_eval and compare")
    p.add_argument("--tag", default=None, help="name of the row and the run file (default: the model name)")
    p.add_argument("--hybrid", choices=["bm25"], help="also fuse each model's run with BM25: row and files <tag>+bm25")
    p.add_argument("--hybrid_weight", type=float, metavar="W",
                   help="the model run's weight in the fusion (BM25's: 1 - W), instead of choosing it on dev")  # fmt: skip
    p.add_argument("--hybrid_fusion", default="interpolate", choices=FUSIONS,
                   help="interpolate: min-max normalised scores, weighted; rrf: reciprocal rank fusion (k = 60)")  # fmt: skip
    p.add_argument("--dev_seed", nargs="+", type=int, default=[DEV_SEED],
                   help="split dev without qrels/dev.tsv: training's seeded slice of the train queries (the union "
                        "of several seeds' slices for an untrained model); also what tunes --hybrid")  # fmt: skip
    p.add_argument("--dev_fraction", type=float, default=DEV_FRACTION, help="that slice's share (training's)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "onnx-int8", "openvino"],
                   help="encode with PyTorch, or through export.py's ONNX graph: fp32 or int8 in onnxruntime, or the fp32 "
                        "graph in OpenVINO (bf16 on a CPU with bf16 units, fp32 elsewhere; metrics.json says which)")
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
    for flag in ("encode_chunk", "batch_size", "query_max_length", "doc_max_length"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    try:
        args.trec_depth = trec_depths(args.trec_depth, args.split)
    except ValueError as exc:
        p.error(str(exc))
    if args.hybrid_weight is not None and not (args.hybrid and args.hybrid_fusion == "interpolate"
                                               and 0 <= args.hybrid_weight <= 1):  # fmt: skip
        p.error(f"--hybrid_weight {args.hybrid_weight}: needs --hybrid, interpolation and a weight in [0, 1]")
    if error := dev_fraction_error(args.dev_fraction):
        p.error(error)
    if args.backend != "torch" and (args.bf16 or args.fp16):
        p.error(f"--backend {args.backend}: --bf16/--fp16 apply to --backend torch only")
    if args.dataset is None and args.data_dir is None:
        args.dataset = "scifact"
    return args


def resolve_lengths(model: BiEncoder, args, exported: dict | None) -> tuple[dict[str, int], dict]:
    """The query and document lengths: the flag's, else an export's (what it was exported and checked with),
    else the default cut to the backbone's positions; a flag beyond the positions is a DataError. Returns them
    and, for an export, what the flags changed ({flag: {"export": .., "used": ..}})."""
    limit = model.config.backbone_config.get("max_position_embeddings")
    lengths, changed = {}, {}
    for flag, default in DEFAULT_LENGTHS.items():
        given, saved = getattr(args, flag, None), (exported or {}).get(flag)
        if given is not None and limit and given > limit:
            raise DataError(f"--{flag} {given}: the backbone has {limit} positions")
        lengths[flag] = given if given is not None else saved if saved is not None else min(default, limit or default)
        if given is not None and saved is not None and given != saved:
            changed[flag] = {"export": saved, "used": given}
    return lengths, changed


def load_retriever(kind: str | None, source: str, pooling: str = "auto") -> BiEncoder:
    """A PyTorch model to evaluate (as loaded: on the CPU, not yet in eval mode), or a one-line DataError: `kind`
    zeroshot is the backbone `source` (hub name or folder) untrained, any other the checkpoint folder `source` of
    that kind (None: of any kind)."""
    if kind == "zeroshot":
        try:
            return BiEncoder.from_backbone(source, pooling=pooling)
        except ValueError as exc:  # neither a local folder nor on the hub
            raise DataError(str(exc).splitlines()[0]) from None
        except OSError as exc:
            raise DataError(f"--model_name_or_path {source}: cannot load an encoder ({str(exc).splitlines()[0]})") from None
    if not (Path(source) / "config.json").is_file():
        raise DataError(f"{source}: no checkpoint (config.json missing); train it first or pass --checkpoint")
    try:
        model = load_model(source)
    except (OSError, ValueError) as exc:
        raise DataError(str(exc).splitlines()[0]) from None
    if kind is not None and model.config.kind != kind:  # the row is labelled with what was loaded, never with what was asked
        raise DataError(f"{source}: holds a {model.config.kind} checkpoint, not {kind} "
                        f"(evaluate it as --model {model.config.kind})")  # fmt: skip
    return model


def load_for_eval(name: str, checkpoint: str | None, args, corpus: Corpus) -> tuple[BiEncoder, object, str, dict]:
    """The model, its tokenizer, where it came from and what shapes its numbers (metrics.json's `settings`)."""
    backend = getattr(args, "backend", "torch")
    precision = {"onnx": "fp32", "onnx-int8": "int8 weights, fp32 activations"}.get(
        backend, "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32")  # fmt: skip
    if checkpoint and name != "zeroshot":

        if sbmoe.onnx.is_export(checkpoint):  # export.py's folder: its graphs (no PyTorch checkpoint in it)
            if backend == "torch":
                raise DataError(f"{checkpoint}: an export folder; evaluate it with --backend onnx or onnx-int8")
            model = sbmoe.onnx.load_onnx_retriever(checkpoint, backend)
            precision = getattr(model, "precision", precision)  # OpenVINO's choice on this CPU
            if model.config.kind != name:
                raise DataError(f"{checkpoint}: holds a {model.config.kind} export, not {name}")
            mode = model.config.inference_mode
            if args.inference_mode and args.inference_mode != mode and model.config.kind == "sbmoe":
                raise DataError(f"--inference_mode {args.inference_mode}: {checkpoint} is a graph traced with "
                                f"inference mode {mode}; evaluate the checkpoint itself for {args.inference_mode}")  # fmt: skip
            info = sbmoe.onnx.read_export_info(checkpoint)
            lengths, changed = resolve_lengths(model, args, info)
            try:
                tokenizer = load_tokenizer(checkpoint)
            except ValueError as exc:
                raise DataError(str(exc)) from None
            facts = {"backend": backend, "precision": precision, **lengths, "inference_mode": mode,
                     "checkpoint_sha1": info.get("checkpoint_sha1"), "export": str(checkpoint),
                     **({"changed_from_export": changed} if changed else {})}  # fmt: skip
            return model, tokenizer, checkpoint, facts
    source = args.model_name_or_path if name == "zeroshot" else checkpoint or f"checkpoints/{name}"
    model = load_retriever(name, source, args.pooling)
    if args.inference_mode:
        model.config.inference_mode = args.inference_mode
    try:
        tokenizer = load_tokenizer(source)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    lengths, _ = resolve_lengths(model, args, None)
    facts = {"backend": backend, "precision": precision, **lengths, "inference_mode": model.config.inference_mode,
             "checkpoint_sha1": None if name == "zeroshot" else checkpoint_digest(source)}  # fmt: skip
    if backend != "torch":

        try:
            calibration = None
            if backend == "onnx-int8" and sbmoe.onnx.needs_calibration(sbmoe.onnx.int8_recipe(model.config.kind)[1]):
                # a recipe that calibrates does so on the corpus being searched
                calibration = (f"{corpus.data_dir.name} corpus", sbmoe.onnx.calibration_texts([corpus]))
            graph = sbmoe.onnx.onnx_retriever(model.eval(), backend, tokenizer, calibration)
            facts["precision"] = getattr(graph, "precision", precision)  # OpenVINO's choice on this CPU
            return graph, tokenizer, source, facts
        except RuntimeError as exc:
            raise DataError(f"{source}: ONNX export failed ({str(exc).splitlines()[0]})") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer, source, facts


def tunes_hybrid(args) -> bool:
    return bool(args.hybrid) and args.hybrid_fusion == "interpolate" and args.hybrid_weight is None


def load_data(args, rank: int, world: int):
    """The folder, the corpus (ids, texts streamed), each split's queries and qrels, and where dev came from
    (sbmoe.data.load_eval_data); rank 0 downloads first. Dev is also read to tune --hybrid's weight."""
    if world > 1 and rank != 0:
        dist.barrier()  # rank 0 resolves (and downloads) the dataset first
    try:
        data_dir = resolve_data_dir(args.dataset, args.data_dir, download=rank == 0)
    finally:
        if world > 1 and rank == 0:
            dist.barrier()
    why = ("--split dev" if "dev" in args.split else
           f"--hybrid {args.hybrid} chooses --hybrid_weight on dev (give --hybrid_weight W to fix it instead)")  # fmt: skip
    dev = (args.dev_seed, args.dev_fraction, why) if "dev" in args.split or tunes_hybrid(args) else None
    return (data_dir, *load_eval_data(data_dir, args.split, dev))


@entry_point
def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, created = init_distributed()
    inputs = [args.data_dir or Path(os.environ.get("BEIR_DATA_DIR", "data")) / args.dataset, *(args.checkpoint or [])]
    try:
        for split in args.split:  # before any encoding: a folder that cannot be written is found now
            check_output(split_dir(args, split), "--output_dir", inputs)
        if args.embedding_cache:
            check_output(args.embedding_cache, "--embedding_cache", inputs)
        data_dir, corpus, splits, dev_source = load_data(args, rank, world)
    except DataError as exc:
        fail(str(exc))
    dataset = args.dataset or str(data_dir)
    dtype = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    rows = {split: {} for split in args.split}  # dev may be searched only to tune --hybrid: not written then
    checkpoints, settings, seconds, hybrid, bm25 = {}, {}, {}, {}, None

    def meta(split: str) -> dict:
        # retrieval_seconds: encoding the corpus and the queries of every split, search and metrics;
        # settings: per run, everything that shapes its numbers (lengths, precision, inference mode, checkpoint digest)
        out = {"split": split, "dataset": dataset, "checkpoints": checkpoints, "settings": settings, "dtype": dtype,
               "backend": args.backend}  # fmt: skip
        return {**out, "retrieval_seconds": seconds, **({"hybrid": hybrid} if hybrid else {})}

    def write(split: str, tag: str, results: dict) -> None:
        out_dir, qrels = split_dir(args, split), splits[split][1]
        depth = args.trec_depth.get(split, args.top_k)

        def verify(path: Path, metrics: dict) -> None:
            worst = verify_run(path, qrels, metrics, depth)
            print(f"{tag}/{split}: metrics match pytrec_eval on the run file (max |diff| {worst:.1e})")

        try:  # every file is written whole (temp file, then rename) or not at all
            rows[split][tag] = write_evaluation(out_dir, tag, results, qrels, depth, meta(split), rows=rows[split],
                                                ignore_identical_ids=args.ignore_identical_ids,
                                                verify=verify if args.verify else None)  # fmt: skip
        except OSError as exc:
            fail(f"{out_dir}: cannot write the results ({exc.strerror or exc})")
        except DataError as exc:  # --verify: the run file does not read back
            fail(str(exc))

    for i, name in enumerate(args.model):
        try:
            model, tokenizer, source, facts = load_for_eval(name, args.checkpoint[i] if args.checkpoint else None, args, corpus)
        except DataError as exc:
            fail(str(exc))
        tag = args.tag if args.tag and len(args.model) == 1 else name
        checkpoints[tag], settings[tag] = str(source), facts
        start = time.perf_counter()
        domain = model_domain(model, data_dir)
        cache = None
        if args.embedding_cache:
            key = cache_key(str(source), model, data_dir, len(corpus), facts["doc_max_length"],
                            dtype if args.backend == "torch" else args.backend, args.batch_size)  # fmt: skip
            cache = EmbeddingCache(args.embedding_cache, key)
        elif args.backend == "torch" and (Path(source) / REUSE_DIR).is_dir():  # the checkpoint's last dev pass
            key = content_key(model, data_dir, len(corpus), facts["doc_max_length"], dtype, args.batch_size,
                              args.encode_chunk, domain)  # fmt: skip
            cache = EmbeddingCache(Path(source) / REUSE_DIR, key, readonly=True)
        timings: dict[str, float] = {}
        tops = retrieve_topk(
            model, tokenizer, len(corpus), corpus.reader(), {split: q for split, (q, _) in splits.items()},
            args.top_k, RetrieveOptions(query_max_length=facts["query_max_length"], doc_max_length=facts["doc_max_length"],
                                        batch_size=args.batch_size, bf16=args.bf16, fp16=args.fp16,
                                        encode_chunk=args.encode_chunk, backend=args.search, domain=domain),
            rank=rank, world=world, cache=cache, timings=timings,
        )  # fmt: skip
        if rank != 0:
            continue
        runs = {split: to_results(tops[split], list(queries), corpus.ids) for split, (queries, _) in splits.items()}
        for split in args.split:
            write(split, tag, runs[split])
        elapsed = seconds[tag] = time.perf_counter() - start
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if k != "gather" or world > 1)
        cached = f", {cache.hits} cached chunk(s) read, {cache.misses} encoded" if cache else ""
        if cache and cache.readonly and cache.hits:
            cached += " (the checkpoint's dev-pass embeddings)"
        print(f"{tag}: {len(corpus)} docs, splits {', '.join(splits)}, retrieval {elapsed:.1f}s "
              f"({parts}{' on rank 0' if world > 1 else ''}{cached}; {world} process(es), chunks of "
              f"{args.encode_chunk})", flush=True)  # fmt: skip
        if args.routing_docs and model.moe_blocks():
            queries = splits[args.split[0]][0]
            lengths = (facts["query_max_length"], facts["doc_max_length"])  # the retrieval's, not the tokenizer's
            record_routing(model, tokenizer, args, data_dir, corpus, queries, domain, tag, lengths)
        if args.hybrid:
            bm25 = bm25 or BM25().search(load_corpus(data_dir), {q: t for qs, _ in splits.values() for q, t in qs.items()},
                                         args.top_k)  # one index for every split's queries
            fused, hybrid[f"{tag}+bm25"] = fuse_runs(args, tag, runs, bm25, splits, dev_source)
            how = hybrid[f"{tag}+bm25"]
            weight = f", {tag} weight {how['weight']:g} ({how['weight_from']})" if "weight" in how else ""
            print(f"{tag}+bm25: {how['fusion']}{weight}", flush=True)
            for split in args.split:
                write(split, f"{tag}+bm25", fused[split])
    if created:
        dist.destroy_process_group()
    if rank != 0:
        return {}
    summaries = {}
    for split, split_rows in rows.items():
        summary = {**split_rows, **meta(split)}
        write_metrics(split_dir(args, split), split_rows, meta(split))
        print(f"\n{dataset} / {split} ({len(splits[split][1])} judged queries, {dtype})")
        print(format_table(split_rows, TABLE_COLUMNS))
        summaries[split] = summary
    return summaries[args.split[0]] if len(summaries) == 1 else summaries


def record_routing(model: BiEncoder, tokenizer, args, data_dir: Path, corpus: Corpus, queries: dict,
                   domain: int | None, tag: str, lengths: tuple[int, int]) -> None:  # fmt: skip
    """`<tag>.routing.json`: first-choice expert counts per block on the queries and on a seeded sample of
    --routing_docs documents, at the retrieval's (query, document) lengths (sbmoe.results.routing_summary turns
    them into shares and mutual information)."""
    record = routing_record(model, tokenizer, data_dir, len(corpus), list(queries.values()), args.routing_docs,
                            lengths, domain, batch_size=args.batch_size,
                            bf16=args.bf16, fp16=args.fp16)  # fmt: skip
    write_routing(split_dir(args, args.split[0]), tag, record)


def fuse_runs(args, tag: str, dense: dict, bm25: dict, splits: dict, dev_source: str | None) -> tuple[dict, dict]:
    """The model's run fused with BM25's on every split asked for (sbmoe.retrieval.Hybrid over the runs already
    made), and how (metrics.json's `hybrid`): the model's weight fixed by --hybrid_weight or chosen on dev."""
    def hybrid(split: str, weight: float | None) -> Hybrid:
        return Hybrid(Runs(dense[split]), Runs(bm25), weight, args.hybrid_fusion)

    how = hybrid(args.split[0], args.hybrid_weight)
    if tunes_hybrid(args):
        how = hybrid("dev", None).fit(None, *splits["dev"], args.top_k)
    weight_from = f"dev: {dev_source}, {len(splits['dev'][1])} queries" if tunes_hybrid(args) else "--hybrid_weight"
    fused = {s: hybrid(s, how.weight).search(None, splits[s][0], args.top_k) for s in args.split}
    return fused, {"fuse": [tag, "bm25"], **how.info(weight_from)}


def split_dir(args, split: str) -> Path:
    """--output_dir itself for one split; a subfolder per split when several are evaluated at once."""
    return Path(args.output_dir) if len(args.split) == 1 else Path(args.output_dir) / split


if __name__ == "__main__":
    main()

"""One epoch of train.py with pair sampling (one example per (query, positive) pair, the old default) and
with query sampling (each training query once, one sampled positive): steps and wall time per epoch.

The data are synthetic, shaped like the big BEIR sets: graded relevance (0/1/2), ~40 judged documents per
training query, one query in 7 with no positive, and an official dev split (sbmoe.fixtures.write_graded_beir).
The encoder is the tests' tiny random BERT (sbmoe.fixtures.write_tiny_backbone), so the numbers measure steps, not
quality. Everything is written to a scratch folder; the logs name it $SCRATCH.

    bash scripts/measure_sampling.sh     # writes results/sampling/{run.log,sampling.json,train-*.log}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sbmoe.data import load_beir  # noqa: E402
from sbmoe.fixtures import write_graded_beir, write_tiny_backbone  # noqa: E402
from sbmoe.negatives import mine_bm25_negatives  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/sampling", help="where the JSON and training logs go")
    ap.add_argument("--shape", type=int, nargs=5, default=[3600, 2600, 260, 79, 32],
                    metavar=("DOCS", "TRAIN_QUERIES", "DEV_QUERIES", "JUDGED", "BATCH"),
                    help="corpus size, queries, judged documents per query cycle 2..JUDGED (mean ~40), batch")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--scratch", default=None, help="scratch folder (default: a new temporary one, removed after)")
    args = ap.parse_args()
    args.docs, args.train_queries, args.dev_queries, args.judged, args.batch = args.shape
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="sampling-"))
    try:
        run(args, out, scratch)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)


def run(args, out: Path, scratch: Path) -> None:
    data = write_graded_beir(
        scratch / "beir" / "synthetic", n_docs=args.docs, n_train=args.train_queries, n_dev=args.dev_queries,
        n_test=0, judged=args.judged, seed=args.seed,
    )  # fmt: skip
    backbone = write_tiny_backbone(scratch / "backbone")
    corpus, queries, qrels = load_beir(data, "train")
    positives = [sum(1 for r in docs.values() if r >= 1) for docs in qrels.values()]
    stats = {
        "documents": len(corpus),
        "train_queries": len(qrels),
        "train_queries_with_a_positive": sum(1 for p in positives if p),
        "judged_per_query_mean": round(statistics.mean(len(d) for d in qrels.values()), 1),
        "positives_per_query_mean": round(statistics.mean(positives), 1),
        "relevance_counts": {g: sum(1 for d in qrels.values() for r in d.values() if r == g) for g in (0, 1, 2)},
        "pairs": sum(positives),
    }
    print("data:", json.dumps(stats), flush=True)
    mine_bm25_negatives(corpus, queries, qrels, 30, data / "cache")  # both runs then read the same cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = {}
    for sampling in ("pair", "query"):
        cmd = [sys.executable, str(ROOT / "train.py"), "--model_name_or_path", str(backbone), "--data_dir", str(data),
               "--output_dir", str(scratch / f"out-{sampling}"), "--sampling", sampling, "--num_train_epochs", "1",
               "--per_device_train_batch_size", str(args.batch), "--seed", str(args.seed), "--eval_strategy", "no",
               "--save_strategy", "no", "--load_best_model_at_end", "false", "--logging_steps", "200",
               "--disable_tqdm", "true", "--use_cpu"]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        text = (proc.stdout + proc.stderr).replace(str(scratch), "$SCRATCH").replace(str(ROOT), ".")
        (out / f"train-{sampling}.log").write_text(text)
        if proc.returncode != 0:
            sys.exit(
                f"train.py --sampling {sampling} failed (rc {proc.returncode}); see {out / f'train-{sampling}.log'}"
            )
        history = json.loads((scratch / f"out-{sampling}" / "log_history.json").read_text())
        info = json.loads((scratch / f"out-{sampling}" / "run_info.json").read_text())
        summary = history[-1]
        runs[sampling] = {
            "examples_per_epoch": info["examples_per_epoch"],
            "steps_per_epoch": summary["step"],
            "train_seconds_per_epoch": round(summary["train_runtime"], 1),
            "process_seconds": round(wall, 1),
            "dev": info["dev"],
            "skipped_queries": info["skipped_queries"],
        }
        print(f"{sampling}: {json.dumps(runs[sampling])}", flush=True)
    ratio = runs["pair"]["steps_per_epoch"] / runs["query"]["steps_per_epoch"]
    result = {
        "data": stats,
        "runs": runs,
        "pair_to_query_steps_ratio": round(ratio, 1),
        "settings": {
            "batch": args.batch,
            "seed": args.seed,
            "hard_negatives": 1,
            "threads": os.environ.get("OMP_NUM_THREADS"),
            "backbone": "tests' tiny random BERT (hidden 32, 2 layers)",
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },  # fmt: skip
    }
    (out / "sampling.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"pair sampling takes {ratio:.1f}x the steps of query sampling per epoch", flush=True)


if __name__ == "__main__":
    main()

"""Retrieval quality of an int8 recipe (or of the OpenVINO backend: --recipe openvino) against fp32: SciFact test
NDCG@10 and Recall@100, on all queries and on the unseen-document ones, for the zero-shot backbone and fine-tuned
checkpoints; NFCorpus test for the zero-shot backbone.

    BEIR_DATA_DIR=... python -m lab.scripts.int8_quality --recipe fused --backbone BACKBONE \
        --checkpoints CKPT_ROOT [--targets zeroshot baseline sbmoe moe zeroshot-nfcorpus] [--output results/export/int8_quality]

For each target: export.py --int8 --int8_recipe RECIPE (the zero-shot backbone first saved as a project checkpoint
of kind baseline, mean pooling, so it exports like any other), eval.py --backend onnx-int8 on the test split, then
the paired difference to the fp32 run of the same model:
- zeroshot: results/zeroshot-fp32 (eval.py --model zeroshot, torch fp32);
- baseline, sbmoe, moe: CKPT_ROOT/<kind>/seed42, whose fp32 test run is results/table1-fresh/scifact/<kind>/seed42/test
  (export.py --metrics checks by content digest that the checkpoint is the one that run measured);
- zeroshot-nfcorpus: an fp32 run made here first when OUTPUT/zeroshot-nfcorpus-fp32 has none.
A recipe that calibrates (smoothing) is calibrated on the other collection than the one evaluated (NFCorpus
documents for SciFact, SciFact's for NFCorpus: export.py --calibration), so that no figure depends on having seen
the searched corpus.
Writes OUTPUT/<target>-<recipe>/ (eval.py's files), OUTPUT/quality.json (every recipe and target measured so far,
merged) and appends the commands and deltas to OUTPUT/quality.log. Unseen-document queries: as compare.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from lab.stats import paired_tests
from sbmoe.data import DataError, query_subsets, resolve_data_dir, split_qrels
from sbmoe.files import atomic_write_text
from sbmoe.onnx import needs_calibration
from sbmoe.results import read_per_query_file
from utils import entry_point, fail

ROOT = Path(__file__).resolve().parents[2]  # the repository
TARGETS = ("zeroshot", "baseline", "sbmoe", "moe", "zeroshot-nfcorpus")
METRICS = ("NDCG@10", "Recall@100")


def run(cmd: list[str], log: list[str], shown: str) -> None:
    log.append(f"$ {shown}")
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    scratch = re.escape(tempfile.gettempdir())  # the scratch exports: named, not located (logs name no machine paths)
    lines = [re.sub(scratch + r"/tmp\w+/", "EXPORT/", x) for x in proc.stdout.splitlines() if x.strip()]
    log += lines[-4:]
    print("\n".join([f"$ {shown}", *lines[-4:]]), flush=True)
    if proc.returncode:
        raise DataError(f"{shown}: exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1][:300]}")


def name_scratch(metrics: Path, tag: str) -> None:
    """metrics.json names the export by what it was, not by the scratch folder it was in (gone, and a machine path)."""
    data = json.loads(metrics.read_text())
    shown = f"EXPORT ({tag}: export.py of the checkpoint into a scratch folder, see quality.log)"
    if tag in data.get("checkpoints", {}):
        data["checkpoints"][tag] = shown
    if "export" in data.get("settings", {}).get(tag, {}):
        data["settings"][tag]["export"] = shown
    atomic_write_text(metrics, json.dumps(data, indent=2))


def deltas(int8_file: Path, fp32_file: Path, dataset: str) -> dict:
    a, b = read_per_query_file(int8_file), read_per_query_file(fp32_file)
    if set(a) != set(b):
        raise DataError(f"{int8_file} and {fp32_file} score different queries")
    subsets = {"all": sorted(a)}
    if dataset == "scifact":
        subsets["unseen"] = query_subsets(*split_qrels(resolve_data_dir(dataset, None), "test"))["unseen"]
    out = {}
    import numpy as np

    for subset, qids in subsets.items():
        for m in METRICS:
            x = np.array([a[q][m] for q in qids])
            y = np.array([b[q][m] for q in qids])
            test = paired_tests(x, y)
            out[f"{m} {subset}"] = {"int8": float(x.mean()), "fp32": float(y.mean()), "delta": float(x.mean() - y.mean()),
                                    "p_t": test["t_pvalue"], "queries": len(qids),
                                    "moved": int(np.sum(np.abs(x - y) > 1e-9))}  # fmt: skip
    return out


def table(summary: dict) -> list[str]:
    """quality.json as a markdown table: one row per recipe and target, the four deltas to fp32 (p of the paired
    t-test in brackets where it is below 0.05), whether all are within 0.005, and how many queries' NDCG@10 int8
    moved at all (of all queries): the deltas are sums of those few queries' changes."""
    cols = ["NDCG@10 all", "NDCG@10 unseen", "Recall@100 all", "Recall@100 unseen"]
    lines = ["| recipe | model | dataset | " + " | ".join(f"Δ {c}" for c in cols) + " | within 0.005 | queries moved |",
             "|---|---|---|" + "---:|" * len(cols) + "---|---:|"]  # fmt: skip
    for recipe, targets in summary.items():
        for target, row in targets.items():
            cells = []
            for c in cols:
                d = row["deltas"].get(c)
                cells.append("" if d is None else f"{d['delta']:+.4f}" + (f" (p {d['p_t']:.3f})" if d["p_t"] < 0.05 else ""))
            ok = all(abs(round(d["delta"], 4)) <= 0.005 for d in row["deltas"].values())  # at the precision shown
            moved = row["deltas"]["NDCG@10 all"]
            lines.append(f"| {recipe} | {target} | {row['dataset']} | " + " | ".join(cells) + f" | {'yes' if ok else 'no'} | "
                         f"{moved['moved']} of {moved['queries']} |")  # fmt: skip
    return lines


@entry_point
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=False, help="the int8 recipe to measure, or openvino (the fp32 graph in OpenVINO "
                   "at its CPU plugin's precision); without it: --table only")
    p.add_argument("--table", action="store_true", help="print OUTPUT/quality.json as a table (OUTPUT/quality.md)")
    p.add_argument("--backbone", default=None, help="the zero-shot backbone (a local folder)")
    p.add_argument("--checkpoints", default="checkpoints/table1-fresh/scifact",
                   help="holds <kind>/seed42 for the fine-tuned targets")  # fmt: skip
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    p.add_argument("--output", default="results/export/int8_quality")
    args = p.parse_args(argv)
    from lab import export

    if args.table and not args.recipe:
        path = Path(args.output) / "quality.json"
        if not path.is_file():
            fail(f"{path}: no such file (measure a recipe first)")
        summary = json.loads(path.read_text())
        for recipe, targets in summary.items():  # the deltas again from the per-query files (older entries lack some)
            for target, row in targets.items():
                tag = f"{target}-{recipe}"
                mine = Path(args.output) / tag / f"{tag}.perquery.json.gz"
                row["deltas"] = deltas(mine, ROOT / row["fp32_run"], row["dataset"])
        atomic_write_text(path, json.dumps(summary, indent=1))
        bf16, fp32 = ROOT / "results/zeroshot-bf16/zeroshot.perquery.json.gz", ROOT / "results/zeroshot-fp32/zeroshot.perquery.json.gz"
        reference = {}
        if bf16.is_file() and fp32.is_file():  # how close a faithful low precision comes: torch bf16 autocast
            reference = {"torch bf16 (no int8)": {"zeroshot": {"dataset": "scifact", "deltas": deltas(bf16, fp32, "scifact")}}}
        lines = table({**summary, **reference})
        print("\n".join(lines))
        atomic_write_text(path.with_name("quality.md"), "\n".join(lines) + "\n")
        return {}
    if not args.recipe or not args.backbone:
        p.error("--recipe and --backbone are needed to measure (or --table alone)")
    if args.recipe not in [*export.INT8_RECIPES, "openvino"]:
        fail(f"--recipe {args.recipe}: not one of {', '.join(export.INT8_RECIPES)}, openvino")
    backend = "openvino" if args.recipe == "openvino" else "onnx-int8"  # openvino: the fp32 graph in OpenVINO
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "quality.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    log: list[str] = []
    backbone_name = Path(args.backbone).name
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            for target in args.targets:
                dataset = "nfcorpus" if target.endswith("nfcorpus") else "scifact"
                kind = "baseline" if target.startswith("zeroshot") else target
                tag = f"{target}-{args.recipe}"
                recipe = export.INT8_RECIPES.get(args.recipe)
                calibrate = recipe is not None and needs_calibration(recipe)
                other = ["--calibration", "scifact" if dataset == "nfcorpus" else "nfcorpus"] if calibrate else []
                flags = ["--int8", "--int8_recipe", args.recipe, *other] if recipe else ["--onnx"]
                exported = tmp / tag
                if target.startswith("zeroshot"):
                    ckpt = tmp / "zeroshot-checkpoint"
                    if not ckpt.is_dir():
                        from transformers import AutoTokenizer

                        from model import BiEncoder

                        BiEncoder.from_backbone(args.backbone, pooling="mean").save_pretrained(ckpt)
                        AutoTokenizer.from_pretrained(args.backbone).save_pretrained(ckpt)
                    run(["export.py", str(ckpt), str(exported), *flags], log,
                        f"python export.py ZEROSHOT EXPORT {' '.join(flags)}"
                        f"   # ZEROSHOT: {backbone_name} "
                        "saved as a baseline checkpoint, mean pooling")  # fmt: skip
                    if dataset == "scifact":
                        ref = ROOT / "results/zeroshot-fp32/zeroshot.perquery.json.gz"
                    else:
                        ref_dir = out / "zeroshot-nfcorpus-fp32"
                        ref = ref_dir / "zeroshot-nfcorpus-fp32.perquery.json.gz"
                        if not ref.is_file():
                            run(["eval.py", "--model", "zeroshot", "--model_name_or_path", args.backbone, "--pooling", "mean",
                                 "--dataset", "nfcorpus", "--output_dir", str(ref_dir), "--tag", "zeroshot-nfcorpus-fp32"],
                                log, f"python eval.py --model zeroshot --model_name_or_path {backbone_name} --pooling mean "
                                f"--dataset nfcorpus --output_dir {ref_dir} --tag zeroshot-nfcorpus-fp32")  # fmt: skip
                else:
                    ckpt = Path(args.checkpoints) / kind / "seed42"
                    fp32_dir = ROOT / "results/table1-fresh/scifact" / kind / "seed42/test"
                    ref = fp32_dir / f"{kind}.perquery.json.gz"
                    run(["export.py", str(ckpt), str(exported), *flags, "--metrics", str(fp32_dir / "metrics.json")], log,
                        f"python export.py checkpoints/table1-fresh/scifact/{kind}/seed42 EXPORT {' '.join(flags)} "
                        f"--metrics results/table1-fresh/scifact/{kind}/seed42/test/metrics.json")  # fmt: skip
                folder = out / tag
                if (folder / f"{tag}.perquery.json.gz").is_file():  # evaluated by an earlier run of this command
                    log.append(f"(reused {folder}: evaluated by an earlier run of this command, same recipe and model)")
                else:
                    run(["eval.py", "--model", kind, "--checkpoint", str(exported), "--backend", backend, "--dataset",
                         dataset, "--output_dir", str(folder), "--tag", tag], log,
                        f"python eval.py --model {kind} --checkpoint EXPORT --backend {backend} --dataset {dataset} "
                        f"--output_dir {folder} --tag {tag}")  # fmt: skip
                name_scratch(folder / "metrics.json", tag)
                d = deltas(folder / f"{tag}.perquery.json.gz", ref, dataset)
                info = json.loads((exported / "onnx/export.json").read_text()).get("int8") or {
                    "precision": json.loads((folder / "metrics.json").read_text())["settings"][tag]["precision"]}
                summary.setdefault(args.recipe, {})[target] = {"dataset": dataset, "fp32_run": str(ref.resolve().relative_to(ROOT)),
                                                               "export": info, "deltas": d}  # fmt: skip
                for k, v in d.items():
                    line = (f"{target} {k}: int8 {v['int8']:.4f}, fp32 {v['fp32']:.4f}, delta {v['delta']:+.4f} "
                            f"(paired t-test p = {v['p_t']:.3f}, {v['queries']} queries)")  # fmt: skip
                    log.append(line)
                    print(line, flush=True)
                atomic_write_text(summary_path, json.dumps(summary, indent=1))
                with open(out / "quality.log", "a") as f:
                    f.write("\n".join(log) + "\n")
                log = []
    except DataError as exc:
        fail(str(exc))
    return summary


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

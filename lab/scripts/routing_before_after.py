"""Random-routing cells before and after the integer routing keys: NDCG@10 per run and seed, from the files.

    python -m lab.scripts.routing_before_after experiments/sbmoe-frozen.toml --before REV run [run ...]

`--before REV`: the commit whose results were evaluated with the float hash (the files at REV); the working tree
holds the re-evaluated cells. Prints one Markdown table: unseen, seen and all queries, before -> after, and the
seed-averaged change.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
from pathlib import Path

import numpy as np

from lab.layout import Layout
from lab.report import stored_subsets
from lab.spec import load_experiment
from sbmoe import results as an


def at_rev(rev: str, path: Path) -> dict:
    data = subprocess.run(["git", "show", f"{rev}:{path.as_posix()}"], capture_output=True, check=True).stdout
    return json.loads(gzip.decompress(data))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment")
    p.add_argument("runs", nargs="+")
    p.add_argument("--before", required=True, help="the commit of the float-hash results")
    args = p.parse_args()
    exp = load_experiment(args.experiment)
    root = Path("results") / exp.name
    subsets = stored_subsets(exp, Layout(exp, "results", "checkpoints")) or {}
    groups = {**{k: subsets[k] for k in ("unseen", "seen") if k in subsets}, "all": None}
    print("| run | seed | " + " | ".join(f"{g} NDCG@10 before → after" for g in groups) + " |")
    print("|---|---|" + "---|" * len(groups))
    for name in args.runs:
        run = exp.runs[name]
        changes = {g: [] for g in groups}
        for seed in run.seeds:
            path = root / name / f"seed{seed}" / exp.splits[0] / f"{run.tag}.perquery.json.gz"
            before, after = at_rev(args.before, path), an.read_per_query_file(path)
            cells = []
            for g, qids in groups.items():
                qs = qids if qids is not None else sorted(after)
                b, a = (float(np.mean([r[q]["NDCG@10"] for q in qs])) for r in (before, after))
                changes[g].append(a - b)
                cells.append(f"{b:.4f} → {a:.4f} ({a - b:+.4f})")
            print(f"| {name} | {seed} | " + " | ".join(cells) + " |")
        print(f"| {name} | mean change | " + " | ".join(f"{np.mean(v):+.4f}" for v in changes.values()) + " |")


if __name__ == "__main__":
    main()

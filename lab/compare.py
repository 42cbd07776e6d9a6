"""Paired significance test of two runs on the same queries, from eval.py's per-query files.

    python compare.py A.perquery.json.gz B.perquery.json.gz [--metric NDCG@10] [--subset all | unseen | seen] [--dataset scifact]

Prints mean(A) - mean(B) of the metric with a paired t-test and a two-sided paired randomisation test
(analysis.paired_tests, the test behind every experiment report). Both files must score the same queries, i.e. come
from the same split. Use it for ablations: a variant's run against the baseline's run of the same seed.
`--subset unseen` keeps the test queries none of whose relevant documents is a positive of any
training query (`seen`: the others), read from the dataset's qrels.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from lab.stats import paired_tests
from sbmoe.data import SUBSETS, DataError, query_subsets, resolve_data_dir, split_qrels
from sbmoe.metrics import METRICS, PRIMARY_METRIC
from sbmoe.results import read_per_query_file
from utils import fail


def load(path: str, metric: str) -> dict[str, float]:
    try:
        per_query = read_per_query_file(path)
    except (OSError, ValueError) as exc:  # also a bad gzip stream or malformed JSON
        fail(f"{path}: cannot read a per-query JSON file ({exc})")
    try:
        scores = {q: float(m[metric]) for q, m in per_query.items()}
    except (KeyError, TypeError, AttributeError, ValueError):
        fail(f"{path}: not eval.py's per-query format or no {metric!r} per query")
    bad = [q for q, v in scores.items() if not math.isfinite(v)]
    if bad:
        fail(f"{path}: {metric} of query {bad[0]!r} is {scores[bad[0]]} ({len(bad)} non-finite scores): no test on those")
    if not scores:
        fail(f"{path}: no queries")
    return scores


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="per-query JSON of the run under test")
    p.add_argument("b", help="per-query JSON of the reference run")
    p.add_argument("--metric", default=PRIMARY_METRIC, choices=[m.name for m in METRICS])
    p.add_argument("--subset", default="all", choices=["all", *SUBSETS], help="test queries to compare")
    p.add_argument("--dataset", default="scifact", help="BEIR dataset under $BEIR_DATA_DIR, for --subset")
    p.add_argument("--data_dir", default=None, help="a BEIR folder (overrides --dataset)")
    args = p.parse_args(argv)
    a, b = load(args.a, args.metric), load(args.b, args.metric)
    if set(a) != set(b):
        fail(f"{args.a} and {args.b} score different queries ({len(a)} vs {len(b)}, {len(set(a) & set(b))} shared)")
    qids = sorted(a)
    if args.subset != "all":
        try:
            train, test = split_qrels(resolve_data_dir(args.dataset, args.data_dir, download=False))
        except DataError as exc:
            fail(str(exc))
        if not set(qids) <= set(test):
            fail(f"--subset {args.subset}: {args.a} does not score {args.dataset}'s test queries")
        subset = set(query_subsets(train, test)[args.subset])
        qids = [q for q in qids if q in subset]
        if len(qids) < 2:
            fail(f"--subset {args.subset}: {len(qids)} queries, too few for a paired test")
    x, y = np.array([a[q] for q in qids]), np.array([b[q] for q in qids])
    result = {"metric": args.metric, "queries": len(qids), "a": float(x.mean()), "b": float(y.mean())}
    result.update(paired_tests(x, y))
    result["subset"] = args.subset
    print(f"{args.metric} over {len(qids)} queries ({args.subset}): A {result['a']:.4f}, B {result['b']:.4f}, "
          f"A - B {result['mean_diff']:+.4f}, t-test p = {result['t_pvalue']:.3g}, "
          f"randomisation p = {result['rand_pvalue']:.3g}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()

"""Metrics: the one metric list (BEIR's definitions through pytrec_eval), per-query and mean scores, the printed table."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Metric:
    """One metric: its name in tables and files, the pytrec_eval measure and cutoff behind it."""

    name: str
    measure: str  # pytrec_eval measure family: recall | ndcg_cut | map_cut | recip_rank
    cutoff: int
    table: bool = True  # a column of the printed tables

    @property
    def key(self) -> str:
        """The key pytrec_eval reports it under (recip_rank is computed on the run cut to `cutoff`)."""
        return self.measure if self.measure == "recip_rank" else f"{self.measure}_{self.cutoff}"


# The one metric list: per-query metrics, printed tables, --verify and the reports derive from it.
METRICS: tuple[Metric, ...] = (
    Metric("Recall@1", "recall", 1),
    Metric("Recall@5", "recall", 5),
    Metric("Recall@10", "recall", 10),
    Metric("Recall@100", "recall", 100),
    Metric("NDCG@10", "ndcg_cut", 10),
    Metric("MRR@10", "recip_rank", 10),
    Metric("MAP@100", "map_cut", 100, table=False),
)


TABLE_COLUMNS: tuple[str, ...] = tuple(m.name for m in METRICS if m.table)


PRIMARY_METRIC = "NDCG@10"  # the one metric tests, dev selection and reports lead with


assert PRIMARY_METRIC in TABLE_COLUMNS
MAX_CUTOFF = max(m.cutoff for m in METRICS)


def truncate_run(results: dict[str, dict[str, float]], k: int) -> dict[str, dict[str, float]]:
    """Top-k per query in trec_eval's order (score descending, then doc id descending)."""
    return {
        qid: dict(sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)[:k]) for qid, docs in results.items()
    }


def per_query_metrics(
    qrels: dict[str, dict[str, int]],
    results: dict[str, dict[str, float]],
    metrics: Sequence[Metric] | None = None,
    ignore_identical_ids: bool = False,
) -> dict[str, dict[str, float]]:
    """Per-query scores of every metric in `metrics` for every judged query (missing runs score 0).

    Reciprocal rank is scored on each query's top `cutoff` (trec_eval's order). `ignore_identical_ids`
    drops a retrieved doc whose id equals the query id (BEIR's default, off here): the count of what
    was dropped is printed, never silent.
    """
    import pytrec_eval

    metrics = METRICS if metrics is None else metrics
    if ignore_identical_ids:
        dropped = sum(1 for q, docs in results.items() if q in docs)
        results = {q: {d: s for d, s in docs.items() if d != q} for q, docs in results.items()}
        print(f"ignore_identical_ids: dropped {dropped} retrieved documents whose id equals the query id")
    results = {q: {d: float(s) for d, s in docs.items()} for q, docs in results.items() if q in qrels}
    scores: dict[Metric, dict] = {}
    plain = [m for m in metrics if m.measure != "recip_rank"]
    if plain:
        families: dict[str, list[str]] = {}
        for m in plain:
            families.setdefault(m.measure, []).append(str(m.cutoff))
        measures = {f"{family}.{','.join(cuts)}" for family, cuts in families.items()}
        evaluated = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(results)
        scores.update({m: evaluated for m in plain})
    for m in metrics:
        if m.measure == "recip_rank":
            scores[m] = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(truncate_run(results, m.cutoff))
    return {qid: {m.name: scores[m].get(qid, {}).get(m.key, 0.0) for m in metrics} for qid in qrels}


def mean_metrics(per_query: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each metric averaged over the queries of a per-query table."""
    names = next(iter(per_query.values())).keys()
    return {m: float(np.mean([row[m] for row in per_query.values()])) for m in names}


def evaluate_run(qrels: dict, results: dict, **kwargs) -> dict[str, float]:
    """Metrics averaged over the split's judged queries."""
    return mean_metrics(per_query_metrics(qrels, results, **kwargs))


def format_table(rows: dict[str, dict[str, object]], columns: Iterable[str] = TABLE_COLUMNS) -> str:
    """A Markdown table, one row per model; cells are floats (4 places) or preformatted strings."""
    columns = list(columns)
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows.items():
        cells = [f"{metrics[c]:.4f}" if isinstance(metrics.get(c), float) else str(metrics.get(c, "")) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

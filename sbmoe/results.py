"""Named readers for the files the scripts hand each other, and the statistics behind every report.

Training writes `log_history.json` and `run_info.json` next to its checkpoint; every evaluation (eval.py,
the runner's BM25 and hybrid runs, frozen.py) writes `<tag>.perquery.json.gz`, `<tag>.trec.gz` and
`metrics.json` per split through `write_evaluation`. Every key and file name of
those files is spelled here once; experiment.py, compare.py, eval.py and train.py go through these
functions.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sbmoe.data import DataError
from sbmoe.files import atomic_write_bytes, atomic_write_text, read_trec, write_trec
from sbmoe.metrics import METRICS, PRIMARY_METRIC, mean_metrics, per_query_metrics

DEV_METRIC = PRIMARY_METRIC.lower()  # the Trainer's metric_for_best_model; logged as eval_<metric>
DEV_KEY = f"eval_{DEV_METRIC}"
LOSS_KEY = "contrastive_loss"  # InfoNCE without DDP's world-size factor
SHARE_PREFIX = "expert_share/"


# --------------------------------------------------------------------------------------------
# Files


def per_query_path(folder: Path | str, tag: str) -> Path:
    """`<tag>.perquery.json.gz` (compact JSON, gzip; scripts/convert_perquery.py converted the plain `.json`
    files older runs wrote)."""
    return Path(folder) / f"{tag}.perquery.json.gz"


def run_path(folder: Path | str, tag: str) -> Path:
    return Path(folder) / f"{tag}.trec.gz"


def write_per_query(folder: Path | str, tag: str, per_query: dict) -> None:
    """Compact and compressed (a tenth of the indented text), reproducibly (no timestamp in the header)."""
    data = json.dumps(per_query, separators=(",", ":")).encode("utf-8")
    atomic_write_bytes(per_query_path(folder, tag), gzip.compress(data, mtime=0))


def write_evaluation(folder: Path | str, tag: str, results: dict, qrels: dict, depth: int, meta: dict, *,
                     rows: dict | None = None, ignore_identical_ids: bool = False,
                     verify: Callable[[Path, dict], object] | None = None) -> dict[str, float]:  # fmt: skip
    """The one writer of an evaluated run, whichever retriever made it: `<tag>.trec.gz` (top `depth`),
    `<tag>.perquery.json.gz` and `metrics.json` = {<tag>: metrics} after `rows` (other runs in the same
    folder), then `meta` (split, dataset, ...). Metrics use the whole run; returns them. `verify(run file,
    metrics)` runs before the per-query file, whose presence marks a run as evaluated, is written."""
    per_query = per_query_metrics(qrels, results, ignore_identical_ids=ignore_identical_ids)
    metrics = mean_metrics(per_query)
    write_trec(run_path(folder, tag), results, tag, depth)
    if verify is not None:
        verify(run_path(folder, tag), metrics)
    write_per_query(folder, tag, per_query)
    write_metrics(folder, {**(rows or {}), tag: metrics}, meta)
    return metrics


def verify_run(path: Path, qrels: dict, metrics: dict[str, float], depth: int, tol: float = 1e-6) -> float:
    """Re-read a written run and score it again: the largest difference from `metrics` over every metric the file
    is deep enough for, or a DataError when one exceeds `tol`."""
    again = mean_metrics(per_query_metrics(qrels, read_trec(path)))
    worst = max(abs(again[m.name] - metrics[m.name]) for m in METRICS if m.cutoff <= depth)
    if worst > tol:
        raise DataError(f"{path}: metrics differ from pytrec_eval on the run file by {worst:.2e}")
    return worst


def trec_depths(entries: list[str], splits: list[str], flag: str = "--trec_depth", splits_flag: str = "--split") -> dict:
    """`SPLIT=K` entries (how deep each split's run file is written) as {split: K}; a ValueError naming the flag
    when an entry is not SPLIT=K, names a split not among `splits` or has K < 1."""
    try:
        depths = {k: int(v) for k, v in (x.split("=") for x in entries)}
    except ValueError:
        raise ValueError(f"{flag} {' '.join(entries)}: expected SPLIT=K entries") from None
    for split, depth in depths.items():
        if split not in splits or depth < 1:
            raise ValueError(f"{flag} {split}={depth}: needs a split of {splits_flag} and K >= 1")
    return depths


def write_metrics(folder: Path | str, rows: dict[str, dict[str, float]], meta: dict) -> None:
    """`metrics.json`: a row of mean metrics per run, then what they were measured on."""
    atomic_write_text(Path(folder) / "metrics.json", json.dumps({**rows, **meta}, indent=2))


def read_metrics(folder: Path | str) -> dict:
    """A split folder's `metrics.json` (rows and what they were measured on); {} if there is none."""
    path = Path(folder) / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def read_per_query(folder: Path | str, tag: str) -> dict[str, dict[str, float]]:
    """eval.py's per-query scores: {qid: {metric: value}}."""
    return read_per_query_file(per_query_path(folder, tag))


def read_per_query_file(path: Path | str) -> dict[str, dict[str, float]]:
    path = Path(path)
    raw = path.read_bytes()
    return json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)


def read_log_history(folder: Path | str) -> list[dict]:
    return json.loads((Path(folder) / "log_history.json").read_text(encoding="utf-8"))


def write_log_history(folder: Path | str, history: list[dict]) -> None:
    atomic_write_text(Path(folder) / "log_history.json", json.dumps(history, indent=1))


def write_checkpoint_facts(folder: Path | str, facts: dict) -> None:
    atomic_write_text(Path(folder) / "checkpoint.json", json.dumps(facts, indent=1))


def read_checkpoint_facts(folder: Path | str) -> dict:
    """What the runner recorded about a trained checkpoint (e.g. `expert_out_max_abs`); {} if nothing."""
    path = Path(folder) / "checkpoint.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def train_seconds(history: list[dict]) -> float | None:
    """Wall-clock seconds of the training loop (the Trainer's `train_runtime`; dev evaluations included)."""
    return next((h["train_runtime"] for h in reversed(history) if "train_runtime" in h), None)


def eval_seconds(folder: Path | str) -> float | None:
    """Wall-clock seconds eval.py spent retrieving (encoding and search) for the split in `folder`."""
    path = Path(folder) / "metrics.json"
    seconds = json.loads(path.read_text(encoding="utf-8")).get("retrieval_seconds") if path.is_file() else None
    return None if seconds is None else sum(seconds.values())  # per model evaluated in the one call


def dev_dataset_key(dataset: str, metric: str) -> str:
    """One training dataset's dev score in the log history (after the `eval_` prefix), when several train a model."""
    return f"{dataset}/{metric}"


def dev_by_dataset(history: list[dict]) -> dict[str, float]:
    """Each training dataset's dev NDCG@10 at the best (mean) dev evaluation; {} for one dataset."""
    evals = [h for h in history if DEV_KEY in h]
    if not evals:
        return {}
    best, suffix = max(evals, key=lambda h: h[DEV_KEY]), "/" + DEV_METRIC
    return {k[len("eval_") : -len(suffix)]: v for k, v in best.items() if k.startswith("eval_") and k.endswith(suffix)}


def expert_share_key(block: int, expert: int) -> str:
    return f"{SHARE_PREFIX}b{block}/e{expert}"


def dev_curve(history: list[dict]) -> list[tuple[float, float]]:
    """(epoch, dev NDCG@10) of every dev evaluation."""
    return [(h.get("epoch", float("nan")), h[DEV_KEY]) for h in history if DEV_KEY in h]


def best_dev(history: list[dict]) -> float | None:
    scores = [v for _, v in dev_curve(history)]
    return max(scores) if scores else None


def epoch_losses(history: list[dict]) -> list[float]:
    """Mean logged InfoNCE per epoch (1, 2, ...)."""
    by_epoch: dict[int, list[float]] = {}
    for h in history:
        if LOSS_KEY in h and "epoch" in h:
            by_epoch.setdefault(int(np.ceil(h["epoch"] - 1e-9)), []).append(h[LOSS_KEY])
    return [float(np.mean(by_epoch[e])) for e in sorted(by_epoch)]


def expert_shares(history: list[dict]) -> dict[int, list[float]]:
    """Share of routed inputs per expert, averaged over the logging steps: {block: [share per expert]}."""
    keys = sorted({k for h in history for k in h if k.startswith(SHARE_PREFIX)})
    shares: dict[int, dict[int, float]] = {}
    for key in keys:
        block, expert = (int(part[1:]) for part in key[len(SHARE_PREFIX) :].split("/"))
        shares.setdefault(block, {})[expert] = float(np.mean([h[key] for h in history if key in h]))
    return {b: [row[e] for e in sorted(row)] for b, row in sorted(shares.items())}


# --------------------------------------------------------------------------------------------
# Per-domain routing


def routing_path(folder: Path | str, tag: str) -> Path:
    return Path(folder) / f"{tag}.routing.json"


def write_routing(folder: Path | str, tag: str, record: dict) -> None:
    """eval.py --routing_docs: first-choice expert counts per block ("queries", "documents": (blocks, experts))."""
    atomic_write_text(routing_path(folder, tag), json.dumps(record, indent=1))


def read_routing(folder: Path | str, tag: str) -> dict | None:
    path = routing_path(folder, tag)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def contingency(a, b) -> np.ndarray:
    """Counts of each (a, b) label pair: rows a's labels, columns b's, in sorted order."""
    _, ai = np.unique(np.asarray(a), return_inverse=True)
    _, bi = np.unique(np.asarray(b), return_inverse=True)
    table = np.zeros((ai.max(initial=-1) + 1, bi.max(initial=-1) + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)
    return table


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def normalized_mutual_info(table) -> float:
    """Normalised mutual information of a contingency table (e.g. dataset x expert): I(X; Y) over the
    arithmetic mean of H(X) and H(Y), as sklearn's normalized_mutual_info_score by default. 0: the columns
    ignore the rows; 1: each row's units all go to a column of their own. 1 when both sides have one label."""
    c = np.asarray(table, dtype=float)
    n = c.sum()
    if n <= 0:
        return float("nan")
    pxy = c / n
    px, py = pxy.sum(1), pxy.sum(0)
    hx, hy = _entropy(px), _entropy(py)
    if hx == 0 and hy == 0:
        return 1.0
    nz = pxy > 0
    mi = float((pxy[nz] * np.log(pxy[nz] / np.outer(px, py)[nz])).sum())
    return max(0.0, mi) / ((hx + hy) / 2) if mi > 0 else 0.0


def routing_summary(records: dict[str, dict]) -> dict:
    """From each dataset's routing record of one checkpoint: per block, each dataset's share of units per
    expert (queries and sampled documents together) and the NMI between expert and dataset."""
    names = list(records)
    counts = np.stack([np.add(records[n]["queries"], records[n]["documents"]) for n in names])  # (D, blocks, E)
    blocks = []
    for b in range(counts.shape[1]):
        table = counts[:, b, :]
        shares = table / np.maximum(table.sum(1, keepdims=True), 1)
        blocks.append({"shares": {n: [round(float(x), 4) for x in row] for n, row in zip(names, shares)},
                       "nmi": normalized_mutual_info(table)})  # fmt: skip
    first = records[names[0]]
    return {"datasets": names, "unit": first.get("unit", "inputs"), "blocks": blocks,
            "units": {n: int(counts[i].sum() // max(1, counts.shape[1])) for i, n in enumerate(names)}}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Query subsets


# --------------------------------------------------------------------------------------------
# Statistics

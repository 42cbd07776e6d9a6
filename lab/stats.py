"""Statistics over per-query scores: paired tests, means, subset means."""

from __future__ import annotations

import numpy as np

from sbmoe.metrics import PRIMARY_METRIC


def paired_tests(a: np.ndarray, b: np.ndarray, n_perm: int = 10000, seed: int = 0) -> dict[str, float]:
    """Paired t-test and a two-sided paired randomisation (sign-flip) test of mean(a - b)."""
    from scipy import stats

    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    t_p = 1.0 if not diff.any() else float(stats.ttest_rel(a, b).pvalue)  # identical scores: no difference
    rng = np.random.default_rng(seed)
    flips = rng.choice([-1.0, 1.0], size=(n_perm, len(diff)))
    null = np.abs((flips * diff).mean(1))
    p_rand = (1 + np.sum(null >= abs(diff.mean()) - 1e-12)) / (n_perm + 1)
    return {"mean_diff": float(diff.mean()), "t_pvalue": t_p, "rand_pvalue": float(p_rand)}


def significant(test: dict, alpha: float = 0.05) -> bool:
    """Both paired tests below alpha."""
    return test["t_pvalue"] < alpha and test["rand_pvalue"] < alpha


def subset_mean(per_query: dict, qids: list[str], metric: str = PRIMARY_METRIC) -> float:
    """Mean of one metric over some of a run's queries (NaN for none)."""
    return float(np.mean([per_query[q][metric] for q in qids])) if qids else float("nan")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def scores_matrix(runs: list[dict], qids: list[str], metric: str = PRIMARY_METRIC) -> np.ndarray:
    """(seeds, queries) array of one metric."""
    return np.array([[run[q][metric] for q in qids] for run in runs])



"""Where an experiment's files live: results/<experiment>/<run>/seed<S>/<split>/ and checkpoints/<experiment>/."""

from __future__ import annotations

from pathlib import Path

from lab.settings import merge
from lab.spec import Experiment, Run
from sbmoe import results as an


class Layout:
    """results/<experiment>/<run>/seed<S>/<split>/ and checkpoints/<experiment>/<checkpoint>/seed<S>."""

    def __init__(self, exp: Experiment, results: str | Path, ckpt_root: str | Path):
        self.exp, self.root, self.ckpts = exp, Path(results) / exp.name, Path(ckpt_root) / exp.name

    def run_dir(self, run: Run, seed: int | None) -> Path:
        return self.root / run.name if not run.per_seed else self.root / run.name / f"seed{seed}"

    def split_dir(self, run: Run, seed: int | None, split: str) -> Path:
        return self.run_dir(run, seed) / split

    def evaluated(self, run: Run, seed: int | None) -> bool:
        return all(an.per_query_path(self.split_dir(run, seed, s), run.tag).is_file() for s in self.exp.splits)

    def trains_alike(self, a: Run, b: Run) -> bool:
        """Whether two runs train the same checkpoint: kind, training settings over the recipe (compared as
        values: their order and spelling aside), frozen backbone and training datasets; evaluation aside."""
        return (a.kind, merge(self.exp.recipe, a.train), a.frozen, a.datasets) == (
            b.kind, merge(self.exp.recipe, b.train), b.frozen, b.datasets)  # fmt: skip

    def lead(self, run: Run, runs: list[Run]) -> Run:
        """The first of `runs` that trains the same checkpoint as `run` (whose name the checkpoint takes)."""
        return next(r for r in runs if r.trained and self.trains_alike(r, run))

    def checkpoint(self, run: Run, runs: list[Run], seed: int) -> Path:
        """Runs that differ only in evaluation settings share one checkpoint, named after the first of them."""
        return self.ckpts / self.lead(run, runs).name / f"seed{seed}"

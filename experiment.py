"""The one experiment runner: an experiment is a TOML file under experiments/, this turns it into results.

    python experiment.py experiments/table1.toml [--model_name_or_path M] [--parallel 4] [--torchrun --fp16]
    python experiment.py experiments/sweep.toml --report          # re-render from the results alone

It trains every (run, seed) whose results are missing (resuming an interrupted checkpoint; runs that
differ only in evaluation flags share one), evaluates each checkpoint once for all splits (one corpus
pass), and writes `results/<experiment>/`: per run and seed the dev curve, expert shares and
per-query scores, per run `summary.json`, then `report.md` / `report.json` (mean ± std over seeds,
paired tests over queries, seed-averaged and per seed, on all queries and on each query subset)
and figures. With a `[select]` table, a second stage trains the combination of options chosen on
*dev* (never test) over its seeds. The file format is described in experiments/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

import analysis as an
from model import VARIANTS
from retrievers import BM25, DEV_FRACTION, FUSIONS, SELECT_METRIC, choose_weight, dev_qrels, fuse
from utils import (
    MAX_CUTOFF,
    TABLE_COLUMNS,
    DataError,
    atomic_write_text,
    check_writable,
    fail,
    load_corpus,
    load_qrels,
    load_queries,
    load_split,
    mean_metrics,
    read_trec,
    resolve_data_dir,
)

UNTRAINED = ("zeroshot", "bm25")  # evaluated once, seed-independent
SMOKE_TRAIN = ["--max_steps", "2", "--doc_max_length", "32", "--per_device_train_batch_size", "8", "--eval_strategy",
               "no", "--load_best_model_at_end", "false", "--save_strategy", "no"]  # fmt: skip
SMOKE_EVAL = ["--doc_max_length", "32"]
SMOKE_QUERIES, SMOKE_DOCS = 40, 300  # per split, in all: the slice of the dataset a smoke run works on
# A child of the runner dies with it, even under kill -9: Linux sends it SIGTERM when the runner goes
# (PR_SET_PDEATHSIG, kept across exec; torchrun passes it on to its workers); elsewhere it just runs.
DIE_WITH_PARENT = """import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(143)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"""


def child_command(launch: list[str], script: str, argv: list[str]) -> list[str]:
    """`launch script argv` run so that it ends with this process (see DIE_WITH_PARENT)."""
    return [launch[0], "-c", DIE_WITH_PARENT, str(os.getpid()), *launch[1:], script, *argv]


def smoke_slice(folder: Path, out: Path, n_queries: int = SMOKE_QUERIES, n_docs: int = SMOKE_DOCS) -> Path:
    """A small BEIR folder cut from `folder`: per qrels split its first `n_queries` queries with a positive, their
    judged documents, and other documents up to `n_docs` in all; rewritten only when it would change."""
    corpus, queries = load_corpus(folder), load_queries(folder)
    splits, small = {}, len(corpus) <= n_docs
    for path in sorted((folder / "qrels").glob("*.tsv")):
        qrels = load_qrels(path)
        small = small and len(qrels) <= n_queries
        keep = [q for q in qrels if q in queries and any(r > 0 for r in qrels[q].values())][:n_queries]
        splits[path.stem] = {q: {d: r for d, r in qrels[q].items() if d in corpus} for q in keep}
    if small:  # already a slice's size: used as it is
        return folder
    judged = dict.fromkeys(d for qrels in splits.values() for docs in qrels.values() for d in docs)
    docs = list(judged) + [d for d in corpus if d not in judged][: max(0, n_docs - len(judged))]
    files = {"corpus.jsonl": "".join(json.dumps({"_id": d, **corpus[d]}) + "\n" for d in docs),
             "queries.jsonl": "".join(json.dumps({"_id": q, "text": queries[q]}) + "\n"
                                      for q in dict.fromkeys(q for qrels in splits.values() for q in qrels))}  # fmt: skip
    for split, qrels in splits.items():
        files[f"qrels/{split}.tsv"] = "query-id\tcorpus-id\tscore\n" + "".join(
            f"{q}\t{d}\t{r}\n" for q, docs in qrels.items() for d, r in docs.items())  # fmt: skip
    for name, text in files.items():
        if not (out / name).is_file() or (out / name).read_text(encoding="utf-8") != text:
            atomic_write_text(out / name, text)
    return out
TOP_KEYS = {"name", "description", "dataset", "data_dir", "model", "seeds", "splits", "subsets", "recipe", "eval",
            "trec_depth", "runs", "select", "figures", "frozen", "transfer"}  # fmt: skip
RUN_KEYS = {"kind", "train", "eval", "label", "reference", "group", "seeds", "frozen", "fuse", "weight", "fusion"}
HYBRID = "hybrid"  # two runs of the file fused (retrievers.fuse), per seed where one of them is trained


# --------------------------------------------------------------------------------------------
# The experiment file


@dataclass
class Run:
    name: str
    kind: str
    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    label: str = ""
    references: list[str] = field(default_factory=list)  # runs it is compared with (paired tests)
    group: str | None = None
    frozen: bool = False  # backbone frozen: frozen.py trains the head on cached backbone outputs
    fuse: list[str] = field(default_factory=list)  # kind hybrid: the two runs fused, the first weighted `weight`
    weight: float | None = None  # kind hybrid: fixed; None: chosen on dev (equal where no dev run files exist)
    fusion: str = "interpolate"  # kind hybrid: interpolate | rrf

    @property
    def trained(self) -> bool:
        return self.kind not in (*UNTRAINED, HYBRID)

    @property
    def per_seed(self) -> bool:
        """Results per seed: a trained run, or a hybrid of one (its seeds are that run's)."""
        return self.trained or (self.kind == HYBRID and bool(self.seeds))

    @property
    def tag(self) -> str:
        """Name of its files and of the TREC run column."""
        return self.name.rsplit("/", 1)[-1]


@dataclass
class Experiment:
    name: str
    description: str
    dataset: str | None
    data_dir: str | None
    model: str | None
    seeds: list[int]
    splits: list[str]
    subsets: list[str]
    recipe: list[str]
    eval: list[str]
    trec_depth: dict[str, int]
    runs: dict[str, Run]
    select: dict | None
    figures: list[str]
    transfer: list[str] = field(default_factory=list)  # further BEIR datasets, evaluated on test, never trained on


def restrict_seeds(exp: Experiment, seeds: list[int]) -> Experiment:
    """The experiment with only `seeds` (where a run or the select stage has them)."""
    keep = lambda xs: [s for s in xs if s in seeds]  # noqa: E731
    runs = {n: replace(r, seeds=keep(r.seeds)) for n, r in exp.runs.items()}
    select = None if exp.select is None else {**exp.select, "seeds": keep(exp.select.get("seeds", exp.seeds))}
    return replace(exp, seeds=keep(exp.seeds), runs=runs, select=select)


def check_types(raw: dict, check) -> None:
    """Every value of an experiment file of the type it must have, before anything reads it (`seeds = "42"`
    must not run seeds 4 and 2)."""

    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    def strings(where: str, value, empty: bool = True) -> None:
        check(isinstance(value, list) and all(isinstance(x, str) for x in value),
              f"{where} must be a list of strings, got {value!r}")  # fmt: skip
        check(empty or bool(value), f"{where} must not be empty")

    def seeds(where: str, value, empty: bool) -> None:
        check(isinstance(value, list) and all(is_int(x) for x in value),
              f"{where} must be a list of integers such as [42, 43], got {value!r}")  # fmt: skip
        check(empty or bool(value), f"{where} must not be empty")
        check(len(set(value)) == len(value), f"{where} repeats a seed: {value}")

    for key in ("name", "description", "dataset", "data_dir", "model"):
        check(key not in raw or isinstance(raw[key], str), f"{key} must be a string, got {raw.get(key)!r}")
    check(bool(str(raw.get("name", "x")).strip()) and "/" not in str(raw.get("name", "")),
          f"name {raw.get('name')!r} must be a non-empty folder name")  # fmt: skip
    if "seeds" in raw:
        seeds("seeds", raw["seeds"], empty=False)
    if "splits" in raw:
        strings("splits", raw["splits"], empty=False)
        check(len(set(raw["splits"])) == len(raw["splits"]) and all(s.strip() for s in raw["splits"]),
              f"splits must be distinct split names, got {raw['splits']!r}")  # fmt: skip
    for key in ("subsets", "recipe", "eval", "figures"):
        if key in raw:
            strings(key, raw[key])
    check(set(raw.get("figures", [])) <= {"training", "experts"}, "figures must be among ['training', 'experts']")
    check("frozen" not in raw or isinstance(raw["frozen"], bool), f"frozen must be true or false, got {raw.get('frozen')!r}")
    depth = raw.get("trec_depth", {})
    check(isinstance(depth, dict) and all(is_int(k) and k >= 1 for k in depth.values()),
          f"trec_depth must be a table of split = K (K >= 1), got {depth!r}")  # fmt: skip
    check(set(depth) <= set(raw.get("splits", ["test"])), f"trec_depth names a split not in splits: {sorted(depth)}")
    for name, spec in raw.get("runs", {}).items():
        if not isinstance(spec, dict):
            continue  # load_experiment says so
        where = f"runs.{name}"
        check("kind" in spec and isinstance(spec["kind"], str), f"{where}.kind must be given as a string")
        for key in ("train", "eval"):
            if key in spec:
                strings(f"{where}.{key}", spec[key])
        if "seeds" in spec:
            seeds(f"{where}.seeds", spec["seeds"], empty=True)  # [] = only a template for [select]
        for key in ("label", "group"):
            check(key not in spec or isinstance(spec[key], str), f"{where}.{key} must be a string")
        ref = spec.get("reference", [])
        check(isinstance(ref, str) or (isinstance(ref, list) and all(isinstance(r, str) for r in ref)),
              f"{where}.reference must be a run name or a list of them, got {ref!r}")  # fmt: skip
        check("frozen" not in spec or isinstance(spec["frozen"], bool), f"{where}.frozen must be true or false")
    select = raw.get("select")
    if select is not None:
        check(isinstance(select, dict), "select must be a table")
        for key in ("reference", "compare_to"):
            check(key not in select or isinstance(select[key], str), f"select.{key} must be a run name")
        if "runs" in select:
            strings("select.runs", select["runs"], empty=False)
        if "seeds" in select:
            seeds("select.seeds", select["seeds"], empty=False)


def load_experiment(path: str | Path) -> Experiment:
    """Parse and check an experiment file; every mistake is a one-line DataError naming the file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DataError(f"{path}: cannot read an experiment file ({exc})") from None

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise DataError(f"{path}: {message}")

    check(not set(raw) - TOP_KEYS, f"unknown key(s) {sorted(set(raw) - TOP_KEYS)}; expected {sorted(TOP_KEYS)}")
    check(isinstance(raw.get("runs"), dict) and bool(raw["runs"]), "no [runs.NAME] tables")
    check_types(raw, check)
    seeds = raw.get("seeds", [42])
    splits = raw.get("splits", ["test"])
    runs = {}
    for name, spec in raw["runs"].items():
        check(isinstance(spec, dict), f"runs.{name} must be a table")
        check(not set(spec) - RUN_KEYS, f"runs.{name}: unknown key(s) {sorted(set(spec) - RUN_KEYS)}")
        kind = spec.get("kind", "")
        check(kind in VARIANTS or kind in UNTRAINED or kind == HYBRID, f"runs.{name}: kind {kind!r} is not one of "
              f"{', '.join([*VARIANTS, *UNTRAINED, HYBRID])}")  # fmt: skip
        check((kind == HYBRID) == ("fuse" in spec) and (kind == HYBRID or not {"weight", "fusion"} & set(spec)),
              f"runs.{name}: `fuse` (and `weight`, `fusion`) belong to kind {HYBRID!r}, which needs `fuse`")  # fmt: skip
        for key in ("train", "eval"):
            check(all(isinstance(x, str) for x in spec.get(key, [])), f"runs.{name}.{key} must be a list of strings")
        refs = spec.get("reference", [])
        check(not ("frozen" in spec and kind in UNTRAINED), f"runs.{name}: only a trained kind can be frozen")
        runs[name] = Run(name, kind, list(spec.get("train", [])), list(spec.get("eval", [])),
                         list(spec.get("seeds", seeds)), spec.get("label", name), [refs] if isinstance(refs, str)
                         else list(refs), spec.get("group"),
                         kind in VARIANTS and bool(spec.get("frozen", raw.get("frozen", False))))  # fmt: skip
        if kind == HYBRID:
            runs[name] = hybrid_run(runs[name], spec, raw["runs"], lambda ok, m, n=name: check(ok, f"runs.{n}: {m}"))
    for run in runs.values():
        for ref in run.references:
            check(ref in runs, f"runs.{run.name}.reference {ref!r} is not a run")
    select = raw.get("select")
    if select is not None:
        check(select.get("reference") in runs, "select.reference must name a run")
        check(all(r in runs for r in select.get("runs", [])), "select.runs must name runs")
        check(select.get("compare_to", select["reference"]) in runs, "select.compare_to must name a run")
    check(set(raw.get("subsets", [])) <= set(an.SUBSETS), f"subsets must be among {an.SUBSETS}")
    transfer = raw.get("transfer", [])
    check(isinstance(transfer, list) and all(isinstance(t, str) and t.strip() for t in transfer),
          "transfer must be a list of dataset names (under $BEIR_DATA_DIR) or BEIR folders")  # fmt: skip
    names = [transfer_name(t) for t in transfer]
    check(len(set(names)) == len(names), f"transfer names a dataset twice: {names}")
    return Experiment(
        name=raw.get("name", path.stem), description=raw.get("description", ""), dataset=raw.get("dataset"),
        data_dir=raw.get("data_dir"), model=raw.get("model"), seeds=seeds, splits=splits,
        subsets=list(raw.get("subsets", [])), recipe=list(raw.get("recipe", [])), eval=list(raw.get("eval", [])),
        trec_depth=dict(raw.get("trec_depth", {})), runs=runs, select=select,
        figures=list(raw.get("figures", ["training", "experts"])), transfer=list(transfer),
    )  # fmt: skip


def hybrid_run(run: Run, spec: dict, specs: dict, check) -> Run:
    """A hybrid's members checked (two other non-hybrid runs of the file), its weight and fusion; its seeds
    are those of its trained member(s), none when both are untrained."""
    members, weight, fusion = spec["fuse"], spec.get("weight"), spec.get("fusion", "interpolate")
    check(isinstance(members, list) and len(members) == 2 and len(set(members)) == 2
          and all(isinstance(m, str) for m in members), f"fuse must name two different runs, got {members!r}")  # fmt: skip
    for member in members:
        check(member in specs and isinstance(specs[member], dict) and specs[member].get("kind") != HYBRID,
              f"fuse: {member!r} is not a (non-hybrid) run of the file")  # fmt: skip
    check(fusion in FUSIONS, f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
    check(weight is None or (number and 0 <= weight <= 1 and fusion == "interpolate"),
          f"weight must be in [0, 1] (and the fusion interpolate), got {weight!r}")  # fmt: skip
    check(not {"train", "eval", "frozen", "group"} & set(spec), "a hybrid has no train, eval, frozen or group")
    trained = [specs[m].get("seeds", run.seeds) for m in members if specs[m].get("kind") not in UNTRAINED]
    seeds = [s for s in trained[0] if all(s in t for t in trained)] if trained else []
    weight = None if weight is None else float(weight)
    return replace(run, fuse=list(members), weight=weight, fusion=fusion, seeds=seeds)


# --------------------------------------------------------------------------------------------
# Where things live


class Layout:
    """results/<experiment>/<run>/seed<S>/<split>/ and checkpoints/<experiment>/<checkpoint>/seed<S>."""

    def __init__(self, exp: Experiment, results: str, ckpt_root: str):
        self.exp, self.root, self.ckpts = exp, Path(results) / exp.name, Path(ckpt_root) / exp.name

    def run_dir(self, run: Run, seed: int | None) -> Path:
        return self.root / run.name if not run.per_seed else self.root / run.name / f"seed{seed}"

    def split_dir(self, run: Run, seed: int | None, split: str) -> Path:
        return self.run_dir(run, seed) / split

    def evaluated(self, run: Run, seed: int | None) -> bool:
        return all(an.per_query_path(self.split_dir(run, seed, s), run.tag).is_file() for s in self.exp.splits)

    def checkpoint(self, run: Run, runs: list[Run], seed: int) -> Path:
        """Runs that differ only in evaluation flags share one checkpoint, named after the first of them."""
        first = next(r for r in runs if r.trained and (r.kind, r.train, r.frozen) == (run.kind, run.train, run.frozen))
        return self.ckpts / first.name / f"seed{seed}"


# --------------------------------------------------------------------------------------------
# Training and evaluation


class Runner:
    def __init__(self, exp: Experiment, args, folder: Path):
        self.exp, self.args, self.folder = exp, args, folder
        self.layout = Layout(exp, args.results, args.ckpt_root)
        self.model = args.model_name_or_path or exp.model
        self.data = ["--data_dir", str(folder)]
        self.dtype = ["--fp16"] if args.fp16 else ["--bf16"] if args.bf16 else []
        self.may_train = True  # False for transfer datasets: evaluate the checkpoints, never train on them

    def execute(self, script: str, argv: list[str], log: Path, launch: list[str]) -> bool:
        """One training or evaluation step, logged; in this process (--in_process) or a fresh one."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as fh:
            fh.write("+ " + " ".join(["python", *launch[1:], script, *argv]) + "\n")  # no machine paths in logs
            fh.flush()
            if not self.args.in_process:
                cmd = child_command(launch, script, argv)
                return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode == 0
            import eval as evaluation
            import frozen
            import train

            entry = {"train.py": lambda: train.main(None, argv), "eval.py": lambda: evaluation.main(argv),
                     "frozen.py": lambda: frozen.main(argv)}[script]  # fmt: skip
            try:
                with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                    entry()
            except SystemExit as exc:
                return exc.code in (0, None)
        return True

    def trec_depth_flags(self) -> list[str]:
        return [f"{s}={k}" for s, k in self.exp.trec_depth.items() if s in self.exp.splits]

    def train_argv(self, run: Run, seed: int, ckpt: Path) -> list[str]:
        return ["--kind", run.kind, "--model_name_or_path", self.model, *self.data, "--seed", str(seed),
                "--output_dir", str(ckpt), *self.exp.recipe, *run.train, *self.dtype,
                *(SMOKE_TRAIN if self.args.smoke else []), *self.args.extra]  # fmt: skip

    def train(self, run: Run, seed: int, ckpt: Path, log: Path) -> bool:
        launch = [sys.executable]
        if self.args.torchrun:
            launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(self.args.nproc)]
        argv = self.train_argv(run, seed, ckpt)
        if any(ckpt.glob("checkpoint-*/trainer_state.json")):
            argv += ["--resume_from_checkpoint", "last"]
        return self.execute("train.py", argv, log, launch)

    def frozen(self, run: Run, seed: int, ckpt: Path) -> bool:
        """Train the head on the cached backbone (once per checkpoint) and evaluate it, in one frozen.py call."""
        out, splits = self.layout.run_dir(run, seed), self.exp.splits
        depth = self.trec_depth_flags()
        argv = [*self.train_argv(run, seed, ckpt), "--eval_output_dir", str(out), "--eval_splits", *splits,
                "--tag", run.tag, *(["--trec_depth", *depth] if depth else []), *self.exp.eval, *run.eval]  # fmt: skip
        return self.execute("frozen.py", argv, out / "train.log", [sys.executable])

    def dev_slice(self, run: Run, seed: int | None) -> tuple[list[int], float]:
        """The seeds and fraction of training's dev slice of the train queries for `run` at `seed`: that seed's,
        every seed's for a run that serves them all (where the dataset has no official dev split)."""
        argv = [*self.exp.recipe, *run.train, *self.args.extra]  # as train_argv; the last --dev_fraction wins
        at = [i for i, x in enumerate(argv[:-1]) if x == "--dev_fraction"]
        return [seed] if seed is not None else list(self.exp.seeds), float(argv[at[-1] + 1]) if at else DEV_FRACTION

    def dev_flags(self, run: Run, seed: int | None) -> list[str]:
        """A run that a hybrid of the file fuses with a weight still to choose is also evaluated on dev."""
        hybrids = [r for r in self.exp.runs.values() if r.kind == HYBRID]
        tuned = [r for r in hybrids if r.weight is None and r.fusion == "interpolate"]
        if "dev" in self.exp.splits or not any(run.name in r.fuse for r in tuned):
            return []
        seeds, fraction = self.dev_slice(run, seed)
        return ["--dev_seed", *map(str, seeds), "--dev_fraction", f"{fraction:g}"]

    def evaluate(self, run: Run, seed: int | None, ckpt: Path | None) -> bool:
        out = self.layout.run_dir(run, seed)
        dev = self.dev_flags(run, seed)
        splits = [*self.exp.splits, *(["dev"] if dev else [])]
        target = ["--checkpoint", str(ckpt)] if ckpt else ["--model_name_or_path", self.model]
        depth = self.trec_depth_flags()
        argv = ["--model", run.kind, *target, *self.data, "--split", *splits, "--tag", run.tag, "--verify",
                "--output_dir", str(out if len(splits) > 1 else out / splits[0]),
                *(["--trec_depth", *depth] if depth else []), *dev, *self.exp.eval, *run.eval,
                *self.dtype, *(SMOKE_EVAL if self.args.smoke else [])]  # fmt: skip
        return self.execute("eval.py", argv, out / "eval.log", [sys.executable])

    def bm25(self, run: Run) -> bool:
        corpus, queries = load_corpus(self.folder), load_queries(self.folder)
        splits = {split: load_split(self.folder, split, corpus, queries)[1] for split in self.exp.splits}
        if self.dev_flags(run, None):
            splits["dev"] = dev_qrels(self.folder, *self.dev_slice(run, None))[0]
        results = BM25().search(corpus, {q: queries[q] for qrels in splits.values() for q in qrels}, MAX_CUTOFF)
        for split, qrels in splits.items():
            an.write_evaluation(self.layout.split_dir(run, None, split), run.tag, {q: results[q] for q in qrels},
                                qrels, self.exp.trec_depth.get(split, MAX_CUTOFF),
                                {"split": split, "dataset": self.folder.name})  # fmt: skip
        return True

    def hybrid(self, run: Run, seed: int | None) -> str | None:
        """Fuse the two runs' files split by split, the weight chosen on their dev run files (if both have
        them: runs evaluated before the hybrid was in the file have none, and take the equal weight).
        Returns what failed, or None."""
        members = [self.exp.runs[m] for m in run.fuse]
        folders = lambda split: [self.layout.split_dir(m, seed if m.per_seed else None, split) for m in members]  # noqa: E731
        read = lambda split: [read_trec(an.run_path(f, m.tag)) for f, m in zip(folders(split), members)]  # noqa: E731
        missing = [an.run_path(f, m.tag) for s in self.exp.splits for f, m in zip(folders(s), members)
                   if not an.run_path(f, m.tag).is_file()]  # fmt: skip
        if missing:
            return f"no run file {missing[0]}"
        info: dict = {"fuse": run.fuse, "fusion": run.fusion}
        if run.fusion == "interpolate" and run.weight is not None:
            info.update(weight=run.weight, weight_from="the experiment file")
        elif run.fusion == "interpolate":
            qrels, source = dev_qrels(self.folder, *self.dev_slice(next((m for m in members if m.trained), run), seed))
            runs = read("dev") if all(an.run_path(f, m.tag).is_file() for f, m in zip(folders("dev"), members)) else []
            if runs and all(set(qrels) <= set(r) for r in runs):
                weight, scores = choose_weight(*({q: r[q] for q in qrels} for r in runs), qrels, MAX_CUTOFF)
                info.update(weight=weight, weight_from=f"dev: {source}, {len(qrels)} queries")
                info[f"dev {SELECT_METRIC}"] = {f"{w:g}": v for w, v in scores.items()}
            else:
                info.update(weight=0.5, weight_from="equal weight: the fused runs have no dev run files of this dev slice")
        for split in self.exp.splits:
            qrels, runs = load_qrels(self.folder / "qrels" / f"{split}.tsv"), read(split)
            fused = fuse(*runs, run.fusion, info.get("weight", 0.5), MAX_CUTOFF)
            depths = [max(map(len, r.values()), default=0) for r in runs]  # what the run files kept (trec_depth)
            an.write_evaluation(self.layout.split_dir(run, seed, split), run.tag, fused, qrels,
                                self.exp.trec_depth.get(split, MAX_CUTOFF),
                                {"split": split, "dataset": self.folder.name, "hybrid": {**info, "fused_depth": depths}})  # fmt: skip
        return None

    def job(self, runs: list[Run], seed: int | None, all_runs: list[Run]) -> str:
        """Train one checkpoint if needed, then evaluate every run that shares it."""
        names = ", ".join(r.name for r in runs) + ("" if seed is None else f" seed {seed}")
        pending = [r for r in runs if not self.layout.evaluated(r, seed)]
        if not pending:
            return f"{names}: done earlier"  # the checkpoint itself may be gone: no need to retrain
        start, lead = time.time(), runs[0]
        if lead.kind == HYBRID:
            if failure := self.hybrid(lead, seed):
                return f"{names}: fusion FAILED: {failure}"
        elif lead.kind == "bm25":
            self.bm25(lead)
        elif lead.kind == "zeroshot":
            if not self.evaluate(lead, None, None):
                return f"{names}: evaluation FAILED, see {self.layout.run_dir(lead, None) / 'eval.log'}"
        elif lead.frozen:
            ckpt = self.layout.checkpoint(lead, all_runs, seed)
            for run in pending:
                if not self.frozen(run, seed, ckpt):
                    return f"{names}: frozen-backbone run FAILED, see {self.layout.run_dir(run, seed) / 'train.log'}"
                keep_training_record(ckpt, self.layout.run_dir(run, seed))
        else:
            ckpt = self.layout.checkpoint(lead, all_runs, seed)
            log = self.layout.run_dir(lead, seed) / "train.log"
            if not (ckpt / "log_history.json").is_file() and not self.may_train:
                return f"{names}: transfer evaluation FAILED: no trained checkpoint in {ckpt}"
            if not (ckpt / "log_history.json").is_file() and not self.train(lead, seed, ckpt, log):
                return f"{names}: training FAILED, see {log}"
            for run in runs:
                keep_training_record(ckpt, self.layout.run_dir(run, seed))
            for run in pending:
                if not self.evaluate(run, seed, ckpt):
                    return f"{names}: evaluation FAILED, see {self.layout.run_dir(run, seed) / 'eval.log'}"
        return f"{names}: {time.time() - start:.0f} s"

    def run_stage(self, runs: list[Run]) -> list[str]:
        """Every missing (checkpoint, seed) of these runs, `--parallel` at a time; returns failures."""
        groups: dict[tuple, list[Run]] = {}
        hybrids = {(run.name, seed): [run] for run in runs if run.kind == HYBRID for seed in run.seeds or [None]}
        for run in runs:
            for seed in run.seeds if run.trained else [None]:
                key = (str(self.layout.checkpoint(run, runs, seed)), seed) if run.trained else (run.name, None)
                if run.kind != HYBRID:
                    groups.setdefault(key, []).append(run)
        self.layout.root.mkdir(parents=True, exist_ok=True)
        total, done, lock = len(groups) + len(hybrids), [0], threading.Lock()

        def work(i: int, item) -> str:
            (_, seed), group = item
            names = ", ".join(r.name for r in group) + ("" if seed is None else f" seed {seed}")
            print(f"[{i}/{total}] start {names}", flush=True)
            message = self.job(group, seed, runs)
            with lock:
                done[0] += 1
                print(f"[{done[0]}/{total} done] {message}", flush=True)
                with open(self.layout.root / "runner.log", "a", encoding="utf-8") as log:
                    log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            return message

        with ThreadPoolExecutor(1 if self.args.in_process else self.args.parallel) as pool:
            messages = list(pool.map(work, range(1, len(groups) + 1), groups.items()))
        messages += [work(len(groups) + i, item) for i, item in enumerate(hybrids.items(), 1)]  # after what they fuse
        return [m for m in messages if "FAILED" in m]


def keep_training_record(ckpt: Path, out: Path) -> None:
    """Copy what training recorded (dev curve, run info) and the expert scale next to the results."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("log_history.json", "run_info.json"):
        if (ckpt / name).is_file():
            shutil.copyfile(ckpt / name, out / name)
    scale = expert_out_max_abs(ckpt)
    if scale is not None:
        an.write_checkpoint_facts(out, {"expert_out_max_abs": scale})


def expert_out_max_abs(ckpt: Path) -> float | None:
    """Largest |weight| of the experts' output projections (SB-MoE's residual-zero design starts them at 0)."""
    from safetensors import safe_open

    weights = next((ckpt / n for n in ("model.safetensors", "head.safetensors") if (ckpt / n).is_file()), None)
    if weights is None:  # (frozen.py saves the head alone)
        return None
    with safe_open(weights, "pt") as f:
        keys = [k for k in f.keys() if ".experts." in k and k.endswith("fc_out.weight")]
        return max(float(f.get_tensor(k).abs().max()) for k in keys) if keys else None


# --------------------------------------------------------------------------------------------
# Selection on dev


def choose(exp: Experiment, layout: Layout) -> list[str]:
    """Per group of alternatives, the option with the best dev NDCG@10 if it beats the reference's.

    Dev scores come from each run's first seed; the test split plays no part.
    """

    def dev(run: Run) -> float | None:
        if not run.seeds:  # e.g. left out by --seeds
            return None
        folder = layout.run_dir(run, run.seeds[0])
        return an.best_dev(an.read_log_history(folder)) if (folder / "log_history.json").is_file() else None

    ref = dev(exp.runs[exp.select["reference"]])
    if ref is None:
        fail(f"select: the reference run {exp.select['reference']!r} has no dev NDCG@10 (trained without dev "
             "evaluation?): nothing to choose on")  # fmt: skip
    flags = []
    for group in dict.fromkeys(r.group for r in exp.runs.values() if r.group):
        options = [(score, run.name) for run in exp.runs.values() if run.group == group
                   and (score := dev(run)) is not None]  # fmt: skip
        if options and max(options)[0] > ref:
            flags += exp.runs[max(options)[1]].train
    return flags


def chosen_runs(exp: Experiment, flags: list[str]) -> dict[str, Run]:
    """Stage 2: the `select.runs` again with the chosen flags over the select seeds, named `chosen/<run>`.

    Each keeps its references that are also in stage 2; one without any is compared with
    `chosen/<select.compare_to>` (default: the select reference).
    """
    sel = exp.select
    names = list(sel.get("runs", [sel["reference"]]))
    base = sel.get("compare_to", sel["reference"])
    out = {}
    for name in names:
        run = exp.runs[name]
        refs = [f"chosen/{r}" for r in run.references if r in names]
        if not refs and name != base and base in names:
            refs = [f"chosen/{base}"]
        out[f"chosen/{name}"] = replace(run, name=f"chosen/{name}", train=[*run.train, *flags], group=None,
                                        seeds=list(sel.get("seeds", exp.seeds)), references=refs)  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# Transfer: every checkpoint, BM25 and the zero-shot backbone on other BEIR datasets (BEIR's zero-shot protocol)


def transfer_name(entry: str) -> str:
    """A transfer entry's name in the results: the dataset name, or a folder's last component."""
    return Path(entry.rstrip("/\\")).name


def resolve_transfer(exp: Experiment, download: bool = True) -> dict[str, Path]:
    """Each transfer dataset's folder, checked to have a test split, before anything trains."""
    folders = {}
    for entry in exp.transfer:
        is_folder = "/" in entry or os.sep in entry or entry.startswith(".")
        folder = resolve_data_dir(None, entry) if is_folder else resolve_data_dir(entry, None, download=download)
        if not (folder / "qrels" / "test.tsv").is_file():
            raise DataError(f"transfer dataset {entry}: {folder / 'qrels' / 'test.tsv'} does not exist")
        folders[transfer_name(entry)] = folder
    return folders


def transfer_stages(exp: Experiment, stages: list[dict[str, Run]]) -> list[dict[str, Run]]:
    """The runs evaluated on a transfer dataset: BM25, the zero-shot backbone and every trained checkpoint of
    each stage, all compared with the (first) baseline run. Frozen-backbone heads are left out (frozen.py
    trains and evaluates in one call on the training dataset)."""
    first = [r for r in stages[0].values() if r.kind in UNTRAINED]
    for kind, label in (("bm25", "BM25"), ("zeroshot", "zero-shot")):
        if not any(r.kind == kind for r in first):
            first.append(Run(kind, kind, label=label))
    out = []
    for i, stage in enumerate(stages):
        runs = [*(first if i == 0 else []), *(r for r in stage.values() if r.trained and not r.frozen)]
        base = next((r.name for r in runs if r.kind == "baseline"), None)
        out.append({r.name: replace(r, references=[base] if base and r.name != base else []) for r in runs})
    return out


def transfer_layout(exp: Experiment, args, name: str) -> tuple[Experiment, Layout]:
    """results/<experiment>/transfer/<name>/..., reading the experiment's own checkpoints."""
    tx = replace(exp, splits=["test"], subsets=[], trec_depth={}, transfer=[])
    layout = Layout(tx, args.results, args.ckpt_root)
    layout.root = Path(args.results) / exp.name / "transfer" / name
    return tx, layout


def run_transfer(exp: Experiment, args, folders: dict[str, Path], stages: list[dict[str, Run]]) -> list[str]:
    failed = []
    for name, folder in folders.items():
        tx, layout = transfer_layout(exp, args, name)
        runner = Runner(tx, args, folder)
        runner.layout, runner.may_train = layout, False
        print(f"transfer: {name} ({folder.name}), test split", flush=True)
        for stage in transfer_stages(exp, stages):
            failed += runner.run_stage(list(stage.values()))
    return failed


def transfer_report(exp: Experiment, args, stages: list[dict[str, Run]]) -> dict:
    """Per transfer dataset, one summary (rows and paired tests against the baseline) of every stage merged."""
    out = {}
    for entry in exp.transfer:
        name = transfer_name(entry)
        tx, layout = transfer_layout(exp, args, name)
        runs = {n: r for stage in transfer_stages(exp, stages) for n, r in stage.items()}
        summary = summarise(tx, layout, runs, {})
        if summary["rows"]:
            out[name] = summary
    return out


# --------------------------------------------------------------------------------------------
# Report


def summarise(exp: Experiment, layout: Layout, runs: dict[str, Run], subsets: dict[str, list[str]]) -> dict:
    """Rows (mean ± std over the evaluated seeds) and paired tests of one stage."""
    main = exp.splits[0]
    rows, scores = {}, {}
    for run in runs.values():
        seeds = [s for s in (run.seeds if run.per_seed else [None]) if layout.evaluated(run, s)]
        if not seeds:
            continue
        per_split = {split: [an.read_per_query(layout.split_dir(run, s, split), run.tag) for s in seeds]
                     for split in exp.splits}  # fmt: skip
        row = {"label": run.label, "kind": run.kind, "change": " ".join(run.train + run.eval),
               "seeds": seeds if run.per_seed else [], "planned_seeds": run.seeds if run.per_seed else []}  # fmt: skip
        if run.kind == HYBRID:  # how each seed's runs were fused
            row["hybrid"] = {str(s): an.read_metrics(layout.split_dir(run, s, main)).get("hybrid") for s in seeds}
        for split, per_seed in per_split.items():
            prefix = "" if split == main else f"{split} "
            for col in TABLE_COLUMNS:
                row[prefix + col] = an.mean_std([mean_metrics(r)[col] for r in per_seed])
        for name, qids in subsets.items():
            row[f"{name} NDCG@10"] = an.mean_std([an.subset_mean(r, qids) for r in per_split[main]])
        histories = [an.read_log_history(layout.run_dir(run, s)) for s in seeds
                     if run.trained and (layout.run_dir(run, s) / "log_history.json").is_file()]  # fmt: skip
        devs = [d for d in (an.best_dev(h) for h in histories) if d is not None]
        row["dev NDCG@10"] = an.mean_std(devs) if devs else None
        times = [t for t in map(an.train_seconds, histories) if t is not None]
        row["train_seconds"] = an.mean_std(times) if times else None
        times = [t for s in seeds if (t := an.eval_seconds(layout.split_dir(run, s, main))) is not None]
        row["eval_seconds"] = an.mean_std(times) if times else None
        facts = {s: an.read_checkpoint_facts(layout.run_dir(run, s)) for s in seeds if run.trained}
        row["expert_out_max_abs"] = {str(s): f["expert_out_max_abs"] for s, f in facts.items()
                                     if f.get("expert_out_max_abs") is not None}  # fmt: skip
        rows[run.name] = row
        scores[run.name] = dict(zip(seeds, per_split[main]))
    tests = [compare(run.name, ref, scores[run.name], scores[ref], subsets) for run in runs.values()
             for ref in run.references if run.name in scores and ref in scores]  # fmt: skip
    return {"rows": rows, "tests": tests}


def compare(run: str, reference: str, a: dict, b: dict, subsets: dict[str, list[str]]) -> dict:
    """Paired tests over queries of one run against its reference: seed-averaged and per seed, on all
    queries and on each subset. Seeds present in both (an untrained reference serves every seed)."""
    untrained_a, untrained_b = list(a) == [None], list(b) == [None]
    seeds = list(b) if untrained_a and not untrained_b else [s for s in a if s in b or untrained_b]
    pick = lambda scores, s: scores[None] if list(scores) == [None] else scores[s]  # noqa: E731
    qids = sorted(next(iter(a.values())))
    x = an.scores_matrix([pick(a, s) for s in seeds], qids)
    y = an.scores_matrix([pick(b, s) for s in seeds], qids)
    out = {"run": run, "reference": reference, "seeds": seeds, "queries": len(qids), **an.paired_tests(x.mean(0), y.mean(0))}
    out["per_seed"] = [an.paired_tests(xs, ys) for xs, ys in zip(x, y)]
    for name, subset in subsets.items():
        keep = np.isin(qids, subset)
        out[name] = an.paired_tests(x.mean(0)[keep], y.mean(0)[keep]) if keep.sum() > 1 else None
    return out


def build_report(exp: Experiment, layout: Layout, folder: Path, stages: list[dict[str, Run]],
                 chosen: list[str] | None) -> dict:
    """Every stage summarised; each run's row also written as `<run>/summary.json`."""
    subsets = {}
    if exp.subsets:
        train, reported = an.split_qrels(folder, exp.splits[0])
        subsets = {k: v for k, v in an.query_subsets(train, reported).items() if k in exp.subsets}
    result = {"experiment": exp.name, "description": exp.description, "splits": exp.splits,
              "recipe": exp.recipe, "subsets": subsets,
              "stages": [summarise(exp, layout, runs, subsets) for runs in stages]}  # fmt: skip
    if chosen is not None:
        result["chosen"] = chosen
    for stage in result["stages"]:
        for name, row in stage["rows"].items():
            atomic_write_text(layout.root / name / "summary.json", json.dumps(row, indent=2))
    return result


def render(result: dict) -> str:
    main, others = result["splits"][0], result["splits"][1:]
    subsets = result["subsets"]
    cols = [*TABLE_COLUMNS, *(f"{k} NDCG@10" for k in subsets), *(f"{s} {c}" for s in others
                                                                 for c in ("NDCG@10", "Recall@10"))]  # fmt: skip
    lines = [f"# {result['experiment']}", ""]
    if result["description"]:
        lines += [result["description"], ""]
    notes = [f"Metrics on the {main} split; trained runs: mean ± std over their seeds."]
    for name, qids in subsets.items():
        what = "none of whose relevant documents is a positive of any" if name == "unseen" else (
            "with a relevant document that is a positive of some")
        notes.append(f"*{name}*: the {len(qids)} {main} queries {what} training query.")
    for split in others:
        notes.append(f"Columns *{split} ...*: the same models on the {split} queries"
                     + (" (the paper's leaky protocol)." if split == "train" else "."))  # fmt: skip
    lines += [" ".join(notes), "", f"Recipe of every trained run: `{' '.join(result['recipe']) or '(defaults)'}`."]
    for i, stage in enumerate(result["stages"]):
        if i == 1:
            lines += ["", "## Stage 2: the combination chosen on dev", "",
                      f"Chosen on dev: `{' '.join(result.get('chosen') or []) or '(no option beat the reference)'}`"]
        lines += ["", *table(stage, cols), "", *tests_text(stage, subsets), *cost_text(stage)]
    if result.get("chosen") is not None and len(result["stages"]) == 1:
        lines += ["", f"Chosen on dev for stage 2: `{' '.join(result['chosen']) or '(none)'}` (not trained yet)."]
    for name, stage in result.get("transfer", {}).items():
        lines += ["", f"## Transfer: {name}", "",
                  f"The same checkpoints, BM25 and the zero-shot backbone on the test split of {name}, which no run "
                  "trained on (BEIR's zero-shot protocol); paired tests against the baseline.", "",
                  *table(stage, list(TABLE_COLUMNS)), "", *tests_text(stage, {})]  # fmt: skip
    return "\n".join(lines) + "\n"


def cell(value, spread: bool) -> str:
    if value is None:
        return "-"
    m, s = value
    return f"{m:.4f} ± {s:.4f}" if spread else f"{m:.4f}"


def table(stage: dict, cols: list[str]) -> list[str]:
    lines = ["| run | change | seeds | dev NDCG@10 | " + " | ".join(cols) + " |", "|---" * (len(cols) + 4) + "|"]
    for name, row in stage["rows"].items():
        first = next((t for t in stage["tests"] if t["run"] == name), None)  # against its first reference
        mark = " †" if first and an.significant(first) else ""
        spread = len(row["seeds"]) > 1
        seeds = ", ".join(map(str, row["seeds"])) or "-"
        if len(row["seeds"]) < len(row["planned_seeds"]):
            seeds += f" (of {len(row['planned_seeds'])})"
        cells = [f"`{row['change']}`" if row["change"] else "", seeds, cell(row["dev NDCG@10"], spread)]
        cells += [cell(row.get(c), spread) for c in cols]
        lines.append(f"| {row['label']}{mark} | " + " | ".join(cells) + " |")
    return lines


def cost_text(stage: dict) -> list[str]:
    """Training and evaluation wall-clock per run (mean over seeds), where the files record them."""
    timed = {n: r for n, r in stage["rows"].items() if r.get("train_seconds") or r.get("eval_seconds")}
    if not timed:
        return []
    minutes = lambda v: "-" if not v else f"{v[0] / 60:.1f}"  # noqa: E731
    lines = ["", "Wall-clock minutes per run and seed (mean over seeds; training includes its dev evaluations; "
             "evaluation is eval.py's encoding and search of every split; on a shared machine these are rough):", "",
             "| run | training | evaluation |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {r['label']} | {minutes(r.get('train_seconds'))} | {minutes(r.get('eval_seconds'))} |"
              for r in timed.values()]  # fmt: skip
    return lines


def hybrid_text(per_seed: dict[str, dict], rows: dict) -> str:
    """How a hybrid row's runs were fused (metrics.json's `hybrid` of each seed)."""
    first = next(iter(per_seed.values()))
    a, b = (rows[m]["label"] if m in rows else m for m in first["fuse"])
    if first["fusion"] == "rrf":
        return f"reciprocal rank fusion of {a} and {b} (k = 60)"
    weights = {s: f"{h['weight']:g}" for s, h in per_seed.items()}
    weight = next(iter(weights.values())) if len(set(weights.values())) == 1 else ", ".join(
        f"{w} (seed {s})" for s, w in weights.items())  # fmt: skip
    sources = "; ".join(dict.fromkeys(h["weight_from"] for h in per_seed.values()))
    return f"min-max normalised scores, {a} weighted {weight}, {b} 1 minus that ({sources})"


def p_text(t: dict) -> str:
    return f"{t['mean_diff']:+.4f}, t-test p = {t['t_pvalue']:.3g}, randomisation p = {t['rand_pvalue']:.3g}"


def tests_text(stage: dict, subsets: dict) -> list[str]:
    lines = []
    rows = stage["rows"]
    for t in stage["tests"]:
        name = t["run"]
        verdict = "significant" if an.significant(t) else "not significant (inside the noise)"
        n = len(t["seeds"])
        avg = "seed-averaged " if n > 1 else ""
        lines.append(f"- {rows[name]['label']} vs {rows[t['reference']]['label']}, NDCG@10 per query ({avg}"
                     f"{t['queries']} queries, paired): difference {p_text(t)}: {verdict}.")  # fmt: skip
        for sub in subsets:
            if t.get(sub):
                lines.append(f"  On the {len(subsets[sub])} {sub}-document queries: difference {p_text(t[sub])}.")
        if n > 1:
            each = ", ".join(f"seed {s} {r['mean_diff']:+.4f} (t p = {r['t_pvalue']:.3g})"
                             for s, r in zip(t["seeds"], t["per_seed"]))  # fmt: skip
            lines.append(f"  Per seed: {each}.")
    for row in rows.values():
        if row.get("hybrid"):
            lines.append(f"- {row['label']}: {hybrid_text(row['hybrid'], rows)}.")
        if row["expert_out_max_abs"] and row["kind"] == "sbmoe":
            scales = ", ".join(f"seed {k} {v:.4f}" for k, v in row["expert_out_max_abs"].items())
            lines.append(f"- {row['label']}: experts' output projections, largest |weight| after training: {scales}.")
    if stage["tests"]:
        lines.append("- † marks a difference from the (first) reference significant at 0.05 in both paired tests; the ± "
                     "and the per-seed lines show how much the seeds disagree.")  # fmt: skip
    return lines


# --------------------------------------------------------------------------------------------
# Figures


def figures(exp: Experiment, layout: Layout, stages: list[dict[str, Run]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for stage in stages for r in stage.values() if r.trained]
    histories = {r.name: [an.read_log_history(layout.run_dir(r, s)) for s in r.seeds
                          if (layout.run_dir(r, s) / "log_history.json").is_file()] for r in runs}  # fmt: skip
    histories = {k: v for k, v in histories.items() if v}
    if "training" in exp.figures and histories:
        fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(11, 4))
        for i, (name, hists) in enumerate(histories.items()):
            style = {"color": plt.cm.tab20(i % 20), "ls": "--" if name.startswith("chosen/") else "-"}
            for ax, curves in ((ax_loss, [an.epoch_losses(h) for h in hists]),
                               (ax_dev, [[v for _, v in an.dev_curve(h)] for h in hists])):  # fmt: skip
                n = min(len(c) for c in curves)
                if n == 0:
                    continue
                arr = np.array([c[:n] for c in curves])
                x = np.arange(1, n + 1)
                ax.plot(x, arr.mean(0), marker="o", ms=3, label=name, **style)
                if len(curves) > 1:
                    ax.fill_between(x, arr.min(0), arr.max(0), alpha=0.15, color=style["color"])
        ax_loss.set(title="training InfoNCE per epoch", xlabel="epoch", ylabel="InfoNCE")
        ax_dev.set(title="dev NDCG@10 per epoch", xlabel="epoch", ylabel="NDCG@10")
        for ax in (ax_loss, ax_dev):
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=6)
        fig.suptitle(f"{exp.name}: mean over seeds; band = min..max")
        fig.tight_layout()
        fig.savefig(layout.root / "fig_training.png", dpi=120)
        plt.close(fig)
    shares, seen = {}, set()
    for run in runs:  # one panel per checkpoint with more than one expert
        per_seed = [an.expert_shares(h) for h in histories.get(run.name, [])]
        key = (run.kind, tuple(run.train), run.frozen)
        if per_seed and per_seed[0] and max(len(v) for v in per_seed[0].values()) > 1 and key not in seen:
            seen.add(key)
            shares[run.name] = per_seed
    if "experts" in exp.figures and shares:
        cols = min(4, len(shares))
        rows = -(-len(shares) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
        for ax in axes.flat[len(shares) :]:
            ax.axis("off")
        for ax, (name, per_seed) in zip(axes.flat, shares.items()):
            blocks = sorted(per_seed[0])
            width = 0.8 / len(blocks)
            for b, block in enumerate(blocks):
                vals = np.mean([s[block] for s in per_seed if block in s], axis=0)
                ax.bar(np.arange(len(vals)) + b * width, vals, width, label=f"block {block}")
            ax.axhline(1 / len(per_seed[0][blocks[0]]), color="k", ls="--", lw=0.8, label="uniform")
            ax.set(title=f"{name}: share per expert (training)", xlabel="expert", ylabel="share of routed inputs")
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(layout.root / "fig_experts.png", dpi=120)
        plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line


def check_backbone(name: str | None) -> None:
    """A DataError when the backbone is neither a local folder nor on the hub (None: main says so)."""
    from model import check_source

    if name:
        try:
            check_source(name)
        except ValueError as exc:
            raise DataError(str(exc)) from None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", help="an experiment file (experiments/*.toml)")
    p.add_argument("--model_name_or_path", help="backbone (default: the file's `model`)")
    p.add_argument("--dataset", help="BEIR dataset under $BEIR_DATA_DIR (default: the file's)")
    p.add_argument("--data_dir", help="a BEIR folder (overrides --dataset and the file)")
    p.add_argument("--results", default="results", help="results root; the experiment writes <results>/<name>/")
    p.add_argument("--ckpt_root", default="checkpoints", help="checkpoints root")
    p.add_argument("--parallel", type=int, default=1, help="jobs at a time (one GPU holds several)")
    p.add_argument("--torchrun", action="store_true", help="launch training through torchrun")
    p.add_argument("--nproc", type=int, default=1, help="processes per training run with --torchrun")
    dtype = p.add_mutually_exclusive_group()
    dtype.add_argument("--fp16", action="store_true", help="fp16 mixed precision in training and evaluation (GPU)")
    dtype.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU, or a CPU with bf16 units)")
    p.add_argument("--seeds", nargs="+", type=int, help="run only these of the file's seeds (e.g. a cut for a CPU)")
    p.add_argument("--smoke", action="store_true", help=f"plumbing only: the first seed (or --seeds), 2 training steps, "
                   f"32-token documents, on a slice of the data ({SMOKE_QUERIES} queries a split, {SMOKE_DOCS} documents)")
    p.add_argument("--in_process", action="store_true", help="train and evaluate in this process, one at a time")
    p.add_argument("--report", action="store_true", help="only rebuild the report from the results on disk")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags for every training run")
    args = p.parse_args(argv)
    for flag in ("parallel", "nproc"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    try:
        exp = load_experiment(args.experiment)
        if args.seeds:
            exp = restrict_seeds(exp, args.seeds)
            if not any(r.seeds for r in exp.runs.values() if r.trained) and any(r.trained for r in exp.runs.values()):
                raise DataError(f"--seeds {' '.join(map(str, args.seeds))}: none of {args.experiment}'s seeds")
        if not args.report:  # the backbone and the data are found (or said not to be) before anything runs
            check_backbone(args.model_name_or_path or exp.model)
            for flag in ("results", "ckpt_root"):
                check_writable(getattr(args, flag), f"--{flag}")
        folder = resolve_data_dir(args.dataset or exp.dataset, args.data_dir or exp.data_dir, download=not args.report)
        missing = [s for s in exp.splits if not (folder / "qrels" / f"{s}.tsv").is_file()]
        if missing:
            raise DataError(f"{args.experiment}: splits {missing} have no qrels in {folder / 'qrels'}")
        if args.smoke and not args.report:  # plumbing: every stage once, on a slice, with the first seed
            folder = smoke_slice(folder, Path(args.results) / exp.name / "smoke-data" / folder.name)
            exp = exp if args.seeds else restrict_seeds(exp, exp.seeds[:1])
        transfer = {} if args.report else resolve_transfer(exp)  # a missing one fails before anything trains
    except DataError as exc:
        fail(str(exc))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runner = Runner(exp, args, folder)
    if not args.report and not runner.model:
        fail("no backbone: give --model_name_or_path or `model` in the experiment file")
    layout = runner.layout
    stages = [exp.runs]
    if not args.report and (failed := runner.run_stage(list(exp.runs.values()))):
        fail(f"{len(failed)} job(s) failed: {failed[0]}")
    chosen = None
    if exp.select:
        chosen = choose(exp, layout)
        stages.append(chosen_runs(exp, chosen))
        if not args.report and (failed := runner.run_stage(list(stages[1].values()))):
            fail(f"{len(failed)} stage 2 job(s) failed: {failed[0]}")
    if transfer and (failed := run_transfer(exp, args, transfer, stages)):
        fail(f"{len(failed)} transfer job(s) failed: {failed[0]}")
    result = build_report(exp, layout, folder, stages, chosen)
    if exp.transfer:
        result["transfer"] = transfer_report(exp, args, stages)
    text = render(result)
    atomic_write_text(layout.root / "report.json", json.dumps(result, indent=2))
    atomic_write_text(layout.root / "report.md", text)
    if not args.smoke:
        figures(exp, layout, stages)
    print(text)
    return result


if __name__ == "__main__":
    main()

"""An experiment's stages beyond one pass over its runs: the second stage chosen on dev (`[select]`), the
transfer datasets (BEIR's zero-shot protocol), several training datasets (`datasets`), and the smoke slice."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from lab.jobs import Outcome
from lab.layout import Layout
from lab.report import build_report, routing_section, store_subsets, summarise
from lab.runner import Runner, is_moe
from lab.settings import Settings, merge
from lab.spec import HYBRID, UNTRAINED, Experiment, Run, transfer_name
from sbmoe import results as an
from sbmoe.data import (
    DataError,
    corpus_path,
    is_dataset_folder,
    load_corpus,
    load_qrels,
    load_queries,
    read_lines,
    resolve_dataset,
)
from sbmoe.files import atomic_write_text
from sbmoe.metrics import PRIMARY_METRIC
from utils import fail

SMOKE_QUERIES, SMOKE_DOCS = 40, 300  # per split, in all: the slice of the dataset a smoke run works on


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


# --------------------------------------------------------------------------------------------
# Selection on dev


def choose(exp: Experiment, layout: Layout) -> Settings:
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
        fail(f"select: the reference run {exp.select['reference']!r} has no dev {PRIMARY_METRIC} (trained without dev "
             "evaluation?): nothing to choose on")  # fmt: skip
    chosen = []
    for group in dict.fromkeys(r.group for r in exp.runs.values() if r.group):
        options = [(score, run.name) for run in exp.runs.values() if run.group == group
                   and (score := dev(run)) is not None]  # fmt: skip
        if options and max(options)[0] > ref:
            chosen.append(exp.runs[max(options)[1]].train)
    return merge(*chosen)


def chosen_runs(exp: Experiment, chosen: Settings) -> dict[str, Run]:
    """Stage 2: the `select.runs` again with the chosen settings over the select seeds, named `chosen/<run>`.

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
        out[f"chosen/{name}"] = replace(run, name=f"chosen/{name}", train=merge(run.train, chosen), group=None,
                                        seeds=list(sel.get("seeds", exp.seeds)), references=refs)  # fmt: skip
    return out



def stages_of(exp: Experiment, layout: Layout) -> tuple[list[dict[str, Run]], Settings | None]:
    """The stages of the experiment (the second chosen on dev from the files) and the chosen settings."""
    if not exp.select:
        return [exp.runs], None
    chosen = choose(exp, layout)
    return [exp.runs, chosen_runs(exp, chosen)], chosen




# --------------------------------------------------------------------------------------------
# Transfer: every checkpoint, BM25 and the zero-shot backbone on other BEIR datasets (BEIR's zero-shot protocol)


def dataset_digest(folder: Path) -> str:
    """A BEIR folder's identity by content: its corpus and queries records (plain or gzip, line endings aside)."""
    h = hashlib.sha1()
    for path in (corpus_path(folder), next(p for p in (folder / "queries.jsonl", folder / "queries.jsonl.gz")
                                           if p.is_file())):  # fmt: skip
        for _, line in read_lines(path):
            if line.strip():
                h.update(line.rstrip("\r\n").encode("utf-8") + b"\n")
        h.update(b"\0")
    return h.hexdigest()


def resolve_transfer(exp: Experiment, training: list[Path], download: bool = True) -> dict[str, Path]:
    """Each transfer dataset's folder, checked to have a test split and to be neither a training dataset nor
    another entry's (by content: a copy under another name is the same data), before anything trains."""
    one = len(training) == 1
    folders, seen = {}, {dataset_digest(t): "the training dataset" if one else f"training dataset {t.name}" for t in training}
    for entry in exp.transfer:
        if is_dataset_folder(entry) and not Path(entry).is_dir():
            raise DataError(f"transfer dataset {entry}: no such folder (experiment {exp.name})")
        folder = resolve_dataset(entry, download=download)
        if not (folder / "qrels" / "test.tsv").is_file():
            raise DataError(f"transfer dataset {entry}: {folder / 'qrels' / 'test.tsv'} does not exist")
        digest = dataset_digest(folder)
        if digest in seen:
            raise DataError(f"transfer dataset {entry}: the same corpus and queries as {seen[digest]} (a transfer "
                            "dataset is one the models were not trained on)")  # fmt: skip
        seen[digest] = f"transfer dataset {transfer_name(entry)}"
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
        names = {r.name for r in runs}

        def refs(r: Run, names=names, base=base) -> list[str]:  # several training datasets: the file's own tests
            return [x for x in r.references if x in names] if exp.datasets else [base] if base and r.name != base else []

        out.append({r.name: replace(r, references=refs(r)) for r in runs})
    return out


def transfer_layout(exp: Experiment, args, name: str, transfer: bool = True) -> tuple[Experiment, Layout]:
    """results/<experiment>/transfer/<name>/... (test split only), or with several training datasets each one's
    results/<experiment>/datasets/<name>/... (every split and subset); both read the experiment's checkpoints."""
    tx = replace(exp, splits=["test"], subsets=[], trec_depth={}, transfer=[]) if transfer else replace(exp, transfer=[])
    layout = Layout(tx, args.results, args.ckpt_root)
    layout.root = Path(args.results) / exp.name / ("transfer" if transfer else "datasets") / name
    return tx, layout


def resolve_training_sets(exp: Experiment, args) -> dict[str, Path]:
    """The file's `datasets` by name: each folder, checked to have the evaluated splits (a slice of it in --smoke)."""
    folders = {}
    for entry in exp.datasets:
        name, folder = transfer_name(entry), resolve_dataset(entry)
        missing = [s for s in exp.splits if not (folder / "qrels" / f"{s}.tsv").is_file()]
        if missing:
            raise DataError(f"{args.experiment}: splits {missing} have no qrels in {folder / 'qrels'}")
        folders[name] = smoke_slice(folder, Path(args.results) / exp.name / "smoke-data" / name) if args.smoke else folder
    return folders


def cell_units(exp: Experiment, layout: Layout) -> list[list[Run]]:
    """What each of the file's runs needs made, in the order to make it: BM25 and the zero-shot backbone, then
    seed by seed each checkpoint in file order with every run that shares it (restricted to that seed), then
    the hybrids (after what they fuse)."""
    listed = list(exp.runs.values())
    checkpoints: dict[tuple[int, str], list[Run]] = {}
    for seed in dict.fromkeys(s for r in listed if r.trained for s in r.seeds):
        for run in listed:
            if run.trained and seed in run.seeds:
                checkpoints.setdefault((seed, layout.lead(run, listed).name), []).append(replace(run, seeds=[seed]))
    units = [[r for r in listed if r.kind in UNTRAINED], *checkpoints.values(), [r for r in listed if r.kind == HYBRID]]
    return [u for u in units if u]


def run_datasets(exp: Experiment, args, folders: dict[str, Path], transfer: dict[str, Path]) -> list[Outcome]:
    """Several training datasets, one checkpoint at a time: trained (by the first dataset's pass), then evaluated
    on every training dataset's splits and every transfer dataset before the next one trains (`cell_units`), so
    that each finished (run, seed) is whole and an MoE checkpoint's per-domain routing is known as soon as it is
    made. A cell that failed on one dataset is not tried on the ones after it (the next call goes on)."""
    runners, first = {}, next(iter(folders.values()))
    for name, folder in folders.items():
        tx, layout = transfer_layout(exp, args, name, transfer=False)
        runner = runners[f"dataset {name}"] = Runner(tx, args, folder, folders)
        runner.layout, runner.routing = layout, True
        store_subsets(tx, layout, folder)
    for name, folder in transfer.items():
        runners[f"transfer {name}"] = transfer_runner(exp, args, name, folder, first, folders)
    evaluated = transfer_stages(exp, [exp.runs])[0]  # what a transfer dataset evaluates: BM25, zero-shot, checkpoints
    extra = [r for r in evaluated.values() if r.name not in exp.runs]  # (BM25 or zero-shot when the file has none)
    failed = []
    for i, unit in enumerate(cell_units(exp, next(iter(runners.values())).layout)):
        seeds = {r.name: r.seeds for r in unit}  # (a checkpoint's unit holds one seed: so does its transfer cell)
        for where, runner in runners.items():
            runs = unit if runner.may_train else [replace(r, seeds=seeds.get(r.name, r.seeds)) for r in evaluated.values()
                                                  if r.name in seeds or (i == 0 and r in extra)]  # fmt: skip
            if runs:
                print(f"{where}: {', '.join(r.name for r in runs)}", flush=True)
                if lost := runner.run_stage(runs):
                    failed += lost
                    break
    return failed


def datasets_report(exp: Experiment, args) -> dict:
    """Per training dataset, its report (rows, subsets, paired tests), from the files alone; and the per-domain
    routing of every MoE checkpoint, from the routing records its lead run's evaluation wrote on each dataset."""
    out, layouts = {}, {}
    for entry in exp.datasets:
        name = transfer_name(entry)
        tx, layouts[name] = transfer_layout(exp, args, name, transfer=False)
        out[name] = build_report(tx, layouts[name], [exp.runs], None)
    listed = list(exp.runs.values())
    first = next(iter(layouts.values()))
    leads = [r for r in listed if is_moe(r) and r.seeds and first.checkpoint(r, listed, r.seeds[0]).parent.name == r.name]
    return {"experiment": exp.name, "description": exp.description, "splits": exp.splits, "recipe": exp.recipe,
            "subsets": {}, "stages": [], "datasets": out, "routing": routing_section(exp, layouts, leads)}  # fmt: skip


def transfer_runner(exp: Experiment, args, name: str, folder: Path, train_folder: Path,
                    train_folders: dict[str, Path] | None = None) -> Runner:  # fmt: skip
    """A runner that evaluates the experiment's checkpoints on a transfer dataset and never trains."""
    tx, layout = transfer_layout(exp, args, name)
    runner = Runner(tx, args, folder, train_folders)
    runner.layout, runner.may_train, runner.train_folder = layout, False, train_folder
    return runner


def run_transfer(exp: Experiment, args, folders: dict[str, Path], stages: list[dict[str, Run]],
                 train_folder: Path) -> list[Outcome]:  # fmt: skip
    """One training dataset: every checkpoint of every stage on each transfer dataset (several: run_datasets)."""
    failed = []
    for name, folder in folders.items():
        runner = transfer_runner(exp, args, name, folder, train_folder)
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



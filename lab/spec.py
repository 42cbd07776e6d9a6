"""The experiment file: its schema (`Run`, `Experiment`), `load_experiment` and every check of it.

The file format is described in experiments/README.md; experiment.py runs what this reads.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from lab.settings import Settings, check_table
from model import VARIANTS
from sbmoe.data import SUBSETS, DataError, dataset_name
from sbmoe.retrieval import FUSIONS

UNTRAINED = ("zeroshot", "bm25")  # evaluated once, seed-independent
TOP_KEYS = {"name", "description", "dataset", "data_dir", "model", "seeds", "splits", "subsets", "recipe", "eval",
            "trec_depth", "runs", "select", "figures", "frozen", "transfer", "datasets", "precision"}  # fmt: skip
RUN_KEYS = {"kind", "train", "eval", "label", "reference", "group", "seeds", "frozen", "fuse", "weight", "fusion",
            "datasets"}  # fmt: skip
PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # auto: bf16 where the device has bf16 units, else fp32
FIGURES = ("training", "experts", "routing")  # routing: per-domain expert shares, with several training datasets
HYBRID = "hybrid"  # two runs of the file fused (retrievers.fuse), per seed where one of them is trained


# --------------------------------------------------------------------------------------------
# The experiment file


@dataclass
class Run:
    name: str
    kind: str
    train: Settings = field(default_factory=dict)  # training settings over the file's recipe (lab/settings.py)
    eval: Settings = field(default_factory=dict)  # evaluation settings over the file's `eval`
    seeds: list[int] = field(default_factory=list)
    label: str = ""
    references: list[str] = field(default_factory=list)  # runs it is compared with (paired tests)
    group: str | None = None
    frozen: bool = False  # backbone frozen: frozen.py trains the head on cached backbone outputs
    fuse: list[str] = field(default_factory=list)  # kind hybrid: the two runs fused, the first weighted `weight`
    weight: float | None = None  # kind hybrid: fixed; None: chosen on dev (equal where no dev run files exist)
    fusion: str = "interpolate"  # kind hybrid: interpolate | rrf
    datasets: list[str] = field(default_factory=list)  # trained on these of the file's `datasets` ([]: all of them)

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
    recipe: Settings
    eval: Settings
    trec_depth: dict[str, int]
    runs: dict[str, Run]
    select: dict | None
    figures: list[str]
    transfer: list[str] = field(default_factory=list)  # further BEIR datasets, evaluated on test, never trained on
    datasets: list[str] = field(default_factory=list)  # several training datasets: each run evaluated on each
    precision: str | None = None  # fp32 | bf16 | fp16 | auto, for every run (None: the runner's flags, else fp32)


def restrict_seeds(exp: Experiment, seeds: list[int]) -> Experiment:
    """The experiment with only `seeds` (where a run or the select stage has them)."""
    keep = lambda xs: [s for s in xs if s in seeds]  # noqa: E731
    runs = {n: replace(r, seeds=keep(r.seeds)) for n, r in exp.runs.items()}
    select = None if exp.select is None else {**exp.select, "seeds": keep(exp.select.get("seeds", exp.seeds))}
    return replace(exp, seeds=keep(exp.seeds), runs=runs, select=select)


def check_types(raw: dict, check, at=lambda table, key: None) -> None:
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
    check("precision" not in raw or raw["precision"] in PRECISIONS,
          f"precision must be one of {', '.join(PRECISIONS)}, got {raw.get('precision')!r}")  # fmt: skip
    check(bool(str(raw.get("name", "x")).strip()) and "/" not in str(raw.get("name", "")),
          f"name {raw.get('name')!r} must be a non-empty folder name")  # fmt: skip
    if "seeds" in raw:
        seeds("seeds", raw["seeds"], empty=False)
    if "splits" in raw:
        strings("splits", raw["splits"], empty=False)
        check(len(set(raw["splits"])) == len(raw["splits"]) and all(s.strip() for s in raw["splits"]),
              f"splits must be distinct split names, got {raw['splits']!r}")  # fmt: skip
    for key in ("subsets", "figures", "datasets"):
        if key in raw:
            strings(key, raw[key])
    for key in ("recipe", "eval"):
        if key in raw:
            check_table(key, raw[key], at(None, key))
    check(set(raw.get("figures", [])) <= set(FIGURES), f"figures must be among {list(FIGURES)}")
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
                check_table(f"{where}.{key}", spec[key], at(f"runs.{name}", key))
        if "datasets" in spec:
            strings(f"{where}.datasets", spec["datasets"])
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
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DataError(f"{path}: cannot read an experiment file ({exc})") from None

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise DataError(f"{path}: {message}")

    def at(table: str | None, key: str):
        """A check whose error names the line of `key` in `table` (None: the top level)."""
        line = key_line(text, table, key)

        def check_at(ok: bool, message: str) -> None:
            if not ok:
                raise DataError(f"{path}" + (f":{line}" if line else "") + f": {message}")

        return check_at

    check(not set(raw) - TOP_KEYS, f"unknown key(s) {sorted(set(raw) - TOP_KEYS)}; expected {sorted(TOP_KEYS)}")
    check(isinstance(raw.get("runs"), dict) and bool(raw["runs"]), "no [runs.NAME] tables")
    check_types(raw, check, at)
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
        refs = spec.get("reference", [])
        check(not ("frozen" in spec and kind in UNTRAINED), f"runs.{name}: only a trained kind can be frozen")
        runs[name] = Run(name, kind, dict(spec.get("train", {})), dict(spec.get("eval", {})),
                         list(spec.get("seeds", seeds)), spec.get("label", name), [refs] if isinstance(refs, str)
                         else list(refs), spec.get("group"),
                         kind in VARIANTS and bool(spec.get("frozen", raw.get("frozen", False))))  # fmt: skip
        check("datasets" not in spec or kind in VARIANTS, f"runs.{name}: only a trained kind has datasets")
        runs[name].datasets = list(spec.get("datasets", []))
        if kind == HYBRID:
            runs[name] = hybrid_run(runs[name], spec, raw["runs"], lambda ok, m, n=name: check(ok, f"runs.{n}: {m}"))
    for run in runs.values():
        for ref in run.references:
            check(ref in runs, f"runs.{run.name}.reference {ref!r} is not a run")
            check(ref != run.name, f"runs.{run.name}.reference names the run itself (a paired test needs another run)")
        check(len(set(run.references)) == len(run.references), f"runs.{run.name}.reference names a run twice")
    select = raw.get("select")
    if select is not None:
        check(select.get("reference") in runs, "select.reference must name a run")
        check(all(r in runs for r in select.get("runs", [])), "select.runs must name runs")
        check(select.get("compare_to", select["reference"]) in runs, "select.compare_to must name a run")
    check(set(raw.get("subsets", [])) <= set(SUBSETS), f"subsets must be among {SUBSETS}")
    transfer = raw.get("transfer", [])
    check(isinstance(transfer, list) and all(isinstance(t, str) and t.strip() for t in transfer),
          "transfer must be a list of dataset names (under $BEIR_DATA_DIR) or BEIR folders")  # fmt: skip
    names = [transfer_name(t) for t in transfer]
    check(len(set(names)) == len(names), f"transfer names a dataset twice: {names}")
    datasets = list(raw.get("datasets", []))
    trained_on = [transfer_name(d) for d in datasets]
    check(len(set(trained_on)) == len(trained_on), f"datasets names a dataset twice: {trained_on}")
    check(not set(trained_on) & set(names), "a dataset is both in datasets and in transfer")
    check(not datasets or not {"dataset", "data_dir", "select"} & set(raw),
          "datasets replaces dataset and data_dir, and has no [select] stage")  # fmt: skip
    for run in runs.values():
        check(not run.datasets or (bool(datasets) and set(run.datasets) <= set(trained_on)),
              f"runs.{run.name}.datasets must name datasets of the file's `datasets` {trained_on}")  # fmt: skip
    return Experiment(
        name=raw.get("name", path.stem), description=raw.get("description", ""), dataset=raw.get("dataset"),
        data_dir=raw.get("data_dir"), model=raw.get("model"), seeds=seeds, splits=splits,
        subsets=list(raw.get("subsets", [])), recipe=dict(raw.get("recipe", {})), eval=dict(raw.get("eval", {})),
        trec_depth=dict(raw.get("trec_depth", {})), runs=runs, select=select,
        figures=list(raw.get("figures", [f for f in FIGURES if f != "routing" or datasets])), transfer=list(transfer),
        datasets=datasets, precision=raw.get("precision"),
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


def key_line(text: str, table: str | None, key: str) -> int | None:
    """The line of `key = ...` in `[table]` (None: before any table) of an experiment file's text."""
    current = None
    for number, line in enumerate(text.splitlines(), 1):
        if header := re.match(r"\s*\[([^\[\]]+)\]", line):
            current = ".".join(a or b for a, b in re.findall(r'"([^"]*)"|([^."\s]+)', header.group(1)))
        elif current == table and re.match(rf"\s*{re.escape(key)}\s*=", line):
            return number
    return None


def transfer_name(entry: str) -> str:
    """A transfer (or training) entry's name in the results: the dataset name, or a folder's last component."""
    return dataset_name(entry)

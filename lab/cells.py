"""What makes a cell: the inputs that shape a (run, seed) cell's numbers, recorded beside it (sbmoe/provenance.py)
and compared with what the runner would run now before a finished cell is reused; the settings they come from."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

from lab.layout import Layout
from lab.settings import Settings, flags, from_flags, merge, same
from lab.spec import HYBRID, Experiment, Run
from model import VARIANTS
from sbmoe import provenance as prov
from sbmoe.device import auto_precision

SMOKE_TRAIN: Settings = {"max_steps": 2, "doc_max_length": 32, "per_device_train_batch_size": 8, "eval_strategy": "no",
                         "load_best_model_at_end": False, "save_strategy": "no"}  # fmt: skip
SMOKE_EVAL: Settings = {"doc_max_length": 32}


def resolve_precision(exp: Experiment, args) -> str:
    """One precision for every run of the experiment: --fp16/--bf16, else the file's `precision` (auto: bf16 where
    the device has bf16 units), else fp32. Each cell records it (provenance.json); a finished cell made in
    another is an error before anything runs, never a mixed table."""
    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else exp.precision or "fp32"
    return auto_precision() if precision == "auto" else precision


def differing_field(recorded: dict, inputs: dict) -> str | None:
    """provenance.differing_field, the training and evaluation flags of a run compared as settings (values: their
    order, spelling and overridden flags aside) rather than as strings."""
    old = dict(recorded.get("inputs", {}))
    for key in ("train", "eval"):
        if inputs.get("kind") != HYBRID and isinstance(old.get(key), list) and same(old[key], inputs.get(key, [])):
            old[key] = inputs[key]
    return prov.differing_field({**recorded, "inputs": old}, inputs)


def checkpoint_inputs(inputs: dict) -> dict:
    """The inputs that shape a checkpoint: not the evaluation flags, nor the evaluation's random routing."""
    return {k: v for k, v in inputs.items() if k not in ("eval", "random_routing")}


class Cells:
    """An experiment's cells on one dataset: where they live, what makes each, and the checks of finished ones."""

    def __init__(self, exp: Experiment, args, folder: Path, train_folders: dict[str, Path] | None = None):
        self.exp, self.args, self.folder = exp, args, folder
        self.layout = Layout(exp, args.results, args.ckpt_root)
        self.model = args.model_name_or_path or exp.model
        self.data = ["--data_dir", str(folder)]  # what is evaluated
        self.train_folders = train_folders  # the file's `datasets`: what is trained on (None: `train_folder`)
        self.routing = False  # record each MoE checkpoint's routing on this dataset (the training datasets)
        precision = resolve_precision(exp, args)
        self.dtype = flags({precision: True}) if precision in ("fp16", "bf16") else []
        self.may_train = True  # False for transfer datasets: evaluate the checkpoints, never train on them
        self.train_folder = folder  # the dataset the checkpoints train on (another than `folder` for a transfer)
        self.rerun = set(getattr(args, "rerun", None) or [])
        self.extra = from_flags(args.extra)  # --extra: settings for every training run

    @functools.cached_property
    def identities(self) -> dict:
        """The backbone's and the datasets' content hashes, computed once."""
        ids = {"dataset": prov.dataset_identity(self.folder), "train_dataset": prov.dataset_identity(self.train_folder)}
        if self.train_folders:
            ids["train_datasets"] = {n: prov.dataset_identity(f) for n, f in self.train_folders.items()}
        return {**ids, "backbone": prov.backbone_identity(self.model) if self.model else prov.UNKNOWN}

    def train_tables(self, run: Run) -> list[Settings]:
        """The settings that shape a run's checkpoint besides backbone, data, seed and precision, in the order
        they are written (a later one wins): the recipe, the run's own, the smoke cut, --extra."""
        return [self.exp.recipe, run.train, SMOKE_TRAIN if self.args.smoke else {}, self.extra]

    def training(self, run: Run) -> Settings:
        """What a run's training settings amount to."""
        return merge(*self.train_tables(run))

    def train_flags(self, run: Run) -> list[str]:
        return flags(*self.train_tables(run), {"frozen": True} if run.frozen else {})

    def eval_flags(self, run: Run) -> list[str]:
        return flags(self.exp.eval, run.eval, SMOKE_EVAL if self.args.smoke else {})

    def inputs(self, run: Run, seed: int | None) -> dict:
        """Everything that shapes a cell's numbers (compared before a finished cell is reused)."""
        out = {"kind": run.kind, "seed": seed, "dataset": self.identities["dataset"]}
        if run.kind == HYBRID:
            members = [self.exp.runs[m] for m in run.fuse]
            return {**out, "backbone": self.identities["backbone"] if any(m.kind != "bm25" for m in members) else None,
                    "precision": prov.precision(self.dtype), "train": [f for m in members for f in self.train_flags(m)],
                    "eval": ["--fuse", *run.fuse, "--fusion", run.fusion, "--weight", str(run.weight)]}  # fmt: skip
        if run.kind == "bm25":
            return {**out, "train": [], "eval": []}
        out.update(backbone=self.identities["backbone"], precision=prov.precision(self.dtype),
                   train=self.train_flags(run) if run.trained else [], eval=self.eval_flags(run))  # fmt: skip
        if run.trained and self.training(run).get("routing") == "random":  # the evaluation routing function shapes
            out["random_routing"] = VARIANTS[run.kind].random_routing  # the numbers of a random control
        if run.trained and self.train_folders:
            out["train_dataset"] = [self.identities["train_datasets"][n] for n in run.datasets or self.train_folders]
        elif run.trained and self.folder != self.train_folder:
            out["train_dataset"] = self.identities["train_dataset"]
        return out

    def checkpoint_made(self, lead: Run, seed: int) -> dict:
        """What a checkpoint records of its making: its lead run's inputs that shape it, its training datasets
        (whichever dataset evaluates it) as its dataset."""
        made = checkpoint_inputs(self.inputs(lead, seed))
        if self.train_folders:
            made["dataset"] = made.pop("train_dataset")
        return made

    def check_cells(self, groups: dict) -> tuple[list[str], dict]:
        """Before anything runs: every cell with results on disk against what would make it now. Returns the
        errors (other inputs) and, per (commit, machine) that differs from this one, how many cells it made."""
        errors, others, here = [], {}, prov.maker_note({"made_by": prov.made_by()})
        for (_, seed), group in groups.items():
            for run in group:
                folder = self.layout.run_dir(run, seed)
                if not folder.is_dir():
                    continue
                recorded = prov.read(folder)
                if recorded is None:
                    if self.layout.evaluated(run, seed):
                        others[("no record", "no record")] = others.get(("no record", "no record"), 0) + 1
                    continue
                if field := differing_field(recorded, self.inputs(run, seed)):
                    if run.name in self.rerun:
                        continue  # made again (forget)
                    at = f"run {run.name}" + ("" if seed is None else f", seed {seed}")
                    errors.append(f"{at}: {folder} was made with another {field}; write elsewhere with another "
                                  f"--results, or redo it with --rerun {run.name}")  # fmt: skip
                elif (note := prov.maker_note(recorded)) != here:
                    others[note] = others.get(note, 0) + 1
        return errors, others

    def record(self, run: Run, seed: int | None) -> None:
        prov.write(self.layout.run_dir(run, seed), self.inputs(run, seed))

    def forget(self, runs: list[Run], seed: int | None) -> None:
        """--rerun: a run's cell made with other inputs than now (or with no record of them) is removed with its
        checkpoint, so that it is made again; a cell that already matches is kept (a resumed --rerun goes on)."""
        for run in runs:
            folder = self.layout.run_dir(run, seed)
            if run.name not in self.rerun or not folder.is_dir():
                continue
            recorded = prov.read(folder)
            inputs = self.inputs(run, seed)
            if recorded is None or differing_field(recorded, inputs):
                shutil.rmtree(folder)
                ckpt = self.layout.checkpoint(run, list(self.exp.runs.values()), seed) if run.trained else None
                made = prov.read(ckpt) if ckpt and self.may_train else None
                if ckpt and (made is None or differing_field(made, checkpoint_inputs(inputs))):
                    shutil.rmtree(ckpt, ignore_errors=True)  # else only its evaluation changed: the weights stay

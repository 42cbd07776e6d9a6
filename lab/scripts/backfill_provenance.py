"""Backfill provenance.json for the cells committed before cells recorded it, from their logs, where they tell.

    python -m lab.scripts.backfill_provenance experiments/table1.toml experiments/finetune.toml ...

For each finished cell without a record: the backbone and dataset the cell's log names (its command line; for a
folder of this workplace, its content hash now; a log without a command line takes the experiment's
`--backbone_log`), the precision the log's flags or metrics.json give, the experiment file's training and
evaluation flags when the log's own training flags equal them (else the log's, so that the runner sees the
difference), and "unknown" for what no log tells: the commit the cell was made with, the machine (unless the
results folder names it, as sweep-h200's gpu.txt), the library versions. `committed_in` is the commit that
first added the cell's metrics, an upper bound of the code's age. It also stores the query subsets the reports
take from the dataset (subsets.json), so that `--report` needs no data. Run it with $BEIR_DATA_DIR set.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
from pathlib import Path

from lab.report import store_subsets
from lab.runner import Runner
from lab.spec import load_experiment
from lab.stages import stages_of
from sbmoe import provenance as prov
from sbmoe.data import resolve_data_dir

LOCATION_FLAGS = {"--model_name_or_path", "--data_dir", "--dataset", "--seed", "--output_dir", "--kind"}
DTYPE_FLAGS = {"--fp16", "--bf16"}
# A backbone that a log names by a name that is not a folder here, and what the results' documents say it was
FLOAT_HASH = "float hash of the hidden state"  # the random routing at evaluation before model.RANDOM_ROUTING
KNOWN_NAMES = {"minilm": "../shared/models/all-minilm-l6-v2"}  # the sweep's GPU machine (RESULTS.md, SciFact test)


def command(log: Path) -> list[str] | None:
    """The command line the runner wrote as a log's first '+ ' line."""
    if not log.is_file():
        return None
    with open(log, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("+ "):
                return shlex.split(line[2:])
    return None


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else None


def training_flags(argv: list[str]) -> list[str]:
    """The training command's flags after the script, without locations, seed and precision."""
    script = next(i for i, a in enumerate(argv) if a.endswith((".py",)) and Path(a).name in ("train.py", "frozen.py", "train_sbmoe.py", "train_moe.py"))
    out, rest = [], argv[script + 1 :]
    i = 0
    while i < len(rest):
        a = rest[i]
        if a in LOCATION_FLAGS or a in ("--eval_output_dir", "--eval_splits", "--tag", "--trec_depth"):
            i += 2
            while a in ("--eval_splits", "--trec_depth") and i < len(rest) and not rest[i].startswith("--"):
                i += 1
            continue
        if a in DTYPE_FLAGS:
            i += 1
            continue
        if a == "--resume_from_checkpoint":
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def committed_in(path: Path) -> str:
    out = subprocess.run(["git", "log", "--diff-filter=A", "--format=%h", "--", str(path)], capture_output=True,
                         text=True).stdout.split()  # fmt: skip
    return out[-1] if out else prov.UNKNOWN


def machine_of(root: Path) -> dict | str:
    gpu = root / "gpu.txt"
    if gpu.is_file():
        lines = gpu.read_text().splitlines()
        if len(lines) > 1:
            return {"gpu": lines[1].split(",")[0].strip()}
    return prov.UNKNOWN


def backfill(path: str, backbone_log: str | None) -> int:
    exp = load_experiment(path)
    args = argparse.Namespace(results="results", ckpt_root="checkpoints", smoke=False, extra=[], rerun=[],
                              fp16=False, bf16=False, model_name_or_path=None)  # fmt: skip
    root = Path("results") / exp.name
    written = 0
    stages, _ = stages_of(exp, Runner(exp, args, Path(".")).layout)
    for run in (r for stage in stages for r in stage.values()):
        for seed in run.seeds if run.per_seed else [None]:
            probe = Runner(exp, args, Path("."))
            cell = probe.layout.run_dir(run, seed)
            if not probe.layout.evaluated(run, seed) or prov.read(cell):
                continue
            lead = probe.layout.checkpoint(run, list(exp.runs.values()), seed).parent.name if run.trained else run.name
            train_cmd = command(cell / "train.log") or command(probe.layout.run_dir(exp.runs.get(lead, run), seed)
                                                                / "train.log")  # a checkpoint shared with its lead run  # fmt: skip
            cmd = train_cmd or command(cell / "eval.log")
            named = (flag(cmd, "--model_name_or_path") if cmd else None) or backbone_log
            named = KNOWN_NAMES.get(named, named)
            data = (flag(cmd, "--data_dir") if cmd else None) or str(Path("../shared/data/beir") /
                                                                     (flag(cmd or [], "--dataset") or exp.dataset))  # fmt: skip
            metrics = json.loads((cell / exp.splits[0] / "metrics.json").read_text())
            dtype = ("fp16" if "--fp16" in cmd else "bf16" if "--bf16" in cmd else "fp32") if cmd else metrics.get(
                "dtype", prov.UNKNOWN)  # fmt: skip
            args.fp16, args.bf16, args.model_name_or_path = dtype == "fp16", dtype == "bf16", named
            runner = Runner(exp, args, Path(data))
            inputs = runner.inputs(run, seed)
            notes = []
            if named is None:
                inputs["backbone"] = prov.UNKNOWN
            if dtype == prov.UNKNOWN:
                inputs["precision"] = prov.UNKNOWN
            if run.kind == "hybrid":  # the precision of the runs it fuses (recorded above: they come first)
                members = [prov.read(probe.layout.run_dir(m, seed if m.per_seed else None)) for m in
                           (exp.runs[f] for f in run.fuse)]  # fmt: skip
                inputs["precision"] = next((m["inputs"]["precision"] for m in members if m and m["inputs"].get(
                    "precision") not in (None, prov.UNKNOWN)), prov.UNKNOWN)  # fmt: skip
            if run.trained and train_cmd:
                logged = training_flags(train_cmd)
                expected = [f for f in inputs["train"] if f != "--frozen"] + (inputs["eval"] if run.frozen else [])
                if logged != expected:  # (frozen.py takes the evaluation flags too)
                    inputs["train"] = logged + (["--frozen"] if run.frozen else [])
                    notes.append("training flags: the log's, not the experiment file's")
            elif run.trained:
                notes.append("training flags: the experiment file's (the log has no command line)")
            if "random_routing" in inputs:  # every cell before the integer keys was evaluated with the float hash
                inputs["random_routing"] = FLOAT_HASH
            maker = {"commit": prov.UNKNOWN, "dirty": prov.UNKNOWN, "machine": machine_of(root),
                     "versions": prov.UNKNOWN, "date": prov.UNKNOWN,
                     "committed_in": committed_in(cell / exp.splits[0] / "metrics.json"),
                     "backfilled": "from " + ("the cell's logs" if cmd else f"the experiment's log ({backbone_log})")
                     + ("; " + "; ".join(notes) if notes else "")}  # fmt: skip
            prov.write(cell, inputs, maker)
            written += 1
    if exp.subsets:  # what the report takes from the dataset, stored with the results (report.SUBSETS_FILE)
        store_subsets(exp, Runner(exp, args, Path(".")).layout, resolve_data_dir(exp.dataset, exp.data_dir, False))
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiments", nargs="+")
    p.add_argument("--backbone_log", help="the backbone for cells whose logs name none (what another log names)")
    args = p.parse_args()
    for path in args.experiments:
        print(f"{path}: {backfill(path, args.backbone_log)} cell(s) backfilled")


if __name__ == "__main__":
    main()

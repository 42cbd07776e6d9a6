"""The runner of one experiment's jobs on one dataset: each job trains a checkpoint if needed and evaluates every
run that shares it (or runs BM25, or fuses two runs' files); finished cells are skipped, interrupted checkpoints
resumed, `--parallel` jobs at a time. What makes a cell, and its checks, are lab/cells.py's."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lab.cells import SMOKE_EVAL, Cells, differing_field
from lab.jobs import Outcome, Status, Step, run_step
from lab.settings import flags
from lab.spec import HYBRID, Run
from sbmoe import provenance as prov
from sbmoe import results as an
from sbmoe.data import DEV_FRACTION, DataError, dev_qrels, load_corpus, load_qrels, load_queries, load_split
from sbmoe.files import read_trec
from sbmoe.metrics import MAX_CUTOFF
from sbmoe.retrieval import BM25, Hybrid, Runs
from utils import fail

ROUTING_DOCS = 1000  # documents per dataset (a seeded sample) whose routing is recorded, with every test query


class Runner(Cells):
    def execute(self, step: Step, argv: list[str], log: Path, launch: list[str]) -> bool:
        """One training or evaluation step, logged; in this process (--in_process) or a fresh one."""
        return run_step(step, argv, log, launch, self.args.in_process)

    def trec_depth_flags(self) -> list[str]:
        return [f"{s}={k}" for s, k in self.exp.trec_depth.items() if s in self.exp.splits]

    def train_data(self, run: Run) -> list[str]:
        """The training data flags: the run's datasets (default every dataset of the file), else the one folder."""
        if not self.train_folders:
            return self.data
        return ["--dataset", *(str(self.train_folders[n]) for n in run.datasets or self.train_folders)]

    def train_argv(self, run: Run, seed: int, ckpt: Path) -> list[str]:
        return ["--kind", run.kind, "--model_name_or_path", self.model, *self.train_data(run), "--seed", str(seed),
                "--output_dir", str(ckpt), *flags(*self.train_tables(run)), *self.dtype]  # fmt: skip

    def train(self, run: Run, seed: int, ckpt: Path, log: Path) -> bool:
        launch = [sys.executable]
        if self.args.torchrun:
            launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(self.args.nproc)]
        argv = self.train_argv(run, seed, ckpt)
        if any(ckpt.glob("checkpoint-*/trainer_state.json")):
            argv += ["--resume_from_checkpoint", "last"]
        return self.execute(Step.TRAIN, argv, log, launch)

    def frozen(self, run: Run, seed: int, ckpt: Path) -> bool:
        """Train the head on the cached backbone (once per checkpoint) and evaluate it, in one frozen.py call."""
        out, splits = self.layout.run_dir(run, seed), self.exp.splits
        depth = self.trec_depth_flags()
        argv = [*self.train_argv(run, seed, ckpt), "--eval_output_dir", str(out), "--eval_splits", *splits,
                "--tag", run.tag, *(["--trec_depth", *depth] if depth else []), *flags(self.exp.eval, run.eval)]  # fmt: skip
        return self.execute(Step.FROZEN, argv, out / "train.log", [sys.executable])

    def dev_slice(self, run: Run, seed: int | None) -> tuple[list[int], float]:
        """The seeds and fraction of training's dev slice of the train queries for `run` at `seed`: that seed's,
        every seed's for a run that serves them all (where the dataset has no official dev split)."""
        fraction = float(self.training(run).get("dev_fraction", DEV_FRACTION))
        return [seed] if seed is not None else list(self.exp.seeds), fraction

    def dev_flags(self, run: Run, seed: int | None) -> list[str]:
        """A run that a hybrid of the file fuses with a weight still to choose is also evaluated on dev."""
        hybrids = [r for r in self.exp.runs.values() if r.kind == HYBRID]
        tuned = [r for r in hybrids if r.weight is None and r.fusion == "interpolate"]
        if "dev" in self.exp.splits or not any(run.name in r.fuse for r in tuned):
            return []
        seeds, fraction = self.dev_slice(run, seed)
        return ["--dev_seed", *map(str, seeds), "--dev_fraction", f"{fraction:g}"]

    def evaluate(self, run: Run, seed: int | None, ckpt: Path | None, routing: bool = False) -> bool:
        """eval.py on every split; `routing`: also record the checkpoint's per-domain routing (once per checkpoint)."""
        out = self.layout.run_dir(run, seed)
        dev = self.dev_flags(run, seed)
        splits = [*self.exp.splits, *(["dev"] if dev else [])]
        target = ["--checkpoint", str(ckpt)] if ckpt else ["--model_name_or_path", self.model]
        depth = self.trec_depth_flags()
        argv = ["--model", run.kind, *target, *self.data, "--split", *splits, "--tag", run.tag, "--verify",
                "--output_dir", str(out if len(splits) > 1 else out / splits[0]),
                *(["--trec_depth", *depth] if depth else []), *dev, *flags(self.exp.eval, run.eval),
                *self.dtype, *flags(SMOKE_EVAL if self.args.smoke else {}),
                *(["--routing_docs", str(ROUTING_DOCS)] if routing else [])]  # fmt: skip
        return self.execute(Step.EVALUATE, argv, out / "eval.log", [sys.executable])

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
        how, weight_from = Hybrid(None, None, run.weight, run.fusion), "the experiment file"
        if run.fusion == "interpolate" and run.weight is None:
            qrels, source = dev_qrels(self.folder, *self.dev_slice(next((m for m in members if m.trained), run), seed))
            runs = read("dev") if all(an.run_path(f, m.tag).is_file() for f, m in zip(folders("dev"), members)) else []
            if runs and all(set(qrels) <= set(r) for r in runs):
                how = Hybrid(*map(Runs, runs)).fit(None, dict.fromkeys(qrels), qrels, MAX_CUTOFF)
                weight_from = f"dev: {source}, {len(qrels)} queries"
            else:
                weight_from = "equal weight: the fused runs have no dev run files of this dev slice"
        info = {"fuse": run.fuse, **how.info(weight_from)}
        for split in self.exp.splits:
            qrels, runs = load_qrels(self.folder / "qrels" / f"{split}.tsv"), read(split)
            queries = dict.fromkeys([*runs[0], *runs[1]])  # every query of the run files
            fused = Hybrid(*map(Runs, runs), how.weight, run.fusion).search(None, queries, MAX_CUTOFF)
            depths = [max(map(len, r.values()), default=0) for r in runs]  # what the run files kept (trec_depth)
            an.write_evaluation(self.layout.split_dir(run, seed, split), run.tag, fused, qrels,
                                self.exp.trec_depth.get(split, MAX_CUTOFF),
                                {"split": split, "dataset": self.folder.name, "hybrid": {**info, "fused_depth": depths}})  # fmt: skip
        return None

    def job(self, runs: list[Run], seed: int | None, all_runs: list[Run]) -> Outcome:
        """Train one checkpoint if needed, then evaluate every run that shares it."""
        names = ", ".join(r.name for r in runs) + ("" if seed is None else f" seed {seed}")
        failed = lambda what, why: Outcome.failure(names, what, why)  # noqa: E731
        self.forget(runs, seed)
        pending = [r for r in runs if not self.layout.evaluated(r, seed)]
        if not pending:
            return Outcome(names, Status.DONE_EARLIER)  # the checkpoint itself may be gone: no need to retrain
        start, lead = time.time(), runs[0]
        if lead.kind == HYBRID:
            if failure := self.hybrid(lead, seed):
                return failed("fusion", f": {failure}")
        elif lead.kind == "bm25":
            self.bm25(lead)
        elif lead.kind == "zeroshot":
            if not self.evaluate(lead, None, None):
                return failed("evaluation", f", see {self.layout.run_dir(lead, None) / 'eval.log'}")
        elif lead.frozen:
            ckpt = self.layout.checkpoint(lead, all_runs, seed)
            for run in pending:
                if not self.frozen(run, seed, ckpt):
                    return failed("frozen-backbone run", f", see {self.layout.run_dir(run, seed) / 'train.log'}")
                keep_training_record(ckpt, self.layout.run_dir(run, seed))
        else:
            ckpt = self.layout.checkpoint(lead, all_runs, seed)
            log = self.layout.run_dir(lead, seed) / "train.log"
            if not (ckpt / "log_history.json").is_file() and not self.may_train:
                return failed("transfer evaluation", f": no trained checkpoint in {ckpt}")
            made = self.checkpoint_made(lead, seed)
            if self.may_train and (recorded := prov.read(ckpt)) and (field := differing_field(recorded, made)):
                return failed(f"checkpoint {ckpt}", f" its check: made with another {field}; remove it or use "
                              "another --ckpt_root")  # fmt: skip
            if not (ckpt / "log_history.json").is_file():
                if self.may_train:
                    prov.write(ckpt, made)
                if not self.train(lead, seed, ckpt, log):
                    return failed("training", f", see {log}")
            for run in runs:
                keep_training_record(ckpt, self.layout.run_dir(run, seed))
            routed = self.routing and is_moe(lead)  # per-domain routing, recorded by the checkpoint's lead run
            for run in pending:
                if not self.evaluate(run, seed, ckpt, routing=routed and run is lead):
                    return failed("evaluation", f", see {self.layout.run_dir(run, seed) / 'eval.log'}")
        for run in pending:
            self.record(run, seed)
        return Outcome(names, Status.MADE, seconds=time.time() - start)

    def run_stage(self, runs: list[Run]) -> list[Outcome]:
        """Every missing (checkpoint, seed) of these runs, `--parallel` at a time; returns the failed jobs."""
        groups: dict[tuple, list[Run]] = {}
        hybrids = {(run.name, seed): [run] for run in runs if run.kind == HYBRID for seed in run.seeds or [None]}
        for run in runs:
            for seed in run.seeds if run.trained else [None]:
                key = (str(self.layout.checkpoint(run, runs, seed)), seed) if run.trained else (run.name, None)
                if run.kind != HYBRID:
                    groups.setdefault(key, []).append(run)
        errors, others = self.check_cells({**groups, **{k: v for k, v in hybrids.items()}})
        if errors:
            fail(errors[0] + (f" (and {len(errors) - 1} more cell(s))" if len(errors) > 1 else ""))
        for (commit, machine), n in sorted(others.items()):
            print(f"note: {n} finished cell(s) made at commit {commit} on {machine}, not this commit and machine: "
                  "kept (the report lists them)", flush=True)  # fmt: skip
        self.layout.root.mkdir(parents=True, exist_ok=True)
        total, done, lock = len(groups) + len(hybrids), [0], threading.Lock()

        def work(i: int, item) -> Outcome:
            (_, seed), group = item
            names = ", ".join(r.name for r in group) + ("" if seed is None else f" seed {seed}")
            print(f"[{i}/{total}] start {names}", flush=True)
            try:
                outcome = self.job(group, seed, runs)
            except DataError as exc:  # bad data met by the runner itself (BM25, a hybrid's run files)
                outcome = Outcome.failure(names, "", f": {exc}")
            with lock:
                done[0] += 1
                print(f"[{done[0]}/{total} done] {outcome}", flush=True)
                with open(self.layout.root / "runner.log", "a", encoding="utf-8") as log:
                    log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {outcome}\n")
            return outcome

        with ThreadPoolExecutor(1 if self.args.in_process else self.args.parallel) as pool:
            outcomes = list(pool.map(work, range(1, len(groups) + 1), groups.items()))
        outcomes += [work(len(groups) + i, item) for i, item in enumerate(hybrids.items(), 1)]  # after what they fuse
        return [o for o in outcomes if o.failed]


def is_moe(run: Run) -> bool:
    """A run whose checkpoint has MoE blocks (routing to record)."""
    from model import VARIANTS, MoEBiEncoder

    return run.kind in VARIANTS and issubclass(VARIANTS[run.kind], MoEBiEncoder)


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

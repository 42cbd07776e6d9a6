"""Recipe sweep for Table 1: one change at a time, chosen on dev, then the chosen recipe over seeds.

    python sweep.py --model_name_or_path M --out results/sweep [--parallel 4] [--fp16] [--torchrun] [--seeds 3]

Phase 1 trains seed 42 of the baseline with Table 1's recipe (reproduce.RECIPE) and with each single
change in CHANGES, plus SB-MoE and MoE variants, and evaluates every run on the test split.
Phase 2 picks, in each group of alternatives, the option whose best-epoch *dev* NDCG@10 beats the
default baseline's (the test split plays no part in the choice), and runs `reproduce.py` with that
combined recipe for `--seeds` seeds of all three models. Writes `<out>/sweep.md` and `<out>/sweep.json`
(every run: dev best, test metrics, paired tests against the default of its kind). Finished runs are
skipped, so an interrupted sweep resumes. Jobs run `--parallel` at a time (one GPU holds several).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import reproduce
from utils import atomic_write_text, fail, mean_metrics

# name: (model kind, training flags, group of alternatives or None, eval.py flags)
CHANGES = {
    "baseline": ("baseline", [], None, []),
    "epochs-5": ("baseline", ["--num_train_epochs", "5"], "epochs", []),
    "epochs-10": ("baseline", ["--num_train_epochs", "10"], "epochs", []),
    "negatives-3": ("baseline", ["--hard_negatives", "3"], "negatives", []),
    "negatives-7": ("baseline", ["--hard_negatives", "7"], "negatives", []),
    "dense-negatives": ("baseline", ["--negative_source", "dense"], "source", []),
    "temperature-0.02": ("baseline", ["--temperature", "0.02"], "temperature", []),
    "lr-5e-5": ("baseline", ["--learning_rate", "5e-5"], "lr", []),
    "doc-256": ("baseline", ["--doc_max_length", "256"], "length", []),
    "sbmoe": ("sbmoe", [], None, []),
    "sbmoe-all": ("sbmoe", [], None, ["--inference_mode", "all"]),
    "sbmoe-moe-lr-1e-3": ("sbmoe", ["--moe_learning_rate", "1e-3"], None, []),
    "sbmoe-moe-lr-1e-3-all": ("sbmoe", ["--moe_learning_rate", "1e-3"], None, ["--inference_mode", "all"]),
    "sbmoe-4-experts": ("sbmoe", ["--num_experts", "4", "--moe_learning_rate", "1e-3"], None, []),
    "moe": ("moe", [], None, []),
}
SEED = 42


def run_logged(cmd: list[str], log: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("+ " + " ".join(cmd) + "\n")
        fh.flush()
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode


def train_cmd(args, kind: str, flags: list[str], out_dir: Path, seed: int) -> list[str]:
    launch = [sys.executable]
    if args.torchrun:  # the real launcher: one process per GPU, NCCL
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc)]
    return [*launch, reproduce.SCRIPTS[kind], "--model_name_or_path", args.model_name_or_path,
            "--dataset", args.dataset, "--seed", str(seed), "--output_dir", str(out_dir),
            *reproduce.RECIPE, *(["--fp16"] if args.fp16 else []), *args.extra, *flags]  # fmt: skip


def ckpt_name(kind: str, flags: list[str]) -> str:
    """Runs that differ only in eval flags share one checkpoint, named after the first of them."""
    return next(n for n, (k, f, _, _) in CHANGES.items() if k == kind and f == flags)


def job(args, names: list[str]) -> str:
    """Train one checkpoint (unless finished earlier), then evaluate every run that shares it."""
    kind, flags, _, _ = CHANGES[names[0]]
    if all((Path(args.out) / n / "metrics.json").is_file() for n in names):
        return f"{', '.join(names)}: done earlier"  # the checkpoint itself may be gone: no need to retrain
    ckpt, start = Path(args.ckpt_root) / ckpt_name(kind, flags), time.time()
    log = Path(args.out) / names[0] / "train.log"
    if not (ckpt / "log_history.json").is_file() and run_logged(train_cmd(args, kind, flags, ckpt, SEED), log):
        return f"{', '.join(names)}: training FAILED, see {log}"
    for name in names:
        out = Path(args.out) / name
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ckpt / "log_history.json", out / "log_history.json")  # dev curve, kept with the results
        if (out / "metrics.json").is_file():
            continue
        cmd = [sys.executable, "eval.py", "--model", kind, "--checkpoint", str(ckpt), "--dataset", args.dataset,
               "--split", "test", "--output_dir", str(out), "--tag", name, *CHANGES[name][3]]  # fmt: skip
        if run_logged(cmd, out / "eval.log"):
            return f"{name}: evaluation FAILED, see {out / 'eval.log'}"
    return f"{', '.join(names)}: {time.time() - start:.0f} s"


def dev_best(folder: Path) -> float | None:
    hist = json.loads((folder / "log_history.json").read_text())
    devs = [h["eval_ndcg@10"] for h in hist if "eval_ndcg@10" in h]
    return max(devs) if devs else None


def choose(rows: dict) -> list[str]:
    """Per group, the option with the highest dev NDCG@10 if it beats the default baseline's dev score."""
    ref = rows["baseline"]["dev NDCG@10"]
    if ref is None:
        fail("the baseline run has no dev NDCG@10 (trained without dev evaluation): nothing to choose on")
    flags = []
    for group in dict.fromkeys(g for _, _, g, _ in CHANGES.values() if g):
        options = [(rows[n]["dev NDCG@10"], n) for n, (_, _, g, _) in CHANGES.items()
                   if g == group and n in rows and rows[n]["dev NDCG@10"] is not None]  # fmt: skip
        if options and max(options)[0] > ref:
            flags += CHANGES[max(options)[1]][1]
    return flags


def summary(args) -> dict:
    out, rows = Path(args.out), {}
    unseen = reproduce.unseen_queries(args.dataset)
    for name, (kind, flags, group, eval_flags) in CHANGES.items():
        if not (out / name / "metrics.json").is_file():
            continue
        per_query = json.loads((out / name / f"{name}.perquery.json").read_text())
        rows[name] = {"kind": kind, "train flags": flags, "eval flags": eval_flags, "group": group,
                      "dev NDCG@10": dev_best(out / name), **mean_metrics(per_query),
                      "unseen NDCG@10": reproduce.subset_mean(per_query, unseen)}  # fmt: skip
        ref = "baseline" if kind == "baseline" else kind  # each variant against the default of its kind
        ref_file = out / ref / f"{ref}.perquery.json"
        if name != ref and ref_file.is_file():
            base = json.loads(ref_file.read_text())
            qids = sorted(per_query)
            a = np.array([per_query[q]["NDCG@10"] for q in qids])
            rows[name]["vs " + ref] = reproduce.paired_tests(a, np.array([base[q]["NDCG@10"] for q in qids]))
    return {"rows": rows, "unseen_queries": unseen}


def render(summary_: dict, chosen: list[str] | None, combined: str | None) -> str:
    rows, n_unseen = summary_["rows"], len(summary_["unseen_queries"])
    lines = [f"Seed {SEED}, one change at a time to Table 1's recipe; test split unless marked dev; *unseen*: the "
             f"{n_unseen} test queries none of whose relevant documents is a positive of any training query.", "",
             "| run | change | dev NDCG@10 (best) | test NDCG@10 | unseen NDCG@10 | Recall@100 | "
             "vs default of its kind (test NDCG@10) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        change = " ".join(r["train flags"] + r["eval flags"]) or "(Table 1 recipe)"
        test = next((v for k, v in r.items() if k.startswith("vs ")), None)
        versus = (f"{test['mean_diff']:+.4f} (t p = {test['t_pvalue']:.3g}, rand p = {test['rand_pvalue']:.3g})"
                  if test else "reference")  # fmt: skip
        dev = f"{r['dev NDCG@10']:.4f}" if r["dev NDCG@10"] is not None else "-"
        lines.append(f"| {name} | `{change}` | {dev} | {r['NDCG@10']:.4f} | {r['unseen NDCG@10']:.4f} | "
                     f"{r['Recall@100']:.4f} | {versus} |")  # fmt: skip
    if chosen is not None:
        lines += ["", f"Chosen on dev for phase 2: `{' '.join(chosen) or '(no change beat the default on dev)'}`"]
    if summary_.get("combined") and combined is None:
        lines += ["", "Phase 2 runs evaluated so far (the table over seeds is not finished):", "",
                  "| run | test NDCG@10 | unseen NDCG@10 | Recall@100 |", "|---|---|---|---|"]  # fmt: skip
        for name, r in summary_["combined"].items():
            lines.append(f"| {name} | {r['NDCG@10']:.4f} | {r['unseen NDCG@10']:.4f} | {r['Recall@100']:.4f} |")
    if combined is not None:
        lines += ["", combined]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", required=True)
    p.add_argument("--dataset", default="scifact")
    p.add_argument("--out", default="results/sweep")
    p.add_argument("--ckpt_root", default="checkpoints/sweep")
    p.add_argument("--runs", nargs="+", default=list(CHANGES), choices=list(CHANGES), help="phase 1 runs")
    p.add_argument("--parallel", type=int, default=1, help="jobs at a time")
    p.add_argument("--fp16", action="store_true", help="train with fp16 mixed precision (GPU)")
    p.add_argument("--torchrun", action="store_true", help="launch training through torchrun")
    p.add_argument("--nproc", type=int, default=1, help="processes per run with --torchrun")
    p.add_argument("--seeds", type=int, default=3, help="phase 2 seeds (0: phase 1 only)")
    p.add_argument("--report", action="store_true", help="only rebuild sweep.md/json from the finished runs")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags for every training run")
    args = p.parse_args(argv)
    if "baseline" not in args.runs:
        fail("--runs must include baseline: every change is chosen and tested against it")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.report:
        groups: dict[str, list[str]] = {}
        for name in args.runs:
            groups.setdefault(ckpt_name(*CHANGES[name][:2]), []).append(name)
        with ThreadPoolExecutor(args.parallel) as pool:
            for message in pool.map(lambda names: job(args, names), groups.values()):
                print(message, flush=True)
    result = summary(args)
    failed = [n for n in args.runs if n not in result["rows"]]
    if failed and not args.report:
        atomic_write_text(Path(args.out) / "sweep.md", render(result, None, None))
        fail(f"runs without results: {', '.join(failed)}; see their logs under {args.out}")
    out2, ck2 = Path(args.out) / "combined", Path(args.ckpt_root) / "combined"
    if args.seeds and "baseline" in result["rows"]:
        result["chosen"] = chosen = choose(result["rows"])
        if not args.report:
            combined_runs(args, chosen, out2, ck2)
    result["combined"] = combined_rows(out2, result["unseen_queries"])
    table = out2 / "table1.md"
    text = render(result, result.get("chosen"), table.read_text() if table.is_file() else None)
    atomic_write_text(Path(args.out) / "sweep.json", json.dumps(result, indent=2))
    atomic_write_text(Path(args.out) / "sweep.md", text)
    figure(Path(args.out), result["rows"])
    print(text)


def figure(out: Path, rows: dict) -> None:
    """Dev NDCG@10 per epoch of every baseline-kind run: how long each recipe keeps improving."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in rows.items():
        hist = json.loads((out / name / "log_history.json").read_text())
        devs = [(h["epoch"], h["eval_ndcg@10"]) for h in hist if "eval_ndcg@10" in h]
        if r["kind"] == "baseline" and devs:
            ax.plot(*zip(*devs), marker="o", ms=3, label=name)
    ax.set(title=f"dev NDCG@10 per epoch, seed {SEED}", xlabel="epoch", ylabel="dev NDCG@10")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fig_dev_curves.png", dpi=120)
    plt.close(fig)


def combined_runs(args, chosen: list[str], out2: Path, ck2: Path) -> None:
    """Phase 2: every model and seed with the chosen recipe, trained in parallel, then reproduce.py."""
    extra = [*(["--fp16"] if args.fp16 else []), *args.extra, *chosen]
    jobs = [(s, k) for s in range(42, 42 + args.seeds) for k in reproduce.SCRIPTS]

    def train(seed_kind) -> int:
        seed, kind = seed_kind
        ckpt = ck2 / f"seed{seed}" / kind
        if (ckpt / "log_history.json").is_file():
            return 0
        return run_logged(train_cmd(args, kind, chosen, ckpt, seed), out2 / "logs" / f"train_{kind}_seed{seed}.log")

    with ThreadPoolExecutor(args.parallel) as pool:  # reproduce.py then finds them finished
        if any(list(pool.map(train, jobs))):
            fail(f"a phase 2 training run failed; see {out2 / 'logs'}")
    reproduce.main(["--model_name_or_path", args.model_name_or_path, "--dataset", args.dataset, "--seeds",
                    str(args.seeds), "--out", str(out2), "--ckpt_root", str(ck2), "--extra", *extra])  # fmt: skip


def combined_rows(out2: Path, unseen: list[str]) -> dict:
    """Test scores of each phase 2 run evaluated so far (also when the table is not finished)."""
    rows = {}
    for metrics in sorted(out2.glob("seed*/test/metrics.json")):
        for kind in reproduce.SCRIPTS:
            file = metrics.parent / f"{kind}.perquery.json"
            if file.is_file():
                per_query = json.loads(file.read_text())
                row = {**mean_metrics(per_query), "unseen NDCG@10": reproduce.subset_mean(per_query, unseen)}
                rows[f"{kind} {metrics.parent.parent.name}"] = row
    return rows


if __name__ == "__main__":
    main()

"""Table 1 and Figure 1 of the paper, measured on the test split: `make reproduce` runs this.

Trains baseline, SB-MoE and MoE for each seed (skipping finished runs, resuming interrupted ones),
evaluates every checkpoint on the test split and, for the leakage column, on the train queries
(one corpus pass for both), adds BM25 and the zero-shot backbone, then writes
`<out>/table1.md`, `<out>/table1.json`, `<out>/fig1_training.png` and `<out>/fig2_experts.png`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from utils import (
    TABLE_COLUMNS,
    atomic_write_text,
    bm25_search,
    fail,
    load_beir,
    load_qrels,
    mean_metrics,
    per_query_metrics,
    resolve_data_dir,
    unseen_document_queries,
    write_trec,
)

SCRIPTS = {"baseline": "train.py", "sbmoe": "train_sbmoe.py", "moe": "train_moe.py"}
RECIPE = ["--num_train_epochs", "2", "--doc_max_length", "128"]
SMOKE = ["--max_steps", "2", "--doc_max_length", "32", "--eval_strategy", "no", "--load_best_model_at_end", "false",
         "--save_strategy", "no"]  # fmt: skip


def sh(cmd: list[str], log: Path) -> None:
    """Run a step, teeing its output to a log; stop the whole reproduction if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("+", " ".join(cmd), flush=True)
    with open(log, "a", encoding="utf-8") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        fail(f"step failed (exit {proc.returncode}); see {log}")


def train_all(args, seeds: list[int]) -> None:
    for seed in seeds:
        for kind in args.models:
            run_dir = Path(args.ckpt_root) / f"seed{seed}" / kind
            if (run_dir / "model.safetensors").is_file() and (run_dir / "log_history.json").is_file():
                continue  # finished earlier
            cmd = [sys.executable, SCRIPTS[kind], "--model_name_or_path", args.model_name_or_path,
                   "--dataset", args.dataset, "--seed", str(seed), "--output_dir", str(run_dir),
                   *(SMOKE if args.smoke else RECIPE), *args.extra]  # fmt: skip
            if any(run_dir.glob("checkpoint-*/trainer_state.json")):
                cmd += ["--resume_from_checkpoint", "last"]
            sh(cmd, Path(args.out) / "logs" / f"train_{kind}_seed{seed}.log")


def eval_all(args, seeds: list[int]) -> None:
    length = ["--doc_max_length", "32"] if args.smoke else []
    for seed in seeds:
        out = Path(args.out) / f"seed{seed}"
        if all((out / s / "metrics.json").is_file() for s in ("test", "train")):
            done = json.loads((out / "test" / "metrics.json").read_text())
            if all(k in done for k in args.models):
                continue
        ckpts = [str(Path(args.ckpt_root) / f"seed{seed}" / k) for k in args.models]
        sh([sys.executable, "eval.py", "--model", *args.models, "--checkpoint", *ckpts, "--dataset", args.dataset,
            "--split", "test", "train", "--output_dir", str(out), "--verify", *length],
           Path(args.out) / "logs" / f"eval_seed{seed}.log")  # fmt: skip
    zs = Path(args.out) / "zeroshot"
    if not (zs / "train" / "metrics.json").is_file():
        sh([sys.executable, "eval.py", "--model", "zeroshot", "--model_name_or_path", args.model_name_or_path,
            "--dataset", args.dataset, "--split", "test", "train", "--output_dir", str(zs), "--verify", *length],
           Path(args.out) / "logs" / "eval_zeroshot.log")  # fmt: skip
    bm = Path(args.out) / "bm25"
    if not (bm / "train" / "metrics.json").is_file():
        data_dir = resolve_data_dir(args.dataset, None)
        for split in ("test", "train"):
            corpus, queries, qrels = load_beir(data_dir, split)
            run = bm25_search(corpus, queries, top_k=100)
            per_query = per_query_metrics(qrels, run)
            write_trec(bm / split / "bm25.trec", run, "bm25", 100)
            atomic_write_text(bm / split / "bm25.perquery.json", json.dumps(per_query, indent=1))
            summary = {"bm25": mean_metrics(per_query), "split": split, "dataset": args.dataset}
            atomic_write_text(bm / split / "metrics.json", json.dumps(summary, indent=2))


def per_query(folder: Path, name: str) -> dict:
    return json.loads((folder / f"{name}.perquery.json").read_text())


# --------------------------------------------------------------------------------------------
# Table 1


def paired_tests(a: np.ndarray, b: np.ndarray, n_perm: int = 10000, seed: int = 0) -> dict[str, float]:
    """Paired t-test and a two-sided paired randomisation (sign-flip) test of mean(a - b)."""
    from scipy import stats

    diff = a - b
    t_p = 1.0 if not diff.any() else float(stats.ttest_rel(a, b).pvalue)  # identical scores: no difference
    rng = np.random.default_rng(seed)
    flips = rng.choice([-1.0, 1.0], size=(n_perm, len(diff)))
    null = np.abs((flips * diff).mean(1))
    p_rand = (1 + np.sum(null >= abs(diff.mean()) - 1e-12)) / (n_perm + 1)
    return {"mean_diff": float(diff.mean()), "t_pvalue": t_p, "rand_pvalue": float(p_rand)}


def split_qrels(dataset: str) -> tuple[dict, dict]:
    """The train and test qrels alone (no corpus to read)."""
    data_dir = resolve_data_dir(dataset, None)
    return load_qrels(data_dir / "qrels" / "train.tsv"), load_qrels(data_dir / "qrels" / "test.tsv")


def unseen_queries(dataset: str) -> list[str]:
    """The test queries whose relevant documents no training query has as a positive."""
    return unseen_document_queries(*split_qrels(dataset))


def subset_mean(per_query: dict, qids: list[str], metric: str = "NDCG@10") -> float:
    """Mean of one metric over some of a run's queries (NaN for none)."""
    return float(np.mean([per_query[q][metric] for q in qids])) if qids else float("nan")


def build_table(args, seeds: list[int]) -> dict:
    out = Path(args.out)
    table, tests = {}, {}
    unseen = unseen_queries(args.dataset)
    per_seed = {}  # model -> (seeds, queries) test NDCG@10
    for name, folders in (("BM25", [out / "bm25"]), ("zero-shot", [out / "zeroshot"])):
        tag = "bm25" if name == "BM25" else "zeroshot"
        runs = [per_query(f / "test", tag) for f in folders]
        table[name] = summarise(runs, [per_query(f / "train", tag) for f in folders], unseen)
    for kind in args.models:
        test_runs = [per_query(out / f"seed{s}" / "test", kind) for s in seeds]
        train_runs = [per_query(out / f"seed{s}" / "train", kind) for s in seeds]
        table[kind] = summarise(test_runs, train_runs, unseen)
        qids = sorted(test_runs[0])
        per_seed[kind] = np.array([[run[q]["NDCG@10"] for q in qids] for run in test_runs])
    if "baseline" in per_seed:
        keep = np.isin(qids, unseen)  # every model scores the same test queries
        for kind in args.models:
            if kind != "baseline":
                a, b = per_seed[kind], per_seed["baseline"]
                tests[kind] = paired_tests(a.mean(0), b.mean(0))  # seed-averaged
                tests[kind]["per_seed"] = [paired_tests(x, y) for x, y in zip(a, b)]
                tests[kind]["unseen"] = paired_tests(a.mean(0)[keep], b.mean(0)[keep]) if keep.sum() > 1 else None
    scale = {s: head_scale(Path(args.ckpt_root) / f"seed{s}" / "sbmoe") for s in seeds} if "sbmoe" in args.models else {}
    return {"rows": table, "tests": tests, "seeds": seeds, "unseen_queries": unseen,
            "sbmoe_fc_out_max_abs": {s: v for s, v in scale.items() if v is not None}}  # fmt: skip


def head_scale(ckpt: Path) -> float | None:
    """Largest |weight| in the SB-MoE experts' output projections (they start at exactly zero)."""
    from safetensors import safe_open

    if not (ckpt / "model.safetensors").is_file():
        return None
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        keys = [k for k in f.keys() if ".experts." in k and k.endswith("fc_out.weight")]
        return max(float(f.get_tensor(k).abs().max()) for k in keys) if keys else None


def summarise(test_runs: list[dict], train_runs: list[dict], unseen: list[str]) -> dict:
    """Mean and std over seeds of each metric (test), NDCG@10 on the unseen-document test queries,
    and NDCG@10 and Recall@10 on the train queries."""

    def mean_std(vals):
        return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0

    row = {col: mean_std([mean_metrics(r)[col] for r in test_runs]) for col in TABLE_COLUMNS}
    row["unseen NDCG@10"] = mean_std([subset_mean(r, unseen) for r in test_runs])
    for col in ("NDCG@10", "Recall@10"):
        row[f"train {col}"] = mean_std([mean_metrics(r)[col] for r in train_runs])
    return row


def render(result: dict) -> str:
    cols = [*TABLE_COLUMNS, "unseen NDCG@10", "train NDCG@10", "train Recall@10"]
    n, n_unseen = len(result["seeds"]), len(result["unseen_queries"])
    lines = [f"Test split; trained models: mean ± std over {n} seed(s) {result['seeds']}. "
             f"*unseen NDCG@10*: the {n_unseen} test queries none of whose relevant documents is a positive of any "
             "training query. Last two columns: the same models on the *train* queries (the paper's leaky protocol).",
             "",
             "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]  # fmt: skip
    for name, row in result["rows"].items():
        mark = ""
        if name in result["tests"]:
            t = result["tests"][name]
            mark = " †" if t["t_pvalue"] < 0.05 and t["rand_pvalue"] < 0.05 else ""
        cells = []
        for c in cols:
            m, s = row[c]
            spread = name not in ("BM25", "zero-shot") and n > 1  # no spread to show from one seed
            cells.append(f"{m:.4f} ± {s:.4f}" if spread else f"{m:.4f}")
        lines.append(f"| {name}{mark} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, t in result["tests"].items():
        verdict = "significant" if t["t_pvalue"] < 0.05 and t["rand_pvalue"] < 0.05 else "not significant (inside the noise)"
        lines.append(f"- {name} vs baseline, test NDCG@10 per query (seed-averaged), paired: difference "
                     f"{t['mean_diff']:+.4f}, t-test p = {t['t_pvalue']:.3g}, randomisation p = {t['rand_pvalue']:.3g}: "
                     f"{verdict}.")  # fmt: skip
        if t.get("unseen"):
            u = t["unseen"]
            lines.append(f"  On the {n_unseen} unseen-document queries: difference {u['mean_diff']:+.4f}, "
                         f"t-test p = {u['t_pvalue']:.3g}, randomisation p = {u['rand_pvalue']:.3g}.")  # fmt: skip
        if n > 1:
            each = ", ".join(f"seed {seed} {r['mean_diff']:+.4f} (t p = {r['t_pvalue']:.3g})"
                             for seed, r in zip(result["seeds"], t["per_seed"]))  # fmt: skip
            lines.append(f"  Per seed: {each}.")
    if result.get("sbmoe_fc_out_max_abs"):
        scales = ", ".join(f"seed {k} {v:.4f}" for k, v in result["sbmoe_fc_out_max_abs"].items())
        lines.append(f"- SB-MoE experts' output projections (zero at step 0), largest |weight| after training: {scales}.")
    lines.append("- † marks a difference from the baseline significant at 0.05 in both paired tests over test queries "
                 "on the seed-averaged scores; " + ("with one seed this ignores seed-to-seed variance." if n == 1 else
                 "the ± column and the per-seed lines show how much the seeds disagree."))  # fmt: skip
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Figures


def figures(args, seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(10, 4))
    shares = {}
    for kind in args.models:
        losses, devs = [], []
        for s in seeds:
            hist = json.loads((Path(args.ckpt_root) / f"seed{s}" / kind / "log_history.json").read_text())
            by_epoch: dict[int, list[float]] = {}
            for h in hist:
                if "contrastive_loss" in h and "epoch" in h:  # without DDP's world-size factor
                    by_epoch.setdefault(int(np.ceil(h["epoch"] - 1e-9)), []).append(h["contrastive_loss"])
            losses.append([np.mean(by_epoch[e]) for e in sorted(by_epoch)])
            devs.append([h["eval_ndcg@10"] for h in hist if "eval_ndcg@10" in h])
            keys = sorted({k for h in hist for k in h if k.startswith("expert_share/")})
            if keys:
                shares.setdefault(kind, []).append([np.mean([h[k] for h in hist if k in h]) for k in keys])
                shares.setdefault(f"{kind}_keys", keys)
        for ax, curves in ((ax_loss, losses), (ax_dev, devs)):
            n = min(len(c) for c in curves)
            if n == 0:
                continue
            arr = np.array([c[:n] for c in curves])
            x = np.arange(1, n + 1)
            ax.plot(x, arr.mean(0), marker="o", label=kind)
            if len(curves) > 1:
                ax.fill_between(x, arr.min(0), arr.max(0), alpha=0.2)
    ax_loss.set(title="training InfoNCE loss per epoch", xlabel="epoch", ylabel="InfoNCE")
    ax_dev.set(title="dev NDCG@10 per epoch", xlabel="epoch", ylabel="NDCG@10")
    for ax in (ax_loss, ax_dev):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"SciFact train, mean over {len(seeds)} seed(s); band = min..max")
    fig.tight_layout()
    fig.savefig(out / "fig1_training.png", dpi=120)
    plt.close(fig)
    kinds = [k for k in args.models if k in shares]
    if kinds:
        fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.5), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            keys, vals = shares[f"{kind}_keys"], np.mean(shares[kind], axis=0)
            blocks = sorted({k.split("/")[1] for k in keys})
            n_exp = len(keys) // len(blocks)
            width = 0.8 / len(blocks)
            for b, block in enumerate(blocks):
                v = [vals[keys.index(f"expert_share/{block}/e{e}")] for e in range(n_exp)]
                ax.bar(np.arange(n_exp) + b * width, v, width, label=f"MoE block {block[1:]}")
            ax.axhline(1 / n_exp, color="k", ls="--", lw=0.8, label="uniform")
            ax.set(title=f"{kind}: share of routed inputs per expert", xlabel="expert", ylabel="share")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "fig2_experts.png", dpi=120)
        plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", required=True)
    p.add_argument("--dataset", default="scifact")
    p.add_argument("--seeds", type=int, default=3, help="seeds 42, 43, ...")
    p.add_argument("--models", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS))
    p.add_argument("--out", default="results/scifact")
    p.add_argument("--ckpt_root", default="checkpoints/scifact")
    p.add_argument("--smoke", action="store_true", help="2 training steps, 32-token documents: checks the plumbing")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further training flags, passed through")
    args = p.parse_args(argv)
    seeds = [42 + i for i in range(args.seeds)]
    train_all(args, seeds)
    eval_all(args, seeds)
    result = build_table(args, seeds)
    text = render(result)
    atomic_write_text(Path(args.out) / "table1.md", text)
    atomic_write_text(Path(args.out) / "table1.json", json.dumps(result, indent=2))
    if not args.smoke:
        figures(args, seeds)
    print(text)


if __name__ == "__main__":
    main()

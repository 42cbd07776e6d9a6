"""The report of an experiment, from its results alone: per-run summaries, paired tests, report.md /
report.json and the figures (experiment.py --report re-renders them).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from lab.layout import Layout
from lab.settings import Settings, flags
from lab.spec import HYBRID, Experiment, Run, transfer_name
from lab.stats import mean_std, paired_tests, scores_matrix, significant, subset_mean
from sbmoe import provenance as prov
from sbmoe import results as an
from sbmoe.data import query_subsets, split_qrels
from sbmoe.files import atomic_write_bytes, atomic_write_text
from sbmoe.metrics import PRIMARY_METRIC, TABLE_COLUMNS, mean_metrics

DEV_COLUMN = f"dev {PRIMARY_METRIC}"  # a report row's best dev score


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
        row = {"label": run.label, "kind": run.kind, "change": " ".join(flags(run.train, run.eval)),
               "seeds": seeds if run.per_seed else [], "planned_seeds": run.seeds if run.per_seed else []}  # fmt: skip
        if run.kind == HYBRID:  # how each seed's runs were fused
            row["hybrid"] = {str(s): an.read_metrics(layout.split_dir(run, s, main)).get("hybrid") for s in seeds}
        for split, per_seed in per_split.items():
            prefix = "" if split == main else f"{split} "
            for col in TABLE_COLUMNS:
                row[prefix + col] = mean_std([mean_metrics(r)[col] for r in per_seed])
        for name, qids in subsets.items():
            row[f"{name} {PRIMARY_METRIC}"] = mean_std([subset_mean(r, qids) for r in per_split[main]])
        histories = [an.read_log_history(layout.run_dir(run, s)) for s in seeds
                     if run.trained and (layout.run_dir(run, s) / "log_history.json").is_file()]  # fmt: skip
        devs = [d for d in (dev_score(h, run, exp, layout) for h in histories) if d is not None]
        row[DEV_COLUMN] = mean_std(devs) if devs else None
        times = [t for t in map(an.train_seconds, histories) if t is not None]
        row["train_seconds"] = mean_std(times) if times else None
        times = [t for s in seeds if (t := an.eval_seconds(layout.split_dir(run, s, main))) is not None]
        row["eval_seconds"] = mean_std(times) if times else None
        facts = {s: an.read_checkpoint_facts(layout.run_dir(run, s)) for s in seeds if run.trained}
        row["expert_out_max_abs"] = {str(s): f["expert_out_max_abs"] for s, f in facts.items()
                                     if f.get("expert_out_max_abs") is not None}  # fmt: skip
        rows[run.name] = row
        scores[run.name] = dict(zip(seeds, per_split[main]))
    tests = [compare(run.name, ref, scores[run.name], scores[ref], subsets) for run in runs.values()
             for ref in run.references if run.name in scores and ref in scores]  # fmt: skip
    return {"rows": rows, "tests": tests}


def dev_score(history: list[dict], run: Run, exp: Experiment, layout: Layout) -> float | None:
    """A row's dev score at its selected epoch: with several training datasets, the reported dataset's own (the
    selection metric is their mean), none where the run did not train on it; else the one dev score."""
    if not exp.datasets:
        return an.best_dev(history)
    here, trained = layout.root.name, [transfer_name(d) for d in run.datasets or exp.datasets]
    if here not in trained:
        return None
    return an.best_dev(history) if len(trained) == 1 else an.dev_by_dataset(history).get(here)


def compare(run: str, reference: str, a: dict, b: dict, subsets: dict[str, list[str]]) -> dict:
    """Paired tests over queries of one run against its reference: seed-averaged and per seed, on all
    queries and on each subset. Seeds present in both (an untrained reference serves every seed)."""
    untrained_a, untrained_b = list(a) == [None], list(b) == [None]
    seeds = list(b) if untrained_a and not untrained_b else [s for s in a if s in b or untrained_b]
    pick = lambda scores, s: scores[None] if list(scores) == [None] else scores[s]  # noqa: E731
    qids = sorted(next(iter(a.values())))
    x = scores_matrix([pick(a, s) for s in seeds], qids)
    y = scores_matrix([pick(b, s) for s in seeds], qids)
    out = {"run": run, "reference": reference, "seeds": seeds, "queries": len(qids), **paired_tests(x.mean(0), y.mean(0))}
    out["per_seed"] = [paired_tests(xs, ys) for xs, ys in zip(x, y)]
    for name, subset in subsets.items():
        keep = np.isin(qids, subset)
        out[name] = paired_tests(x.mean(0)[keep], y.mean(0)[keep]) if keep.sum() > 1 else None
        if out[name] is not None:  # the training noise: does each seed agree on the subset too?
            out[name]["per_seed"] = [paired_tests(xs[keep], ys[keep]) for xs, ys in zip(x, y)]
    return out


SUBSETS_FILE = "subsets.json"  # what the report takes from the dataset, stored with the results when they are made


def store_subsets(exp: Experiment, layout: Layout, folder: Path) -> None:
    """The query subsets of the reported split, kept beside the results so that a report never reads the data."""
    if not exp.subsets:
        return
    train, reported = split_qrels(folder, exp.splits[0])
    subsets = {k: v for k, v in query_subsets(train, reported).items() if k in exp.subsets}
    text = json.dumps({"split": exp.splits[0], "dataset": prov.dataset_identity(folder), "subsets": subsets}, indent=1)
    path = layout.root / SUBSETS_FILE
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)


def stored_subsets(exp: Experiment, layout: Layout) -> dict[str, list[str]] | None:
    path = layout.root / SUBSETS_FILE
    if not exp.subsets or not path.is_file():
        return None
    return {k: v for k, v in json.loads(path.read_text(encoding="utf-8"))["subsets"].items() if k in exp.subsets}


def provenance_summary(layout: Layout, stages: list[dict[str, Run]]) -> dict:
    """What made the report's cells: each backbone, dataset, precision, commit and machine with its cell count."""
    counts: dict[str, dict[str, int]] = {k: {} for k in ("backbone", "dataset", "precision", "commit", "machine")}
    for runs in stages:
        for run in runs.values():
            for seed in run.seeds if run.per_seed else [None]:
                folder = layout.run_dir(run, seed)
                if not layout.evaluated(run, seed):
                    continue
                rec = prov.read(folder) or {"inputs": {}, "made_by": {}}
                commit, machine = prov.maker_note(rec) if rec["made_by"] else ("no record", "no record")
                values = {"commit": commit, "machine": machine}
                for key in ("backbone", "dataset", "precision"):
                    if key in rec["inputs"] and rec["inputs"][key] is not None:
                        values[key] = prov.short(rec["inputs"][key])
                    elif not rec["inputs"]:
                        values[key] = "no record"
                for key, value in values.items():
                    counts[key][value] = counts[key].get(value, 0) + 1
    return {k: dict(sorted(v.items())) for k, v in counts.items()}


def build_report(exp: Experiment, layout: Layout, stages: list[dict[str, Run]], chosen: Settings | None) -> dict:
    """Every stage summarised from the files alone; each run's row also written as `<run>/summary.json`."""
    stored = stored_subsets(exp, layout) or {}
    subsets = {k: v for k, v in stored.items() if v}  # a subset no query falls in has no column (NFCorpus' unseen)
    result = {"experiment": exp.name, "description": exp.description, "splits": exp.splits,
              "recipe": flags(exp.recipe), "subsets": subsets,
              "stages": [summarise(exp, layout, runs, subsets) for runs in stages],
              "provenance": provenance_summary(layout, stages)}  # fmt: skip
    if exp.subsets and not stored:
        result["missing_subsets"] = list(exp.subsets)
    if empty := [k for k, v in stored.items() if not v]:
        result["empty_subsets"] = empty
    if chosen is not None:
        result["chosen"] = flags(chosen)
    for stage in result["stages"]:
        for name, row in stage["rows"].items():
            atomic_write_text(layout.root / name / "summary.json", json.dumps(row, indent=2))
    return result


def render(result: dict) -> str:
    lines = [f"# {result['experiment']}", ""]
    if result["description"]:
        lines += [result["description"], ""]
    lines += [f"Recipe of every trained run: `{' '.join(result['recipe']) or '(defaults)'}`"
              + (f"; precision {result['precision']} for every run." if result.get("precision") else ".")]  # fmt: skip
    if result.get("datasets"):
        lines += ["", "Trained on several datasets: every run (unless its change says `datasets`) on all of "
                  f"{', '.join(result['datasets'])} together, every batch from one dataset; evaluated on each "
                  "dataset's own test split below, and on the transfer datasets after them."]  # fmt: skip
        for name, sub in result["datasets"].items():
            lines += ["", f"## {name}", "", *stage_lines(sub)]
    else:
        lines += ["", *stage_lines(result)]
    for name, stage in result.get("transfer", {}).items():
        lines += ["", f"## Transfer: {name}", "",
                  f"The same checkpoints, BM25 and the zero-shot backbone on the test split of {name}, which no run "
                  "trained on (BEIR's zero-shot protocol); paired tests against "
                  + ("each run's references." if result.get("datasets") else "the baseline."), "",
                  *table(stage, list(TABLE_COLUMNS)), "", *tests_text(stage, {})]  # fmt: skip
    if result.get("routing"):
        lines += ["", *routing_text(result["routing"])]
    if result.get("figures"):
        lines += ["", "## Figures", "", *(f"![{f['caption']}]({f['file']})" for f in result["figures"])]
    return "\n".join(lines) + "\n"


def stage_lines(result: dict) -> list[str]:
    """The notes, provenance, tables and tests of every stage of one dataset's report."""
    main, others = result["splits"][0], result["splits"][1:]
    subsets = result["subsets"]
    cols = [*TABLE_COLUMNS, *(f"{k} {PRIMARY_METRIC}" for k in subsets), *(f"{s} {c}" for s in others
                                                                 for c in (PRIMARY_METRIC, "Recall@10"))]  # fmt: skip
    notes = [f"Metrics on the {main} split; trained runs: mean ± std over their seeds."]
    for name, qids in subsets.items():
        what = "none of whose relevant documents is a positive of any" if name == "unseen" else (
            "with a relevant document that is a positive of some")
        notes.append(f"*{name}*: the {len(qids)} {main} queries {what} training query.")
    for name in result.get("empty_subsets", []):
        why = " (each has a relevant document that is a positive of some training query)" if name == "unseen" else ""
        notes.append(f"*{name}*: no {main} query falls in it{why}: no column.")
    for split in others:
        notes.append(f"Columns *{split} ...*: the same models on the {split} queries"
                     + (" (the paper's leaky protocol)." if split == "train" else "."))  # fmt: skip
    if result.get("missing_subsets"):
        notes.append(f"The query subsets ({', '.join(result['missing_subsets'])}) are not stored with these results "
                     f"({SUBSETS_FILE}): run the experiment once with its data to add them.")  # fmt: skip
    lines = [" ".join(notes), *provenance_text(result.get("provenance"))]
    for i, stage in enumerate(result["stages"]):
        if i == 1:
            lines += ["", "## Stage 2: the combination chosen on dev", "",
                      f"Chosen on dev: `{' '.join(result.get('chosen') or []) or '(no option beat the reference)'}`"]
        lines += ["", *differences_table(stage, subsets), *table(stage, cols), "", *tests_text(stage, subsets),
                  *cost_text(stage)]  # fmt: skip
    if result.get("chosen") is not None and len(result["stages"]) == 1:
        lines += ["", f"Chosen on dev for stage 2: `{' '.join(result['chosen']) or '(none)'}` (not trained yet)."]
    return lines


def routing_section(exp: Experiment, layouts: dict[str, Layout], runs: list[Run]) -> list[dict]:
    """Per MoE checkpoint (its lead run) with more than one expert: per block, each dataset's share of routed
    units per expert (mean over seeds) and the NMI between expert and dataset (mean ± std over seeds), from
    the routing records eval.py --routing_docs wrote on each training dataset's first split."""
    out = []
    for run in runs:
        per_seed, seeds = [], []
        for seed in run.seeds:
            records = {n: an.read_routing(layout.split_dir(run, seed, exp.splits[0]), run.tag)
                       for n, layout in layouts.items()}  # fmt: skip
            if all(records.values()):
                per_seed.append(an.routing_summary(records))
                seeds.append(seed)
        if not per_seed or max(len(v) for v in per_seed[0]["blocks"][0]["shares"].values()) < 2:
            continue
        blocks = [{"nmi": mean_std([s["blocks"][b]["nmi"] for s in per_seed]),
                   "shares": {n: np.mean([s["blocks"][b]["shares"][n] for s in per_seed], 0).round(4).tolist()
                              for n in layouts}} for b in range(len(per_seed[0]["blocks"]))]  # fmt: skip
        out.append({"run": run.name, "label": run.label, "trained_on": run.datasets or list(layouts), "seeds": seeds,
                    "unit": per_seed[0]["unit"], "units": per_seed[0]["units"], "blocks": blocks})  # fmt: skip
    return out


def routing_text(routing: list[dict]) -> list[str]:
    lines = ["## Per-domain routing", "",
             "Which expert each MoE block chooses first (top-1 mode, whatever the run's inference mode) on each "
             "training dataset's test queries and a seeded sample of its documents; units are inputs for a pooled "
             "SB-MoE head and non-padding tokens for per-token blocks. NMI: normalised mutual information between "
             "expert and dataset (arithmetic-mean normalisation; 0: routing ignores the dataset, 1: one expert per "
             "dataset), mean ± std over seeds; shares: mean over seeds.", "",
             "| checkpoint | trained on | seeds | block | NMI | share per expert, by dataset |", "|---|---|---|---|---|---|"]
    for r in routing:
        for b, block in enumerate(r["blocks"]):
            shares = "; ".join(f"{n}: " + " ".join(f"{x:.2f}" for x in v) for n, v in block["shares"].items())
            lines.append(f"| {r['label']} | {', '.join(r['trained_on'])} | {', '.join(map(str, r['seeds']))} | {b} | "
                         f"{cell(block['nmi'], len(r['seeds']) > 1)} | {shares} |")  # fmt: skip
    return lines


def provenance_text(summary: dict | None) -> list[str]:
    """What made the cells, one line per field: each value with the number of cells it made."""
    if not summary:
        return []
    names = {"backbone": "Backbone", "dataset": "Dataset", "precision": "Precision", "commit": "Commit",
             "machine": "Machine"}  # fmt: skip
    lines = ["", "What made these cells (provenance.json in each cell; *no record*: made before cells recorded it):", ""]
    for key, label in names.items():
        if summary.get(key):
            lines.append(f"- {label}: " + "; ".join(f"{v} ({n} cell{'s' if n > 1 else ''})" for v, n in summary[key].items()))
    return lines


def cell(value, spread: bool) -> str:
    if value is None:
        return "-"
    m, s = value
    return f"{m:.4f} ± {s:.4f}" if spread else f"{m:.4f}"


def table(stage: dict, cols: list[str]) -> list[str]:
    lines = [f"| run | change | seeds | {DEV_COLUMN} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 4) + "|"]
    for name, row in stage["rows"].items():
        first = next((t for t in stage["tests"] if t["run"] == name), None)  # against its first reference
        mark = " †" if first and significant(first) else ""
        spread = len(row["seeds"]) > 1
        seeds = ", ".join(map(str, row["seeds"])) or "-"
        if len(row["seeds"]) < len(row["planned_seeds"]):
            seeds += f" (of {len(row['planned_seeds'])})"
        cells = [f"`{row['change']}`" if row["change"] else "", seeds, cell(row[DEV_COLUMN], spread)]
        cells += [cell(row.get(c), spread) for c in cols]
        lines.append(f"| {row['label']}{mark} | " + " | ".join(cells) + " |")
    return lines


def differences_table(stage: dict, subsets: dict) -> list[str]:
    """Every paired test in one table, the query subsets (unseen documents first) before all queries: the
    seed-averaged difference, † where both tests call it significant, and each seed's own in brackets."""
    if not stage["tests"]:
        return []
    rows = stage["rows"]

    def diff(t: dict | None) -> str:  # a test, or a subset's, with its own per-seed tests
        if t is None:
            return "-"
        text = f"{t['mean_diff']:+.4f}" + (" †" if significant(t) else "")
        per_seed = t.get("per_seed", [])
        each = ", ".join(f"{r['mean_diff']:+.4f}" for r in per_seed)
        return text + (f" ({each})" if len(per_seed) > 1 else "")

    heads = [*(f"{k} ({len(q)})" for k, q in subsets.items()), "all queries"]
    lines = [f"Differences in {PRIMARY_METRIC} from each reference, paired over queries (seed-averaged; † significant "
             "at 0.05 in both tests; in brackets each seed's own difference, in the order of the seeds column):", "",
             "| run | against | seeds | " + " | ".join(heads) + " |", "|---" * (len(heads) + 3) + "|"]  # fmt: skip
    for t in stage["tests"]:
        cells = [diff(t.get(k)) for k in subsets] + [diff(t)]
        seeds = ", ".join(str(s) for s in t["seeds"] if s is not None) or "-"
        lines.append(f"| {rows[t['run']]['label']} | {rows[t['reference']]['label']} | {seeds} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return [*lines, ""]


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
        verdict = "significant" if significant(t) else "not significant (inside the noise)"
        n = len(t["seeds"])
        avg = "seed-averaged " if n > 1 else ""
        lines.append(f"- {rows[name]['label']} vs {rows[t['reference']]['label']}, {PRIMARY_METRIC} per query ({avg}"
                     f"{t['queries']} queries, paired): difference {p_text(t)}: {verdict}.")  # fmt: skip
        for sub in subsets:
            if t.get(sub):
                lines.append(f"  On the {len(subsets[sub])} {sub}-document queries: difference {p_text(t[sub])}.")
        if n > 1:
            each = ", ".join(f"seed {s} {r['mean_diff']:+.4f} (t p = {r['t_pvalue']:.3g})"
                             for s, r in zip(t["seeds"], t["per_seed"]))  # fmt: skip
            lines.append(f"  Per seed: {each}.")
            for sub in subsets:
                if t.get(sub):
                    each = ", ".join(f"seed {s} {r['mean_diff']:+.4f}" for s, r in zip(t["seeds"], t[sub]["per_seed"]))
                    lines.append(f"  Per seed, {sub}-document queries: {each}.")
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


def save_figure(fig, path: Path, caption: str) -> dict:
    """The figure as PNG, written whole (temp file, then rename), and closed; its entry in the report."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return {"file": path.name, "caption": caption}


def figures(exp: Experiment, layout: Layout, stages: list[dict[str, Run]], routing: list[dict] | None = None,
            smoke: bool = False) -> list[dict]:  # fmt: skip
    """Draws the experiment's figures (a smoke run: only the routing one, its training curves being two steps);
    returns each one's file and caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = []
    if "routing" in exp.figures and routing:
        drawn.append(routing_figure(plt, routing, layout.root / "fig_routing.png"))
    if smoke:
        return drawn

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
        ax_dev.set(title=f"{DEV_COLUMN} per epoch", xlabel="epoch", ylabel=PRIMARY_METRIC)
        for ax in (ax_loss, ax_dev):
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=6)
        fig.suptitle(f"{exp.name}: mean over seeds; band = min..max")
        fig.tight_layout()
        drawn.append(save_figure(fig, layout.root / "fig_training.png", "training loss and dev NDCG@10 per epoch"))
    shares, seen = {}, set()
    for run in runs:  # one panel per checkpoint with more than one expert
        per_seed = [an.expert_shares(h) for h in histories.get(run.name, [])]
        key = layout.lead(run, runs).name  # one panel per checkpoint
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
        drawn.append(save_figure(fig, layout.root / "fig_experts.png", "share of routed inputs per expert in training"))
    return drawn


def routing_figure(plt, routing: list[dict], path: Path) -> dict:
    """One heatmap per (checkpoint, block): rows the training datasets, columns the experts, cells the share."""
    panels = [(r, b) for r in routing for b in range(len(r["blocks"]))]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 1.2 + 0.9 * rows * len(routing[0]["blocks"][0]["shares"])),
                             squeeze=False)  # fmt: skip
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (r, b) in zip(axes.flat, panels):
        block = r["blocks"][b]
        names = list(block["shares"])
        grid = np.array([block["shares"][n] for n in names])
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xticks(range(grid.shape[1]))
        ax.tick_params(labelsize=6)
        title = r["label"] + (f", block {b}" if len(r["blocks"]) > 1 else "")
        ax.set_title(f"{title}\nNMI {block['nmi'][0]:.2f}", fontsize=7)
        ax.set_xlabel("expert", fontsize=7)
    fig.suptitle("share of routed units per expert, by dataset (mean over seeds)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, "per-domain routing: share of each dataset's units per expert, and NMI")

"""Take a trained retriever away: a sentence-transformers folder, and ONNX graphs of the whole encoder.

    python export.py CHECKPOINT OUT_DIR [--onnx] [--int8] [--overwrite] [--metrics DIR/metrics.json]

OUT_DIR loads with `SentenceTransformer(OUT_DIR)` and encodes as eval.py does (same pooling,
normalisation and lengths; embeddings equal to float rounding, checked before the folder appears):
- the baseline with stock modules only (Transformer, Pooling, Normalize), no remote code;
- every MoE variant with `trust_remote_code=True`: `sentence_moe.py` (one module that runs the project's
  own `embed`, since stock modules cannot hold a head between backbone and output or MoE FFNs inside
  the backbone) and a copy of model.py travel in the folder, then a stock Normalize.
The folder's README.md is a model card (hub metadata header): backbone, design and settings, the
training recipe (the checkpoint's run_info.json and log_history.json) and, with `--metrics`, the
test metrics of that checkpoint and their unseen-document subset (the per-query file beside it).

`--onnx` adds `onnx/encoder.onnx`: ids and attention mask in, the normalised embedding out (backbone,
pooling, head and normalisation in one graph; dynamic batch and length), traced from the same model,
MoE blocks dispatching densely (`sbmoe.layers.dispatch` while traced). `--int8` adds `onnx/encoder_int8.onnx`, built with onnxruntime by
the recipe chosen for the checkpoint's kind (`INT8_BY_KIND`; `--int8_recipe` names another of `INT8_RECIPES`);
onnx/export.json records the recipe as applied and the CPU it was chosen on, and the recipe read back from the graph
(`graph_recipe`) must equal it, at export and whenever `eval.py --backend onnx-int8` loads the folder.

Nothing is half-written: the folder is built next to OUT_DIR and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from eval import load_retriever
from model import BiEncoder
from sbmoe.config import RetrieverConfig
from sbmoe.data import Corpus, DataError, dataset_name, resolve_dataset
from sbmoe.files import follow_umask, make_temp_dir, move_into_place, read_json, remove_stale_temps, temp_prefix
from sbmoe.hub import checkpoint_digest
from sbmoe.onnx import (
    CALIBRATION_DOCS,
    INT8_RECIPES,
    ONNX_FP32,
    ONNX_INT8,
    calibration_texts,
    export_graphs,
    needs_calibration,
)
from sbmoe.onnx import int8_recipe as recipe_for
from utils import check_output, entry_point, fail

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOLERANCE = 1e-5  # max |difference| per embedding coordinate, export vs eval.py, fp32


# --------------------------------------------------------------------------------------------
# Loading a checkpoint


def load_checkpoint(path: str | Path) -> BiEncoder:
    """A trained retriever of this project, or a one-line DataError saying why not."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such checkpoint folder")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise DataError(f"{path}: not a checkpoint (no config.json)")
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError):
        raise DataError(f"{cfg}: not a JSON config") from None
    if model_type != RetrieverConfig.model_type:
        raise DataError(f"{path}: not a checkpoint of this project (model_type {model_type!r}, expected "
                        f"{RetrieverConfig.model_type!r}; export.py takes what train.py writes)")  # fmt: skip
    return load_retriever(None, str(path)).eval()


# --------------------------------------------------------------------------------------------
# The sentence-transformers folder


def modeling_source() -> str:
    """model.py for the exported folder as one self-contained file: the library modules it imports (sbmoe/...)
    inlined above it, each after its own, and the training loss replaced by a stub (inference needs no loss)."""
    parts, seen = [], {"loss"}

    def inline(path: Path) -> None:
        src = path.read_text(encoding="utf-8")
        for name in re.findall(r"^from sbmoe\.(\w+) import", src, flags=re.M):
            if name not in seen:
                seen.add(name)
                inline(REPO / "sbmoe" / f"{name}.py")
        src = re.sub(r"^from sbmoe\.\w+ import (?:\((?:.|\n)*?\)|.*)\n", "", src, flags=re.M)
        parts.append(src.replace("from __future__ import annotations\n", ""))

    inline(REPO / "model.py")
    stub = ("def info_nce(*args, **kwargs):  # exported copy: encoding only, the loss lives in the project's sbmoe/loss.py\n"
            "    raise NotImplementedError('train with the moe-retrieval project, not from an exported folder')\n")  # fmt: skip
    return "from __future__ import annotations\n\n" + stub + "\n\n".join(parts)


def build_sentence_transformer(model: BiEncoder, tokenizer, query_max_length: int, doc_max_length: int, work: Path):
    """The SentenceTransformer equal to eval.py's encoder; `work` holds the baseline's backbone files."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    if type(model) is BiEncoder:  # stock modules express the baseline exactly
        model.encoder.save_pretrained(work)
        tokenizer.save_pretrained(work)
        modules = [Transformer(str(work), max_seq_length=doc_max_length),
                   Pooling(model.config.backbone_config["hidden_size"], pooling_mode=model.config.pooling)]  # fmt: skip
    else:
        from lab.sentence_moe import MoEEncoder

        modules = [MoEEncoder(model, tokenizer, max_seq_length=doc_max_length, query_max_length=query_max_length)]
    if model.config.normalize:
        modules.append(Normalize())
    return SentenceTransformer(modules=modules, device="cpu")


def write_sentence_transformer(st, model: BiEncoder, folder: Path) -> None:
    st.save(str(folder), create_model_card=False)
    if type(model) is not BiEncoder:
        (folder / "modeling_moe_retriever.py").write_text(modeling_source(), encoding="utf-8")
        shutil.copyfile(HERE / "sentence_moe.py", folder / "sentence_moe.py")


def check_sentence_transformer(folder: Path, model: BiEncoder, tokenizer, query_max_length: int,
                               doc_max_length: int, texts: list[str]) -> float:  # fmt: skip
    """Max |difference| between the written folder, loaded fresh, and eval.py's encoder (queries and documents)."""
    from sentence_transformers import SentenceTransformer

    from sbmoe.encoding import encode_texts

    st = SentenceTransformer(str(folder), device="cpu", trust_remote_code=type(model) is not BiEncoder,
                             local_files_only=True)  # fmt: skip
    worst = 0.0
    for length, encode in ((doc_max_length, st.encode_document), (query_max_length, st.encode_query)):
        if type(model) is BiEncoder:
            st.max_seq_length = length  # stock Transformer: one length (see the model card)
        ours = encode_texts(model, tokenizer, texts, length, batch_size=8, show_progress=False)
        theirs = encode(texts, batch_size=8, convert_to_numpy=True, show_progress_bar=False)
        worst = max(worst, float(np.abs(ours - theirs).max()))
    return worst


# --------------------------------------------------------------------------------------------
# ONNX: the whole encoder in one graph, and its int8 version














































# --------------------------------------------------------------------------------------------
# The model card


def training_recipe(checkpoint: Path) -> dict:
    """What the checkpoint folder says about its training (run_info.json, log_history.json, training_args.bin)."""
    recipe: dict = {}
    run_info = read_json(checkpoint / "run_info.json")
    if isinstance(run_info, dict):
        recipe.update(run_info)
    history = read_json(checkpoint / "log_history.json")
    if isinstance(history, list) and history:
        from sbmoe.results import best_dev, train_seconds

        recipe["epochs"] = max((h.get("epoch", 0) for h in history), default=None)
        recipe["steps"] = max((h.get("step", 0) for h in history), default=None)
        recipe["best_dev_ndcg@10"] = best_dev(history)
        recipe["train_seconds"] = train_seconds(history)
    args_file = checkpoint / "training_args.bin"
    if args_file.is_file():
        try:
            targs = torch.load(args_file, weights_only=False)  # the project's own Trainer arguments
            for key in ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "warmup_ratio",
                        "weight_decay", "lr_scheduler_type", "seed", "fp16", "bf16"):  # fmt: skip
                recipe.setdefault(key, getattr(targs, key, None))
            for key in ("moe_learning_rate", "query_max_length", "doc_max_length", "hard_negatives"):
                if hasattr(targs, key):
                    recipe.setdefault(key, getattr(targs, key))
        except Exception:  # an unreadable pickle only costs the card these lines
            pass
    return {k: v for k, v in recipe.items() if v is not None}


def checkpoint_metrics(path: Path, checkpoint: Path) -> dict:
    """The row of `path` (eval.py's metrics.json) measured on this very checkpoint (by the content digest eval.py
    records, never by name or by being the only row), plus its unseen-document NDCG@10/Recall@100 from the
    per-query file beside it when the dataset's qrels are at hand."""
    if not path.is_file():
        raise DataError(f"--metrics {path}: no such file")
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"--metrics {path}: not eval.py's metrics.json (not a JSON object)")
    rows = {k: v for k, v in data.items() if isinstance(v, dict) and "NDCG@10" in v}
    if not rows:
        raise DataError(f"--metrics {path}: no model rows")
    digest = checkpoint_digest(checkpoint)
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    tags = [t for t in rows if isinstance(settings.get(t), dict) and settings[t].get("checkpoint_sha1") == digest]
    if not tags:
        known = sorted(t for t in rows if isinstance(settings.get(t), dict) and settings[t].get("checkpoint_sha1"))
        why = (f"its rows {known} were measured on other checkpoints" if known else
               "it records no checkpoint identity (re-evaluate the checkpoint with eval.py)")  # fmt: skip
        raise DataError(f"--metrics {path}: no row of {checkpoint}: {why}")
    tag = tags[0]
    # the dataset's name, never the folder it was read from (a path of the machine that evaluated it)
    out = {"tag": tag, "split": data.get("split"), "dataset": Path(str(data.get("dataset"))).name, "all": rows[tag]}
    try:
        from lab.stats import subset_mean
        from sbmoe.data import query_subsets, resolve_data_dir, split_qrels
        from sbmoe.results import read_per_query

        per_query = read_per_query(path.parent, tag)
        data_dir = resolve_data_dir(data["dataset"], None, download=False) if not Path(str(data["dataset"])).is_dir() \
            else Path(data["dataset"])  # fmt: skip
        subsets = query_subsets(*split_qrels(data_dir, data.get("split", "test")))
        out["unseen"] = {m: subset_mean(per_query, subsets["unseen"], m) for m in ("NDCG@10", "Recall@100")}
        out["unseen_queries"] = len(subsets["unseen"])
    except (OSError, KeyError, ValueError, DataError, TypeError):
        pass  # no per-query file or no qrels here: the card gives the all-query figures only
    return out


def _name(source: str) -> str:
    """A hub name as it is; a local folder by its last part (cards name no machine paths)."""
    return source if source.count("/") == 1 and not Path(source).exists() else Path(source).name


def _card_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(f"`{x}`" for x in v)
    return str(v)


def model_card(model: BiEncoder, recipe: dict, metrics: dict | None, query_max_length: int, doc_max_length: int,
               onnx: dict | None) -> str:  # fmt: skip
    c = model.config
    remote = type(model) is not BiEncoder
    base = _name(c.backbone)
    params = model.count_parameters()
    header = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
              "tags:", "- sentence-transformers", "- feature-extraction", "- sentence-similarity", "- dense-retrieval"]  # fmt: skip
    if remote:
        header += ["- mixture-of-experts", "- custom_code"]
    if "/" in base:
        header.append(f"base_model: {base}")
    if metrics:
        header += ["model-index:", f"- name: {c.kind}", "  results:", "  - task:", "      type: retrieval",
                   "    dataset:", f"      name: {metrics['dataset']}", f"      type: {metrics['dataset']}",
                   f"      split: {metrics['split']}", "    metrics:"]  # fmt: skip
        for key, value in metrics["all"].items():
            header += [f"    - type: {key.lower()}", f"      value: {value:.4f}"]
    header.append("---")
    design = {"baseline": "the backbone's pooled output, no MoE",
              "sbmoe": f"SB-MoE: one MoE block after the last layer, design `{c.design}`, routing `{c.routing}`, "
                       f"{c.num_experts} experts, top-{c.top_k}, inference mode `{c.inference_mode}`",
              "moe": f"token-level MoE in the FFN of layers {c.resolved_moe_layers()}, {c.num_experts} experts, "
                     f"top-{c.top_k}, routing `{c.routing}`, experts upcycled from the dense FFN"}.get(c.kind, c.kind)  # fmt: skip
    load = "SentenceTransformer(path, trust_remote_code=True)" if remote else "SentenceTransformer(path)"
    lines = [*header, "", f"# {c.kind} retriever on {base}", "",
             f"A dense bi-encoder from the moe-retrieval project: {design}. {c.pooling} pooling"
             f"{', L2-normalised' if c.normalize else ''}, {c.backbone_config['hidden_size']} dimensions, "
             f"{params['total']:,} parameters ({params['active_per_token']:,} active per input).", "",
             "## Use", "", "```python", "from sentence_transformers import SentenceTransformer", "",
             f"model = {load}", "q = model.encode_query(['...'])", "d = model.encode_document(['...'])", "```", ""]  # fmt: skip
    if remote:
        lines += ["This folder ships its own module code (`sentence_moe.py`, and `modeling_moe_retriever.py`, a copy of "
                  "the project's model.py): loading it needs `trust_remote_code=True`, which runs that code.", ""]  # fmt: skip
    else:
        lines += ["Stock sentence-transformers modules only (Transformer, Pooling, Normalize); no remote code.", ""]
    lines += [f"Lengths as in the project's eval.py: documents truncated at {doc_max_length} tokens, queries at "
              f"{query_max_length}."
              + ("" if remote else f" A stock Transformer has one length ({doc_max_length}); for queries longer than "
                 f"{query_max_length} tokens set `model.max_seq_length = {query_max_length}` before `encode_query`."),
              ""]  # fmt: skip
    lines += ["## Settings", "", "| setting | value |", "|---|---|", f"| backbone | {base} |", f"| kind | {c.kind} |"]
    keys = ["pooling", "normalize", "temperature"]
    if c.kind != "baseline":
        keys += ["num_experts", "top_k", "routing", "aux_loss_coef", "z_loss_coef"]
    if c.kind == "sbmoe":
        keys += ["design", "gate_temperature", "expert_dim", "noise_std", "inference_mode"]
    lines += [f"| {k} | {getattr(c, k)} |" for k in keys]
    lines += ["", "## Training", ""]
    if recipe:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in recipe.items()]
    else:
        lines.append("No training record in the checkpoint folder (run_info.json, log_history.json).")
    lines += ["", "## Evaluation", ""]
    if metrics:
        lines.append(f"{metrics['dataset']} / {metrics['split']}, the project's eval.py (pytrec_eval):")
        lines += ["", "| queries | " + " | ".join(metrics["all"]) + " |", "|---" * (len(metrics["all"]) + 1) + "|",
                  "| all | " + " | ".join(f"{v:.4f}" for v in metrics["all"].values()) + " |"]  # fmt: skip
        if "unseen" in metrics:
            lines += ["", f"Unseen-document subset ({metrics['unseen_queries']} test queries none of whose relevant "
                      "documents is a training positive): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics["unseen"].items())]  # fmt: skip
    else:
        lines.append("No test metrics were given at export (`export.py --metrics metrics.json`).")
    if onnx:
        lines += ["", "## ONNX", "", f"`{ONNX_FP32}`: the whole encoder (ids and mask in, normalised embedding out), "
                  f"max |difference| to PyTorch {onnx['fp32_max_abs_diff_vs_torch']:.1e}. On a CPU with bf16 units "
                  "(AVX512-BF16, AMX), OpenVINO compiling this graph (bf16 there; `eval.py --backend openvino`) was "
                  "faster than the int8 graph and as close to fp32 as PyTorch's bf16 in the project's measurements; "
                  + ("not for this model: its random routing needs int64 arithmetic, which OpenVINO's CPU plugin runs "
                     "in int32." if model.config.routing == "random" else "elsewhere the int8 graph is the faster.")]  # fmt: skip
        if "int8" in onnx:
            q = onnx["int8"]
            recipe = "; ".join(f"{k} {_card_value(v) if v != [] else 'none'}" for k, v in q["recipe"].items())
            lines.append(f"`{ONNX_INT8}`: int8 with onnxruntime, recipe `{q['recipe_name']}` ({recipe}; "
                         f"{q['fp32_nodes']} weight MatMuls kept fp32), chosen by measurement on {q['chosen_on']}; "
                         f"exported on {q['exported_on']}."
                         + (f" Cosine of int8 to fp32 embeddings on sample texts: min {q['min_cosine_to_fp32']:.4f}, "
                            f"mean {q['mean_cosine_to_fp32']:.4f}." if "min_cosine_to_fp32" in q else ""))  # fmt: skip
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line


SAMPLE_TEXTS = [
    "Vitamin D deficiency is associated with an increased risk of tuberculosis.",
    "The protein binds the receptor and the enzyme blocks the tumor pathway in mouse liver cells " * 12,
    "sleep", "A randomised trial of exercise therapy for heart failure.",
]  # fmt: skip


def training_datasets(checkpoint: Path) -> list[str]:
    """The datasets the checkpoint was trained on, as its provenance.json names them (none if it has none)."""
    record = read_json(checkpoint / "provenance.json")
    entry = record.get("inputs", {}).get("dataset") if isinstance(record, dict) else None
    entries = entry if isinstance(entry, list) else [entry] if entry else []
    return [e["name"] for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)]


def calibration_corpora(checkpoint: Path, wanted: list[str] | None) -> tuple[str, list[str]]:
    """(where they come from, documents) for a recipe that calibrates: `--calibration`'s datasets (names or
    folders), or else the checkpoint's training datasets found here."""
    names = wanted or training_datasets(checkpoint)
    if not names:
        raise DataError(f"{checkpoint}: records no training dataset to calibrate int8 on; name one with --calibration")
    try:
        folders = [resolve_dataset(name, download=False) for name in names]
    except DataError as exc:
        flag = "--calibration" if wanted else "--calibration (the checkpoint's training data is not here)"
        raise DataError(f"{flag}: {exc}") from None
    texts = calibration_texts([Corpus(f) for f in folders])
    if not texts:
        raise DataError(f"--calibration {' '.join(names)}: no corpus documents")
    return f"{' + '.join(dataset_name(f) for f in folders)} corpus", texts


def export(checkpoint: Path, out: Path, onnx: bool = False, int8: bool = False, overwrite: bool = False,
           metrics: Path | None = None, query_max_length: int = 64, doc_max_length: int = 256,
           int8_recipe: str | None = None, calibration: list[str] | None = None) -> dict:  # fmt: skip
    """Build the whole folder beside `out`, check it, then rename it into place."""
    extra = len(temp_prefix(out)) - len(out.name) + 8  # the temporary sibling's longer name (mkdtemp adds 8)
    check_output(out, "OUT_DIR", inputs=[checkpoint, metrics], file=out.is_file(), extra_name=extra)  # a file: --overwrite
    if out.exists() and not overwrite:
        raise DataError(f"{out} exists (pass --overwrite to replace it)")
    model = load_checkpoint(checkpoint)
    limit = model.config.backbone_config.get("max_position_embeddings")
    for flag, value in (("query_max_length", query_max_length), ("doc_max_length", doc_max_length)):
        if limit and value > limit:
            raise DataError(f"--{flag} {value}: the backbone has {limit} positions")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    facts = checkpoint_metrics(metrics, checkpoint) if metrics else None
    documents = None
    if int8:
        recipe = recipe_for(model.config.kind, int8_recipe)[1]
        if needs_calibration(recipe):
            documents = calibration_corpora(checkpoint, calibration)
    settings = {"query_max_length": query_max_length, "doc_max_length": doc_max_length,
                "checkpoint_sha1": checkpoint_digest(checkpoint)}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # what an export killed with SIGKILL left
    tmp = make_temp_dir(out)
    try:
        with tempfile.TemporaryDirectory() as work:
            st = build_sentence_transformer(model, tokenizer, query_max_length, doc_max_length, Path(work))
            write_sentence_transformer(st, model, tmp)
        report = {"sentence_transformers_max_abs_diff": check_sentence_transformer(
            tmp, model, tokenizer, query_max_length, doc_max_length, SAMPLE_TEXTS)}  # fmt: skip
        if report["sentence_transformers_max_abs_diff"] > TOLERANCE:
            raise RuntimeError(f"the exported folder encodes {report['sentence_transformers_max_abs_diff']:.1e} away "
                               "from eval.py")  # fmt: skip
        graphs = export_graphs(model, tmp, int8, SAMPLE_TEXTS, tokenizer, doc_max_length, settings, int8_recipe,
                               documents) if onnx or int8 else None  # fmt: skip
        if graphs:
            report["onnx"] = graphs
        card = model_card(model, training_recipe(checkpoint), facts, query_max_length, doc_max_length, graphs)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        follow_umask(tmp)
        old = None
        if out.exists() or out.is_symlink():  # --overwrite: the old one leaves only once the new one is complete
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            move_into_place(out, old)
        move_into_place(tmp, out)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


@entry_point
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint folder written by train.py")
    p.add_argument("out_dir", help="the sentence-transformers folder to write (must not exist, unless --overwrite)")
    p.add_argument("--onnx", action="store_true", help="also onnx/encoder.onnx: the whole encoder, fp32")
    p.add_argument("--int8", action="store_true", help="also onnx/encoder_int8.onnx (implies --onnx)")
    p.add_argument("--int8_recipe", default=None, choices=list(INT8_RECIPES),
                   help="with --int8: this recipe instead of the one chosen for the checkpoint's kind (INT8_BY_KIND)")
    p.add_argument("--calibration", nargs="+", metavar="DATASET", default=None,
                   help="with --int8, for a recipe that calibrates (smoothing): the BEIR datasets (names or folders) "
                        f"whose corpus documents ({CALIBRATION_DOCS}, spread evenly) set the activation ranges; by "
                        "default the checkpoint's training datasets")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--metrics", default=None, help="eval.py's metrics.json of this checkpoint, for the model card")
    p.add_argument("--query_max_length", type=int, default=64)
    p.add_argument("--doc_max_length", type=int, default=256)
    args = p.parse_args(argv)
    if args.int8_recipe and not args.int8:
        p.error("--int8_recipe: only with --int8")
    if args.calibration and not args.int8:
        p.error("--calibration: only with --int8")
    for flag in ("query_max_length", "doc_max_length"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    try:
        report = export(Path(args.checkpoint), Path(args.out_dir), args.onnx, args.int8, args.overwrite,
                        Path(args.metrics) if args.metrics else None, args.query_max_length, args.doc_max_length,
                        args.int8_recipe, args.calibration)  # fmt: skip
    except DataError as exc:
        fail(str(exc))
    except RuntimeError as exc:
        fail(f"export of {args.checkpoint} failed: {str(exc).splitlines()[0]}")
    except OSError as exc:  # the disk filled up, or the folder went away while writing
        fail(f"{args.out_dir}: cannot write the export ({exc.strerror or exc})")
    parts = [f"sentence-transformers max |diff| {report['sentence_transformers_max_abs_diff']:.1e}"]
    if "onnx" in report:
        parts.append(f"ONNX fp32 max |diff| {report['onnx']['fp32_max_abs_diff_vs_torch']:.1e}")
        if "min_cosine_to_fp32" in report["onnx"].get("int8", {}):
            parts.append(f"int8 min cosine to fp32 {report['onnx']['int8']['min_cosine_to_fp32']:.4f}")
    print(f"wrote {args.out_dir} ({'; '.join(parts)})")
    return report


if __name__ == "__main__":
    main()

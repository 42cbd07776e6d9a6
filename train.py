"""The one training driver: arguments, data, ContrastiveTrainer; `main(kind)` serves every variant.

    python train.py        --model_name_or_path M --dataset scifact          # baseline bi-encoder
    python train.py        --kind K ...                                      # any variant in model.VARIANTS
    python train_sbmoe.py  --num_experts 8 --top_k 1 [--design sokli] ...    # SB-MoE (the paper's command line)
    python train_moe.py    --num_experts 8 --top_k 2 --moe_layers 1 3 5 ...  # token-level MoE
    torchrun --nproc_per_node N train_sbmoe.py --fp16 ...                     # DDP

Training reads only the train split and a dev split: the official one (qrels/dev.tsv, or --dev_split),
else a seeded dev slice of the train queries, picks the best epoch (dev NDCG@10, the same evaluation
function as eval.py). The test split is never read here. An epoch visits each training query once with
one sampled positive (--sampling query; --sampling pair: each (query, positive) pair once).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path

import torch
from transformers import HfArgumentParser, ProgressCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from model import VARIANTS, BiEncoder
from sbmoe.config import Setting
from sbmoe.data import DEV_FRACTION, DataError, data_dirs, dataset_name, dev_fraction_error, load_data
from sbmoe.encoding import BATCH_SIZE, DOC_MAX_LENGTH, QUERY_MAX_LENGTH, REUSE_DIR, prune_reuse_cache
from sbmoe.files import FolderLock, atomic_write_text
from sbmoe.hub import load_tokenizer
from sbmoe.metrics import PRIMARY_METRIC
from sbmoe.negatives import default_cache_dir, mine_bm25_negatives, mine_dense_negatives
from sbmoe.results import DEV_METRIC, write_log_history
from sbmoe.trainer import (
    SAMPLINGS,
    ContrastiveCollator,
    ContrastiveDataset,
    ContrastiveTrainer,
    DevSet,
    EpochCallback,
    MixedDataset,
    NonFiniteLossError,
    namespaced,
    save_final,
    unwrap,
)
from utils import check_writable, fail


@dataclass
class ModelArguments:
    """The flags every kind shares; each variant's own settings (model.Setting) are added by `model_arguments`."""

    kind: str | None = field(default=None, metadata={"help": "model variant: " + " | ".join(VARIANTS)})
    model_name_or_path: str = field(
        default="huawei-noah/TinyBERT_General_6L_768D", metadata={"help": "backbone: hub name or local folder"}
    )
    pooling: str = field(default="auto", metadata={"help": "cls | mean | auto (sentence-transformers config, else cls)"})
    normalize: bool = field(default=True, metadata={"help": "L2-normalise embeddings (cosine similarity)"})
    temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature"})
    moe_learning_rate: float | None = field(
        default=None,
        metadata={"help": "learning rate of routers, experts and head (default: the variant's, else --learning_rate)"},
    )


def variant_flags() -> dict[str, tuple[Setting, list[str]]]:
    """Every training flag the registered variants declare (model.Setting), with the kinds that take it;
    a flag several variants share is declared once, on the class that introduces it."""
    flags: dict[str, tuple[Setting, list[str]]] = {}
    for kind, cls in VARIANTS.items():
        for name, setting in cls.variant_settings().items():
            if setting.flag:
                flags.setdefault(name, (setting, []))[1].append(kind)
    return flags


def model_arguments() -> type[ModelArguments]:
    """ModelArguments plus one field per variant flag, made now, so that a variant defined after this
    module was imported (in a test file) has its flags. Each is None unless given: parse fills in defaults."""
    fields = [("kind", str | None, field(default=None, metadata={"help": "model variant: " + " | ".join(VARIANTS)}))]
    per_variant = set().union(*(cls.defaults() for cls in VARIANTS.values()))
    for name, (setting, kinds) in variant_flags().items():
        default = "" if name in per_variant or "default" in setting.help else f"; unset: {setting.default}"
        help_ = f"{setting.help} [--kind {' | '.join(kinds)}{default}]"
        fields.append((name, setting.type | None, field(default=None, metadata={"help": help_})))
    return make_dataclass("ModelArguments", fields, bases=(ModelArguments,))


@dataclass
class DataArguments:
    dataset: list[str] = field(
        default_factory=lambda: ["scifact"],
        metadata={"help": "BEIR dataset(s): names under $BEIR_DATA_DIR or folders. Several train one model: every "
                          "batch from one dataset, batches interleaved in proportion to each dataset's training "
                          "examples (MixedDataset), negatives mined per corpus, dev selection on the mean of the "
                          "datasets' dev scores"},
    )  # fmt: skip
    data_dir: str | None = field(default=None, metadata={"help": "a BEIR folder (overrides --dataset)"})
    train_split: str = field(default="train", metadata={"help": "qrels split to train on"})
    dev_fraction: float = field(default=DEV_FRACTION, metadata={"help": "fraction of train queries held out for selection"})
    dev_split: str | None = field(
        default=None,
        metadata={"help": "qrels split that selects the best epoch (default: dev when qrels/dev.tsv exists, "
                          "else a seeded --dev_fraction slice of the train queries); none forces the slice"},
    )  # fmt: skip
    sampling: str = field(
        default="query",
        metadata={"help": "query: an epoch visits each training query once, with one positive sampled from its "
                          "judged documents of relevance >= 1 (Tevatron); pair: one example per (query, positive) "
                          "pair. Queries without a positive are skipped; draws depend only on (seed, epoch, index)"},
    )  # fmt: skip
    hard_negatives: int = field(default=1, metadata={"help": "hard negatives per query"})
    negative_source: str = field(
        default="bm25", metadata={"help": "bm25 | dense (the starting model's own top documents, mined once)"}
    )
    negative_depth: int = field(default=30, metadata={"help": "hard negatives are sampled from this depth"})
    query_max_length: int = field(default=QUERY_MAX_LENGTH, metadata={"help": "query truncation (tokens)"})
    doc_max_length: int = field(default=DOC_MAX_LENGTH, metadata={"help": "document truncation (tokens)"})
    eval_doc_max_length: int | None = field(
        default=None,
        metadata={"help": f"dev evaluation document truncation (default --doc_max_length; eval.py uses {DOC_MAX_LENGTH})"},
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "hard-negatives cache (default $RETRIEVAL_CACHE_DIR or ./cache, /negatives/<dataset>)"}
    )


@dataclass
class RetrievalTrainingArguments(TrainingArguments):
    """TrainingArguments with retrieval defaults: per-epoch dev selection, no column pruning."""

    output_dir: str | None = field(default=None, metadata={"help": "default checkpoints/<kind>"})
    num_train_epochs: float = field(default=2.0, metadata={"help": "training epochs"})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "queries per device and step"})
    learning_rate: float = field(default=2e-5, metadata={"help": "backbone learning rate"})
    warmup_steps: float = field(default=0.1, metadata={"help": "warm-up steps (a float < 1 is a fraction)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    eval_strategy: str = field(default="epoch", metadata={"help": "dev evaluation schedule"})
    save_strategy: str = field(default="epoch", metadata={"help": "checkpoint schedule"})
    save_total_limit: int | None = field(default=2, metadata={"help": "checkpoints kept (the best one is kept)"})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "final model = best dev NDCG@10"})
    metric_for_best_model: str | None = field(default=DEV_METRIC, metadata={"help": "selection metric (dev)"})
    logging_steps: float = field(default=5, metadata={"help": "log every N steps"})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "none | tensorboard | ..."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "the dict collator needs every column"})
    dataloader_drop_last: bool = field(default=True, metadata={"help": "equal batches on every rank"})
    eval_batch_size: int = field(default=BATCH_SIZE, metadata={"help": "encoding batch size for dev evaluation"})


# --------------------------------------------------------------------------------------------
# Entry point


def parse(kind: str | None, argv: list[str] | None, extra: tuple = ()):
    """The three argument dataclasses (plus any `extra` ones, e.g. frozen.py's), checked; unknown flags fail."""
    parser = HfArgumentParser((model_arguments(), DataArguments, RetrievalTrainingArguments, *extra))
    argv = list(argv) if argv is not None else sys.argv[1:]
    if not torch.cuda.is_available() and not any(a.split("=")[0] == "--use_cpu" for a in argv):
        argv.append("--use_cpu")  # no GPU: the CPU is the device, also for --bf16
    try:
        margs, dargs, targs, *others = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=False)
    except ValueError as exc:  # HfArgumentParser reports leftover (unknown) flags this way
        fail(str(exc).splitlines()[0])
    if kind and margs.kind and margs.kind != kind:
        fail(f"--kind {margs.kind}: this entry point trains {kind} (use train.py --kind {margs.kind})")
    margs.kind = kind = margs.kind or kind or "baseline"
    if kind not in VARIANTS:
        fail(f"--kind {kind!r}: expected one of {', '.join(VARIANTS)}")
    check_variant_flags(margs, kind)
    defaults = VARIANTS[kind].defaults(getattr(margs, "design", None))
    for name, value in defaults.items():
        if getattr(margs, name) is None:
            setattr(margs, name, value)
    own = VARIANTS[kind].variant_settings()  # the kind's unset flags get their declared defaults; others stay None
    for name, setting in own.items():
        if setting.flag and getattr(margs, name) is None:
            setattr(margs, name, setting.default)
    if margs.moe_learning_rate is None:
        margs.moe_learning_rate = targs.learning_rate
    if not any(str(a).split("=")[0] == "--output_dir" for a in argv):  # transformers 5 fills in "trainer_output"
        targs.output_dir = f"checkpoints/{kind}"
    check_ranges(margs, dargs, targs)
    if VARIANTS[kind] is not BiEncoder and targs.ddp_find_unused_parameters is None:
        targs.ddp_find_unused_parameters = True  # experts that got no input this step have no gradient
    if (error := VARIANTS[kind].settings_error({n: getattr(margs, n) for n in own if own[n].flag})) is not None:
        fail(error)  # the kind's settings, with their defaults in (for checks that span them: --top_k, --num_experts)
    if getattr(margs, "routing", None) == "domain":
        n = 1 if dargs.data_dir else len(dargs.dataset)
        if n < 2:
            fail("--routing domain: needs several --dataset (each dataset's examples go to its own expert)")
        if margs.num_experts != n:
            fail(f"--routing domain: --num_experts {margs.num_experts} must equal the number of datasets ({n})")
    if dargs.negative_source not in ("bm25", "dense"):
        fail(f"--negative_source {dargs.negative_source!r}: expected bm25 or dense")
    if dargs.hard_negatives > dargs.negative_depth:
        fail(f"--hard_negatives {dargs.hard_negatives} exceeds --negative_depth {dargs.negative_depth}")
    if error := dev_fraction_error(dargs.dev_fraction):
        fail(error)
    if dargs.sampling not in SAMPLINGS:
        fail(f"--sampling {dargs.sampling!r}: expected one of {', '.join(SAMPLINGS)}")
    if dargs.dev_split is not None and dargs.dev_split == dargs.train_split:
        fail(f"--dev_split {dargs.dev_split}: the dev split must differ from --train_split")
    return (margs, dargs, targs, *others)  # one per dataclass parsed


def check_variant_flags(margs: ModelArguments, kind: str) -> None:
    """Each flag given that `kind` does not have, against the declaration of the variant that does (the kind's
    own are checked by `settings_error` once their defaults are in): a strict one fails for any value."""
    own = VARIANTS[kind].variant_settings()
    for name, (setting, kinds) in variant_flags().items():
        value = getattr(margs, name)
        if value is None or name in own:
            continue
        if setting.strict:
            fail(f"--{name}: only --kind {' | '.join(kinds)} has this setting, not {kind}")
        if (error := setting.error(name, value)) is not None:
            fail(error)


def check_ranges(margs: ModelArguments, dargs: DataArguments, targs: RetrievalTrainingArguments) -> None:
    """Every numeric flag in its range, at parse time: one line naming the flag."""
    def need(flag: str, value, ok: bool, what: str) -> None:
        if value is not None and not ok:
            fail(f"--{flag} {value}: must be {what}")

    for flag, value in (("learning_rate", targs.learning_rate), ("moe_learning_rate", margs.moe_learning_rate),
                        ("temperature", margs.temperature)):  # fmt: skip
        need(flag, value, value is None or (math.isfinite(value) and value > 0), "a number > 0")
    for flag, value in (("weight_decay", targs.weight_decay), ("warmup_steps", targs.warmup_steps)):
        need(flag, value, math.isfinite(value) and value >= 0, "a number >= 0")
    for flag, value in (("negative_depth", dargs.negative_depth), ("query_max_length", dargs.query_max_length),
                        ("doc_max_length", dargs.doc_max_length), ("eval_doc_max_length", dargs.eval_doc_max_length),
                        ("per_device_train_batch_size", targs.per_device_train_batch_size),
                        ("eval_batch_size", targs.eval_batch_size),
                        ("gradient_accumulation_steps", targs.gradient_accumulation_steps),
                        ("save_total_limit", targs.save_total_limit)):  # fmt: skip
        need(flag, value, value is None or value >= 1, "at least 1")
    need("hard_negatives", dargs.hard_negatives, dargs.hard_negatives >= 0, "0 or more")
    if targs.max_steps <= 0:
        need("num_train_epochs", targs.num_train_epochs, targs.num_train_epochs > 0, "> 0 (or give --max_steps)")


def build_model(margs: ModelArguments) -> BiEncoder:
    """A new model of `margs.kind` with exactly that kind's settings in its config (its flags, else their defaults)."""
    own = VARIANTS[margs.kind].variant_settings()
    settings = {name: getattr(margs, name, s.default) if s.flag else s.default for name, s in own.items()}
    settings = dict(normalize=margs.normalize, temperature=margs.temperature, **settings)
    try:
        return VARIANTS[margs.kind].from_backbone(margs.model_name_or_path, pooling=margs.pooling, **settings)
    except ValueError as exc:  # not found locally nor on the hub, or --moe_layers beyond the backbone's layers
        fail(str(exc).splitlines()[0])
    except OSError as exc:
        fail(f"--model_name_or_path {margs.model_name_or_path}: cannot load a backbone ({str(exc).splitlines()[0]})")


def mine_negatives(model, tokenizer, corpus, queries, train_qrels, cache, margs, dargs, targs) -> dict:
    """BM25 negatives, or the starting model's own (every variant starts as the pretrained retriever)."""
    if dargs.negative_source == "bm25":
        return mine_bm25_negatives(corpus, queries, train_qrels, dargs.negative_depth, cache)
    return mine_dense_negatives(
        model, tokenizer, corpus, queries, train_qrels, dargs.negative_depth, cache, targs.device,
        [str(margs.model_name_or_path), margs.pooling, dargs.doc_max_length],
        query_max_length=dargs.query_max_length, doc_max_length=dargs.doc_max_length,
        batch_size=targs.eval_batch_size, bf16=targs.bf16, fp16=targs.fp16,
    )  # fmt: skip


def check_lengths(model: BiEncoder, dargs: DataArguments) -> None:
    """Lengths beyond the backbone's positions would fail in the first long batch: cut them, and say so."""
    limit = model.config.backbone_config.get("max_position_embeddings")
    for flag in ("query_max_length", "doc_max_length", "eval_doc_max_length"):
        value = getattr(dargs, flag)
        if limit and value is not None and value > limit:
            print(f"note: --{flag} {value}: the backbone has {limit} positions; using {limit}", flush=True)
            setattr(dargs, flag, limit)


def main(kind: str | None = None, argv: list[str] | None = None) -> None:
    margs, dargs, targs = parse(kind, argv)
    try:
        check_writable(targs.output_dir)
        dirs = data_dirs(dargs.dataset, dargs.data_dir)
        data = [load_data(d, dargs.train_split, dargs.dev_split, dargs.dev_fraction, targs.seed) for d in dirs]
    except DataError as exc:
        fail(str(exc))
    model = build_model(margs)
    check_lengths(model, dargs)
    try:
        tokenizer = load_tokenizer(margs.model_name_or_path)
    except ValueError as exc:
        fail(str(exc))
    writer = int(os.environ.get("RANK", "0")) == 0  # one lock per folder, held by the saving process
    try:
        with FolderLock(targs.output_dir) if writer else contextlib.nullcontext():
            run_training(margs, dargs, targs, model, tokenizer, data, dirs)
    except DataError as exc:
        fail(str(exc))


def training_data(margs, dargs, targs, model, tokenizer, data: list[tuple], dirs: list[Path]):
    """The training set, its collator and the dev sets. One dataset: as it is. Several: negatives mined per
    corpus, ids namespaced per dataset, a MixedDataset (every batch from one dataset), one dev set each."""
    multi = len(data) > 1
    parts, devs, merged = [], [], ({}, {}, {})
    for d, (corpus, queries, train_qrels, dev_qrels, _) in enumerate(data):
        cache = default_cache_dir(dirs[d], dargs.cache_dir)
        negatives = mine_negatives(model, tokenizer, corpus, queries, train_qrels, cache, margs, dargs, targs)
        devs.append(DevSet(dataset_name(dirs[d]), dirs[d], corpus, {q: queries[q] for q in dev_qrels}, dev_qrels,
                           d if multi else None))  # fmt: skip
        if multi:
            corpus, queries, train_qrels, negatives = namespaced(d, corpus, queries, train_qrels, negatives)
        try:
            parts.append(ContrastiveDataset(queries, train_qrels, negatives, dargs.hard_negatives, targs.seed,
                                            sampling=dargs.sampling))  # fmt: skip
        except DataError as exc:
            fail(f"{dataset_name(dirs[d])}: {exc}" if multi else str(exc))
        for into, part in zip(merged, (corpus, queries, train_qrels)):
            into.update(part)
    batch = targs.train_batch_size * targs.world_size  # one loader batch on each process (DataParallel: all GPUs')
    train_set = MixedDataset(parts, batch, targs.seed) if multi else parts[0]
    collator = ContrastiveCollator(tokenizer, *merged, dargs.query_max_length, dargs.doc_max_length)
    return train_set, collator, devs


def run_training(margs, dargs, targs, model, tokenizer, data: list[tuple], dirs: list[Path]) -> None:
    """Mine negatives, train, save the final model and its records (inside the output folder's lock)."""
    kind = margs.kind
    train_set, collator, devs = training_data(margs, dargs, targs, model, tokenizer, data, dirs)
    if len(train_set) < targs.train_batch_size * targs.world_size:
        fail(f"{len(train_set)} examples per epoch ({dargs.sampling} sampling) are fewer than one global batch")
    if len(devs) > 1:
        model.config.domains = [dev.name for dev in devs]
    model.config.pad_token_id = tokenizer.pad_token_id  # as the Trainer would set it, with a notice each run
    reuse_dir = Path(targs.output_dir) / REUSE_DIR if targs.eval_strategy != "no" else None
    trainer = ContrastiveTrainer(
        model=model, args=targs, train_dataset=train_set, data_collator=collator, processing_class=tokenizer,
        eval_dataset=[q for dev in devs for q in sorted(dev.qrels)],  # only its presence matters
        dev_data=devs, moe_learning_rate=margs.moe_learning_rate, reuse_dir=reuse_dir,
        callbacks=[EpochCallback(train_set)],
        eval_kwargs=dict(
            query_max_length=dargs.query_max_length, doc_max_length=dargs.eval_doc_max_length or dargs.doc_max_length,
            batch_size=targs.eval_batch_size,
        ),
    )  # fmt: skip
    resume = targs.resume_from_checkpoint
    if resume in ("last", "True", "true"):
        resume = get_last_checkpoint(targs.output_dir)
        if resume is None:
            fail(f"--resume_from_checkpoint last: no checkpoint in {targs.output_dir}")
    if resume and not (Path(resume) / "trainer_state.json").is_file():
        fail(f"{resume}: not a complete checkpoint (trainer_state.json missing)")
    if resume and trainer.is_world_process_zero():
        step = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]
        print(f"{kind}: resuming from {resume} at step {step}", flush=True)
    train_queries = sum(len(train_qrels) for _, _, train_qrels, *_ in data) - len(train_set.skipped)
    dev_info = {dev.name: info for dev, (*_, info) in zip(devs, data)}
    if trainer.is_world_process_zero():
        mixed = (f", {len(devs)} datasets ({MixedDataset.__name__}: every batch from one dataset)"
                 if len(devs) > 1 else "")  # fmt: skip
        devs_text = "; ".join(f"{len(dev.qrels)} dev queries ({info['source']})" + (f" of {n}" if len(devs) > 1 else "")
                              for dev, (n, info) in zip(devs, dev_info.items()))  # fmt: skip
        print(
            f"{kind}: {dargs.sampling} sampling{mixed}, {len(train_set)} examples per epoch "
            f"({train_queries} training queries, {len(train_set.skipped)} without a positive skipped), {devs_text}, "
            f"{dargs.hard_negatives} hard negatives, {sum(p.numel() for p in model.parameters()):,} parameters",
            flush=True,
        )
    try:
        trainer.train(resume_from_checkpoint=resume)
    except NonFiniteLossError as exc:
        for callback in trainer.callback_handler.callbacks:  # end the open progress bar: the error gets its own line
            if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
                callback.training_bar.close()
        fail(str(exc))
    save_final(trainer, targs.output_dir)
    if trainer.is_world_process_zero():
        history = trainer.state.log_history
        write_log_history(targs.output_dir, history)
        if reuse_dir is not None:  # only the final weights' dev-pass embeddings can ever be reused
            prune_reuse_cache(Path(targs.output_dir), unwrap(trainer.model))
        run_info = {
            "sampling": dargs.sampling, "examples_per_epoch": len(train_set), "seed": targs.seed,
            "train_queries": train_queries, "skipped_queries": len(train_set.skipped),
            "dev": dev_info[devs[0].name] if len(devs) == 1 else dev_info,
        }  # fmt: skip
        if len(devs) > 1:
            run_info["datasets"] = [dev.name for dev in devs]
            run_info["sampler"] = ("every global batch from one dataset; per epoch each dataset's examples shuffled and "
                                   "cut into global batches, all batches shuffled together (seeded by seed and epoch)")
        atomic_write_text(Path(targs.output_dir) / "run_info.json", json.dumps(run_info, indent=1) + "\n")
        best = trainer.state.best_metric
        print(f"{kind}: best dev {PRIMARY_METRIC} {best if best is None else round(best, 4)} -> {targs.output_dir}")
        if best is not None and math.isnan(best):
            fail(f"dev {PRIMARY_METRIC} is NaN")


if __name__ == "__main__":
    main()

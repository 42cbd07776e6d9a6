"""Contrastive training through the Hugging Face Trainer: datasets (query or pair sampling, several datasets with one dataset per batch), the collator, the trainer with its dev pass."""

from __future__ import annotations

import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sbmoe.data import (
    DataError,
    doc_text,
)
from sbmoe.encoding import EmbeddingCache, content_key
from sbmoe.files import move_into_place
from sbmoe.results import dev_dataset_key, expert_share_key
from sbmoe.retrieval import evaluate_model
from sbmoe.search import ENCODE_CHUNK

SAMPLINGS = ("query", "pair")


class ContrastiveDataset(Dataset):
    """Training examples (query, one positive, hard negatives), with what example i of epoch e holds a pure
    function of (seed, e, i): a resumed run, or another rank, sees the same data.

    sampling="query" (Tevatron's epochs): one example per training query, its positive drawn each epoch from
    the query's judged documents of relevance >= 1. sampling="pair": one example per (query, positive) pair.
    Queries without a positive are skipped (listed in `skipped`). Hard negatives are drawn from the query's
    mined ones. The Trainer (and `EpochCallback`, which also covers DDP) calls `set_epoch`.
    """

    def __init__(self, queries, qrels, negatives, num_negatives: int, seed: int, sampling: str = "query"):
        if sampling not in SAMPLINGS:
            raise DataError(f"--sampling {sampling!r}: expected one of {', '.join(SAMPLINGS)}")
        positives = {q: sorted(d for d, r in qrels[q].items() if r >= 1) for q in sorted(qrels)}
        self.skipped = [q for q, docs in positives.items() if not docs]
        positives = {q: docs for q, docs in positives.items() if docs}
        if sampling == "query":
            self.examples = [(q, tuple(docs)) for q, docs in positives.items()]
        else:
            self.examples = [(q, (d,)) for q, docs in positives.items() for d in docs]
        self.queries, self.negatives, self.num_negatives = queries, negatives, num_negatives
        self.seed, self.sampling, self.epoch = seed, sampling, 0
        short = [q for q in positives if len(negatives.get(q, [])) < num_negatives]
        if short:
            raise DataError(f"query {short[0]!r}: fewer than {num_negatives} hard negatives (lower --hard_negatives)")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        qid, positives = self.examples[i]
        rng = random.Random(f"{self.seed}/{self.epoch}/{i}")  # a str seed is hashed with SHA-512: stable across runs
        pos = rng.choice(positives)
        negs = rng.sample(self.negatives[qid], self.num_negatives) if self.num_negatives else []
        return {"qid": qid, "docs": [pos, *negs]}


class MixedDataset(Dataset):
    """Several datasets' training examples in one epoch, every global batch from one dataset (in-batch negatives
    from another corpus would be trivially easy).

    The sampler, a pure function of (seed, epoch): each dataset's examples are shuffled and cut into blocks of
    `batch` (the global batch: per-device batch x processes); the leftover of each dataset (fewer than `batch`,
    different examples each epoch) waits for the next epoch; then all blocks are shuffled together. Each
    dataset thus has its share of the steps in proportion to its training examples, spread over the epoch.
    The Trainer reads it in order (`ordered`: no sampler shuffle), and under DDP each process takes its
    consecutive slice of every block. Example j of dataset d is `parts[d][j]`, with `domain` = d added.
    """

    ordered = True

    def __init__(self, parts: list[ContrastiveDataset], batch: int, seed: int):
        self.parts, self.batch, self.seed = parts, batch, seed
        self.skipped = [q for p in parts for q in p.skipped]
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        rng = random.Random(f"{self.seed}/{self.epoch}/mix")
        blocks = []
        for d, part in enumerate(self.parts):
            part.set_epoch(epoch)
            order = list(range(len(part)))
            rng.shuffle(order)
            blocks += [(d, order[i : i + self.batch]) for i in range(0, len(order) - self.batch + 1, self.batch)]
        rng.shuffle(blocks)
        self.index = [(d, j) for d, rows in blocks for j in rows]

    def __len__(self) -> int:
        return sum(len(p) // self.batch for p in self.parts) * self.batch

    def __getitem__(self, i: int) -> dict:
        d, j = self.index[i]
        return {**self.parts[d][j], "domain": d}


def namespaced(d: int, corpus: dict, queries: dict, qrels: dict, negatives: dict) -> tuple[dict, dict, dict, dict]:
    """Dataset d's ids as (d, id) pairs: ids that collide across datasets stay apart in the merged training data."""
    return ({(d, k): v for k, v in corpus.items()}, {(d, k): v for k, v in queries.items()},
            {(d, q): {(d, x): r for x, r in docs.items()} for q, docs in qrels.items()},
            {(d, q): [(d, x) for x in docs] for q, docs in negatives.items()})  # fmt: skip


class EpochCallback(TrainerCallback):
    """Set the training set's epoch as each epoch begins (state.epoch is e + the fraction done, also on resume).

    The Trainer's dataloader forwards `set_epoch` to the dataset only in one process: under DDP accelerate's
    sharded sampler takes the call instead, so without this every epoch would reuse epoch 0's draws.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(math.floor(state.epoch or 0))


def positive_ids(qrels: dict, qids: list[str], doc_index: dict[str, int], width: int) -> torch.Tensor:
    """(B, width) corpus indices of every known positive of each query, -1 padded (same width on every rank),
    so that InfoNCE masks another positive of the same query instead of using it as a negative."""
    pos = torch.full((len(qids), width), -1, dtype=torch.long)
    for row, qid in enumerate(qids):
        known = [doc_index[x] for x, r in qrels[qid].items() if r > 0]
        pos[row, : len(known)] = torch.tensor(known, dtype=torch.long)
    return pos


class ContrastiveCollator:
    """Tokenise a batch: queries (B), documents (B*(1+N), positive first), ids for false-negative masks."""

    def __init__(self, tokenizer, corpus, queries, qrels, query_max_length: int, doc_max_length: int):
        self.tokenizer, self.corpus, self.queries, self.qrels = tokenizer, corpus, queries, qrels
        self.doc_index = {d: i for i, d in enumerate(corpus)}
        self.max_pos = max(sum(1 for r in docs.values() if r > 0) for docs in qrels.values())
        self.query_max_length, self.doc_max_length = query_max_length, doc_max_length

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        q = self.tokenizer(
            [self.queries[e["qid"]] for e in examples], padding=True, truncation=True,
            max_length=self.query_max_length, return_tensors="pt",
        )  # fmt: skip
        doc_ids = [d for e in examples for d in e["docs"]]
        d = self.tokenizer(
            [doc_text(self.corpus[x]) for x in doc_ids], padding=True, truncation=True,
            max_length=self.doc_max_length, return_tensors="pt",
        )  # fmt: skip
        pos = positive_ids(self.qrels, [e["qid"] for e in examples], self.doc_index, self.max_pos)
        domains = {"domains": torch.tensor([e["domain"] for e in examples])} if "domain" in examples[0] else {}
        return {
            **domains,
            "query_input_ids": q["input_ids"],
            "query_attention_mask": q["attention_mask"],
            "doc_input_ids": d["input_ids"],
            "doc_attention_mask": d["attention_mask"],
            "doc_ids": torch.tensor([self.doc_index[x] for x in doc_ids]),
            "pos_ids": pos,
        }


@dataclass
class DevSet:
    """One dataset's dev split, searched over its own corpus at each dev evaluation."""

    name: str
    data_dir: Path
    corpus: dict
    queries: dict
    qrels: dict
    domain: int | None = None  # its index among several training datasets (expert d of --routing domain)


class NonFiniteLossError(RuntimeError):
    pass


class ContrastiveTrainer(Trainer):
    """The model owns the loss; this adds dev evaluation, MoE logging, a second LR, atomic checkpoints."""

    def __init__(self, *args, dev_data=None, eval_kwargs=None, moe_learning_rate=None, reuse_dir=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dev_data, self.eval_kwargs, self.moe_learning_rate = dev_data, eval_kwargs or {}, moe_learning_rate
        self.reuse_dir = reuse_dir  # where dev passes keep their corpus embeddings (None: nowhere)
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if not torch.isfinite(outputs.loss):
            raise NonFiniteLossError(
                f"non-finite loss ({outputs.loss.item()}) at step {self.state.global_step + 1}; "
                "stopped before the optimizer step, nothing saved from it"
            )
        self._accumulate(outputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _accumulate(self, outputs) -> None:
        parts = {"contrastive_loss": outputs.contrastive_loss, "aux_loss": outputs.aux_loss}
        parts.update(expert_load=outputs.expert_load, router_entropy=outputs.router_entropy)
        for name, value in parts.items():
            if value is not None:
                value = value.detach().float()
                self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._count and "loss" in logs:
            sums = {k: v / self._count for k, v in self._sums.items()}
            # The contrastive loss carries the world-size factor for exact DDP gradients; log it without.
            logs["contrastive_loss"] = sums["contrastive_loss"].item() / max(1, self.args.world_size)
            if "aux_loss" in sums:
                logs["aux_loss"] = sums["aux_loss"].item()
                logs["router_entropy"] = sums["router_entropy"].mean().item()
                load = sums["expert_load"] / sums["expert_load"].sum(-1, keepdim=True)  # (L, E) shares
                for b, row in enumerate(load):
                    for e, share in enumerate(row):
                        logs[expert_share_key(b, e)] = round(share.item(), 4)
            for i, group in enumerate(self.optimizer.param_groups if self.optimizer else []):
                logs[f"lr/{group.get('name', i)}"] = group["lr"]
            self._sums, self._count = {}, 0
        super().log(logs, start_time)

    def create_optimizer(self, model=None):
        """AdamW with the Trainer's decay groups, each split into backbone and MoE (router + experts) parts."""
        if self.optimizer is None:
            opt = super().create_optimizer(model)
            model = unwrap(model or self.model)
            moe = {id(p) for n, p in model.named_parameters() if n in model.moe_parameter_names()}
            groups = []
            for group in opt.param_groups:
                for part in ("backbone", "moe"):
                    params = [p for p in group["params"] if (part == "moe") == (id(p) in moe)]
                    if params:
                        lr = self.moe_learning_rate if part == "moe" and self.moe_learning_rate else group["lr"]
                        groups.append({**group, "params": params, "lr": lr, "initial_lr": lr, "name": part})
            opt.param_groups[:] = groups  # no step taken yet, so there is no state to move
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        """A MixedDataset is read in its own order (its batches must not mix datasets); others are shuffled."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(dataset, "ordered", False):
            return SequentialSampler(dataset)
        return super()._get_train_sampler(train_dataset)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval") -> dict[str, float]:
        """Dev NDCG@10 etc. by full retrieval over each dev set's corpus (every rank computes the same numbers).

        With several datasets, each one's scores are logged as `<prefix>_<dataset>/<metric>` and the selection
        metrics are their means (each dataset counts once, whatever its number of dev queries)."""
        bf16, fp16 = self.args.bf16, self.args.fp16
        dtype = "bf16" if bf16 else "fp16" if fp16 else "fp32"
        per_set = {}
        for dev in self.dev_data:
            kwargs = {**self.eval_kwargs, "domain": dev.domain}
            cache = None
            if self.reuse_dir is not None:  # the test evaluation of the selected checkpoint reads these
                key = content_key(self.model, dev.data_dir, len(dev.corpus), kwargs["doc_max_length"], dtype,
                                  kwargs["batch_size"], ENCODE_CHUNK, dev.domain)  # fmt: skip
                cache = EmbeddingCache(self.reuse_dir, key)
            per_set[dev.name] = evaluate_model(
                self.model, self.processing_class, dev.corpus, dev.queries, dev.qrels, bf16=bf16, fp16=fp16,
                show_progress=False, cache=cache, **kwargs,
            )  # fmt: skip
        scores = {k: float(np.mean([v[k] for v in per_set.values()])) for k in next(iter(per_set.values()))}
        metrics = {f"{metric_key_prefix}_{k.lower()}": v for k, v in scores.items()}
        if len(per_set) > 1:
            metrics.update({f"{metric_key_prefix}_{dev_dataset_key(name, k.lower())}": v
                            for name, values in per_set.items() for k, v in values.items()})  # fmt: skip
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save_checkpoint(self, model, trial) -> None:
        """Write each checkpoint into a hidden staging folder, then rename: never half a checkpoint."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, ".staging")
        if self.args.should_save:  # only the saving rank touches the folders
            shutil.rmtree(staging, ignore_errors=True)
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        final = os.path.join(run_dir, name)
        if self.state.best_global_step:  # super() pointed it into the staging folder: point it at the real one
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            self.state.best_model_checkpoint = best if best == final or os.path.isdir(best) else None
        if self.args.should_save:
            self.state.save_to_json(os.path.join(staging, name, "trainer_state.json"))
            shutil.rmtree(final, ignore_errors=True)
            move_into_place(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)

    def _rotate_checkpoints(self, use_mtime=False, output_dir=None) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        rotate_checkpoints(
            output_dir=output_dir or self.args.output_dir, save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=use_mtime,
        )  # fmt: skip


def unwrap(model):
    """The model inside DDP or compile wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)




def save_final(trainer: Trainer, out: str) -> None:
    """The final model as the checkpoints are saved: into a staging folder, then renamed in (config.json
    last), so a full disk never leaves a config without its weights."""
    staging = Path(out) / ".staging-final"
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))
    if trainer.args.should_save:
        for name in sorted(os.listdir(staging), key=lambda n: n == "config.json"):
            move_into_place(staging / name, Path(out) / name)
        staging.rmdir()

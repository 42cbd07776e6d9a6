"""BEIR folders: finding and downloading them, reading corpus, queries and qrels with line-numbered errors, splits and the seen/unseen-document subsets, the evaluation corpus."""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import os
import random
import re
import shutil
import sys
import zlib
from array import array
from collections.abc import Iterable, Iterator
from contextlib import suppress
from pathlib import Path

import numpy as np

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{}.zip"


class DataError(Exception):
    """Bad input: the message names the file (and line) at fault, and is shown without a traceback."""


def resolve_dataset(entry: str, download: bool = True) -> Path:
    """A dataset given as a name (under $BEIR_DATA_DIR, downloaded when missing) or as a folder: an entry with a
    path separator, or starting with `.`, is a folder."""
    return resolve_data_dir(None, entry) if is_dataset_folder(entry) else resolve_data_dir(entry, None, download=download)


def is_dataset_folder(entry: str) -> bool:
    """Whether a dataset entry names a folder (a path separator, or a leading `.`) rather than a dataset name."""
    return "/" in entry or os.sep in entry or entry.startswith(".")


def dataset_name(entry: str | Path) -> str:
    """A dataset's name in results, logs and a checkpoint's `domains`: the name, or a folder's last component."""
    return Path(str(entry).rstrip("/\\")).name


def resolve_data_dir(dataset: str | None, data_dir: str | None, download: bool = True) -> Path:
    """``--data_dir`` wins; else ``$BEIR_DATA_DIR/<dataset>``, fetched with BEIR's downloader if missing."""
    if data_dir:
        path = Path(data_dir)
        if not path.is_dir():
            raise DataError(f"{path}: --data_dir does not exist")
        return path
    if not dataset:
        raise DataError("give --dataset NAME or --data_dir DIR")
    root = Path(os.environ.get("BEIR_DATA_DIR", "data"))
    path = root / dataset
    if path.is_dir():
        return path
    if not download:
        raise DataError(f"{path}: dataset folder missing (set BEIR_DATA_DIR or pass --data_dir)")
    from beir import util as beir_util  # imported late: beir.util needs requests and network

    created = [p for p in (root, *root.parents) if not p.exists()]  # removed again if the download fails
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(beir_util.download_and_unzip(BEIR_URL.format(dataset), str(root)))
    except Exception as exc:  # network errors come in many types; report one line
        for folder in created:  # innermost first; a partial download is removed with its folder
            if folder == root:
                shutil.rmtree(root / dataset, ignore_errors=True)
                (root / f"{dataset}.zip").unlink(missing_ok=True)
            with suppress(OSError):
                folder.rmdir()
        reason = str(exc).splitlines()[0].split(" (Caused by")[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: dataset {dataset!r} is not there and BEIR's download failed ({reason[:200]}); "
                        "set BEIR_DATA_DIR or pass --data_dir") from None  # fmt: skip


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, plain or `.gz`; bad bytes, a corrupt or truncated gzip stream
    and unreadable files are a DataError naming the file and line."""
    path = Path(path)
    lineno = 0
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {raw[exc.start]:#x} at column "
                                    f"{exc.start + 1})") from None  # fmt: skip
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}:{lineno + 1}: corrupt or truncated gzip stream ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _find(folder: Path, stem: str) -> Path:
    found = [folder / name for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz") if (folder / name).is_file()]
    if len(found) > 1:
        raise DataError(f"{found[0]}: both {found[0].name} and {found[1].name} exist; keep one")
    if not found:
        raise DataError(f"{folder / (stem + '.jsonl')}: file not found (nor .jsonl.gz)")
    return found[0]


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for every non-blank line, with a file:line error on bad JSON."""
    for lineno, line in read_lines(path):
        if line.strip():
            yield lineno, _corpus_record(path, lineno, line)


# An id is one TREC column: no whitespace (the run file's separator), no control character, not empty.
BAD_ID_CHARS = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


def check_id(path: Path, lineno: int, kind: str, value: str) -> str:
    """`value` if it can be a column of a TREC run file, else a DataError naming the file and line."""
    bad = BAD_ID_CHARS.search(value)
    if not value or bad:
        why = "is empty" if not value else f"contains {bad.group()!r} at column {bad.start() + 1}"
        raise DataError(f"{path}:{lineno}: {kind} id {value!r} {why} (ids are TREC run columns: no whitespace "
                        "or control characters)")  # fmt: skip
    return value


def _unique_records(path: Path, kind: str) -> Iterator[tuple[int, str, dict]]:
    """(line, id, record) of a corpus or queries file; a repeated id is a DataError naming both lines."""
    first: dict[str, int] = {}
    for lineno, rec in read_jsonl(path):
        rid = str(rec["_id"])
        if rid in first:
            raise DataError(f"{path}:{lineno}: {kind} id {rid!r} repeats line {first[rid]} (ids must be unique)")
        first[rid] = lineno
        yield lineno, rid, rec


def load_corpus(folder: Path) -> dict[str, dict[str, str]]:
    path = _find(folder, "corpus")
    return {did: {"title": rec.get("title") or "", "text": rec.get("text") or ""}
            for _, did, rec in _unique_records(path, "document")}  # fmt: skip


def load_queries(folder: Path) -> dict[str, str]:
    """Every query of the folder; an empty one is kept (BEIR scores it) with a warning naming its line."""
    path = _find(folder, "queries")
    queries, empty = {}, []
    for lineno, qid, rec in _unique_records(path, "query"):
        queries[qid] = rec.get("text") or ""
        if not str(queries[qid]).strip():
            empty.append(lineno)
    if empty:
        print(f"warning: {path}:{empty[0]}: {len(empty)} empty quer{'y' if len(empty) == 1 else 'ies'} "
              "(scored as they are: every document ties)", file=sys.stderr)  # fmt: skip
    return queries


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels tsv with a header; CRLF tolerated; every row must be `qid docid int`."""
    if not path.is_file():
        raise DataError(f"{path}: split file does not exist")
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[tuple[str, str], int] = {}
    for lineno, line in read_lines(path):
        row = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE), [])
        if lineno == 1 and row and row[0].strip().lower() in {"query-id", "query_id", "qid"}:
            continue
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 3:
            raise DataError(f"{path}:{lineno}: expected 3 tab-separated columns, got {len(row)}")
        qid, did, score = (c.strip() for c in row)
        check_id(path, lineno, "query", qid)
        check_id(path, lineno, "document", did)
        try:
            value = int(score)
        except ValueError:
            raise DataError(f"{path}:{lineno}: score {score!r} is not an integer") from None
        seen = qrels.setdefault(qid, {})
        if did in seen and seen[did] != value:
            raise DataError(f"{path}:{lineno}: query {qid!r}, document {did!r} judged {value} here and "
                            f"{seen[did]} on line {first_line[qid, did]}")  # fmt: skip
        first_line.setdefault((qid, did), lineno)
        seen[did] = value
    return qrels


def load_beir(data_dir: str | Path, split: str = "test"):
    """Return (corpus, queries, qrels) for one split; queries are restricted to the split's judged ones."""
    corpus = load_corpus(Path(data_dir))
    queries, qrels = load_split(data_dir, split, corpus)
    return corpus, queries, qrels


def corpus_path(data_dir: str | Path) -> Path:
    """The corpus file of a BEIR folder (corpus.jsonl or corpus.jsonl.gz)."""
    return _find(Path(data_dir), "corpus")


def _corpus_record(path: Path, lineno: int, line: str) -> dict:
    """One JSONL record that must have an `_id`; a file:line error otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(record, dict) or "_id" not in record:
        raise DataError(f"{path}:{lineno}: record has no '_id'")
    check_id(path, lineno, "query" if path.name.startswith("queries") else "document", str(record["_id"]))
    return record


def iter_corpus(data_dir: str | Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, str]]:
    """(doc_id, doc_text) of corpus records start..stop-1 in file order (blank lines are not records),
    streamed: records before `start` are skipped without being parsed. The text is `doc_text` of the
    record, as `load_corpus` + `doc_text` give it."""
    path = corpus_path(data_dir)
    n = 0
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        if stop is not None and n >= stop:
            return
        if n >= start:
            rec = _corpus_record(path, lineno, line)
            yield str(rec["_id"]), doc_text({"title": rec.get("title") or "", "text": rec.get("text") or ""})
        n += 1


def iter_corpus_ids(data_dir: str | Path) -> Iterator[str]:
    """Every record's document id in file order (duplicates kept, so positions are record numbers)."""
    path = corpus_path(data_dir)
    for lineno, line in read_lines(path):
        if line.strip():
            yield str(_corpus_record(path, lineno, line)["_id"])


def load_split(data_dir: str | Path, split: str, doc_ids, queries: dict[str, str] | None = None):
    """(queries, qrels) of one split, checked like `load_beir` against `doc_ids` (any container of ids)
    instead of a loaded corpus; `queries` (all of them, from `load_queries`) saves re-reading the file."""
    folder = Path(data_dir)
    queries = load_queries(folder) if queries is None else queries
    qrels_path = folder / "qrels" / f"{split}.tsv"
    qrels = load_qrels(qrels_path)
    for qid, docs in qrels.items():
        if qid not in queries:
            raise DataError(f"{qrels_path}: query {qid!r} is not in {_find(folder, 'queries').name}")
        for did in docs:
            if did not in doc_ids:
                raise DataError(f"{qrels_path}: document {did!r} (query {qid!r}) is not in the corpus")
    if not qrels:
        raise DataError(f"{qrels_path}: no judgments")
    if not any(r > 0 for docs in qrels.values() for r in docs.values()):
        raise DataError(f"{qrels_path}: no positive judgment (every score is 0 or less): nothing to score")
    return {qid: queries[qid] for qid in qrels}, qrels


# --------------------------------------------------------------------------------------------
# The dev split: the official one (qrels/dev.tsv), else training's seeded slice of the train queries


DEV_FRACTION, DEV_SEED = 0.1, 42  # the slice's share of the train queries, and training's default seed


def dev_fraction_error(fraction: float) -> str | None:
    """A one-line message unless the slice's share is in (0, 1)."""
    return None if 0 < fraction < 1 else f"--dev_fraction {fraction} must be in (0, 1)"


def split_dev(qrels: dict, dev_fraction: float, seed: int) -> tuple[dict, dict]:
    """Hold out a seeded fraction of the (train) queries for model selection."""
    qids = sorted(qrels)
    random.Random(seed).shuffle(qids)
    n_dev = int(round(len(qids) * dev_fraction))
    dev = set(qids[:n_dev])
    return ({q: d for q, d in qrels.items() if q not in dev}, {q: d for q, d in qrels.items() if q in dev})


def slice_source(split: str, fraction: float, seeds) -> str:
    """How a dev slice is named in logs and result files: `slice of train (10%, seed 42)`."""
    seeds = list(seeds)
    return f"slice of {split} ({fraction * 100:g}%, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"


def dev_qrels(data_dir: str | Path, seeds: list[int] | tuple[int, ...] = (DEV_SEED,),
              fraction: float = DEV_FRACTION) -> tuple[dict, str]:  # fmt: skip
    """The dev qrels of a folder and where they come from: the official dev split when it has qrels/dev.tsv,
    else training's seeded `fraction` slice of the train queries (the union of the slices of several training
    seeds, for a run that serves them all)."""
    folder = Path(data_dir)
    if (folder / "qrels" / "dev.tsv").is_file():
        return load_qrels(folder / "qrels" / "dev.tsv"), "split dev"
    train = load_qrels(folder / "qrels" / "train.tsv")
    qrels = {}
    for seed in seeds:
        qrels.update(split_dev(train, fraction, seed)[1])
    return qrels, slice_source("train", fraction, seeds)


def data_dirs(datasets: list[str], data_dir: str | None = None) -> list[Path]:
    """The training datasets' folders: `data_dir`, else each of `datasets` (a name or a folder); names distinct."""
    dirs = [resolve_data_dir(None, data_dir)] if data_dir else [resolve_dataset(d) for d in datasets]
    names = [dataset_name(d) for d in dirs]
    if len(set(names)) < len(names):
        raise DataError(f"--dataset {' '.join(datasets)}: two datasets share a name ({', '.join(names)}); "
                        "each needs its own (it names its dev scores and its expert)")  # fmt: skip
    return dirs


def load_data(data_dir: Path, train_split: str = "train", dev_split: str | None = None,
              dev_fraction: float = DEV_FRACTION, seed: int = DEV_SEED):  # fmt: skip
    """What training reads of one dataset: corpus, queries (train and dev), train and dev qrels, and where dev
    came from (run_info.json's `dev`).

    Dev is the official split (`dev_split`, by default `dev` when qrels/dev.tsv exists; then every train
    query trains) or else a seeded `dev_fraction` slice of the train queries (`dev_split` "none").
    """
    corpus, queries, qrels = load_beir(data_dir, train_split)
    name = dev_split
    if name is None and train_split != "dev" and (data_dir / "qrels" / "dev.tsv").is_file():
        name = "dev"
    if name is None or name.lower() == "none":
        train_qrels, dev = split_dev(qrels, dev_fraction, seed)
        if not train_qrels or not dev:
            raise DataError(f"{data_dir}: {len(qrels)} train queries are too few for a train/dev split")
        info = {"source": slice_source(train_split, dev_fraction, [seed])}
    else:
        if not (data_dir / "qrels" / f"{name}.tsv").is_file():
            raise DataError(f"--dev_split {name}: {data_dir / 'qrels' / f'{name}.tsv'} does not exist")
        dev_queries, dev = load_split(data_dir, name, corpus)
        queries = {**queries, **dev_queries}
        train_qrels = {q: docs for q, docs in qrels.items() if q not in dev}  # dev stays held out
        if not train_qrels:
            raise DataError(f"--dev_split {name}: every {train_split} query is also a dev query")
        info = {"source": f"split {name}"}
        if len(train_qrels) < len(qrels):
            info["left_out_of_training"] = len(qrels) - len(train_qrels)
    info["queries"] = len(dev)
    return corpus, queries, train_qrels, dev, info


def load_eval_data(data_dir: Path, splits: list[str], dev: tuple[list[int], float, str] | None = None):
    """What eval.py reads: the corpus (ids, texts streamed), each split's (queries, qrels) in the order asked,
    and where dev came from. Split dev is the official one, else training's slice (`dev`: its seeds, fraction
    and why it is needed, for the error); it is also read when `dev` is given without `dev` in `splits`."""
    corpus = Corpus(data_dir)
    queries = load_queries(data_dir)
    out = {split: load_split(data_dir, split, corpus.ids, queries) for split in splits if split != "dev"}
    source = None
    if dev is not None or "dev" in splits:
        seeds, fraction, why = dev or ([DEV_SEED], DEV_FRACTION, "--split dev")
        if (data_dir / "qrels" / "dev.tsv").is_file():
            out["dev"], source = load_split(data_dir, "dev", corpus.ids, queries), "split dev"
        elif not (data_dir / "qrels" / "train.tsv").is_file():
            raise DataError(f"{data_dir / 'qrels'}: neither dev.tsv nor train.tsv to slice a dev split from; {why}")
        else:
            train_queries, _ = load_split(data_dir, "train", corpus.ids, queries)  # checked as any split is
            qrels, source = dev_qrels(data_dir, seeds, fraction)
            if not qrels:
                raise DataError(f"{data_dir / 'qrels' / 'train.tsv'}: the dev {source} has no queries "
                                f"({len(train_queries)} train queries; raise --dev_fraction); {why}")  # fmt: skip
            out["dev"] = {q: train_queries[q] for q in qrels}, qrels
    corpus.ids.drop_lookup()  # only the checks above needed it
    return corpus, {s: out[s] for s in [*splits, "dev"] if s in out}, source


def unseen_document_queries(train_qrels: dict, test_qrels: dict) -> list[str]:
    """Test queries none of whose relevant documents is relevant to any training query.

    On SciFact most test claims cite an abstract that some training claim also cites; a model can
    score those by remembering the abstract. This subset measures retrieval of documents never seen
    as positives in training.
    """
    seen = {d for docs in train_qrels.values() for d, r in docs.items() if r > 0}
    return sorted(q for q, docs in test_qrels.items() if not any(r > 0 and d in seen for d, r in docs.items()))


def doc_text(doc: dict[str, str]) -> str:
    """BEIR's convention for dense models: title and text joined by a space."""
    return (doc.get("title", "") + " " + doc.get("text", "")).strip()


class DocIds:
    """Document ids by record number, packed (utf-8 in one buffer, int64 ends: len + 8 bytes an id, not ~60
    for a Python string in a list), with a hash lookup for `in` and duplicates until `drop_lookup`."""

    def __init__(self, ids: Iterable[str]):
        buf, ends, hashes = bytearray(), array("q"), array("q")
        for d in ids:
            buf += d.encode("utf-8")
            ends.append(len(buf))
            hashes.append(hash(d))
        self._buf, self._ends = bytes(buf), np.array(ends, dtype=np.int64)
        del buf, ends
        h = np.array(hashes, dtype=np.int64)
        del hashes
        self._order = np.argsort(h, kind="stable")
        self._sorted = h[self._order]

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        j = int(j)
        return self._buf[self._ends[j - 1] if j else 0 : self._ends[j]].decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        return (self[j] for j in range(len(self)))

    def _positions(self, d: str) -> list[int]:
        h = hash(d)
        a, b = np.searchsorted(self._sorted, h, "left"), np.searchsorted(self._sorted, h, "right")
        return [int(j) for j in self._order[a:b] if self[j] == d]

    def __contains__(self, d) -> bool:
        return isinstance(d, str) and bool(self._positions(d))

    def repeated(self) -> int:
        """How many records repeat an earlier record's id."""
        same = np.flatnonzero(self._sorted[1:] == self._sorted[:-1])  # equal hashes: compare the ids
        return len({j for i in same for j in self._positions(self[self._order[i + 1]])[1:]})

    def drop_lookup(self) -> None:
        self._order = self._sorted = None


class Corpus:
    """A BEIR corpus by record number: every id held (packed), texts streamed from the file a chunk at a time.

    Ids are unique (a repeated one is `load_corpus`'s DataError naming its line: the dense run would keep one
    record, BM25 both).
    """

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.ids = DocIds(iter_corpus_ids(data_dir))
        if self.ids.repeated():
            load_corpus(data_dir)  # the one check of unique ids: raises naming the file and both lines

    def __len__(self) -> int:
        return len(self.ids)

    def reader(self):
        """texts(start, stop) for increasing, non-overlapping ranges: one forward pass over the file."""
        state = {"it": None, "pos": 0}

        def texts(a: int, b: int) -> list[str]:
            if state["it"] is None or a != state["pos"]:  # records skipped by line, not parsed
                state["it"], state["pos"] = iter_corpus(self.data_dir, a), a
            out = [t for _, t in itertools.islice(state["it"], b - a)]
            state["pos"] = b
            return out

        return texts


def split_qrels(folder: Path | str, split: str = "test") -> tuple[dict, dict]:
    """The train qrels and one evaluation split's qrels, read alone (no corpus)."""
    folder = Path(folder)
    return load_qrels(folder / "qrels" / "train.tsv"), load_qrels(folder / "qrels" / f"{split}.tsv")


SUBSETS = ("unseen", "seen")


def query_subsets(train_qrels: dict, test_qrels: dict) -> dict[str, list[str]]:
    """`unseen`: test queries none of whose relevant documents is a positive of a training query;
    `seen`: the others. Both sorted."""
    unseen = unseen_document_queries(train_qrels, test_qrels)
    return {"unseen": unseen, "seen": sorted(set(test_qrels) - set(unseen))}

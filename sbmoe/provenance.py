"""What made a result: the inputs that shape its numbers, and where and with what code it was made.

Every (run, seed) cell of an experiment keeps `provenance.json` beside its metrics:

    {"inputs":   {"backbone": {"name", "sha256"}, "dataset": {"name", "sha256"}, "kind", "seed", "precision",
                  "train": [flags], "eval": [flags]},     # compared before a finished cell is reused
     "made_by":  {"commit", "dirty", "machine", "versions", "date"}}   # reported, never an error

A cell whose inputs differ from what the runner is about to run is never reused in silence
(`check_inputs`); a field recorded as "unknown" (results backfilled from logs that did not tell) is
reported, not compared. Content hashes make a renamed or moved folder the same input and a changed
file another one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from sbmoe.files import atomic_write_text

FILE = "provenance.json"
UNKNOWN = "unknown"
COMPARED = ("backbone", "dataset", "train_dataset", "kind", "seed", "precision", "train", "eval", "random_routing")  # in the order they are checked
# What a backbone is made of: architecture, weights, vocabulary (not the tokenizer's formatting files, which
# differ between library versions saving the same tokenizer)
MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "vocab.txt")
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@functools.lru_cache(maxsize=None)
def _file_sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def files_sha256(files: list[Path], root: Path) -> str:
    """One hash of the files' names (relative to root) and contents, in name order."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        st = f.stat()
        h.update(f"{f.relative_to(root).as_posix()}\0{_file_sha256(str(f), st.st_size, st.st_mtime)}\n".encode())
    return h.hexdigest()


def model_folder(name_or_path: str) -> Path | None:
    """The local folder of a model: the folder itself, or the hub's cached snapshot of a hub name."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=list(MODEL_FILES)))
    except Exception:  # offline without a cache, or not a hub name: the identity is then unknown
        return None


def backbone_identity(name_or_path: str) -> dict:
    """{"name", "sha256"}: the hash covers the weights, config and tokenizer files the model is loaded from."""
    folder = model_folder(name_or_path)
    files = [folder / n for n in MODEL_FILES if (folder / n).is_file()] if folder else []
    name = Path(name_or_path).name if Path(name_or_path).expanduser().is_dir() else name_or_path
    return {"name": name, "sha256": files_sha256(files, folder) if files else UNKNOWN}


def dataset_identity(folder: Path) -> dict:
    """{"name", "sha256"}: the hash covers the corpus, the queries and every qrels file of the BEIR folder."""
    folder = Path(folder)
    files = [f for f in folder.iterdir() if f.is_file() and f.name.startswith(("corpus.jsonl", "queries.jsonl"))]
    files += sorted((folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
    return {"name": folder.name, "sha256": files_sha256(files, folder) if files else UNKNOWN}


def precision(flags: list[str]) -> str:
    return "fp16" if "--fp16" in flags else "bf16" if "--bf16" in flags else "fp32"


@functools.lru_cache(maxsize=1)
def machine() -> dict:
    """The CPU (model and the ISA flags that change kernels) and the GPU, if any."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    out = {"cpu": cpu, "isa": [f for f in ISA_FLAGS if f in flags]}
    try:
        import torch

        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return out


def describe_machine(m: dict | str) -> str:
    if not isinstance(m, dict):
        return str(m)
    if m.get("gpu"):
        return m["gpu"]
    return f"{m.get('cpu', UNKNOWN)} ({'+'.join(m.get('isa', [])) or 'no AVX2'})"


@functools.lru_cache(maxsize=1)
def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "faiss-cpu", "faiss-gpu", "numpy", "sentence-transformers", "onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


@functools.lru_cache(maxsize=1)
def code_state() -> dict:
    """The commit of the code and whether tracked files outside results/ differ from it."""
    root = Path(__file__).resolve().parent
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, check=True).stdout  # noqa: E731
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results").strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": UNKNOWN, "dirty": UNKNOWN}


def made_by() -> dict:
    return {**code_state(), "machine": machine(), "versions": versions(), "date": time.strftime("%Y-%m-%d")}


def write(folder: Path, inputs: dict, maker: dict | None = None) -> None:
    atomic_write_text(Path(folder) / FILE, json.dumps({"inputs": inputs, "made_by": maker or made_by()}, indent=1))


def read(folder: Path) -> dict | None:
    path = Path(folder) / FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _same(old, new) -> bool:
    """Equal, or not comparable (recorded as unknown); identities compare by content hash where both have one."""
    if old == UNKNOWN or new == UNKNOWN:
        return True
    if isinstance(old, dict) and isinstance(new, dict) and "sha256" in old and "sha256" in new:
        if UNKNOWN in (old["sha256"], new["sha256"]):
            return old["sha256"] == new["sha256"] or old.get("name") == new.get("name")
        return old["sha256"] == new["sha256"]
    return old == new


def short(value) -> str:
    if isinstance(value, dict) and "sha256" in value:
        return f"{value.get('name')} (sha256 {str(value['sha256'])[:12]})"
    return " ".join(map(short, value)) if isinstance(value, list) else str(value)  # flags, or several datasets


def differing_field(recorded: dict, inputs: dict) -> str | None:
    """The first compared field in which a cell's recorded inputs differ from `inputs`, with both values."""
    old = recorded.get("inputs", {})
    for key in COMPARED:
        if key in old and key in inputs and not _same(old[key], inputs[key]):
            return f"{key} ({short(old[key]) or '(none)'} there, {short(inputs[key]) or '(none)'} now)"
    return None


def maker_note(recorded: dict) -> tuple[str, str]:
    """(commit, machine) of a cell, for the runner's notes and the report."""
    m = recorded.get("made_by", {})
    commit = str(m.get("commit", UNKNOWN))
    commit = commit[:10] + ("+dirty" if m.get("dirty") is True else "") if commit != UNKNOWN else UNKNOWN
    return commit, describe_machine(m.get("machine", UNKNOWN))


if __name__ == "__main__":  # python -m sbmoe.provenance FOLDER...: the identity of models or datasets
    for arg in sys.argv[1:]:
        p = Path(arg)
        ident = dataset_identity(p) if (p / "qrels").is_dir() else backbone_identity(arg)
        print(arg, json.dumps(ident))

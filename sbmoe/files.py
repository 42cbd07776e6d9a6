"""Files: atomic, byte-stable writes (temp file, then rename), stale temp cleanup, folder locks, TREC run files,
the names of cache entries."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from sbmoe.data import DataError, read_lines
from sbmoe.metrics import truncate_run


def cache_name(key, length: int = 16) -> str:
    """The one name of a disk cache entry (the embedding cache, hard negatives, the frozen study's backbone
    outputs): a hash of its key, everything the cached values depend on, as canonical JSON."""
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:length]


def file_stats(folder: Path | str, suffixes: tuple[str, ...] | None = None) -> list[list]:
    """[name, size, mtime_ns] of each file in `folder` (of these `suffixes`), by name: a model folder's identity
    in a cache key, cheap to compute and changed by any rewrite."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and (suffixes is None or p.suffix in suffixes))
    return [file_stat(p) for p in files]


def file_stat(path: Path) -> list:
    st = Path(path).stat()
    return [Path(path).name, st.st_size, st.st_mtime_ns]


def write_trec(path: Path, results: dict[str, dict[str, float]], tag: str, top_k: int) -> None:
    """TREC run `qid Q0 docid rank score tag`; scores as repr so reading them back is lossless.

    A path ending in `.gz` is written gzip-compressed (reproducibly: no timestamp in the header).
    """
    lines = []
    for qid, docs in truncate_run(results, top_k).items():
        for rank, (did, score) in enumerate(docs.items(), 1):
            lines.append(f"{qid} Q0 {did} {rank} {float(score)!r} {tag}\n")
    text = "".join(lines)
    if str(path).endswith(".gz"):
        atomic_write_bytes(path, gzip.compress(text.encode("utf-8"), mtime=0))
    else:
        atomic_write_text(path, text)


def read_trec(path: Path) -> dict[str, dict[str, float]]:
    """A TREC run file, plain or `.gz`."""
    run: dict[str, dict[str, float]] = {}
    for lineno, line in read_lines(Path(path)):
        parts = line.split()
        if len(parts) != 6:
            raise DataError(f"{path}:{lineno}: expected 6 columns in a TREC run, got {len(parts)}")
        try:
            run.setdefault(parts[0], {})[parts[2]] = float(parts[4])
        except ValueError:
            raise DataError(f"{path}:{lineno}: score {parts[4]!r} is not a number") from None
    return run


def read_json(path: Path):
    """A JSON file's content, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    atomic_write_bytes(path, text.encode("utf-8"))


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp creates 0600 files, written files get the user's usual mode


def temp_prefix(path: Path) -> str:
    """The name prefix of `path`'s temporary sibling: hidden, with this process' id, so a run killed with
    SIGKILL leaves a name that `remove_stale_temps` recognises."""
    return f".{path.name}.tmp-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: Path | str) -> list[Path]:
    """Remove what a killed writer of `path` left beside it (`.NAME.tmp-PID-*`, `.NAME.old-PID`) when that
    process is gone; returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:tmp-(\d+)-.*|old-(\d+))$")
    for entry in path.parent.iterdir():
        m = pattern.match(entry.name)
        if m and int(m.group(1) or m.group(2)) != os.getpid() and not _alive(int(m.group(1) or m.group(2))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def make_temp_dir(path: Path) -> Path:
    """A new temporary folder beside `path` (see `temp_prefix`) with the user's usual mode, not mkdtemp's 0700."""
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    return tmp


def follow_umask(folder: Path) -> None:
    """Give a staged folder's files and folders the user's usual modes (libraries such as safetensors write
    0600 through a temporary file) before it is renamed into place."""
    for p in [folder, *folder.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_UMASK)


_SIGNALLED: list[str] = []  # the signal `utils.entry_point` turned into KeyboardInterrupt, if one came


def note_signal(name: str | None) -> None:
    """Record the SIGINT or SIGTERM an entry point received (None: forget it, a new command starts)."""
    _SIGNALLED[:] = [name] if name else []


def signalled() -> str | None:
    return _SIGNALLED[0] if _SIGNALLED else None


def move_into_place(src: Path | str, dst: Path | str) -> None:
    """os.replace, unless the command was interrupted: Python drops an exception raised inside a finaliser
    (`__del__`, a weakref callback: "Exception ignored in ..."), so a Ctrl-C that lands there would let the
    command run on and publish what the user stopped. The interrupt is raised again here instead."""
    if name := signalled():
        raise KeyboardInterrupt(name)
    os.replace(src, dst)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)
        move_into_place(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FolderLock:
    """An exclusive `fcntl.flock` on `<folder>/.lock` while a process writes into the folder: a second
    writer (a rerun while an orphan still trains) fails at once; the kernel drops the lock when its holder dies."""

    def __init__(self, folder: Path | str):
        self.folder, self.fh = Path(folder), None

    def __enter__(self) -> FolderLock:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.folder / ".lock", "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise DataError(f"{self.folder}: another process is writing into this folder (it holds "
                            f"{self.folder / '.lock'}); wait for it or stop it") from None  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()  # closing releases the lock; the empty lock file stays (removing it would race)

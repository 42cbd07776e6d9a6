"""Tiny BEIR folders and tiny random BERTs (sbmoe/fixtures.py), built in tmp_path: no test downloads anything."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sbmoe.fixtures import WORDS, write_graded_beir, write_tiny_backbone, write_tiny_beir  # noqa: E402, F401

# Caches (hard negatives) of every test, in-process or a subprocess, go to a temp folder, never ./cache.
os.environ["RETRIEVAL_CACHE_DIR"] = CACHE = tempfile.mkdtemp(prefix="retrieval-test-cache-")
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)
SHARED = ROOT.parent / "shared"
SCIFACT = SHARED / "data" / "beir" / "scifact"
MINILM = SHARED / "models" / "all-minilm-l6-v2"

def one_line_error(capsys, *needles: str) -> str:
    """The command's stderr: one `error:` line (argparse may print its usage line first) naming every needle."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:") or ": error: " in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def free_port() -> int:
    """A port nobody listens on now, for a torchrun test's rendezvous (fixed ports collide across test runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run` with two processes on a free port, from the repository root; by default
    offline, one thread per process and no tokenizer threads (two processes on a small machine)."""
    if env is None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           script, *args]  # fmt: skip
    return subprocess.run(list(map(str, cmd)), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# The zero-shot backbone and a trained baseline: the runs the tests' experiment files share (TOML).
ZEROSHOT_AND_BASELINE = """
[runs.zeroshot]
kind = "zeroshot"

[runs.baseline]
kind = "baseline"
"""


@pytest.fixture
def tiny_beir(tmp_path) -> Path:
    return write_tiny_beir(tmp_path / "beir" / "tiny")


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    return write_tiny_backbone(tmp_path_factory.mktemp("backbone"))


needs_shared = pytest.mark.skipif(
    not (SCIFACT / "queries.jsonl").is_file() or not (MINILM / "config.json").is_file(),
    reason="shared SciFact data and MiniLM model not present",
)

"""The runner's transfer report, end to end on tiny folders (the only real BEIR dataset here is SciFact).

    python -m lab.scripts.transfer_demo      # from the repository root; writes results/transfer-demo/report.md

Builds, in a temp folder, a tiny random BERT and two tiny BEIR folders (sbmoe.fixtures): `tiny`, the training set,
and `other-set`, a second dataset named as a folder in the experiment file's `transfer = [...]`; then runs
`experiment.py` (--smoke: 2 training steps) on that file. Every trained checkpoint, BM25 and the zero-shot backbone
are evaluated on other-set's test split without training on it. The numbers are a tiny random model's: plumbing,
not science. A user adds a real BEIR dataset the same way: `transfer = ["nfcorpus", "path/to/a/beir/folder"]`.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sbmoe.fixtures import write_tiny_backbone, write_tiny_beir

# The experiment file, `{other}` the second dataset's folder (tests/test_experiment.py's transfer test runs it too)
TRANSFER = """
name = "tiny-transfer"
dataset = "tiny"
seeds = [42]
splits = ["test"]
recipe = {{ num_train_epochs = 1 }}
transfer = ["{other}"]

[runs.baseline]
kind = "baseline"

[runs.sbmoe]
kind = "sbmoe"
reference = "baseline"
"""
TINY = ["--per_device_train_batch_size", "4", "--num_experts", "4", "--dev_fraction", "0.2"]  # tiny folders' flags


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    work = Path(tempfile.mkdtemp(prefix="transfer-demo-"))
    write_tiny_beir(work / "beir" / "tiny")
    other = write_tiny_beir(work / "elsewhere" / "other-set", n_docs=40, n_queries=15, seed=7)
    backbone = write_tiny_backbone(work / "backbone")
    (work / "tiny-transfer.toml").write_text(TRANSFER.format(other=other))
    cmd = [sys.executable, "experiment.py", str(work / "tiny-transfer.toml"), "--model_name_or_path", str(backbone),
           "--data_dir", str(work / "beir" / "tiny"), "--results", str(work / "res"), "--ckpt_root", str(work / "ck"),
           "--smoke", "--extra", *TINY]  # fmt: skip
    print("$ python", " ".join(cmd[1:]).replace(str(work), "TMP"), flush=True)
    rc = subprocess.call(cmd)
    if rc == 0:
        out = Path("results/transfer-demo/report.md")
        tmp = out.with_suffix(".md.tmp")
        tmp.write_text((work / "res" / "tiny-transfer" / "report.md").read_text().replace(str(work), "TMP"))
        tmp.replace(out)
        shutil.rmtree(work)
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""The console commands that `pip install -e .` puts on the PATH (pyproject.toml's [project.scripts]), each the
command line of one script: `sbmoe-train` is `python train.py`, `sbmoe-experiment` is `python experiment.py`, and
so on. Each returns nothing, so the command exits 0 whatever the script's `main` returns (a dict of results, for the
tests); errors exit as they do from the script.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def command(module: str, *args: str) -> Callable[[], None]:
    """A console entry point that runs `module.main(*args)` on sys.argv; the module is imported when it runs."""

    def run() -> None:
        importlib.import_module(module).main(*args)

    run.__doc__ = f"python -m {module}" + (f" (main{args})" if args else "")
    return run


train = command("train")
train_sbmoe = command("train", "sbmoe")
train_moe = command("train", "moe")
evaluate = command("eval")
experiment = command("lab.experiment")
frozen = command("lab.frozen")
export = command("lab.export")
bench = command("lab.bench")
compare = command("lab.compare")

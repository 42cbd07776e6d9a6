"""The runner's jobs as values: the step a job launches (`Step`), and what became of a job (`Outcome`)."""

from __future__ import annotations

import contextlib
import enum
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sbmoe.data import DataError

# A child of the runner dies with it, even under kill -9: Linux sends it SIGTERM when the runner goes
# (PR_SET_PDEATHSIG, kept across exec; torchrun passes it on to its workers); elsewhere it just runs.
DIE_WITH_PARENT = """import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(143)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"""


def child_command(launch: list[str], script: str, argv: list[str]) -> list[str]:
    """`launch script argv` run so that it ends with this process (see DIE_WITH_PARENT)."""
    return [launch[0], "-c", DIE_WITH_PARENT, str(os.getpid()), *launch[1:], script, *argv]


class Step(enum.Enum):
    """A step the runner launches; its value is the script a user would type (and the logs say)."""

    TRAIN = "train.py"
    EVALUATE = "eval.py"
    FROZEN = "frozen.py"  # the frozen-backbone study: trains the head and evaluates it in one call

    @property
    def script(self) -> str:
        return self.value

    def run_here(self, argv: list[str]) -> None:
        """The step in this process (--in_process)."""
        if self is Step.TRAIN:
            import train

            train.main(None, argv)
        elif self is Step.EVALUATE:
            import eval as evaluation

            evaluation.main(argv)
        else:
            from lab import frozen

            frozen.main(argv)


def run_step(step: Step, argv: list[str], log: Path, launch: list[str], in_process: bool) -> bool:
    """One step, logged as the command a user would type; in this process or a fresh one. True if it succeeded."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("+ " + " ".join(["python", *launch[1:], step.script, *argv]) + "\n")  # no machine paths in logs
        fh.flush()
        if not in_process:
            return subprocess.run(child_command(launch, step.script, argv), stdout=fh, stderr=subprocess.STDOUT).returncode == 0
        try:
            with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                step.run_here(argv)
        except SystemExit as exc:
            return exc.code in (0, None)
        except DataError as exc:  # raised past a script's own handling: logged as the script would say it
            fh.write(f"error: {exc}\n")
            return False
    return True


class Status(enum.Enum):
    MADE = "made"
    DONE_EARLIER = "done earlier"  # every run of the job evaluated before: nothing ran
    FAILED = "failed"


@dataclass(frozen=True)
class Outcome:
    """What became of one job (a checkpoint and the runs it serves, at one seed); str() is its log line."""

    cell: str  # "sokli, sokli-all seed 42"
    status: Status
    seconds: float = 0.0  # MADE: how long it took
    what: str = ""  # FAILED: the step that failed ("training", "evaluation", "checkpoint <path>", ...)
    why: str = ""  # FAILED: the reason or the log to read, as it follows FAILED (", see <log>", ": <error>")

    @classmethod
    def failure(cls, cell: str, what: str, why: str) -> Outcome:
        return cls(cell, Status.FAILED, what=what, why=why)

    @property
    def failed(self) -> bool:
        return self.status is Status.FAILED

    def __str__(self) -> str:
        if self.status is Status.MADE:
            return f"{self.cell}: {self.seconds:.0f} s"
        if self.status is Status.DONE_EARLIER:
            return f"{self.cell}: done earlier"
        return f"{self.cell}: {self.what + ' ' if self.what else ''}FAILED{self.why}"

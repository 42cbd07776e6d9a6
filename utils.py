"""The command-line helpers the top scripts and the lab share: `fail` (a one-line error, exit 2), `entry_point`
(interrupts end in one line), and the output checks made before any work starts (`check_output`,
`check_writable`)."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

from sbmoe.data import DataError
from sbmoe.files import note_signal, signalled


def fail(message: str) -> None:
    """Print a one-line error and exit non-zero; for command-line entry points only."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_writable(folder: Path | str, flag: str = "--output_dir") -> None:
    """A DataError unless files can be created in `folder` (or in the nearest existing folder above it,
    which is then where it will be made); nothing is created here."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.is_symlink() or probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise DataError(f"{flag} {folder}: {probe} is a file, not a folder")
    if not os.access(probe if probe.exists() else Path.cwd(), os.W_OK | os.X_OK):
        raise DataError(f"{flag} {folder}: {probe} is not writable")


def check_output(path: Path | str, flag: str, inputs: Iterable[Path | str | None] = (), file: bool = False,
                 extra_name: int = 0) -> None:
    """An output path checked before any work starts, or a one-line DataError naming `flag`: not an input
    (nor inside one, nor holding one), every name short enough for the file system (`extra_name` bytes more
    for a temporary sibling's name), and a folder (`file`: a file's folder) that exists or can be made and is
    writable. Nothing is created here."""
    path = Path(path)
    target = path.resolve()
    for given in inputs:
        if given is None:
            continue
        src = Path(given).resolve()
        if target == src or src in target.parents or target in src.parents:
            how = "is" if target == src else "is inside" if src in target.parents else "holds"
            raise DataError(f"{flag} {path}: {how} the input {given}; write somewhere else")
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        limit = os.pathconf(probe if probe.is_dir() else probe.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for i, part in enumerate(path.parts):
        size = len(os.fsencode(part)) + (extra_name if i == len(path.parts) - 1 else 0)
        if size > limit:
            raise DataError(f"{flag} {path}: the name {part[:24]}... is {len(os.fsencode(part))} bytes; the file "
                            f"system takes {limit - (extra_name if i == len(path.parts) - 1 else 0)} here")  # fmt: skip
    if file:
        if path.is_dir():
            raise DataError(f"{flag} {path}: is a folder, not a file")
        check_writable(path.parent, flag)
    else:
        check_writable(path, flag)


_ENTRY_DEPTH = 0


def entry_point(main):
    """A command line's `main`: SIGINT and SIGTERM raise KeyboardInterrupt (so every `finally` and `except
    BaseException` cleanup runs) and end in one line and exit 130 (SIGINT) or 143 (SIGTERM). The signal is also
    recorded: where a finaliser swallowed its KeyboardInterrupt, the next rename into place raises it again
    (`move_into_place`), and a command that still finishes exits as interrupted. A signal the process was started
    ignoring (nohup, a shell's background job) stays ignored. Only the outermost entry point of the main thread
    does this: an in-process caller sees the interrupt."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        global _ENTRY_DEPTH
        if _ENTRY_DEPTH or threading.current_thread() is not threading.main_thread():
            return main(*args, **kwargs)

        def on_signal(signum, frame):
            name = signal.Signals(signum).name
            note_signal(name)
            raise KeyboardInterrupt(name)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)
                    if signal.getsignal(s) is not signal.SIG_IGN}  # (ignored, as under nohup: left ignored)
        note_signal(None)
        _ENTRY_DEPTH += 1
        try:
            result = main(*args, **kwargs)
            if name := signalled():  # interrupted where the exception was dropped, after the last rename
                raise KeyboardInterrupt(name)
            return result
        except KeyboardInterrupt as exc:
            name = "SIGTERM" if str(exc) == "SIGTERM" else "SIGINT"
            print(f"error: interrupted by {name}; temporary files removed, nothing half-written", file=sys.stderr)
            raise SystemExit(143 if name == "SIGTERM" else 130) from None
        finally:
            _ENTRY_DEPTH -= 1
            note_signal(None)
            for s, handler in previous.items():
                signal.signal(s, handler)

    return wrapper

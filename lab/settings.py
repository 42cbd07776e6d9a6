"""A run's settings: the typed tables of an experiment file, and the one place they become command-line flags.

    recipe = { num_train_epochs = 2, doc_max_length = 128, sampling = "query" }
    [runs.sokli-all]
    train = { design = "sokli", num_experts = 6 }
    eval = { inference_mode = "all" }

A table maps a flag name to its value (a string, an integer, a float, true or false, or a list of them) and is
written as flags in its own order: `--num_train_epochs 2 --doc_max_length 128 --sampling query`. Several tables
that apply to one run (the file's recipe, the run's own, the smoke cut, --extra) are written one after the
other, so that a later table wins as a later flag does; `merge` gives what they amount to, and is what runs
are compared by (a checkpoint is shared by runs whose merged training settings are equal as values).
"""

from __future__ import annotations

import re

Value = str | int | float | bool | list
Settings = dict[str, Value]
FLAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def number_text(x: float) -> str:
    """A float as the shortest text that reads back as it (a tie to the decimal form): 1e-3, 5e-5, 0.02, 1."""
    candidates = [str(int(x))] if x.is_integer() and abs(x) < 1e16 else []
    candidates.append(repr(x))
    for digits in range(17):
        text = f"{x:.{digits}e}"
        if float(text) == x:
            mantissa, exponent = text.split("e")
            candidates.append(f"{mantissa}e{int(exponent)}")
            break
    return min(candidates, key=len)


def value_text(value: Value) -> list[str]:
    if isinstance(value, bool):
        return [] if value else ["false"]  # true: the bare flag (a switch, or a boolean field's `true`)
    if isinstance(value, float):
        return [number_text(value)]
    if isinstance(value, list):
        return [t for v in value for t in value_text(v) or ["true"]]
    return [str(value)]


def flags(*tables: Settings) -> list[str]:
    """The command-line flags of these tables, in order (the one place settings become flags)."""
    return [t for table in tables for key, value in table.items() for t in (f"--{key}", *value_text(value))]


def merge(*tables: Settings) -> Settings:
    """What the tables amount to: a later table's value wins."""
    return {k: v for table in tables for k, v in table.items()}


def parse_value(text: str) -> Value:
    """A flag's value as the file would type it: true/false, an integer, a float, else the string."""
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def from_flags(argv: list[str]) -> Settings:
    """Command-line flags (`--extra`, a recorded cell's) as settings; a flag without a value is true."""
    out: Settings = {}
    key = None
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            key = token[2:]
            out[key] = True
        elif key is not None:
            value = parse_value(token)
            out[key] = value if out[key] is True else [*(out[key] if isinstance(out[key], list) else [out[key]]), value]
        else:
            raise ValueError(f"{token!r} is not a flag (--name) nor follows one")
    return out


def same(a: list[str], b: list[str]) -> bool:
    """Two flag lists that amount to the same settings (order and spelling aside: 1e-3 == 0.001)."""
    try:
        return from_flags(a) == from_flags(b)
    except ValueError:
        return a == b


def toml_text(table: Settings) -> str:
    """A table as the experiment file writes it inline: { num_train_epochs = 2, sampling = "query" }."""

    def value(v: Value) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(map(value, v)) + "]"
        return f'"{v}"' if isinstance(v, str) else number_text(v) if isinstance(v, float) else str(v)

    return "{ " + ", ".join(f"{k} = {value(v)}" for k, v in table.items()) + " }" if table else "{}"


def check_table(where: str, raw, check) -> None:
    """A settings table of the experiment file; the old list of flags is refused with how to write it now."""
    if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        try:
            hint = f"{where.rsplit('.', 1)[-1]} = {toml_text(from_flags(raw))}"
        except ValueError:
            hint = f'{where.rsplit(".", 1)[-1]} = {{ num_train_epochs = 2, design = "sokli" }}'
        check(False, f"{where} is a list of command-line flags; settings are a table now: {hint}")
    check(isinstance(raw, dict), f"{where} must be a table of flag = value, such as {{ num_train_epochs = 2 }}, "
          f"got {raw!r}")  # fmt: skip
    for key, value in raw.items():
        check(bool(FLAG_NAME.fullmatch(key)), f"{where}.{key}: not a flag name (write num_train_epochs, not "
              f"--num_train_epochs)")  # fmt: skip
        scalar = lambda v: isinstance(v, (str, int, float, bool))  # noqa: E731
        check(scalar(value) or (isinstance(value, list) and bool(value) and all(scalar(v) for v in value)),
              f"{where}.{key} must be a string, a number, true/false or a list of them, got {value!r}")  # fmt: skip

"""The layout's rules that a file can break without a test failing elsewhere: results/ holds data only, scripts/
imports only the library and the paper's scripts, and pyproject.toml declares every package, the paper's scripts
and the dependencies of requirements.txt."""

import ast
import re
import tomllib

from conftest import ROOT

PAPER = {"model", "train", "train_sbmoe", "train_moe", "eval", "utils"}


def test_results_holds_no_code():
    code = [p for p in (ROOT / "results").rglob("*") if p.suffix in (".py", ".sh", ".ipynb")]
    assert not code, f"move these to scripts/ or lab/scripts/: {code}"


def test_scripts_import_only_the_library_and_the_papers_scripts():
    for path in (ROOT / "scripts").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])  # fmt: skip
            for name in names:
                top = name.split(".")[0]
                local = (ROOT / f"{top}.py").is_file() or (ROOT / top).is_dir()
                assert not local or top == "sbmoe" or top in PAPER, f"{path.name} imports {name}"


def test_pyproject_declares_the_packages_the_papers_scripts_and_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    tools = project["tool"]["setuptools"]
    packages = {p.parent.relative_to(ROOT).as_posix().replace("/", ".") for top in ("sbmoe", "lab")
                for p in (ROOT / top).rglob("__init__.py")}  # fmt: skip
    assert set(tools["packages"]) == packages
    assert set(tools["py-modules"]) == PAPER
    for top in ROOT.glob("*.py"):  # any other top file only starts a lab module
        assert top.stem in PAPER or (ROOT / "lab" / top.name).is_file(), top.name
    deps = project["project"]["dependencies"] + sum(project["project"]["optional-dependencies"].values(), [])
    required = [re.sub(r"\s*#.*", "", line) for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert sorted(deps) == sorted(r for r in required if r)
    for target in project["project"]["scripts"].values():
        module, name = target.split(":")
        assert module == "lab.cli" and callable(getattr(__import__(module, fromlist=[name]), name)), target

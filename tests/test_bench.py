"""bench.py encode on a tiny model and a tiny BEIR folder: the rows it prints are the rows it writes, each ratio is
docs/s over the fastest anchor's, and bad input is one line. sentence-transformers' ONNX backends need a venv of
their own (sentence-transformers[onnx] brings optimum, which never enters the project's): the test of the anchor
worker runs only when BENCH_ANCHOR_PYTHON names that venv's interpreter, and is skipped otherwise."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import one_line_error

import sbmoe.onnx
from lab import bench

ANCHOR_PYTHON = os.environ.get("BENCH_ANCHOR_PYTHON")
BY_KIND = sbmoe.onnx.INT8_BY_KIND
try:  # the fp32 graph in OpenVINO: a row per variant, named by the precision its CPU plugin picks here
    import openvino  # noqa: F401

    OV = [" openvino (PRECISION)"]  # the precision filled in by ours()
except ImportError:
    OV = []
OURS = ["ours torch fp32", "ours torch bf16", "ours onnx fp32", *[f"ours{x}" for x in OV],
        f"ours onnx int8 {BY_KIND['baseline']}", *[f"ours sbmoe{x}" for x in OV],
        *[f"ours sbmoe onnx int8 {r}" for r in dict.fromkeys([BY_KIND["sbmoe"], BY_KIND["baseline"]])]]  # fmt: skip


def ours(report: dict) -> list[str]:
    """OURS with OpenVINO's precision as it ran here (bf16 on a CPU with bf16 units, fp32 elsewhere)."""
    found = {k.rsplit("(", 1)[1].rstrip(")") for k in report["rows"] if " openvino (" in k}
    assert len(found) <= 1 and found <= {"bf16", "fp32"}, found
    return [k.replace("PRECISION", next(iter(found), "?")) for k in OURS]


def run_encode(backbone: Path, data: Path, out: Path, *extra: str) -> dict:
    bench.main(["encode", "--model_name_or_path", str(backbone), "--data_dir", str(data), "--docs", "8",
                "--doc_max_length", "16", "--batch_size", "4", "--repeats", "2", "--output", str(out), *extra])  # fmt: skip
    return json.loads(out.read_text())


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The printed table: encoder -> its cells."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "encoder":  # not the header, nor its |---| rule
            rows[cells[0]] = cells[1:]
    return rows


def check_report(report: dict, stdout: str, expected: list[str]) -> None:
    rows = report["rows"]
    assert list(rows) == expected
    assert report["docs"] == 8 and report["max_length"] == 16 and report["batch_size"] == 4
    anchors = [k for k in rows if k.startswith("sentence-transformers")]
    best = max(anchors, key=lambda k: rows[k]["docs_per_s"])
    assert report["fastest_anchor"] == best
    for row in rows.values():
        assert row["ratio_to_fastest_anchor"] == pytest.approx(row["docs_per_s"] / rows[best]["docs_per_s"])
        assert row["docs_per_s"] > 0 and -1.0001 <= row["min_cosine"] <= 1.0001
    assert rows[best]["ratio_to_fastest_anchor"] == pytest.approx(1.0)
    assert rows["ours torch fp32"]["max_abs_diff"] == 0.0  # the reference itself
    for name, row in rows.items():  # each int8 row names its recipe, as export.py builds it
        if "int8" in name and name.startswith("ours"):
            assert row["recipe_settings"] == sbmoe.onnx.INT8_RECIPES[row["recipe"]] and name.endswith(row["recipe"])
            assert row["fraction_of_int8_peak"] == pytest.approx(row["gops"] / report["peaks"]["int8_gops"])
    printed = table_rows(stdout)
    assert list(printed) == expected
    for name, cells in printed.items():  # docs/s and ratio as written
        assert cells[0] == f"{rows[name]['docs_per_s']:.1f}"
        assert cells[1] == f"{rows[name]['ratio_to_fastest_anchor']:.2f}"
    assert f"fastest anchor: {best}" in stdout
    assert "\n".join(report["table"]) in stdout  # the JSON keeps the printed table


def test_encode_rows_and_ratios(tiny_backbone, tiny_beir, tmp_path, capsys):
    report = run_encode(tiny_backbone, tiny_beir, tmp_path / "encode.json")
    out = capsys.readouterr().out
    expected = ours(report) + ["sentence-transformers torch"]
    onnx = [k for k in ("sentence-transformers onnx", "sentence-transformers onnx-int8") if k in report["rows"]]
    check_report(report, out, expected + onnx)
    for backend in ("onnx", "onnx-int8"):  # not loadable here (no optimum): says so, and how to measure it
        if f"sentence-transformers {backend}" not in report["rows"]:
            note = next(n for n in report["notes"] if n.startswith(f"sentence-transformers {backend}:"))
            assert "not measured here" in note and "--anchor_python" in note
    assert "anchor" not in report


@pytest.mark.skipif(not ANCHOR_PYTHON, reason="BENCH_ANCHOR_PYTHON (a venv with sentence-transformers[onnx]) not set")
def test_encode_with_anchor_worker(tiny_backbone, tiny_beir, tmp_path, capsys):
    report = run_encode(tiny_backbone, tiny_beir, tmp_path / "encode.json", "--anchor_python", ANCHOR_PYTHON)
    out = capsys.readouterr().out
    expected = ours(report) + ["sentence-transformers torch", "sentence-transformers onnx",
                               "sentence-transformers onnx-int8"]  # fmt: skip
    check_report(report, out, expected)
    rows = report["rows"]
    assert rows["sentence-transformers onnx"]["min_cosine"] > 0.9999  # the same model, the same documents
    assert rows["sentence-transformers onnx-int8"]["min_cosine"] > 0.9
    anchor = report["anchor"]
    assert anchor["quantization"] in ("arm64", "avx2", "avx512", "avx512_vnni")
    assert anchor["int8_file"].endswith(f"_{anchor['quantization']}.onnx")
    for name in ("sentence-transformers onnx", "sentence-transformers onnx-int8"):
        # the table's round trip is the worker's own encode time plus a pipe message
        assert anchor["round_trip_median_s"][name] >= anchor["worker_median_s"][name] > 0
    assert any(n.startswith("sentence-transformers onnx, onnx-int8: worker process") for n in report["notes"])
    assert not (tiny_backbone / "onnx").exists()  # the worker quantised a copy, not the model folder


def exits(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    return exc.value.code


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--docs", "0"], ["--docs 0", "at least 1"]),
        (["--repeats", "0"], ["--repeats 0", "at least 1"]),
        (["--anchor_python", "no-such-python-here"], ["--anchor_python no-such-python-here", "no such executable"]),
    ],
)
def test_encode_bad_flags(tiny_backbone, tiny_beir, capsys, extra, needles):
    assert exits(["encode", "--model_name_or_path", str(tiny_backbone), "--data_dir", str(tiny_beir), *extra]) == 2
    one_line_error(capsys, *needles)


def test_anchor_python_only_for_encode(tiny_backbone, capsys):
    assert exits(["models", "--model_name_or_path", str(tiny_backbone), "--anchor_python", "python3"]) == 2
    one_line_error(capsys, "--anchor_python", "only for encode")


def test_anchor_worker_that_dies(tiny_backbone, tiny_beir, tmp_path, capsys):
    """An interpreter that cannot run the worker: one line naming it and what the worker last said."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'no sentence-transformers in this one' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "encode.json"
    argv = ["encode", "--model_name_or_path", str(tiny_backbone), "--data_dir", str(tiny_beir), "--docs", "4",
            "--doc_max_length", "16", "--repeats", "1", "--anchor_python", str(fake), "--output", str(out)]  # fmt: skip
    assert exits(argv) == 2
    one_line_error(capsys, f"--anchor_python {fake}", "exited (code 3)", "no sentence-transformers in this one")
    assert not out.exists()


@pytest.mark.parametrize("backend", ["torch", "onnx", "onnx-int8"])
def test_latency_rows_and_ratios(tiny_backbone, tiny_beir, tmp_path, capsys, backend):
    out = tmp_path / "latency.json"
    bench.main(["latency", "--model_name_or_path", str(tiny_backbone), "--data_dir", str(tiny_beir), "--docs", "8",
                "--doc_max_length", "16", "--batch_size", "4", "--repeats", "1", "--latency_queries", "6",
                "--backend", backend, "--output", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    rows = report["models"]
    assert report["backend"] == backend and report["queries"] == 6 and list(rows) == list(bench.VARIANTS)
    base = rows["baseline"]
    for kind, row in rows.items():
        assert row["p50_ratio"] == pytest.approx(row["latency_p50_ms"] / base["latency_p50_ms"])
        assert row["throughput_ratio"] == pytest.approx(row["docs_per_s"] / base["docs_per_s"])
        assert row["latency_p95_ms"] >= row["latency_p50_ms"] > 0
        assert f"| {kind} | {row['latency_p50_ms']:.2f} |" in printed
        assert (row["encoder"] == "OnnxRetriever") == (backend != "torch")  # what was timed
        if backend == "torch":
            assert "max_abs_diff_vs_torch" not in row
        elif backend == "onnx":  # the graph encodes as the model does
            assert row["max_abs_diff_vs_torch"] < 1e-4
        else:  # quantised
            assert 0 < row["max_abs_diff_vs_torch"] < 0.1
    assert ("fp32" if backend == "torch" else f"ONNX ({backend}") in report["table"][0]


def test_latency_builds_distinct_experts(tiny_backbone):
    """Upcycled experts start as copies; the benchmark makes them distinct, as training does (an ONNX export stores
    identical weights once, which would flatter the token-level MoE's graph)."""
    model = bench.build("moe", str(tiny_backbone))
    for layer in model.encoder.encoder.layer:
        experts = getattr(layer.intermediate, "experts", None)
        if experts is not None:
            w = [e.fc_in.weight for e in experts]
            assert all(not torch.equal(w[0], x) for x in w[1:])


def test_backend_only_for_latency(tiny_backbone, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["encode", "--model_name_or_path", str(tiny_backbone), "--backend", "onnx"])
    assert exc.value.code != 0
    one_line_error(capsys, "--backend onnx: only for latency")


def test_int8_rows_show_the_recipes_quality_deltas(tiny_backbone, tiny_beir, tmp_path, capsys):
    """Beside each int8 row: the largest |delta| to fp32 that lab/scripts/int8_quality.py measured for its recipe."""
    name = BY_KIND["baseline"]
    deltas = {"NDCG@10 all": {"delta": 0.001}, "NDCG@10 unseen": {"delta": -0.0042}, "Recall@100 all": {"delta": 0.003}}
    quality = {name: {"zeroshot": {"deltas": deltas}, "sbmoe": {"deltas": {"NDCG@10 all": {"delta": 0.0071}}}}}
    (tmp_path / "quality.json").write_text(json.dumps(quality))
    report = run_encode(tiny_backbone, tiny_beir, tmp_path / "encode.json", "--kinds", "baseline", "--quality",
                        str(tmp_path / "quality.json"))  # fmt: skip
    row = table_rows(capsys.readouterr().out)[f"ours onnx int8 {name}"]
    assert row[-2:] == ["-0.0042 (zeroshot unseen)", "+0.0030 (zeroshot all)"]
    assert report["rows"][f"ours onnx int8 {name}"]["quality"]["NDCG@10"]["delta"] == -0.0042
    assert [k for k in report["rows"] if k.startswith("ours")] == ours(report)[: 4 + len(OV)]  # --kinds baseline: no SB-MoE rows
    assert table_rows("\n".join(report["table"]))["ours onnx fp32"][-2:] == ["", ""]  # no deltas for fp32 rows

"""Worker for `bench.py encode --anchor_python PYTHON`: sentence-transformers' own ONNX backends, measured in an
environment of their own (they need optimum, which pins transformers below 5 and so never enters the project's).

Run by bench.py with the anchor interpreter, never by hand:

    PYTHON bench_anchor.py SPEC.json

SPEC.json: {"model": folder or hub name, "texts": path of a JSON list of documents, "max_length": int,
"batch_size": int, "device": "cpu", "workdir": a scratch folder, "quantization": "auto" | "avx2" | ...}.

The worker copies the model into workdir (the source may be read-only), loads it with `backend="onnx"` (exported
on the fly when the folder has no ONNX file), writes the dynamically quantised int8 model with
`sentence_transformers.backend.export_dynamic_quantized_onnx_model` for this CPU's ISA and loads that too. It then
answers one JSON line per request on its stdin, on the stdout it was started with (everything the libraries print
goes to stderr):

    {"op": "encode", "name": "sentence-transformers onnx", "save": false}
        -> {"seconds": encode time measured here, "embeddings": path of an .npy when save, else null}
    {"op": "quit"} (or end of input) -> exits

Its first line is {"ready": true, "encoders": [...], "quantization": ..., "versions": {...}} or {"error": "..."}.
It imports none of the project's modules: only what a venv with sentence-transformers[onnx] has.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ONNX = "sentence-transformers onnx"
INT8 = "sentence-transformers onnx-int8"


def cpu_quantization() -> str:
    """The `export_dynamic_quantized_onnx_model` config that fits this CPU (as sentence-transformers names them)."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return "arm64"
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


def load(spec: dict) -> tuple[dict, dict]:
    import sentence_transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.backend import export_dynamic_quantized_onnx_model

    work = Path(spec["workdir"])
    folder = work / "model"
    source = Path(spec["model"])
    if source.is_dir():
        shutil.copytree(source, folder)
        for path in folder.rglob("*"):  # the copy of a read-only folder is read-only too
            path.chmod(path.stat().st_mode | 0o200)
        folder.chmod(folder.stat().st_mode | 0o200)
    else:  # a hub name: a local folder first, so the quantised file has somewhere to go
        SentenceTransformer(spec["model"], device="cpu").save(str(folder))
    device = spec.get("device", "cpu")
    models = {ONNX: SentenceTransformer(str(folder), device=device, backend="onnx")}
    config = spec.get("quantization") or "auto"
    config = cpu_quantization() if config == "auto" else config
    before = set((folder / "onnx").glob("*.onnx")) if (folder / "onnx").is_dir() else set()
    export_dynamic_quantized_onnx_model(models[ONNX], config, str(folder))
    written = sorted(set((folder / "onnx").glob(f"*_{config}.onnx")) - before) or sorted(
        (folder / "onnx").glob(f"*_{config}.onnx"))  # fmt: skip
    if not written:
        raise RuntimeError(f"export_dynamic_quantized_onnx_model wrote no onnx/*_{config}.onnx")
    file_name = f"onnx/{written[0].name}"
    kw = {"file_name": file_name}
    models[INT8] = SentenceTransformer(str(folder), device=device, backend="onnx", model_kwargs=kw)
    for model in models.values():
        model.max_seq_length = spec["max_length"]
    import numpy
    import onnxruntime
    import optimum.version
    import transformers

    info = {"quantization": config, "int8_file": file_name,
            "versions": {"python": platform.python_version(), "sentence-transformers": sentence_transformers.__version__,
                         "transformers": transformers.__version__, "optimum": optimum.version.__version__,
                         "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}}  # fmt: skip
    return models, info


def main(argv: list[str]) -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's own stream
    os.dup2(2, 1)  # whatever the libraries print (Python or C) goes to stderr
    sys.stdout = sys.stderr

    def say(message: dict) -> None:
        proto.write(json.dumps(message) + "\n")
        proto.flush()

    try:
        spec = json.loads(Path(argv[0]).read_text())
        texts = json.loads(Path(spec["texts"]).read_text())
        models, info = load(spec)
    except Exception as exc:  # reported to bench.py as one line
        say({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]})
        return 1
    import numpy as np
    import torch

    say({"ready": True, "encoders": list(models), **info})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        try:
            model = models[request["name"]]
            start = time.perf_counter()
            with torch.inference_mode():  # as bench.py runs sentence-transformers' torch backend
                emb = model.encode(texts, batch_size=spec["batch_size"], normalize_embeddings=True,
                                   show_progress_bar=False)  # fmt: skip
            seconds = time.perf_counter() - start
            path = None
            if request.get("save"):
                path = str(Path(spec["workdir"]) / f"{request['name'].split()[-1]}.npy")
                np.save(path, np.asarray(emb, dtype=np.float32))
            say({"seconds": seconds, "embeddings": path})
        except Exception as exc:
            say({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

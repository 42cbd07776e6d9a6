#!/usr/bin/env bash
# One epoch with --sampling pair vs --sampling query on synthetic graded data (~40 judged documents per
# query): steps and seconds per epoch. Writes results/sampling/{run.log,sampling.json,train-*.log}.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=${PYTHON:-.venv/bin/python}
"$PY" scripts/measure_sampling.py --out results/sampling "$@" 2>&1 | tee results/sampling/run.log

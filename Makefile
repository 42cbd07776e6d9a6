# make test       create .venv if missing, install (pinned torch first), run the tests
# make reproduce  Table 1 (experiments/table1.toml) on SciFact test: BM25, zero-shot, and three seeds of the
#                 baseline, SB-MoE and MoE; finished runs are skipped, interrupted ones resumed.
#                 Variables: MODEL=backbone, BEIR_DATA_DIR=data root, EXPERIMENT=another experiment file,
#                 SMOKE=1 (plumbing only: a slice of the data, 2 steps, every stage, into results/smoke),
#                 PARALLEL=jobs at a time,
#                 EXTRA="training flags" (e.g. "--fp16"; use a new RESULTS= and CKPT= with it)
SHELL := bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# The offline folders of this workplace when they are there; elsewhere the hub name and ./data
MODEL ?= $(if $(wildcard ../shared/models/all-minilm-l6-v2/config.json),../shared/models/all-minilm-l6-v2,huawei-noah/TinyBERT_General_6L_768D)
BEIR_DATA_DIR ?= $(if $(wildcard ../shared/data/beir),../shared/data/beir,data)
export BEIR_DATA_DIR
EXPERIMENT ?= experiments/table1.toml
PARALLEL ?= 1
RESULTS ?= results$(if $(SMOKE),/smoke)
CKPT ?= checkpoints$(if $(SMOKE),/smoke)

.PHONY: test install lint reproduce

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .

reproduce: install
	$(PY) experiment.py $(EXPERIMENT) --model_name_or_path $(MODEL) --results $(RESULTS) --ckpt_root $(CKPT) \
		--parallel $(PARALLEL) $(if $(SMOKE),--smoke) $(if $(EXTRA),--extra $(EXTRA))

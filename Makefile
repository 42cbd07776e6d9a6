# make test       create .venv if missing, install (pinned torch first), run the tests
# make reproduce  Table 1 (experiments/table1.toml) on SciFact test: BM25, zero-shot, and three seeds of the
#                 baseline, SB-MoE and MoE; finished runs are skipped, interrupted ones resumed.
#                 Variables: MODEL=backbone (another than the file's: into results/<its name>), BEIR_DATA_DIR=data root, EXPERIMENT=another experiment file,
#                 SMOKE=1 (plumbing only: a slice of the data, 2 steps, every stage, into results/smoke),
#                 PARALLEL=jobs at a time,
#                 EXTRA="training flags" (e.g. "--fp16"; use a new RESULTS= and CKPT= with it)
SHELL := bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# The backbone: the experiment file's (table1.toml: sentence-transformers/all-MiniLM-L6-v2, which made the committed
# results), from this workplace's offline copy when it is there. MODEL=another (the paper's
# huawei-noah/TinyBERT_General_6L_768D) writes into results/<its name>/ and checkpoints/<its name>/, never over
# the committed results, which the runner would refuse anyway (provenance.py).
ifneq ($(filter command line environment,$(origin MODEL)),)
OWN := /$(notdir $(MODEL))
endif
MODEL ?= $(wildcard ../shared/models/all-minilm-l6-v2)
BEIR_DATA_DIR ?= $(if $(wildcard ../shared/data/beir),../shared/data/beir,data)
export BEIR_DATA_DIR
EXPERIMENT ?= experiments/table1.toml
PARALLEL ?= 1
RESULTS ?= results$(OWN)$(if $(SMOKE),/smoke)
CKPT ?= checkpoints$(OWN)$(if $(SMOKE),/smoke)

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
	$(PY) experiment.py $(EXPERIMENT) $(if $(MODEL),--model_name_or_path $(MODEL)) --results $(RESULTS) --ckpt_root $(CKPT) \
		--parallel $(PARALLEL) $(if $(SMOKE),--smoke) $(if $(EXTRA),--extra $(EXTRA))

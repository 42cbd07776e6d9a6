# make test       create .venv if missing, install (pinned torch first), run the tests
# make reproduce  Table 1 and the figures on SciFact test: SEEDS seeds of baseline, SB-MoE and MoE,
#                 plus BM25 and the zero-shot backbone; finished runs are skipped, interrupted ones resumed.
#                 Variables: MODEL=backbone, BEIR_DATA_DIR=data root, SEEDS=3, SMOKE=1 (2 steps, plumbing only),
#                 EXTRA="training flags" (e.g. "--num_train_epochs 10 --fp16"; use a new OUT= and CKPT= with it)
SHELL := bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
MODEL ?= ../shared/models/all-minilm-l6-v2
BEIR_DATA_DIR ?= ../shared/data/beir
export BEIR_DATA_DIR
SEEDS ?= 3
OUT ?= results/scifact$(if $(SMOKE),-smoke)
CKPT ?= checkpoints/scifact$(if $(SMOKE),-smoke)

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
	mkdir -p $(OUT)
	set -o pipefail; $(PY) reproduce.py --model_name_or_path $(MODEL) --seeds $(SEEDS) --out $(OUT) \
		--ckpt_root $(CKPT) $(if $(SMOKE),--smoke) $(if $(EXTRA),--extra $(EXTRA)) 2>&1 | tee -a $(OUT)/reproduce.log

# make test       create .venv if missing, install (pinned torch first), run the tests
# make scifact    train baseline, SB-MoE and MoE on SciFact train and evaluate them on test
# make reproduce  reserved for the paper's Table 1 (multi-seed); see README
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
MODEL ?= ../shared/models/all-minilm-l6-v2
BEIR_DATA_DIR ?= ../shared/data/beir
export BEIR_DATA_DIR
OUT ?= results/scifact
SEED ?= 42
# The recipe of the real runs (README): CPU, fp32, 2 epochs, documents cut at 128 tokens in training.
RECIPE ?= --model_name_or_path $(MODEL) --dataset scifact --num_train_epochs 2 --doc_max_length 128 --seed $(SEED)

.PHONY: test install scifact lint reproduce

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .

scifact: install
	mkdir -p $(OUT)/logs
	$(PY) train.py $(RECIPE) --output_dir checkpoints/baseline 2>&1 | tee $(OUT)/logs/train_baseline.log
	$(PY) train_sbmoe.py $(RECIPE) --output_dir checkpoints/sbmoe 2>&1 | tee $(OUT)/logs/train_sbmoe.log
	$(PY) train_moe.py $(RECIPE) --output_dir checkpoints/moe 2>&1 | tee $(OUT)/logs/train_moe.log
	$(PY) eval.py --model baseline sbmoe moe --dataset scifact --split test --output_dir $(OUT)/test 2>&1 | tee $(OUT)/logs/eval_test.log

reproduce:
	@echo "make reproduce: the multi-seed Table 1 is not built yet (see README)"; exit 2

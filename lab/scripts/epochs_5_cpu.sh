#!/usr/bin/env bash
# The seed-42 baseline trained 5 epochs on the CPU in fp32 (last epoch kept, no dev evaluation), evaluated on SciFact
# test and compared with Table 1's seed-42 baseline on all, unseen and seen queries (compare.py: the lab's paired
# tests). Writes results/ablations/epochs-5-cpu/; checkpoints under checkpoints/ablations/epochs-5-cpu/.
# Pair sampling, as Table 1's (one example per (query, positive) pair an epoch: the only sampling when this ran).
#   bash lab/scripts/epochs_5_cpu.sh     # MODEL=backbone folder or hub name, BEIR_DATA_DIR=data root
set -euo pipefail
cd "$(dirname "$0")/../.."
export BEIR_DATA_DIR=${BEIR_DATA_DIR:-../shared/data/beir} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
M=${MODEL:-../shared/models/all-minilm-l6-v2}
PY=${PY:-.venv/bin/python}
A=results/ablations/epochs-5-cpu
CK=checkpoints/ablations/epochs-5-cpu/seed42/baseline
REF=results/scifact/baseline/seed42/test/baseline.perquery.json.gz   # Table 1's seed-42 baseline
"$PY" train.py --model_name_or_path "$M" --dataset scifact --seed 42 --output_dir $CK --doc_max_length 128 \
  --sampling pair --num_train_epochs 5 --eval_strategy no --load_best_model_at_end false --save_strategy no > $A/train_seed42.log 2>&1
"$PY" eval.py --model baseline --checkpoint $CK --dataset scifact --split test --output_dir $A/seed42 --verify \
  > $A/eval_seed42.log 2>&1
for sub in all unseen seen; do
  echo "+ python compare.py $A/seed42/baseline.perquery.json.gz $REF --subset $sub"
  "$PY" compare.py $A/seed42/baseline.perquery.json.gz $REF --subset $sub
done > $A/compare_seed42.log 2>&1
echo finished >> $A/compare_seed42.log

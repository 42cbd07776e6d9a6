cd "$(dirname "$0")/../../.."
export BEIR_DATA_DIR=../shared/data/beir TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
A=results/ablations/epochs-5-cpu
.venv/bin/python train.py --model_name_or_path ../shared/models/all-minilm-l6-v2 --dataset scifact --seed 42 \
  --output_dir checkpoints/ablations/epochs-5-cpu/seed42/baseline --num_train_epochs 2 --doc_max_length 128 \
  --num_train_epochs 5 --eval_strategy no --load_best_model_at_end false --save_strategy no > $A/train_seed42.log 2>&1 || exit 1
.venv/bin/python eval.py --model baseline --checkpoint checkpoints/ablations/epochs-5-cpu/seed42/baseline --dataset scifact \
  --split test --output_dir $A/seed42 --verify > $A/eval_seed42.log 2>&1 || exit 1
for sub in all unseen seen; do
  echo "+ python compare.py $A/seed42/baseline.perquery.json results/scifact/seed42/test/baseline.perquery.json --subset $sub"
  .venv/bin/python compare.py $A/seed42/baseline.perquery.json results/scifact/seed42/test/baseline.perquery.json --subset $sub
done > $A/compare_seed42.log 2>&1
echo finished >> $A/compare_seed42.log

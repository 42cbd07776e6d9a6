#!/usr/bin/env bash
# One 1-epoch SciFact baseline cell (all-MiniLM-L6-v2, seed 42) timed before and after the cheaper-cell change:
# before = fp32, dev passes at the training length, the test evaluation encoding the corpus again;
# after = bf16 autocast (a CPU with bf16 units) and dev passes at the test length, whose corpus embeddings the
# test evaluation reads back. The BM25 negatives are mined first, so neither cell pays for mining.
# Made results/heterogeneous/cell-time/ (run from the repository root, BEIR_DATA_DIR set).
set -euo pipefail
OUT=${OUT:-checkpoints/measure}
M=${MODEL:-../shared/models/all-minilm-l6-v2}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
echo "commit $(git rev-parse --short HEAD); $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg)"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RETRIEVAL_CACHE_DIR="$OUT/cache"
COMMON="--kind baseline --model_name_or_path $M --dataset scifact --num_train_epochs 1 --doc_max_length 128 --sampling query --seed 42 --logging_steps 5 --disable_tqdm true"
$PY train.py $COMMON --output_dir "$OUT/warm" --max_steps 1 --eval_strategy no --save_strategy no --load_best_model_at_end false > "$OUT/warm.log" 2>&1
for cell in before after; do
  if [ $cell = before ]; then T=""; E=""; else T="--bf16 --eval_doc_max_length 256"; E="--bf16"; fi
  s=$(date +%s.%N)
  $PY train.py $COMMON $T --output_dir "$OUT/$cell" > "$OUT/$cell.train.log" 2>&1
  m=$(date +%s.%N)
  $PY eval.py --model baseline --checkpoint "$OUT/$cell" --dataset scifact --split test --output_dir "$OUT/$cell-eval" $E > "$OUT/$cell.eval.log" 2>&1
  e=$(date +%s.%N)
  quality=$($PY -c "import json, sys; m = json.load(open(sys.argv[1]))['baseline']; print(f\"NDCG@10 {m['NDCG@10']:.4f} Recall@100 {m['Recall@100']:.4f}\")" "$OUT/$cell-eval/metrics.json")
  echo "$cell train $(echo "$m - $s" | bc) s eval $(echo "$e - $m" | bc) s total $(echo "$e - $s" | bc) s; $quality; load $(cut -d' ' -f1-3 /proc/loadavg)"
done

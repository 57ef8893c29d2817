#!/usr/bin/env bash
# The GLUE results table of recipes/README.md: FP MiniLM teacher and W1A1 SURGE student per task,
# CPU profile, real data from a local mirror. One task after another (two torch jobs thrash 2 cores).
#   SURGE_NLP_GLUE_DATASET=../shared/data/glue bash recipes/run_glue_table.sh [TASK ...]
set -euo pipefail
tasks=("${@:-cola sst2 mrpc stsb rte}")
for task in ${tasks[@]}; do
  start=$(date +%s)
  surge-nlp glue "$task" --profile cpu --output "runs/cpu/$task"
  echo "$task wall $(( $(date +%s) - start )) s" | tee -a runs/cpu/wall_times.txt
done
python recipes/glue_table.py runs/cpu

#!/usr/bin/env bash
# Issue 5's benchmark end to end: every suite of recipes/estimators.yaml (estimators, eta sweep,
# auxiliary-rank sweep), then the training-step benchmark for the time and memory ratios, then the
# tables (markdown + JSON) in recipes/results/. Runs one job at a time (two torch jobs thrash 2 cores);
# finished runs are kept, so the command can be re-run after an interruption.
#   SURGE_NLP_GLUE_DATASET=../shared/data/glue bash recipes/run_estimator_benchmark.sh [--teachers runs/cpu]
# --teachers reuses the FP teachers of `bash recipes/run_glue_table.sh` (same profile); without it the
# teachers are fine-tuned first, under runs/estimators/teachers/.
set -euo pipefail
out=runs/estimators
python recipes/benchmark_estimators.py run --output "$out" "$@"
python recipes/benchmark_training_step.py --steps 3 --json recipes/results/training_step_cpu.json \
  | tee recipes/results/training_step_cpu.txt
python recipes/benchmark_estimators.py table --output "$out" --step-benchmark recipes/results/training_step_cpu.json \
  --json recipes/results/estimators_cpu.json | tee recipes/results/estimators_cpu.md

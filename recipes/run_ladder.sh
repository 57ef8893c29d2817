#!/usr/bin/env bash
# The cpu-full accuracy ladder (recipes/ladder.yaml), in issue 10's order, one run at a time on the
# two cores; every run resumes where it stopped and a finished one is never redone, so the same
# command continues the grid in a later session. Teachers are fine-tuned on first use (cpu-full's
# teacher settings) into $TEACHERS/<task>/teacher.
#   SURGE_NLP_GLUE_DATASET=../shared/data/glue bash recipes/run_ladder.sh [OUTPUT] [TEACHERS]
set -euo pipefail
output=${1:-runs/ladder}
teachers=${2:-runs/cpu-full}
run() { python recipes/benchmark_ladder.py run --output "$output" --teachers "$teachers" "$@"; }
run --row w1a1 --task stsb
run --row w1a1 --task mrpc
run --row ablation_all_on --row ablation_gelu_ffn --row ablation_scale_through --row ablation_shift_at_scale_lr \
    --row ablation_all_off --row ablation_multistep --row ablation_multistep_reset_shifts
run --row w1a1
run --row w1a4 --row w1a2
run --row w1a1_multistep --row w1a1_fp_embeddings
run  # every other row of the file (the probes, w1a1_augmented), in its order
python recipes/benchmark_ladder.py baseline --teachers "$teachers"
python recipes/benchmark_ladder.py table --output "$output" --teachers "$teachers" \
  --json recipes/results/glue_cpu_full.json --plot recipes/results/glue_cpu_full.png

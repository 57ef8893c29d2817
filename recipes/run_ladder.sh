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
run --row ablate_scale_through --row ablate_gelu_ffn --row ablate_shift_at_scale_lr
run --row w1a1
run --row w1a4 --row w1a2
run --row w1a1_multistep --row ablate_multistep_reset_shifts --row w1a1_fp_embeddings
python recipes/benchmark_ladder.py table --output "$output" --teachers "$teachers" \
  --json recipes/results/glue_cpu_full.json --plot recipes/results/glue_cpu_full.png

#!/usr/bin/env bash
# The objective and step-size variants of docs/benchmarks.md (Ablations), each through scripts/bench_quality.py at one
# reduced budget on the inr task: gradient matching with each variant against the direct (end-to-end) arm.
# Usage: bash scripts/ablate_objective.sh OUT_DIR [STEPS] [BUDGET]; prints one line a variant, JSON in OUT_DIR.
set -euo pipefail
out=${1:?usage: ablate_objective.sh OUT_DIR [STEPS] [BUDGET]}
steps=${2:-2000}
budget=${3:-48000}
mkdir -p "$out"
python=${PYTHON:-python}
run() {  # name, arms, then --set overrides
  local name=$1 arms=$2
  shift 2
  $python scripts/bench_quality.py --task inr --budget "$budget" --fractions 1 --arms "$arms" \
    --set "train.max_steps=$steps" --set field.width=128 --set field.tensor_heads=false \
    --set "field.time_constants=[]" "$@" --work "$out/work" --json "$out/$name.json" \
    > "$out/$name.log" 2>&1
  $python - "$out/$name.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
cells = "  ".join(f"{arm} " + " / ".join(f"{v:.2f}" for v in values.values()) for arm, values in r["trajectory"].items())
print(f"{sys.argv[2]:28s} {cells}  ({r['seconds']:.0f} s)", flush=True)
PY
}
run end300                field,direct "--set=objective.end_weight=300" "--set=objective.loss=relative_mse"
run end300-cosine-norm    field "--set=objective.end_weight=300" "--set=objective.loss=cosine_norm"
run hinge10-end300        field "--set=objective.end_weight=300" "--set=objective.hinge_weight=10" "--set=objective.loss=relative_mse"
run hinge10               field "--set=objective.end_weight=0" "--set=objective.hinge_weight=10" "--set=objective.loss=relative_mse"
run end1000-cosine-norm   field "--set=objective.end_weight=1000" "--set=objective.loss=cosine_norm"
run rollout2-end300-cosine-norm field "--set=objective.end_weight=300" "--set=objective.loss=cosine_norm" "--set=objective.rollout=2"
# Momentum: real optimisation itself changes (a smooth path that goes further in T steps), and with it the targets.
run momentum09-end300     field "--set=objective.end_weight=300" "--set=objective.loss=relative_mse" "--set=objective.momentum=0.9"
run momentum09            field "--set=objective.end_weight=0" "--set=objective.loss=relative_mse" "--set=objective.momentum=0.9"
# Every row runs the field the ablations were measured with (128 wide, one head per shape, t/T alone); then the field's
# size and learning rate, with the preset's objective (cosine_norm + end 300).
run width256              field "--set=field.width=256"
run depth4                field "--set=field.depth=4"
run lr3e-3                field "--set=train.learning_rate=0.003"

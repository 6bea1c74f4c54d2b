#!/usr/bin/env bash
# The field's output side in docs/benchmarks.md (Ablations: the path and the heads): gradient matching with the
# preset's objective, trained by scripts/bench_quality.py at a quarter of each benchmark's budget (inr) or the full
# one (lora), with and without one head per tensor (field.tensor_heads) and the early-moving path components
# (field.time_constants); then the preset with one change each to the objective or the training.
# Usage: bash scripts/ablate_path.sh OUT_DIR; prints one line a variant, JSON in OUT_DIR.
set -euo pipefail
out=${1:?usage: ablate_path.sh OUT_DIR}
mkdir -p "$out"
python=${PYTHON:-python}
run() {  # name, task, budget, fractions, then --set overrides
  local name=$1 task=$2 budget=$3 fractions=$4
  shift 4
  $python scripts/bench_quality.py --task "$task" --budget "$budget" --fractions "$fractions" --arms field "$@" \
    --work "$out/work-$task" --json "$out/$name.json" > "$out/$name.log" 2>&1
  $python - "$out/$name.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
cells = "  ".join(f"{arm} " + " / ".join(f"{v:.2f}" for v in values.values()) for arm, values in r["trajectory"].items())
print(f"{sys.argv[2]:28s} {cells}  ({r['seconds']:.0f} s)", flush=True)
PY
}
run inr-shared-straight   inr 128000 0.25 "--set=field.tensor_heads=false" "--set=field.time_constants=[]"
run inr-tensor-heads      inr 128000 0.25 "--set=field.time_constants=[]"
run inr-time-constants    inr 128000 0.25 "--set=field.tensor_heads=false"
run inr-preset            inr 128000 0.25
run inr-time-constants-1  inr 128000 0.25 "--set=field.time_constants=[1,3,10,30]"
run inr-relative-mse      inr 128000 0.25 "--set=objective.loss=relative_mse"
run inr-end1000           inr 128000 0.25 "--set=objective.end_weight=1000"
run inr-end3000           inr 128000 0.25 "--set=objective.end_weight=3000"
run inr-ema                inr 128000 0.25 "--set=train.ema_decay=0.998"
run inr-clip10             inr 128000 0.25 "--set=train.max_grad_norm=10"
run inr-hinge10            inr 128000 0.25 "--set=objective.hinge_weight=10"
run inr-difference         inr 128000 0.25 "--set=objective.match=difference"
run inr-difference-seed1   inr 128000 0.25 "--set=objective.match=difference" "--set=train.seed=1"
run inr-preset-seed1       inr 128000 0.25 "--set=train.seed=1"
run inr-lr5e-4             inr 128000 0.25 "--set=train.learning_rate=0.0005"
run inr-gain06             inr 128000 0.25 "--set=field.output_gain=0.6"
run lora-shared           lora 2000 1 "--set=field.tensor_heads=false"
run lora-preset           lora 2000 1
run lora-time-constants   lora 2000 1 "--set=field.time_constants=[3,10,30]"

#!/usr/bin/env bash
# One GPU session's checks, in the order they matter, each step's log kept even when a later one fails:
#   1. `ppcl bench gpu` (the GPU check: real-width Qwen-Image and FLUX.1 blocks, memory vs the planner, step and
#      forward times, pruned speedup; docs/resources.md);
#   2. the whole command chain on CUDA with the committed reference teacher: probe, select at keep 0.5, distill
#      (bf16 autocast, fp32 AdamW), export, evaluate (judge accuracy, latency) -- the code paths a cluster run takes.
# Usage, on a machine whose python3 holds a CUDA torch and ppcl's other requirements:
#   OUT=/some/dir tools/gpu-session.sh            (DEVICE=cpu STEPS=20 runs the same chain on a CPU, for a dry run)
# Writes under $OUT: gpu/gpu_check.{json,md}, gpu.log, chain.log, chain.json (the chain's numbers).
set -u
OUT=${OUT:-/tmp/ppcl-gpu-session}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-1000}
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MLFLOW_TRACKING_URI=
mkdir -p "$OUT"
W=$(mktemp -d)
T=ppcl/bench/assets/reference-teacher
ppcl() { "$PY" -m ppcl "$@"; }
timed() {  # timed NAME CMD...: runs CMD, records its seconds and exit status in $W/times
    local name=$1 t0 rc; shift; t0=$(date +%s%N)
    "$@"; rc=$?
    echo "$name $(( ($(date +%s%N) - t0) / 1000000 )) $rc" >> "$W/times"; return $rc
}

{ command -v nvidia-smi >/dev/null && nvidia-smi -L
  "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
} 2>&1 | tee "$OUT/machine.txt"

if [ "$DEVICE" = cuda ]; then
    timed bench_gpu ppcl bench gpu --device cuda --out "$OUT/gpu" 2>&1 | tee "$OUT/gpu.log"
fi

{
    set -o pipefail
    "$PY" -c 'from ppcl.bench.teacher import eval_prompts; print("\n".join(eval_prompts(64)[0]))' > "$W/prompts.txt"
    timed probe ppcl probe --model $T --out "$W/probe" --device "$DEVICE" --no-progress --no-tracking &&
    timed select ppcl select --probe "$W/probe/probe.json" --keep-params 0.5 --out "$W/plan.json" --no-plot \
        --no-tracking &&
    timed distill ppcl distill --model $T --plan "$W/plan.json" --out "$W/run" --steps "$STEPS" \
        --no-use-8bit-adam --no-progress --no-tracking &&
    timed export ppcl export --model $T --plan "$W/plan.json" --plugs "$W/run" --keep-params 0.5 \
        --out "$W/student" --no-tracking &&
    timed evaluate ppcl evaluate --model "$W/student" --teacher $T --prompts "$W/prompts.txt" --out "$W/eval" \
        --device "$DEVICE" --judge --no-progress --no-tracking 2>&1 | grep -v "input was truncated"
    echo "chain exit $?"
} 2>&1 | tee "$OUT/chain.log"

cp "$W/eval/grid.png" "$OUT/grid.png" 2>/dev/null
"$PY" - "$W" "$OUT" <<'PY'
import json, sys
from pathlib import Path
w, out = Path(sys.argv[1]), Path(sys.argv[2])
res = {"times_s": {l.split()[0]: {"seconds": int(l.split()[1]) / 1000, "exit": int(l.split()[2])}
                   for l in (w / "times").read_text().splitlines()} if (w / "times").exists() else {}}
for name, f in {"plan": "plan.json", "distill_metrics_tail": "run/metrics.jsonl", "evaluate": "eval/metrics.json"}.items():
    p = w / f
    if p.exists():
        res[name] = [json.loads(l) for l in p.read_text().splitlines()[-3:]] if f.endswith("jsonl") else json.loads(p.read_text())
(out / "chain.json").write_text(json.dumps(res, indent=1, default=str))
print(json.dumps(res.get("times_s"), indent=1))
PY

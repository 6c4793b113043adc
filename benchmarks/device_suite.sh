#!/usr/bin/env bash
# The one-command device suite: every GPU measurement the project records, in under 9 minutes on
# a bare H200 machine (its own torch, onnx, onnxruntime; no network), run from the checkout with
# PYTHONPATH=. and nothing installed.
#
#   bash benchmarks/device_suite.sh                      # on the GPU machine: full-size release
#   bash benchmarks/device_suite.sh --dry-run            # CPU, tiny model, small sizes (CI)
#   bash benchmarks/device_suite.sh --out /scratch/suite --work /scratch/suite-work
#
# Steps (each under its own timeout, all under one deadline; a failed step is recorded and the
# rest still run):
#   env         torch / CUDA / device facts
#   kernels     benchmarks/kernels.py: each QLinear kernel path vs bf16 at Lance's Linear shapes,
#               decode and denoise row counts
#   checkpoint  a full-size random bf16 release (lance-deploy make-checkpoint --full)
#   rehearse    benchmarks/rehearse.py on that release, bf16 / fp8-rtn / int8-rtn (reads headers
#               only: on the CPU, in the background while the GPU steps run)
#   memory-*    benchmarks/memory.py per task: all resident and under 16/12/8 GiB; per-phase
#               max_memory_allocated beside the planner; paged vs resident s/step
#   quant-*     quantize the image model with fp8-rtn and int8-rtn (timed)
#   memq-*      benchmarks/memory.py on those artifacts (t2i, x2t_image; resident and 8 GiB)
#   report      benchmarks/device_report.py: OUT/device_suite.json + OUT/device_suite.md, the
#               table that goes into docs/benchmarks.md
# Wheels the machine lacks (bitsandbytes, imageio-ffmpeg) are installed from a git-ignored .whl/
# folder when there is one (pip --no-index); without it the paths that need them are skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
OUT=""
WORK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=$2; shift ;;
    --work) WORK=$2; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "device_suite.sh: unknown option $1 (expected --dry-run, --out DIR, --work DIR)" >&2; exit 2 ;;
  esac
  shift
done

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-$ROOT/bench-out/device-$STAMP$([ $DRY = 1 ] && echo -dry)}
WORK=${WORK:-$OUT/work}
mkdir -p "$OUT/logs" "$WORK"
OUT=$(cd "$OUT" && pwd); WORK=$(cd "$WORK" && pwd)
STEPS=$OUT/steps.jsonl
: > "$STEPS"

if [ $DRY = 1 ]; then
  DEADLINE=${SUITE_SECONDS:-1800}
  SCALE=6                  # step timeouts: a shared 2-core CI runner, not an H200
  DEVICE=cpu
  TASKS=(t2i:64x64 x2t_image:64x64)
  BUDGETS=(70MiB)          # the tiny model: a budget that moves components phase by phase
  QBUDGETS=(70MiB)
  STEPS_N=2; TOKENS=4
  KERNEL_ARGS=(--device cpu --quick)
  CKPT_ARGS=(--tiny)
else
  DEADLINE=${SUITE_SECONDS:-530}
  SCALE=1
  DEVICE=cuda
  TASKS=(t2i:768x768 image_edit:768x768 t2v:480x848x121 i2v video_edit:480x848x69 x2t_image x2t_video)
  BUDGETS=(16GiB 12GiB 8GiB)
  QBUDGETS=(8GiB)
  STEPS_N=2; TOKENS=16
  KERNEL_ARGS=(--device cuda)
  CKPT_ARGS=(--full --dtype bfloat16)
fi

# step NAME TIMEOUT CMD...: run CMD under min(TIMEOUT, time left), log to logs/NAME.log, record
# {"step", "rc", "seconds"} in steps.jsonl. Never stops the suite.
step() {
  local name=$1 limit=$(($2 * SCALE)); shift 2
  local left=$((DEADLINE - SECONDS - 15))  # 15 s kept for the report
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -le 0 ]; then
    echo "{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"note\": \"skipped: suite deadline\"}" >> "$STEPS"
    echo "[suite] $name: skipped (deadline)"; return 0
  fi
  local t0=$SECONDS
  echo "[suite] $name (timeout ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"timeout\": $limit}" >> "$STEPS"
  [ $rc = 0 ] || { echo "[suite] $name failed (rc $rc); last lines:"; tail -n 5 "$OUT/logs/$name.log"; }
  return 0
}

if [ $DRY = 0 ] && [ -d "$ROOT/.whl" ]; then
  step wheels 120 "$PY" -m pip install --no-index --find-links "$ROOT/.whl" bitsandbytes imageio-ffmpeg
fi

step env 60 "$PY" -c '
import json, platform, sys, torch
cuda = torch.cuda.is_available()
print(json.dumps({"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                  "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
                  "capability": list(torch.cuda.get_device_capability()) if cuda else None,
                  "gpu_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None}))' 
cp "$OUT/logs/env.log" "$OUT/env.json" 2>/dev/null

step kernels 90 "$PY" benchmarks/kernels.py "${KERNEL_ARGS[@]}" --json "$OUT/kernels.json"
CKPT=$WORK/ckpt
step checkpoint 170 "$PY" -m lance_deploy make-checkpoint "${CKPT_ARGS[@]}" --force "$CKPT"

# The rehearsal reads the release's headers only and needs no GPU: on the device it runs on the
# CPU in the background while the GPU steps run (its JSON grows run by run, so a deadline loses
# only the run in flight); the dry run runs it in line.
REHEARSE=("$PY" benchmarks/rehearse.py --model "$CKPT" --tasks "${TASKS[@]}" --budgets resident "${BUDGETS[@]}"
          --steps 1 --max-new-tokens "$TOKENS" --json "$OUT/rehearse.json")
REHEARSE_PID=""
if [ $DRY = 1 ]; then
  step rehearse 120 "${REHEARSE[@]}" --recipes bf16
else
  left=$((DEADLINE - SECONDS - 20))
  (t0=$SECONDS; timeout --kill-after=10 $left "${REHEARSE[@]}" --recipes bf16 fp8-rtn int8-rtn \
     > "$OUT/logs/rehearse.log" 2>&1
   echo "{\"step\": \"rehearse\", \"rc\": $?, \"seconds\": $((SECONDS - t0)), \"note\": \"background, CPU\"}" \
     >> "$STEPS") &
  REHEARSE_PID=$!
fi

for spec in "${TASKS[@]}"; do
  task=${spec%%:*}
  limit=45; case $task in t2v|video_edit|i2v) limit=75 ;; esac
  step "memory-$task" $limit "$PY" benchmarks/memory.py --model "$CKPT" --device $DEVICE --task "$spec" \
    --gpu-memory "${BUDGETS[@]}" --steps $STEPS_N --max-new-tokens $TOKENS --json "$OUT/memory-$task.json"
done

for recipe in fp8-rtn int8-rtn; do
  step "quant-$recipe" 90 "$PY" -m lance_deploy quantize "$CKPT/Lance_3B" --recipe $recipe --out "$WORK/$recipe" \
    --device $DEVICE --overwrite --restart --json
  for spec in "${TASKS[@]}"; do  # t2i and x2t_image on the artifact
    task=${spec%%:*}
    case $task in t2i) ;; x2t_image) [ $DRY = 1 ] && continue ;; *) continue ;; esac
    step "memq-$recipe-$task" 40 "$PY" benchmarks/memory.py --model "$WORK/$recipe" --device $DEVICE \
      --task "$spec" --gpu-memory "${QBUDGETS[@]}" --steps $STEPS_N --max-new-tokens $TOKENS --label $recipe \
      --json "$OUT/memory-$recipe-$task.json"
  done
done

if [ -n "$REHEARSE_PID" ]; then wait "$REHEARSE_PID"; fi
"$PY" benchmarks/device_report.py "$OUT" || echo "[suite] report failed"
echo "[suite] done in ${SECONDS}s: $OUT/device_suite.json, $OUT/device_suite.md"
# the suite passes when every step did (CI runs the dry run)
! grep -q '"rc": [1-9]' "$STEPS" && ! grep -q '"rc": null' "$STEPS"

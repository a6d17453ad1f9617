#!/usr/bin/env bash
# Patient, consistent distillation on one GPU, in about 8 minutes: S0 and DBB-S0 students of insightface's
# MobileFaceNet, trained by train.face with the teacher online on the augmented batch, at an equal wall-clock budget
# each; every stage under `timeout`, writing to $OUT as it goes (a cut stage keeps its log.jsonl curve and best.json).
#
#   python benchmarks/distill_data.py --out .distill_data                      # here: the faces, 41 MiB
#   OUT=/some/dir WHEEL=.wheels/timm-1.0.31-py3-none-any.whl bash benchmarks/gpu_distill.sh   # on the GPU machine
#   DEVICE=cpu DATA=/tmp/dd OUT=/tmp/d bash benchmarks/gpu_distill.sh   # the same stages, tiny, on the CPU (a check;
#                                                   # /tmp/dd: distill_data.py --extra 40 --train-people 40 ...)
#
# Faces ($DATA, from benchmarks/distill_data.py): train on split/train (lfw_dev minus the people of LFW fold 5) plus
# extra/utkface (unlabeled); choose the best step on select/ (CelebA people: nobody trained on, not LFW), log fold 5
# (split/val) as a curve beside it; fold 5's figure of the chosen step is read once, in the report.
# Stages (CUDA: batch 256, bfloat16 autocast, channels_last, crops preloaded on the GPU):
#   1. probe: one epoch of each student, to measure images/s (its epochs then fill the budget) ....... ~2 x 30 s
#   2. DBB-S0 (branches: DBB has no merged form): the epochs that fill $BUDGET seconds (default 80) ..... ~B + 40 s
#   3. S0 (merged training form, exact, its fastest): DBB's epochs (equal images), then $BUDGET seconds
#      (equal wall time); and the earlier recipe (cached targets, no augmentation) at DBB's epochs
#      ..................................................................................... ~B/3 + B + B/3 + 120 s
#   4. both at 4x the learning rate for one epoch: divergence (log rows `diverged`) ....................... ~2 x 25 s
#   5. the report (benchmarks/distill_report.py): table and curves, JSON to $OUT/report.json
# $DEADLINE (seconds from the start; 540 on CUDA, so that the whole script fits one 10-minute device call) caps
# every stage's timeout: a stage that would pass it is cut, one that would start after it is skipped (said on
# stderr), and the report always runs, on the runs that exist.
# The INT8 drift of the students runs on a CPU afterwards (benchmarks/int8_trained.py on $OUT/*/best.safetensors).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d)}
DATA=${DATA:-.distill_data}
DEVICE=${DEVICE:-cuda}
TEACHER=${TEACHER:-$DATA/teacher/model-0000.params}
mkdir -p "$OUT"
if [ -n "${WHEEL:-}" ]; then $PY -m pip install -q --no-deps "$WHEEL" >"$OUT/pip.log" 2>&1 || cat "$OUT/pip.log"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' | tee "$OUT/versions.txt"
for need in "$DATA/split/train" "$DATA/split/val" "$DATA/select" "$TEACHER"; do
  [ -e "$need" ] || { echo "error: $need missing (python benchmarks/distill_data.py; TEACHER=...)" >&2; exit 2; }
done
EXTRA=()
[ -d "$DATA/extra" ] && EXTRA=(--extra-data "$DATA/extra")

if [ "$DEVICE" = cuda ]; then
  BUDGET=${BUDGET:-80} B=256 LR=${LR:-0.4} SPEED=(--amp --amp-dtype bfloat16 --channels-last --preload -j 12)
  PROBE_T=60 PAD=60 VALS=8 DEADLINE=${DEADLINE:-540}
else  # the script's own check: the real faces and flags, a few steps
  BUDGET=${BUDGET:-60} B=16 LR=${LR:-0.1} SPEED=(--preload -j 2)
  PROBE_T=600 PAD=600 VALS=3 DEADLINE=${DEADLINE:-3600}
fi
START=$SECONDS
cap() {  # a stage's timeout in seconds, capped by what is left before $DEADLINE (the report keeps 30 s); 0: skip
  local want=$1 left=$(( DEADLINE - (SECONDS - START) - 30 ))
  (( left < want )) && want=$left
  (( want > 0 )) && echo "$want" || echo 0
}
# the recipe: consistent teaching (crops near the aligned framing, small rotations, colour, blur, grayscale, mixup
# or cutmix on every batch), cosine to the teacher plus the batch's cosine matrix, EMA of the student (its decay
# warmed up: a budget run of a few hundred steps at a fixed 0.999 would validate an EMA near the random init)
COMMON=(--loss none --teacher mobilefacenet --teacher-checkpoint "$TEACHER" --model-kwargs embed_dim=128
        --model-ema --model-ema-decay 0.999 --model-ema-warmup -b "$B" --lr "$LR" --weight-decay 5e-5
        --weight-decay-end 5e-6 --device "$DEVICE" --no-export --data "$DATA/split/train" "${EXTRA[@]}"
        --log-interval 10 "${SPEED[@]}")
CONSISTENT=(--crop-scale 0.8 1 --crop-ratio 0.9 1.1 --rotate 8 --color-jitter 0.3 --gaussian-blur-prob 0.1
            --grayscale-prob 0.1 --mixup 0.4 --cutmix 1.0 --relational-weight 1.0)
RECIPE=("${COMMON[@]}" "${CONSISTENT[@]}")
stage() { echo "== $(date +%T) $*" >&2; }
form() { [ "$1" = mobileone_112_s0 ] && echo merged || echo branches; }
MODELS=(mobileone_112_s0 mobileone_112_dbb_s0)

stage "1: probe"
for m in "${MODELS[@]}"; do
  t=$(cap "$PROBE_T"); [ "$t" -gt 0 ] || { echo "probe $m skipped: past the deadline" >&2; continue; }
  timeout "$t" $PY -m train.face --model "$m" --train-form "$(form "$m")" "${RECIPE[@]}" --epochs 1 \
    --warmup-epochs 0.2 --output "$OUT/probe-$m" > "$OUT/probe-$m.json" 2> "$OUT/probe-$m.log"
  echo "probe $m exit $?" >&2
done

# epochs that fill the budget at the probed speed, and a validation every ~1/12 of the run
plan() {  # model; prints: epochs, validation interval (steps), probed images/s, training images
  $PY - "$OUT/probe-$1/log.jsonl" "$BUDGET" "$B" "$VALS" "$DATA/split/train" "${EXTRA[@]:1}" <<'EOF'
import json, sys
from pathlib import Path
from train.data import open_dataset
log, budget, batch, vals = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data, extra = sys.argv[5], sys.argv[6:]
rows = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
speed = [r['images_per_second'] for r in rows if 'images_per_second' in r]
ips = speed[-1] if speed else 0.0
n = len(open_dataset(data, (112, 112), extra=extra))
epochs = max(1, int(budget * ips / n)) if ips else 1
print(epochs, max(1, epochs * (n // batch) // vals), round(ips, 1), n)
EOF
}

run() {  # model, output name, epochs (empty: fill $BUDGET at the probed speed), [cached: the earlier recipe]
  local m=$1 name=$2 epochs=$3 flags=("${RECIPE[@]}") t
  [ "${4:-}" = cached ] && flags=("${COMMON[@]}")
  t=$(cap $((BUDGET * 2 + PAD))); [ "$t" -gt 0 ] || { echo "$name skipped: past the deadline" >&2; return; }
  read -r EPOCHS VAL_EVERY IPS N < <(plan "$m")
  if [ -n "$epochs" ]; then VAL_EVERY=$(( VAL_EVERY * epochs / EPOCHS )); EPOCHS=$epochs; fi
  [ "$VAL_EVERY" -ge 1 ] || VAL_EVERY=1
  echo "$name: $EPOCHS epochs of $N images (probed $IPS images/s), validation every $VAL_EVERY steps" >&2
  echo "$EPOCHS" > "$OUT/$name.epochs"
  timeout "$t" $PY -m train.face --model "$m" --train-form "$(form "$m")" "${flags[@]}" \
    --epochs "$EPOCHS" --warmup-epochs "$(( EPOCHS >= 10 ? 2 : 1 ))" --val "$DATA/select" "$DATA/split/val" \
    --best-on select --val-every "$VAL_EVERY" --output "$OUT/$name" > "$OUT/$name.json" 2> "$OUT/$name.log"
  echo "$name exit $?" >&2
}

stage "2: DBB-S0, the budget"
run mobileone_112_dbb_s0 dbb_s0 ""
stage "3: S0, as many images as DBB-S0 saw (equal images)"
run mobileone_112_s0 s0_equal_images "$(cat "$OUT/dbb_s0.epochs" 2>/dev/null)"
stage "3b: S0, the budget (equal wall time)"
run mobileone_112_s0 s0 ""
stage "3c: S0, the earlier recipe (cached targets, no augmentation), DBB-S0's images"
run mobileone_112_s0 s0_cached "$(cat "$OUT/dbb_s0.epochs" 2>/dev/null)" cached

stage "4: 4x the learning rate, one epoch each"
for m in "${MODELS[@]}"; do
  t=$(cap "$PROBE_T"); [ "$t" -gt 0 ] || { echo "high lr $m skipped: past the deadline" >&2; continue; }
  timeout "$t" $PY -m train.face --model "$m" --train-form "$(form "$m")" "${RECIPE[@]}" --epochs 1 \
    --warmup-epochs 0.2 --lr "$($PY -c "print(4 * $LR)")" --output "$OUT/highlr-$m" \
    > "$OUT/highlr-$m.json" 2> "$OUT/highlr-$m.log"
  echo "high lr $m exit $?" >&2
done

stage "5: report"
$PY benchmarks/distill_report.py --runs "$OUT/s0" "$OUT/s0_equal_images" "$OUT/s0_cached" "$OUT/dbb_s0" \
  --high-lr "$OUT/highlr-mobileone_112_s0" "$OUT/highlr-mobileone_112_dbb_s0" --plot "$OUT/curves.png" \
  --markdown "$OUT/report.md" > "$OUT/report.json"
cat "$OUT/report.md" >&2
# the runs' resumable state, final weights and target caches: too large to bring back; the best weights of s0,
# s0_equal_images and dbb_s0 stay (for the INT8 and agreement measurements on a CPU)
find "$OUT" -name 'checkpoint-*.safetensors' -delete
rm -f "$OUT"/*/final.safetensors "$OUT"/*/teacher.safetensors "$OUT"/s0_cached/best.safetensors

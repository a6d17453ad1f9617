#!/usr/bin/env bash
# Training throughput on one GPU, in under 8 minutes: benchmarks/train_throughput.py in stages, each under
# `timeout`, each writing its table to $OUT as it goes (a cut stage keeps what it measured).
#
#   OUT=/some/dir bash benchmarks/gpu_throughput.sh              # on a CUDA machine
#   THROUGHPUT_DEVICE=cpu OUT=/tmp/t bash benchmarks/gpu_throughput.sh   # the same stages, small, on the CPU
#
# Stages (batch 256, bfloat16 autocast, channels_last on CUDA), at most 200 + 170 + 130 s:
#   1. eager, synthetic batches on the device: MobileFaceNet, S0-S4 and DBB-S0, branches vs merged, each model
#      with MobileFaceNet in a process of its own, 3 rounds (the table grows after each model)
#   2. torch.compile of merged S0 against eager merged S0 (one compilation: ~100 s for S0 on an H200)
#   3. train.face on real crops ($FACES, or generated crops): MobileFaceNet, S0 branches, S0 merged
# Needs the project importable (pip install -e . or PYTHONPATH=.) and timm >= 1.0.31 (carry its wheel to a
# machine with an older one: WHEEL=path/to/timm.whl installs it first, without dependencies).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d)}
DEVICE=${THROUGHPUT_DEVICE:-cuda}
mkdir -p "$OUT"
if [ -n "${WHEEL:-}" ]; then $PY -m pip install -q --no-deps "$WHEEL" >"$OUT/pip.log" 2>&1 || cat "$OUT/pip.log"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' | tee "$OUT/versions.txt"

if [ "$DEVICE" = cuda ]; then
  COMMON=(--device cuda -b 256 --amp --channels-last)
  ALL=(mobilefacenet mobileone_112_s0 mobileone_112_s1 mobileone_112_s2 mobileone_112_s3 mobileone_112_s4
       mobileone_112_dbb_s0)
  T1=200 T2=170 T3=130 ROUNDS=3 REAL_STEPS=120 WORKERS=12
else  # the script's own check: small and short
  COMMON=(--device cpu -b 8)
  ALL=(mobilefacenet mobileone_112_s0)
  T1=300 T2=300 T3=300 ROUNDS=2 REAL_STEPS=8 WORKERS=2
fi
stage() { echo "== $(date +%T) $*" >&2; }

stage "1: eager, synthetic"
timeout "$T1" $PY benchmarks/train_throughput.py "${COMMON[@]}" --models "${ALL[@]}" --rounds "$ROUNDS" \
  --out "$OUT/1_eager.md" > "$OUT/1_eager.json" 2> "$OUT/1_eager.log"
echo "stage 1 exit $?" >&2

stage "2: compiled, synthetic"
timeout "$T2" $PY benchmarks/train_throughput.py "${COMMON[@]}" --models mobileone_112_s0 --forms merged \
  --compile --rounds "$ROUNDS" --out "$OUT/2_compiled.md" > "$OUT/2_compiled.json" 2> "$OUT/2_compiled.log"
echo "stage 2 exit $?" >&2

stage "3: train.face on real crops"
DATA=()
if [ -n "${FACES:-}" ]; then DATA=(--data "$FACES"); else DATA=(--real); fi
timeout "$T3" $PY benchmarks/train_throughput.py "${COMMON[@]}" --models mobilefacenet mobileone_112_s0 \
  "${DATA[@]}" --rounds 1 --real-steps "$REAL_STEPS" --workers "$WORKERS" --out "$OUT/3_train_face.md" \
  > "$OUT/3_train_face.json" 2> "$OUT/3_train_face.log"
echo "stage 3 exit $?" >&2
cat "$OUT"/*.md >&2

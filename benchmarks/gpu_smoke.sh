#!/usr/bin/env bash
# GPU smoke check: the whole face pipeline on one GPU in a few minutes, on generated data.
#
#   bash benchmarks/gpu_smoke.sh            # on a machine with a CUDA GPU (exit 0 only if every step works)
#   SMOKE_DEVICE=cpu bash benchmarks/gpu_smoke.sh   # the same steps on CPU, small, to check the script itself
#
# Steps: a generated RecordIO pack (256 identities x 32 images, 8,192 aligned 112x112 crops) and a verification
# pack; `torchrun --nproc-per-node=1 -m train.face` with --amp --channels-last --model-ema --head sharded and a
# validation at the end of each epoch; the hub export train.face writes; `python -m eval.lfw` on the exported
# folder; `python -m timm_mobileone.export` of it to ONNX (checked against PyTorch by the exporter). Prints the
# training images/s (median over the logged intervals after the first) and the peak GPU memory of the training
# process, then one JSON line. Needs the project installed (pip install -e '.[test]').
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${SMOKE_DEVICE:-cuda}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
step() { echo "== $*" >&2; }

if [ "$DEVICE" = cuda ]; then
  if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: no CUDA device here (SMOKE_DEVICE=cpu runs the same steps on the CPU)" >&2
    exit 2
  fi
  IDS=256 PER=32 EPOCHS=2 BATCH=128 WORKERS=4 FLAGS="--amp --channels-last"
else  # channels_last training is refused on CPU (oneDNN#6035), and bfloat16 autocast is slow there
  IDS=8 PER=8 EPOCHS=1 BATCH=8 WORKERS=0 FLAGS=""
fi

step "data: $IDS identities x $PER images"
$PY - "$WORK" "$IDS" "$PER" <<'EOF'
import sys
from pathlib import Path
from train.synthetic import identity_images, make_pack, write_rec_pack
work, ids, per = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
write_rec_pack(work / 'pack', identity_images(ids, per, seed=0))
make_pack(work / 'smoke_val.bin', num_pairs=100)
EOF

step "train: torchrun --nproc-per-node=1 -m train.face ($DEVICE)"
t0=$(date +%s)
# shellcheck disable=SC2086  # FLAGS is a list of flags
$PY -m torch.distributed.run --standalone --nproc-per-node=1 -m train.face --data "$WORK/pack" \
  --output "$WORK/run" --val "$WORK/smoke_val.bin" --device "$DEVICE" $FLAGS --model-ema --head sharded \
  --epochs "$EPOCHS" -b "$BATCH" --lr 0.1 --warmup-epochs 0.5 --log-interval 2 -j "$WORKERS" \
  --tag smoke_arcface > "$WORK/train.json"
t_train=$(( $(date +%s) - t0 ))

step "eval.lfw on the exported hub folder"
$PY -m eval.lfw --model "local-dir:$WORK/run/hub" --pretrained --data "$WORK/smoke_val.bin" --device "$DEVICE" \
  --no-progress > "$WORK/lfw.json"

step "timm_mobileone.export to ONNX"
$PY -m timm_mobileone.export --model "local-dir:$WORK/run/hub" --pretrained --onnx "$WORK/smoke.onnx" \
  > "$WORK/export.json" 2> "$WORK/export.log" || { cat "$WORK/export.log" >&2; exit 1; }

$PY - "$WORK" "$DEVICE" "$t_train" <<'EOF'
import json, statistics, sys
from pathlib import Path
work, device, seconds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
train = json.loads((work / 'train.json').read_text().strip().splitlines()[-1])
rows = [json.loads(l) for l in (work / 'run' / 'log.jsonl').read_text().splitlines() if l.strip()]
rates = [r['images_per_second'] for r in rows if 'images_per_second' in r][1:] or [0.0]
lfw = json.loads((work / 'lfw.json').read_text().strip().splitlines()[-1])
onnx = json.loads((work / 'export.json').read_text().strip().splitlines()[-1])
assert train['head']['kind'] == 'sharded' and train['export'] is not None, train
out = dict(device=device, train_images_per_second=round(statistics.median(rates), 1),
           peak_memory_mb=train['peak_memory_mb'], train_seconds=seconds, steps=train['steps'],
           first_loss=train['first_loss'], last_loss=train['last_loss'], best=train['best'],
           lfw_accuracy=lfw['results'][0]['accuracy'] if 'results' in lfw else lfw.get('accuracy'),
           onnx_ops=onnx['ops'], onnx_rel_err=onnx['max_rel_err'])
print(f"train: {out['train_images_per_second']} images/s, peak {'GPU ' if device == 'cuda' else ''}memory "
      f"{out['peak_memory_mb']} MB", file=sys.stderr)
print(json.dumps(out))
EOF

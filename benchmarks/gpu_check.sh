#!/usr/bin/env bash
# The GPU paths in one short script, for a session lent a device machine (see
# /work/.library/device): `bash benchmarks/gpu_check.sh` from the repository root, with
# OUT set to a folder for the figures (default /tmp/gpu_check). It installs into .venv when
# that is missing, then runs, each timed:
#   1. dpl demo (AMP teacher with strong augmentation, cross-fitted polisher, polish, the
#      three students) on 400 generated images, --device $DEVICE;
#   2. the online student (--online, strong augmentation under AMP, evaluation slice);
#   3. dpl polish throughput on the 380 unlabeled images, batch 16;
#   4. resume of an interrupted AMP student (killed after its first checkpoint).
# Every step must exit 0; times and figures go to $OUT/gpu_check.txt. DEVICE, CFG,
# TRAIN_IMAGES, TEST_IMAGES and PERCENT override the defaults (a CPU dry run of the script itself:
# DEVICE=cpu CFG=<a preset with a few iterations> TRAIN_IMAGES=40 TEST_IMAGES=8 PERCENT=25).
set -euo pipefail
OUT=${OUT:-/tmp/gpu_check}
DEVICE=${DEVICE:-cuda}
CFG=${CFG:-benchmarks/configs/gpu_check.yaml}
TRAIN_IMAGES=${TRAIN_IMAGES:-400}
TEST_IMAGES=${TEST_IMAGES:-100}
PERCENT=${PERCENT:-5}
mkdir -p "$OUT"
[ -x .venv/bin/dpl ] || make install >/dev/null
DPL=.venv/bin/dpl
RUN="$OUT/run"
LOG="$OUT/gpu_check.txt"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "$DEVICE"; } | tee "$LOG"
step() {
    local name=$1; shift; local t0=$SECONDS
    if ! "$@" > "$OUT/$name.log" 2>&1; then
        echo "$name: FAILED after $((SECONDS - t0)) s ($OUT/$name.log):" | tee -a "$LOG"
        tail -3 "$OUT/$name.log" | tee -a "$LOG"
        exit 1
    fi
    echo "$name: $((SECONDS - t0)) s" | tee -a "$LOG"
}
step demo $DPL demo --out "$RUN" --config $CFG --train-images $TRAIN_IMAGES --test-images $TEST_IMAGES \
    --percent $PERCENT --device $DEVICE --json "$OUT/demo.json"
step online $DPL train-student --online --run-dir "$RUN" --config $CFG --device $DEVICE \
    --images "$RUN/data/train/images" --unlabeled "$RUN/split/unlabeled.json" \
    --unlabeled-gt "$RUN/split/unlabeled_gt.json" --out "$RUN/student-online.pt" \
    --online-log-every 40 --online-eval-images 50
step polish $DPL polish --run-dir "$RUN" --config $CFG --device $DEVICE \
    --images "$RUN/split/unlabeled.json" --image-root "$RUN/data/train/images" \
    --out "$OUT/labels-throughput.parquet" --batch-size 16
# resume: stop the student after its first checkpoint (iteration 50), then resume it
( timeout 600 $DPL train-student --run-dir "$RUN" --config $CFG --device $DEVICE \
    --images "$RUN/data/train/images" --out "$OUT/student-resume.pt" > "$OUT/resume-1.log" 2>&1 & \
  pid=$!; while [ ! -f "$OUT/student-resume.last.pt" ]; do sleep 1; kill -0 $pid 2>/dev/null || break; done; \
  kill -INT $pid 2>/dev/null || true; wait $pid || true )
step resume $DPL train-student --run-dir "$RUN" --config $CFG --device $DEVICE \
    --images "$RUN/data/train/images" --out "$OUT/student-resume.pt" --resume
grep -h "images/s\|AP" "$OUT/polish.log" "$OUT/online.log" | tail -5 >> "$LOG" || true
cat "$OUT/demo.json" >> "$LOG"
echo "all GPU steps passed" | tee -a "$LOG"

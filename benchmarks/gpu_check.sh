#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in ONE command (about 8 minutes on one
# H100/H200), so that a session lent a device spends its 15 minutes measuring, not preparing:
#   1. the CUDA-only tests (pytest -m gpu)
#   2. bench_speed.py on Inception v3 Mixed_7c (299 px) and EfficientNet-Lite0 _blocks.10 (224 px):
#      eager fp32 at B = 1, 12, 64 (notes' loop, Lucent, featsweep, both floors, Lucent defaults vs
#      featsweep fft + transforms), compiled and CUDA graphs at B = 12, bf16 at B = 12 and 64 with
#      bf16's effect on the final activations
#   3. the notes' 12-run sweep (experiment=seed_notes) at 10,000 steps, timed end to end
# Every table and log goes to OUT_DIR (default: $OUT, the device tool's output folder).
#
# On the device (after `bash ../shared/gpu/wheels.sh .whl torch-lucent==0.1.8 decorator` here and
# carry: [".whl"]; see BENCHMARKS.md):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#     export PYTHONPATH=$PWD/src:/tmp/site; bash benchmarks/gpu_check.sh "$OUT"
# CPU dry run (tiny sizes, every step of the script; tests/test_gpu_check.py runs it):
#   FEATSWEEP_GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh /tmp/gpu_check
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
dry=${FEATSWEEP_GPU_CHECK_DRY:-0}
py=${PYTHON:-python3}
start=$(date +%s)
status=0

step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, log to $out/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee -a "$out/summary.md"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc after $(( $(date +%s) - t0 ))s" | tee -a "$out/summary.md"
  [ $rc -eq 0 ] || status=1
}

: >"$out/summary.md"
{ echo "# gpu_check $(date -u +%FT%TZ) dry=$dry"; nvidia-smi -L 2>/dev/null || echo "no nvidia-smi";
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"; } \
  >>"$out/summary.md" 2>&1

if [ "$dry" = 1 ]; then
  dev=cpu
  inception=(--model tiny --layer block3 --size 32 --steps 2 --warmup 1 --threads 1)
  effnet=(--model tiny --layer block3 --size 32 --steps 2 --warmup 1 --threads 1)
  batches=4; batch12=4
  sweep=(model=tiny model.weights=random image.size=32 steps=3 target.layer=block3 target.channel=3 log_every=1)
  limit_bench=120; limit_sweep=120
  nets=(inception)  # the dry run checks the script, not the numbers: one network, no compile
else
  dev=cuda
  inception=(--model inception_v3 --weights random --layer Mixed_7c --size 299)
  effnet=(--model efficientnet_lite0 --layer _blocks.10 --size 224)
  batches=12,64; batch12=12
  sweep=(model.weights=random)  # Inception ImageNet weights are not on the device: same cost
  limit_bench=110; limit_sweep=240
  nets=(inception effnet)
fi

step gpu_tests 90 $py -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
for net in "${nets[@]}"; do
  declare -n args=$net
  step "${net}_eager" "$limit_bench" $py benchmarks/bench_speed.py "${args[@]}" --device "$dev" \
    --batches "$batches" --methods notes,lucent,featsweep,batched,floor,floor_cl,lucent_fft,fft \
    --json "$out/${net}_eager.json"
  if [ "$dev" = cuda ]; then
    step "${net}_compiled" "$limit_bench" $py benchmarks/bench_speed.py "${args[@]}" --device cuda \
      --batches "$batch12" --methods batched,compiled,graphs,floor_cl --json "$out/${net}_compiled.json"
    step "${net}_bf16" 60 $py benchmarks/bench_speed.py "${args[@]}" --device cuda \
      --batches "$batches" --methods batched,bf16,floor_cl --json "$out/${net}_bf16.json"
  fi
done
# The notes' twelve runs end to end (Hydra, batched launcher, files): the 2-minute goal.
sweep_t0=$(date +%s)
step notes_sweep "$limit_sweep" $py -m featsweep experiment=seed_notes device="$dev" "${sweep[@]}" \
  "hydra.sweep.dir=$out/seed_notes"
echo "   notes' 12-run sweep wall time: $(( $(date +%s) - sweep_t0 ))s" | tee -a "$out/summary.md"
grep -h "ms/image-step" "$out/notes_sweep.log" | tail -1 >>"$out/summary.md" || true

for f in "$out"/*_eager.log "$out"/*_compiled.log "$out"/*_bf16.log; do
  [ -f "$f" ] || continue
  { echo; echo "## $(basename "$f" .log)"; grep -E "^\||^- |^[A-Za-z].* px," "$f"; } >>"$out/summary.md"
done
echo "total $(( $(date +%s) - start ))s, status $status" | tee -a "$out/summary.md"
exit $status

#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md ("One GPU" tables) in one bounded call, from a clone.
#
#   bash bench/gpu_session.sh [DEADLINE_S]             # default 500 s for all stages together
#   STAGES='train compile' bash bench/gpu_session.sh   # only the named stages
#
# Inputs: one CUDA GPU; a Python with tgdp's dependencies (`bash .ci/setup.sh`, or
# `pip install -e '.[dev]'`; PYTHON picks the interpreter, default python3; an extra PYTHONPATH is
# kept). SHARDS: base-resolution shards to train on; when SHARDS has no index.json, the script
# writes 32 synthetic clips and shards them there (8 shards, default runs/gpu_shards, ~1 minute).
# Optional: STAGES, PROFILE_VARIANTS, TRAIN_BACKENDS, TRAIN_OVERRIDES, RESUME_BACKENDS (below).
# Outputs: one log per stage, gpu.txt (GPU, driver, torch, CUDA, DeepSpeed versions), profile.json
# and the trainers' metrics under OUT (default ./gpu_out); a summary at the end on stdout.
# Stages:
#   0. (first) bench/profile_step.py: the trainer's step without the loader, per variant
#      (PROFILE_VARIANTS='a=1 b=2;c=3' replaces the list): device-busy %, kernel time by kind, memory.
#   1. bench_step, base, batch 64: ours in bf16 vs the official-style passes under fp16 autocast
#      (the official recipe) and under bf16 (same precision); ours eager, then compiled (--compile).
#   2. bench_train, base, bf16, one GPU: every backend through the real trainer (NCCL group of one
#      for ddp / fsdp2 / zero2 / zero3), samples/s and MFU vs the bf16 dense peak.
#   3. tiny preset on CUDA + NCCL per RESUME_BACKENDS (default fsdp2 zero2 zero3): 10 steps with
#      checkpoints, then a re-run that resumes.
#   3b. loader_long: batch 256, compiled passes, 60 steps (does the loader keep up in steady state?).
#   4. bench_train fsdp2 with parallel.compile=true (torch.compile per block), if time is left.
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE=${1:-500}
OUT=${OUT:-$PWD/gpu_out}
SHARDS=${SHARDS:-runs/gpu_shards}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
START=$SECONDS
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 DS_BUILD_OPS=0
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null ||
  { echo "no CUDA device visible to $PYTHON: this script measures GPUs only"; exit 1; }
if [ ! -f "$SHARDS/index.json" ]; then
  echo "== writing 32 synthetic clips and their shards to $SHARDS"
  "$PYTHON" data_tools/make_synthetic.py --output "$SHARDS.src" --num-clips 32 > "$OUT/shards.log" 2>&1 &&
  "$PYTHON" data_tools/make_shards.py --input "$SHARDS.src/manifest.csv" --output "$SHARDS" max_samples_per_shard=4 >> "$OUT/shards.log" 2>&1 ||
  { echo "building shards failed, see $OUT/shards.log"; exit 1; }
fi

left() { echo $(( DEADLINE - (SECONDS - START) )); }
stage() {  # stage NAME MAX_S CMD...: run with min(MAX_S, time left) seconds; log to $OUT/NAME.log
  local name=$1 max=$2; shift 2
  if [ -n "${STAGES:-}" ] && [[ " $STAGES " != *" $name "* ]]; then return; fi
  local t; t=$(left); [ "$t" -gt "$max" ] && t=$max
  if [ "$t" -lt 20 ]; then echo "== $name: skipped (${t}s left)"; return; fi
  echo "== $name (limit ${t}s, $(( SECONDS - START ))s elapsed)"
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? after $(( SECONDS - START ))s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch, deepspeed, omegaconf, webdataset; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'deepspeed', deepspeed.__version__, torch.cuda.get_device_name(0))" 2>&1 | grep -v Warning | tee -a "$OUT/gpu.txt"

# Profile variants: whole-pass compilation on the bf16 stream at batch 128, the same with the
# non-finite guard read on the host every step (nonfinite_guard=host), DDP (one rank) for the ratio
# to DDP, batch 256, then FSDP2 with per-block graphs (its only compile scope).
PASS='parallel.compile=true parallel.compile_scope=pass'
VARIANTS=(--variant "parallel.backend=none data.batch_size=128 $PASS"
          --variant "parallel.backend=none data.batch_size=128 $PASS nonfinite_guard=host"
          --variant "parallel.backend=ddp data.batch_size=128 $PASS"
          --variant "parallel.backend=none data.batch_size=256 $PASS" --variant "parallel.backend=fsdp2 data.batch_size=128 parallel.compile=true")
[ -n "${PROFILE_VARIANTS:-}" ] && IFS=';' read -r -a V <<< "$PROFILE_VARIANTS" && VARIANTS=() \
  && for v in "${V[@]}"; do VARIANTS+=(--variant "$v"); done
stage profile 300 "$PYTHON" bench/profile_step.py --shards "$SHARDS" --preset base --device cuda --batch 64 \
  --json "$OUT/profile.json" "${VARIANTS[@]}"
stage step_fp16 110 "$PYTHON" bench/bench_step.py --device cuda --dtype bf16 --naive-dtype fp16 --batch 64 --repeats 10
stage step_compile 200 "$PYTHON" bench/bench_step.py --device cuda --dtype bf16 --naive-dtype fp16 --batch 64 --repeats 10 --compile
stage train 240 "$PYTHON" bench/bench_train.py --device cuda --dtype bf16 --presets base --nproc 1 \
  --backends "${TRAIN_BACKENDS:-none,ddp,fsdp2,zero2,zero3}" --shards "$SHARDS" --no-memory --steps 30 \
  --warmup 10 --log-every 10 --log-dir "$OUT" --override data.num_workers=12 ${TRAIN_OVERRIDES:-}
# Checkpoint + resume on CUDA, bf16, NCCL, per backend in RESUME_BACKENDS (fsdp2 by default): 10
# steps with a checkpoint every 5, then the same command with --steps 20 resumes from step 10.
for backend in ${RESUME_BACKENDS:-fsdp2 zero2 zero3}; do
  RUN=/tmp/tgdp_gpu_resume_$backend
  rm -rf "$RUN"
  RESUME=("$PYTHON" -m torch.distributed.run --nproc_per_node 1 --master_port 29533 tgdp/train.py --config tiny
          --run-dir "$RUN" --shards "$SHARDS" device=cuda parallel.mixed_precision=bf16 checkpoint.every_steps=5
          logging.wandb=false logging.log_every=5 data.batch_size=16 parallel.backend=$backend)
  stage "resume_a_$backend" 60 "${RESUME[@]}" --steps 10
  stage "resume_b_$backend" 60 "${RESUME[@]}" --steps 20
  ls "$RUN/checkpoints" > "$OUT/resume_checkpoints_$backend.txt" 2>&1
  cp "$RUN/metrics.jsonl" "$OUT/resume_metrics_$backend.jsonl" 2>/dev/null
done
# The loader over a longer run (30-step runs are dominated by worker start-up) at batch 256 with
# compiled passes (~1,070 samples/s to feed on an H200).
stage loader_long 180 "$PYTHON" bench/bench_train.py --device cuda --dtype bf16 --presets base --nproc 1 \
  --backends none --shards "$SHARDS" --no-memory --steps 60 --warmup 20 --log-every 10 --batch 256 --log-dir "$OUT" \
  --override data.num_workers=14 --override data.samples_per_epoch=100000 --override parallel.compile=true \
  --override parallel.compile_scope=pass
stage step_bf16 80 "$PYTHON" bench/bench_step.py --device cuda --dtype bf16 --naive-dtype bf16 --batch 64 --repeats 10
stage compile 150 "$PYTHON" bench/bench_train.py --device cuda --dtype bf16 --presets base --nproc 1 \
  --backends fsdp2 --shards "$SHARDS" --no-memory --steps 30 --warmup 10 --log-every 10 --log-dir "$OUT" \
  --override data.num_workers=6 --override parallel.compile=true

echo "== summary ($(( SECONDS - START ))s)"
grep -E "^== |MFU |device busy|host syncs|^ +[0-9]+x " "$OUT/profile.log" 2>/dev/null
for f in step_fp16 step_compile step_bf16; do grep -E "^model=|speed-up|achieved|step time|loss " "$OUT/$f.log" 2>/dev/null; done
grep -E "^\| base|MFU peak|FAILED" "$OUT/train.log" "$OUT/compile.log" "$OUT/loader_long.log" 2>/dev/null
for f in "$OUT"/resume_checkpoints_*.txt; do [ -f "$f" ] && echo "$f:" && cat "$f"; done
for f in "$OUT"/resume_b_*.log; do [ -f "$f" ] && tail -3 "$f"; done

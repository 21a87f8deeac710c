#!/usr/bin/env bash
# Issue 18 on one GPU: the default run (MiniLM, the defaults' 4,000 / 2,000 reviews, CUDA graphs) uninterrupted, and
# the same run stopped by SIGTERM inside epoch 2 and resumed with --resume.
#   bash benchmarks/gpu_checks.sh MODEL TRAIN.parquet TEST.parquet OUT
# (The FSDP runs of issue 19 are in this script as of commit f468bb0; FSDP is refused since: benchmarks/NOTES.md.)
set -uo pipefail
model=$1 train=$2 test=$3 out=$4
script="$(cd "$(dirname "$0")" && pwd)/../peft_qlora.py"
common=(--model "$model" --train-file "$train" --eval-file "$test")
mkdir -p "$out"
python3 "$script" "${common[@]}" --output-dir "$out/plain" --images-dir "$out/plain/images" > "$out/plain.log" 2>&1 &
# Stopped once checkpoint-150 (epoch 2 of 125 steps) is whole, then resumed
python3 "$script" "${common[@]}" --save-steps 25 --output-dir "$out/plain_stopped" \
  --images-dir "$out/plain_stopped/images" > "$out/plain_stopped.log" 2>&1 &
pid=$!
until [ -f "$out/plain_stopped/checkpoints/checkpoint-150/trainer_state.json" ] || ! kill -0 $pid 2>/dev/null; do
  sleep 0.2
done
kill -TERM $pid; wait $pid; echo "stopped: status $?"
python3 "$script" "${common[@]}" --resume --output-dir "$out/plain_stopped" --images-dir "$out/plain_stopped/images" \
  > "$out/plain_stopped.resume.log" 2>&1
echo "resumed: status $?"
wait
for log in "$out"/*.log; do
  echo "== $log"; tr '\r' '\n' < "$log" | grep -E "^(Training steps|Before|Epoch|After|Trained|Resuming|stopped|error)"
done

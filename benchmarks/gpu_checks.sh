#!/usr/bin/env bash
# Issues 18 and 19 on one GPU: a run stopped by SIGTERM inside an epoch and resumed, with CUDA graphs and under FSDP,
# against the same runs uninterrupted; FSDP at one process against the plain run (MiniLM, the defaults' 4,000 /
# 2,000 reviews); FSDP in fp16; a Llama-3-8B-shaped model under FSDP at one process, capped at a T4's 15 GiB.
#   bash benchmarks/gpu_checks.sh MODEL TRAIN.parquet TEST.parquet OUT [all|fsdp]   # all: also FSDP in fp16 and
#   the 8B shape; fsdp: the FSDP runs of MiniLM only
set -uo pipefail
model=$1 train=$2 test=$3 out=$4 more=${5:-}
here=$(cd "$(dirname "$0")" && pwd)
script="$here/../peft_qlora.py"
fsdp=(python3 -m accelerate.commands.launch --config_file "$here/../fsdp.yaml" --num_processes 1)
common=(--model "$model" --train-file "$train" --eval-file "$test")
mkdir -p "$out"

stop_inside_epoch_2() {  # NAME COMMAND...: start it, SIGTERM it once checkpoint-150 (epoch 2 of 125 steps) is whole
  local name=$1; shift
  "$@" --save-steps 25 --output-dir "$out/$name" --images-dir "$out/$name/images" > "$out/$name.log" 2>&1 &
  local pid=$!
  until [ -f "$out/$name/checkpoints/checkpoint-150/trainer_state.json" ] || ! kill -0 $pid 2>/dev/null; do sleep 0.2; done
  kill -TERM $pid; wait $pid; echo "$name stopped: status $?"
  "$@" --resume --output-dir "$out/$name" --images-dir "$out/$name/images" > "$out/$name.resume.log" 2>&1
  echo "$name resumed: status $?"
}
[ "$more" = fsdp ] || python3 "$script" "${common[@]}" --output-dir "$out/plain" --images-dir "$out/plain/images" > "$out/plain.log" 2>&1 &
"${fsdp[@]}" "$script" "${common[@]}" --output-dir "$out/fsdp" --images-dir "$out/fsdp/images" > "$out/fsdp.log" 2>&1 &
[ "$more" = fsdp ] || stop_inside_epoch_2 plain_stopped python3 "$script" "${common[@]}" &
stop_inside_epoch_2 fsdp_stopped "${fsdp[@]}" --main_process_port 29501 "$script" "${common[@]}" &
wait
if [ "$more" = all ]; then
  "${fsdp[@]}" "$script" "${common[@]}" --precision fp16 --train-size 1000 --eval-size 500 --epochs 1 \
    --output-dir "$out/fsdp_fp16" --images-dir "$out/fsdp_fp16/images" > "$out/fsdp_fp16.log" 2>&1 &
  python3 "$here/llama8b.py" make /tmp/llama8b > "$out/llama8b_make.log" 2>&1
  "${fsdp[@]}" "$here/llama8b.py" train /tmp/llama8b -- --train-file "$train" --eval-file "$test" --train-size 256 \
    --eval-size 64 --epochs 1 --output-dir "$out/llama8b_fsdp" --images-dir "$out/llama8b_fsdp/images" \
    > "$out/llama8b_fsdp.log" 2>&1
  wait
fi
for log in "$out"/*.log; do
  echo "== $log"; tr '\r' '\n' < "$log" | grep -E "^(FSDP|Batches|Training steps|Before|Epoch|After|Trained|Resuming|Kept|stopped|error)|Error|\"peak" | head -20
done

#!/usr/bin/env bash
# The GPU checks of issues 18 and 19, on one GPU (benchmarks/NOTES.md):
#   bash benchmarks/gpu_checks.sh MODEL TRAIN.parquet TEST.parquet OUT [resume|fsdp|fsdp8b]
# resume (issue 18): the default run (MiniLM, the defaults' 4,000 / 2,000 reviews, CUDA graphs) uninterrupted, and
#   the same run stopped by SIGTERM inside epoch 2 and resumed with --resume.
# fsdp (issue 19): the default run plain and under FSDP at one process (accelerate launch --config_file fsdp.yaml),
#   each saved model then read back by predict --file on all of TEST; and FSDP with --precision fp16 (1 epoch).
# fsdp8b (issue 19): the Llama-3-8B shape (benchmarks/llama8b.py, made in /tmp/llama8b; MODEL unused), plain and
#   under FSDP at one process, each capped at a T4's 15 GiB.
set -uo pipefail
model=$1 train=$2 test=$3 out=$4 mode=${5:-resume}
here="$(cd "$(dirname "$0")" && pwd)"
script="$here/../peft_qlora.py"
fsdp=(python3 -m accelerate.commands.launch --config_file "$here/../fsdp.yaml" --num_processes 1)
common=(--model "$model" --train-file "$train" --eval-file "$test")
mkdir -p "$out"

read_back() {  # accuracy of a saved model's predictions on all of TEST, through the predict command
  python3 "$script" predict --file "$test" --output "$out/$1.predictions.csv" --model-dir "$out/$1/model" \
    > "$out/$1.predict.log" 2>&1
  python3 -c "import pandas as pd; p = pd.read_csv('$out/$1.predictions.csv'); t = pd.read_parquet('$test')
names = {0: 'neg', 1: 'pos'}
print('$1 read back by predict --file:', len(p), 'reviews, accuracy', round((p.label == t.label.map(names)).mean(), 4))"
}

if [ "$mode" = resume ]; then
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
elif [ "$mode" = fsdp ]; then
  python3 "$script" "${common[@]}" --output-dir "$out/plain" --images-dir "$out/plain/images" > "$out/plain.log" 2>&1 &
  "${fsdp[@]}" "$script" "${common[@]}" --output-dir "$out/fsdp" --images-dir "$out/fsdp/images" > "$out/fsdp.log" 2>&1 &
  "${fsdp[@]}" --main_process_port 29501 "$script" "${common[@]}" --precision fp16 --epochs 1 \
    --output-dir "$out/fsdp_fp16" --images-dir "$out/fsdp_fp16/images" > "$out/fsdp_fp16.log" 2>&1 &
  wait
  for run in plain fsdp fsdp_fp16; do read_back $run & done
elif [ "$mode" = fsdp8b ]; then
  [ -f /tmp/llama8b/config.json ] || python3 "$here/llama8b.py" make /tmp/llama8b
  flags=(--train-file "$train" --eval-file "$test" --train-size 256 --eval-size 64 --epochs 1)
  python3 "$here/llama8b.py" train /tmp/llama8b -- "${flags[@]}" --output-dir "$out/llama8b_plain" \
    --images-dir "$out/llama8b_plain/images" > "$out/llama8b_plain.log" 2>&1 &
  "${fsdp[@]}" "$here/llama8b.py" train /tmp/llama8b -- "${flags[@]}" --output-dir "$out/llama8b_fsdp" \
    --images-dir "$out/llama8b_fsdp/images" > "$out/llama8b_fsdp.log" 2>&1 &
fi
wait
for log in "$out"/*.log; do
  echo "== $log"
  tr '\r' '\n' < "$log" | grep -E "^(FSDP|Batches|Training steps|Before|Epoch|After|Trained|Resuming|stopped|error|Saved)|Error|\"peak"
done

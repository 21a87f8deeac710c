#!/usr/bin/env bash
# The GPU checks of issues 18 and 19, on one GPU (benchmarks/NOTES.md):
#   bash benchmarks/gpu_checks.sh MODEL TRAIN.parquet TEST.parquet OUT [resume|fsdp|fsdp8b|fsdpflags]
# resume (issue 18): the default run (MiniLM, the defaults' 4,000 / 2,000 reviews, CUDA graphs) uninterrupted, and
#   the same run stopped by SIGTERM inside epoch 2 and resumed with --resume.
# fsdp (issue 19): the default run plain and under FSDP at one process (accelerate launch --config_file fsdp.yaml)
#   for each seed of SEEDS (default 42), the saved models of seed 42 then read back by predict --file on all of TEST;
#   FSDP with --precision fp16 (1 epoch); the FSDP run stopped inside epoch 2 and resumed, as in resume.
#   PLAIN_FLAGS="--fast-path off": the plain runs step eagerly, as FSDP's do (folders plain_eager_seed*).
# fsdp8b (issue 19): the Llama-3-8B shape (benchmarks/llama8b.py, made in /tmp/llama8b; MODEL unused), plain and
#   under FSDP at one process, each capped at a T4's 15 GiB.
# fsdpflags (issue 19): FSDP at one process and plain (eager) with each of --validation-size 400, --batching tokens
#   and --fast-path compiled.
set -uo pipefail
model=$1 train=$2 test=$3 out=$4 mode=${5:-resume}
here="$(cd "$(dirname "$0")" && pwd)"
script="$here/../peft_qlora.py"
fsdp=(python3 -m accelerate.commands.launch --config_file "$here/../fsdp.yaml" --num_processes 1)
common=(--model "$model" --train-file "$train" --eval-file "$test")
mkdir -p "$out"

read_back() {  # NAME: the accuracy of that run's saved model on all of TEST, through the predict command
  python3 "$script" predict --file "$test" --output "$out/$1.predictions.csv" --model-dir "$out/$1/model" \
    > "$out/$1.predict.log" 2>&1
  python3 -c "import csv; rows = list(csv.DictReader(open('$out/$1.predictions.csv')))
right = sum(row['predicted_label'] == ('neg', 'pos')[int(row['label'])] for row in rows)
print('$1 read back by predict --file:', len(rows), 'reviews, accuracy', round(right / len(rows), 4))"
  rm "$out/$1.predictions.csv"
}

stop_inside_epoch_2() {  # NAME COMMAND...: the run stopped by SIGTERM once checkpoint-150 (epoch 2 of 125 steps)
  # is whole, then resumed with --resume
  local name=$1; shift
  "$@" --save-steps 25 --output-dir "$out/$name" --images-dir "$out/$name/images" > "$out/$name.log" 2>&1 &
  local pid=$!
  until [ -f "$out/$name/checkpoints/checkpoint-150/trainer_state.json" ] || ! kill -0 $pid 2>/dev/null; do
    sleep 0.2
  done
  kill -TERM $pid; wait $pid; echo "$name stopped: status $?"
  "$@" --resume --output-dir "$out/$name" --images-dir "$out/$name/images" > "$out/$name.resume.log" 2>&1
  echo "$name resumed: status $?"
}

if [ "$mode" = resume ]; then
  python3 "$script" "${common[@]}" --output-dir "$out/plain" --images-dir "$out/plain/images" > "$out/plain.log" 2>&1 &
  stop_inside_epoch_2 plain_stopped python3 "$script" "${common[@]}"
elif [ "$mode" = fsdp ]; then
  port=29500
  plain=plain${PLAIN_FLAGS:+_eager}
  for seed in ${SEEDS-42}; do
    python3 "$script" "${common[@]}" ${PLAIN_FLAGS-} --seed $seed --output-dir "$out/${plain}_seed$seed" \
      --images-dir "$out/${plain}_seed$seed/images" > "$out/${plain}_seed$seed.log" 2>&1 &
    port=$((port + 1))  # each launch its own (an expansion inside a background command would not count up here)
    "${fsdp[@]}" --main_process_port $port "$script" "${common[@]}" --seed $seed \
      --output-dir "$out/fsdp_seed$seed" --images-dir "$out/fsdp_seed$seed/images" > "$out/fsdp_seed$seed.log" 2>&1 &
  done
  "${fsdp[@]}" --main_process_port $((port + 1)) "$script" "${common[@]}" --precision fp16 --epochs 1 \
    --output-dir "$out/fsdp_fp16" --images-dir "$out/fsdp_fp16/images" > "$out/fsdp_fp16.log" 2>&1 &
  stop_inside_epoch_2 fsdp_stopped "${fsdp[@]}" --main_process_port $((port + 2)) "$script" "${common[@]}" &
  wait
  for run in ${plain}_seed42 fsdp_seed42 fsdp_fp16; do [ -d "$out/$run/model" ] && read_back $run & done
elif [ "$mode" = fsdpflags ]; then
  port=29510
  for flags in "--validation-size 400" "--batching tokens" "--fast-path compiled"; do
    name=$(echo "$flags" | tr -d '-' | tr ' ' '_')
    python3 "$script" "${common[@]}" --fast-path off $flags --output-dir "$out/plain_$name" \
      --images-dir "$out/plain_$name/images" > "$out/plain_$name.log" 2>&1 &
    port=$((port + 1))
    "${fsdp[@]}" --main_process_port $port "$script" "${common[@]}" $flags --output-dir "$out/fsdp_$name" \
      --images-dir "$out/fsdp_$name/images" > "$out/fsdp_$name.log" 2>&1 &
  done
elif [ "$mode" = fsdp8b ]; then
  [ -f /tmp/llama8b/config.json ] || python3 "$here/llama8b.py" make /tmp/llama8b
  flags=(--train-file "$train" --eval-file "$test" --train-size 256 --eval-size 64 --epochs 1)
  python3 "$here/llama8b.py" train /tmp/llama8b -- "${flags[@]}" --output-dir "$out/llama8b_plain" \
    --images-dir "$out/llama8b_plain/images" > "$out/llama8b_plain.log" 2>&1 &
  "${fsdp[@]}" --main_process_port 29601 "$here/llama8b.py" train /tmp/llama8b -- "${flags[@]}" \
    --output-dir "$out/llama8b_fsdp" --images-dir "$out/llama8b_fsdp/images" > "$out/llama8b_fsdp.log" 2>&1 &
fi
wait
for log in "$out"/*.log; do
  echo "== $log"
  tr '\r' '\n' < "$log" | grep -E "^(Model:|FSDP|Batches|Training steps|Compiling|Before|Validation before|Epoch|Kept|After|Trained|Resuming|stopped|error|Saved)|Error|\"peak"
done

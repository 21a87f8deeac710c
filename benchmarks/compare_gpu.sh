#!/usr/bin/env bash
# Two versions of the script side by side on one GPU, in one call (benchmarks/NOTES.md):
#   bash benchmarks/compare_gpu.sh OTHER MODEL TRAIN.parquet TEST.parquet OUT
# OTHER is a checkout of the other version (its peft_qlora.py and benchmarks/). First, at the same time: the default
# run (MODEL, the defaults' 4,000 / 2,000 reviews, 3 epochs) of each version, and this version's under FSDP at one
# process (accelerate launch --config_file fsdp.yaml), each saved model read back by predict --file. Then, one after
# the other: benchmarks/bench.py's QLoRA mode (bert-base shape: the fixed-shape step and an epoch of 4,000 reviews)
# of OTHER, then this version, ROUNDS times (default 2). Prints each run's accuracy and each bench's figures.
set -uo pipefail
other=$1 model=$2 train=$3 test=$4 out=$5
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$out"
common=(--model "$model" --train-file "$train" --eval-file "$test")
run() {  # NAME SCRIPT [launcher...]: the default run, then its saved model read back on all of TEST
  local name=$1 script=$2; shift 2
  "$@" "$script" "${common[@]}" --output-dir "$out/$name" --images-dir "$out/$name/images" > "$out/$name.log" 2>&1
  python3 "$script" predict --file "$test" --output "$out/$name.csv" --model-dir "$out/$name/model" \
    > "$out/$name.predict.log" 2>&1
  python3 -c "import csv, json; rows = list(csv.DictReader(open('$out/$name.csv')))
m = json.load(open('$out/$name/model/metrics.json'))
right = sum(row['predicted_label'] == ('neg', 'pos')[int(row['label'])] for row in rows)
print('$name: accuracy before', m['before']['accuracy'], 'after', m['after']['accuracy'], 'per epoch',
      [h['accuracy'] for h in m['history']], 'training', round(m['training']['train_runtime_s'], 1), 's,',
      m['training'].get('cuda_graphs'), '; read back by predict --file:', len(rows), 'reviews, accuracy',
      round(right / len(rows), 4))"
}
run other "$other/peft_qlora.py" &
run this "$here/../peft_qlora.py" &
run this_fsdp "$here/../peft_qlora.py" python3 -m accelerate.commands.launch --config_file "$here/../fsdp.yaml" \
  --num_processes 1 &
wait
versions=(); for round in $(seq "${ROUNDS:-2}"); do versions+=("other_$round" "this_$round"); done
for version in "${versions[@]}"; do
  bench="$here/bench.py"; case $version in other*) bench="$other/benchmarks/bench.py";; esac
  python3 "$bench" --data "$train" --modes qlora --epoch-reviews 4000 --predict-reviews 2000 \
    --out "$out/bench_$version.json" > "$out/bench_$version.log" 2>&1
  python3 -c "import json; q = json.load(open('$out/bench_$version.json'))['modes']['qlora']
print('bench $version:', q['reviews_per_s'] and round(q['reviews_per_s'], 1), 'reviews/s fixed shape, step',
      round(q['step_wall_ms'], 1), 'ms wall /', round(q['step_kernel_ms'], 1), 'ms kernels; epoch of 4,000:',
      round(q['epoch_s'], 2), 's,', round(q['epoch_reviews_per_s'], 1), 'reviews/s; predict()',
      round(q['predict_reviews_per_s'], 1), 'reviews/s; evaluation', round(q['evaluation_reviews_per_s'], 1))"
done

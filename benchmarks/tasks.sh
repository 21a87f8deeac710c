#!/usr/bin/env bash
# Issue 17's results: each task shape trained on all of IMDb, QLoRA (peft_qlora.py's defaults) against full
# fine-tuning of the same checkpoint (benchmarks/full_finetune.py, learning rate 3e-5), the six runs side by side on
# one GPU (their accuracy is what is compared; their times, sharing the GPU, are not).
#   regression:  the 1-10 star rating of each review (--label-column rating --task regression)
#   pairs:       two reviews, the same sentiment or not (benchmarks/imdb_tasks.py)
#   multi-label: pos or neg, and strong at the scale's ends (benchmarks/imdb_tasks.py)
#
#   bash benchmarks/tasks.sh MODEL TRAIN.parquet TEST.parquet OUT [flags for every run, e.g. --train-size 4000]
#   TASKS="pairs" bash benchmarks/tasks.sh ...   # some of the tasks only
#
# Writes OUT/{qlora,full}_{regression,pairs,multi-label}/metrics.json (QLoRA's inside model/) and OUT/*.log.
set -euo pipefail
model=$1 train=$2 test=$3 out=$4
shift 4
here=$(cd "$(dirname "$0")" && pwd)
python "$here/imdb_tasks.py" "$train" "$test" --out "$out/data"
declare -A task_flags=(
  [regression]="--train-file $train --eval-file $test --label-column rating --task regression"
  [pairs]="--train-file $out/data/pairs_train.parquet --eval-file $out/data/pairs_test.parquet --text-column text text_pair"
  [multi-label]="--train-file $out/data/multilabel_train.parquet --eval-file $out/data/multilabel_test.parquet --label-column labels"
)
for task in ${TASKS:-regression pairs multi-label}; do
  # shellcheck disable=SC2086  # the flags split into words on purpose
  python "$here/../peft_qlora.py" --model "$model" ${task_flags[$task]} --train-size all --eval-size all \
    --output-dir "$out/qlora_$task" --images-dir "$out/qlora_$task/images" "$@" > "$out/qlora_$task.log" 2>&1 &
  # shellcheck disable=SC2086
  python "$here/full_finetune.py" --model "$model" ${task_flags[$task]} --train-size all --eval-size all \
    --learning-rate 3e-5 --output-dir "$out/full_$task" "$@" > "$out/full_$task.log" 2>&1 &
done
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
exit $status

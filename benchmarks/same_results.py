"""Does a version of peft_qlora.py train exactly what another did? Each task shape, trained on the CPU, compared bit
for bit.

    python benchmarks/same_results.py run --script peft_qlora.py --model MODEL --out OUT     # the four runs
    python benchmarks/same_results.py compare OUT_A OUT_B                                   # exit status 1 if they differ

`run` trains MODEL (a small pretrained one: ../shared/models/minilm-l6-h384-uncased) with SCRIPT on the real reviews
committed in tests/data, one short run per task shape: one label per text, multi-label (each review's labels from
its rating, as benchmarks/imdb_tasks.py builds them), regression of the rating, and pairs of reviews (the same
sentiment or not, as imdb_tasks.py pairs them); 64 training and 32 test texts, 128 tokens, one epoch, and balanced
class weights where the task has classes. Each run's model folder lands in OUT/TASK/. `compare` says, for each task,
whether the trained weights (adapter_model.safetensors) are equal bit for bit and whether the test metrics before
and after training and the per-epoch history are equal (their timings aside).
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(os.path.dirname(HERE), "tests", "data")
TASKS = {
    "classification": ["--class-weights", "balanced"],
    "multi-label": ["--label-column", "labels", "--class-weights", "balanced"],
    "regression": ["--label-column", "rating", "--task", "regression"],
    "pairs": ["--text-column", "text", "text_pair", "--class-weights", "balanced"],
}
TIMINGS = {"runtime_s", "samples_per_s", "eval_runtime_s"}


def task_files(out: str, train: int, test: int) -> dict:
    """OUT/data/TASK_{train,test}.parquet for each task, from the first rows of the committed reviews."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, HERE)
    from imdb_tasks import pairs, rating_labels

    folder = os.path.join(out, "data")
    os.makedirs(folder, exist_ok=True)
    files = {}
    for split, n in (("train", train), ("test", test)):
        rows = pq.read_table(os.path.join(DATA, f"imdb_{split}.parquet")).slice(0, n).to_pydict()
        rows["labels"] = [rating_labels(r) for r in rows["rating"]]
        rows["rating"] = [int(r) for r in rows["rating"]]
        tables = {"single": pa.table({k: rows[k] for k in ("text", "label", "labels", "rating")}),
                  "pairs": pa.table(pairs(rows["text"], rows["label"], seed=0))}
        for name, table in tables.items():
            files[name, split] = os.path.join(folder, f"{name}_{split}.parquet")
            pq.write_table(table, files[name, split])
    return files


def run(args) -> int:
    files = task_files(args.out, args.train, args.test)
    status = 0
    for task, flags in TASKS.items():
        data = "pairs" if task == "pairs" else "single"
        folder = os.path.join(args.out, task)
        command = [sys.executable, args.script, "--model", args.model, "--train-file", files[data, "train"],
                   "--eval-file", files[data, "test"], "--train-size", "all", "--eval-size", "all", "--epochs", "1",
                   "--max-length", "128", "--batch-size", "8", "--output-dir", folder, "--images-dir",
                   os.path.join(folder, "images"), "--overwrite", *flags]
        done = subprocess.run(command, capture_output=True, text=True)
        with open(os.path.join(args.out, f"{task}.log"), "w") as f:
            f.write(" ".join(command) + "\n" + done.stdout + done.stderr)
        print(f"{task}: exit status {done.returncode}")
        status = status or done.returncode
    return status


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def compare(args) -> int:
    import torch
    from safetensors.torch import load_file

    differ = False
    for task in TASKS:
        folders = [os.path.join(out, task, "model") for out in (args.a, args.b)]
        weights = [load_file(os.path.join(f, "adapter_model.safetensors")) for f in folders]
        metrics = []
        for folder in folders:
            with open(os.path.join(folder, "metrics.json")) as f:
                saved = json.load(f)
            metrics.append({k: without_timings(saved[k]) for k in ("before", "after", "history")})
        unequal = sorted(k for k in weights[0].keys() | weights[1].keys()
                         if k not in weights[0] or k not in weights[1] or not torch.equal(weights[0][k], weights[1][k]))
        changed = [k for k in metrics[0] if metrics[0][k] != metrics[1][k]]
        print(f"{task}: {len(weights[0])} trained tensors, {len(unequal)} differ"
              + (f" ({', '.join(unequal[:3])})" if unequal else "") + "; test metrics "
              + (f"differ in {', '.join(changed)}" if changed else "equal")
              + f"; accuracy-like headline after: {next(iter(metrics[1]['after'].values()))}")
        differ = differ or bool(unequal or changed)
    print("DIFFERENT" if differ else "THE SAME, bit for bit")
    return 1 if differ else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train each task shape with --script into --out")
    r.add_argument("--script", required=True, help="the peft_qlora.py to run")
    r.add_argument("--model", required=True, help="a small pretrained model's folder")
    r.add_argument("--out", required=True)
    r.add_argument("--train", type=int, default=64, help="training texts")
    r.add_argument("--test", type=int, default=32, help="test texts")
    c = sub.add_parser("compare", help="compare two --out folders")
    c.add_argument("a")
    c.add_argument("b")
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else compare(args)


if __name__ == "__main__":
    sys.exit(main())

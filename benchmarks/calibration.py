"""How well a saved model's probabilities are calibrated on texts it never saw, with and without its temperature.

    python benchmarks/calibration.py MODEL_DIR TEST.parquet --texts 1500 [--exclude-eval-of METRICS_JSON]

Draws --texts rows of the test file at random (seeded; --exclude-eval-of leaves out the rows the training run drew
for its own evaluation), classifies them with peft_qlora's Classifier (as predict() does) and reports the expected
calibration error (15 bins), log loss and Brier score of the probabilities as trained and divided by the saved
temperature, and the accuracy, which the temperature does not change.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import peft_qlora  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("test_file")
    parser.add_argument("--texts", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exclude-eval-of", metavar="METRICS_JSON",
                        help="leave out the test rows the training run drew for its evaluation (its metrics.json)")
    parser.add_argument("--out")
    args = parser.parse_args()
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(args.test_file).to_pydict()
    rows = list(range(len(table["text"])))
    if args.exclude_eval_of:  # the run's own draw, as load_data makes it
        with open(args.exclude_eval_of) as f:
            config = json.load(f)["config"]
        taken = set(peft_qlora.balanced_subset(table[config["label_column"]], config["eval_size"], config["seed"]))
        rows = [i for i in rows if i not in taken]
    rows = list(np.random.default_rng(args.seed).choice(rows, args.texts, replace=False))
    texts, labels = [table["text"][i] for i in rows], np.array([table["label"][i] for i in rows])
    classifier = peft_qlora.Classifier.load(args.model_dir)
    started = time.perf_counter()
    logits = classifier.logits(texts).cpu().numpy()
    seconds = time.perf_counter() - started
    figures = classifier.task.calibration(logits, labels)["calibration"]
    result = {"model_dir": args.model_dir, "test_file": args.test_file, "texts": args.texts, "seed": args.seed,
              "excluded_eval_rows": bool(args.exclude_eval_of), "temperature": classifier.task.temperature,
              "accuracy": float((logits.argmax(-1) == labels).mean()), "seconds": seconds,
              **{key: {k: v for k, v in figures[key].items() if k != "bins"}
                 for key in figures if key != "temperature"},
              "command": " ".join(sys.argv)}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

"""Long reviews: windows against head+tail against head, at two lengths, each a full training run.

    python benchmarks/long_texts.py --model DIR --train train.parquet --test test.parquet --out OUT \
        [--lengths 128 512] [--truncations head head+tail windows] [--eval-size 2000] [--default-run [TEST]]

Keeps the test reviews longer than 512 tokens (the model's tokenizer, special tokens included), writes them to
OUT/long_test.parquet, and for each --max-length and --truncation trains peft_qlora's defaults otherwise (4,000
training reviews, 3 epochs, calibration) and evaluates on those long reviews (--eval-size of them, balanced).
--default-run adds the plain defaults on the whole test file (or the file it names): their calibration figures.
Each run's metrics.json is copied to OUT, and OUT/summary.json holds one row per run.
"""
import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import peft_qlora  # noqa: E402


def long_reviews(model: str, test: str, out: str, longer_than: int = 512) -> str:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    tokenizer = peft_qlora.load_tokenizer(model)
    table = pq.read_table(test)
    lengths = [len(ids) for ids in tokenizer(table.column("text").to_pylist(), verbose=False)["input_ids"]]
    path = os.path.join(out, "long_test.parquet")
    pq.write_table(table.filter(pc.greater(lengths, longer_than)), path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--truncations", nargs="+", default=["head", "head+tail", "windows"])
    parser.add_argument("--eval-size", type=int, default=2000)
    parser.add_argument("--default-run", nargs="?", const=True, metavar="TEST")
    args = parser.parse_args()
    import logging

    logging.basicConfig(format="%(message)s")
    peft_qlora.log.setLevel(logging.INFO)
    os.makedirs(args.out, exist_ok=True)
    long_test = long_reviews(args.model, args.test, args.out)
    default_test = args.test if args.default_run is True else args.default_run
    runs = [("default", dict(eval_file=default_test))] if args.default_run else []
    runs += [(f"{truncation}_{length}", dict(eval_file=long_test, max_length=length, truncation=truncation))
             for length in args.lengths for truncation in args.truncations]
    summary = []
    for name, settings in runs:
        work = os.path.join("/tmp", "long_texts", name)
        shutil.rmtree(work, ignore_errors=True)
        cfg = peft_qlora.Config(model=args.model, train_file=args.train, eval_size=args.eval_size,
                                output_dir=work, images_dir=os.path.join(work, "images"), **settings)
        started = time.perf_counter()
        metrics = peft_qlora.run(cfg)
        calibration = metrics["after"]["calibration"]
        summary.append({"run": name, "max_length": cfg.max_length, "truncation": cfg.truncation,
                        "eval_file": os.path.basename(cfg.eval_file), "accuracy": metrics["after"]["accuracy"],
                        "f1": metrics["after"]["f1"], "accuracy_before": metrics["before"]["accuracy"],
                        "ece_uncalibrated": calibration["uncalibrated"]["ece"],
                        "ece_calibrated": calibration["calibrated"]["ece"], "temperature": calibration["temperature"],
                        "train_runtime_s": metrics["training"]["train_runtime_s"],
                        "wall_s": time.perf_counter() - started, "device": metrics["device"]})
        shutil.copy(os.path.join(cfg.model_dir, "metrics.json"), os.path.join(args.out, f"{name}_metrics.json"))
        print(json.dumps(summary[-1]), flush=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"command": " ".join(sys.argv), "long_reviews": os.path.basename(long_test), "runs": summary}, f,
                  indent=2)


if __name__ == "__main__":
    main()

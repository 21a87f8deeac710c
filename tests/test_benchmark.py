"""The benchmark's CPU smoke run: every mode runs end to end and the results file has every column.

No timing is asserted: the numbers that matter come from a GPU (see the README)."""
import json
import os
import subprocess
import sys

from conftest import DATA, ROOT


def test_the_benchmark_runs_every_mode_on_a_tiny_model(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--tiny", "--data",
         os.path.join(DATA, "imdb_train.parquet"), "--max-length", "128", "--epoch-reviews", "32", "--steps", "1",
         "--predict-reviews", "32", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"qlora", "naive", "lora", "full", "qlora-compile", "lora-compile"}
    for mode, row in report["modes"].items():
        assert row["reviews_per_s"] > 0 and row["epoch_s"] > 0 and row["warmup_s"] > 0
        assert row["epoch_tokens_per_s"] > 0 and row["peak_memory_gib"] > 0
        # 32 of 512 reviews: an epoch over all is extrapolated, except where it would multiply the compilation
        assert (row["full_epoch_s"] is None) == mode.endswith("-compile")
        # The timed epoch is one pass over the 32 reviews, whatever the script's default number of epochs
        assert row["epochs"] == 1 and row["optimizer_steps"] == 32 // row["batch_size"], (mode, row)
    assert report["modes"]["naive"]["batch_size"] == 8  # the Trainer's default, as in the notebook
    assert report["modes"]["qlora"]["predict_reviews_per_s"] > 0
    assert set(report["ratios"]) == {f"{q}_vs_{m}" for q in ("qlora", "qlora-compile")
                                     for m in ("naive", "lora", "full", "lora-compile")}
    assert "| qlora |" in result.stdout and "| naive |" in result.stdout

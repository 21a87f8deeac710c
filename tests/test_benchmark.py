"""The benchmark's CPU smoke run: every mode runs end to end and the results file has every column.

No timing is asserted: the numbers that matter come from a GPU (benchmarks/NOTES.md)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import DATA, ROOT


def test_the_benchmark_runs_every_mode_on_a_tiny_model(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--tiny", "--data",
         os.path.join(DATA, "imdb_train.parquet"), "--max-length", "128", "--epoch-reviews", "32", "--steps", "1",
         "--predict-reviews", "32", "--batching", "tokens", "--check-graphs", "32", "--out", str(out),
         # The compiled modes left out: compiling on a CPU takes longer than the rest of this run together, and the
         # script's compiled path is tested through its command line (test_recipe)
         "--modes", "qlora", "naive", "lora", "full"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"qlora", "naive", "lora", "full"}
    for mode, row in report["modes"].items():
        assert row["reviews_per_s"] > 0 and row["epoch_s"] > 0 and row["warmup_s"] > 0
        assert row["epoch_tokens_per_s"] > 0 and row["peak_memory_gib"] > 0 and row["step_wall_ms"] > 0
        assert 0 <= row["epoch_padding_share"] < 1
        # No GPU: no kernel time, and every step eager (step_path), in the loop and in the Trainer
        assert row["step_kernel_ms"] is None and not row["fixed_shape_graphs"] and row["cuda_graphs"] is None
        # 32 of 512 reviews: an epoch over all is extrapolated (not for a compiled mode: it would multiply the
        # compilation)
        assert row["full_epoch_s"] == pytest.approx(512 / row["epoch_reviews_per_s"])
        # The timed epoch is one pass over the 32 reviews, whatever the script's default number of epochs: a step
        # per batch of 8 reviews in the notebook's recipe, a step per micro-batch filled to 32 x 128 tokens in
        # the others (--batching tokens)
        assert row["epochs"] == 1, (mode, row)
        steps = 32 // 8 if mode == "naive" else row["micro_batches"]
        assert row["optimizer_steps"] == steps and row["reviews_per_step"] == 32 / steps, (mode, row)
    assert report["modes"]["naive"]["batch_size"] == 8  # the Trainer's default, as in the notebook
    assert report["batching"] == "tokens"
    qlora = report["modes"]["qlora"]
    assert qlora["predict_reviews_per_s"] > 0 and qlora["evaluation_reviews_per_s"] > 0 and qlora["shell_predict_s"] > 0
    # Each target this run can measure, judged: the epoch ratios, and the graph check, whose two runs here are both
    # eager (the graphed Trainer's capture is refused without a GPU), so they must agree exactly
    judged = {t["target"].split(" (")[0]: t["met"] for t in report["targets"]}
    assert set(judged) == {"1. QLoRA's epoch >= 1.2x full's", "1. QLoRA's epoch >= 1.0x lora's",
                           "without dropout, CUDA-graph training ends as near eager training as a second eager run does"}, judged
    check = report["graph_check"]
    for run in check.values():
        assert run["reviews"] == 32 and run["relative_difference"] == run["relative_difference_eager_again"] == 0
        assert run["train_loss_eager"] == run["train_loss_graphs"]
    assert judged["without dropout, CUDA-graph training ends as near eager training as a second eager run does"]
    assert set(report["ratios"]) == {f"qlora_vs_{m}" for m in ("naive", "lora", "full")}
    assert "| qlora |" in result.stdout and "| naive |" in result.stdout


def test_every_benchmark_explains_itself_without_the_frameworks():
    """--help of each maintained benchmark works where torch, transformers and the data libraries are missing."""
    missing = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "sklearn", "matplotlib",
               "pyarrow", "numpy", "pandas")
    for name in ("bench.py", "full_finetune.py", "llama8b.py", "profile_step.py", "segment_attention.py"):
        path = os.path.join(ROOT, "benchmarks", name)
        code = ("import runpy, sys\n"
                f"sys.modules.update(dict.fromkeys({missing!r}))  # None: importing any of them fails\n"
                f"sys.argv = [{path!r}, '--help']\n"
                f"runpy.run_path({path!r}, run_name='__main__')\n")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (name, result.stderr[-2000:])
        assert result.stdout.startswith("usage: ") and name in result.stdout.splitlines()[0], result.stdout

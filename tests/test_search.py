"""--search N: Optuna's trials, each scored on the validation texts, the given settings first, the best trained
again as the saved model; a search stopped by SIGTERM continues with --resume; its bad inputs in one line."""
import json
import signal
import subprocess
import sys
import time

import pytest

import peft_qlora
from conftest import SCRIPT, run_cli, run_main, train_args


def search_args(tiny_bert, data_files, out, trials=3):
    return train_args(tiny_bert, data_files, out, "--search", trials, "--validation-size", "16")


def test_the_search_tries_the_given_settings_first_and_trains_the_best_again(tiny_bert, data_files, tmp_path):
    result = run_cli(*search_args(tiny_bert, data_files, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    trials = metrics["search"]["trials"]
    assert [t["trial"] for t in trials] == [1, 2, 3] and {t["state"] for t in trials} <= {"complete", "pruned"}
    given = trials[0]
    assert (given["learning_rate"], given["lora_r"], given["epochs"], given["lora_targets"]) == (1e-3, 8, 2, "given")
    best = max((t for t in trials if t["state"] == "complete"), key=lambda t: t["score"])
    assert metrics["search"]["best"] == best["trial"] and best["score"] >= given["score"]
    config = metrics["config"]
    assert (config["learning_rate"], config["lora_r"], config["lora_alpha"], config["epochs"]) == (
        best["learning_rate"], best["lora_r"], 2 * best["lora_r"], best["epochs"])
    # Trained again from the same seed on the same texts: the trial's validation score, exactly
    assert max(h["accuracy"] for h in metrics["history"]) == best["score"]
    assert "x one run with the given settings (trial 1" in result.stderr
    with open(tmp_path / "images" / "search.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "model", peft_qlora.SEARCH_FILE]


def test_a_search_stopped_by_sigterm_keeps_its_trials_and_resumes(tiny_bert, data_files, tmp_path, capsys,
                                                                  caplog):
    args = search_args(tiny_bert, data_files, tmp_path, trials=2)
    process = subprocess.Popen([sys.executable, SCRIPT, *map(str, args)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # trial 2 under way: its first epoch began
        if line.startswith("Search: trial 2 of 2"):
            break
    started = tmp_path / "search" / "trial-1" / "checkpoints" / "epoch_start_rng_0.pth"
    while not started.exists() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    said = process.stderr.read()
    assert process.wait(timeout=300) == 128 + signal.SIGTERM, said[-3000:]
    assert said.strip().splitlines()[-1] == (
        f"stopped by SIGTERM during trial 2 of the search: its 1 finished trials are kept in "
        f"{tmp_path / peft_qlora.SEARCH_FILE}; continue with the same command and --resume (that trial starts again)")
    status, said = run_main(args, capsys, caplog)
    assert status == 1 and "holds an interrupted search: pass --resume" in said
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Search: 1 of 2 trials done before, continuing" in resumed.stderr
    trials = json.loads((tmp_path / "model" / "metrics.json").read_text())["search"]["trials"]
    assert [t["trial"] for t in trials] == [1, 3], "the stopped trial ran again as the third"


def test_a_search_runs_in_one_process(tiny_bert, data_files, tmp_path):
    import torch

    cfg = peft_qlora.parse_args([str(a) for a in search_args(tiny_bert, data_files, tmp_path)])
    runtime = peft_qlora.Runtime(torch.device("cpu"), "fp32", num_processes=2)
    with pytest.raises(peft_qlora.UserError, match="--search runs its trials one after another in one process"):
        peft_qlora.search_settings(cfg, None, None, None, runtime)

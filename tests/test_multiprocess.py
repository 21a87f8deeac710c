"""Several processes, as torchrun and accelerate launch start them on several GPUs: here two CPU processes over gloo."""
import json
import os
import subprocess
import sys

import pytest

from conftest import SCRIPT, run_cli, train_args


LAUNCHERS = {  # as a user types them, with this interpreter's modules
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # --multi_gpu is accelerate's multi-process launcher; with no GPU the processes join over gloo
    "accelerate launch": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_processes_split_the_data_and_save_one_model_that_predicts(launcher, tiny_bert, data_files, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *LAUNCHERS[launcher], SCRIPT,
                             *map(str, train_args(tiny_bert, data_files, out))],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["device"].startswith("2 processes on CPU")
    # 64 training texts, 8 per step in each of two processes: 4 optimizer steps an epoch, not 8
    assert metrics["training"]["optimizer_steps"] == 2 * 4
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert result.stderr.count("Trainable parameters:") == 1, "one process speaks for the run"
    assert sorted(p.name for p in out.iterdir()) == ["images", "model"], "one model, no checkpoints or staging left"

    predicted = run_cli("predict", "--model-dir", out / "model", "A fine film.", "A dull one.")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert [row["text"] for row in json.loads(predicted.stdout)] == ["A fine film.", "A dull one."]

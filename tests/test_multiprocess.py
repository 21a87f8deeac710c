"""Several processes, as torchrun and accelerate launch start them on several GPUs: here two CPU processes over gloo."""
import json
import os
import subprocess
import sys

from conftest import SCRIPT, run_cli, train_args


LAUNCHERS = {  # as a user types them, with this interpreter's modules
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # --multi_gpu is accelerate's multi-process launcher; with no GPU the processes join over gloo
    "accelerate launch": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


def test_two_processes_split_the_data_and_save_one_model_that_predicts(tiny_bert, data_files, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *LAUNCHERS["torchrun"], SCRIPT,
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


def test_an_interrupted_two_process_run_resumes_to_its_end(tiny_bert, tmp_path):
    """Started by accelerate launch, killed after its first epoch's checkpoint as a lost machine would be, resumed
    by torchrun with as many processes; a resume with another number of processes is refused (a step would see
    other texts)."""
    import signal
    import time

    import psutil

    from conftest import DATA

    out = tmp_path / "run"
    args = train_args(tiny_bert, {"train": os.path.join(DATA, "imdb_train.parquet"),
                                  "test": os.path.join(DATA, "imdb_test.parquet")}, out)
    args += ["--epochs", "3", "--eval-size", "64"]  # 512 texts: 32 steps an epoch in each of two processes
    command = {launcher: [sys.executable, *LAUNCHERS[launcher], SCRIPT, *map(str, args)] for launcher in LAUNCHERS}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    first = out / "checkpoints" / "checkpoint-32" / "trainer_state.json"  # written last in a checkpoint
    process = subprocess.Popen(command["accelerate launch"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    launcher = psutil.Process(process.pid)
    for proc in [launcher, *launcher.children(recursive=True)]:  # the workers have process groups of their own
        proc.send_signal(signal.SIGKILL)
    process.wait()
    assert first.exists() and not (out / "model").exists(), "the run should stop during epoch 2"

    alone = run_cli(*args, "--resume")
    assert alone.returncode == 1 and "differ from the interrupted run's: processes" in alone.stderr

    resumed = subprocess.run(command["torchrun"] + ["--resume"], env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["training"]["resumed"] and metrics["processes"] == 2
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3] and metrics["training"]["optimizer_steps"] == 96

"""Several processes, as torchrun and accelerate launch start them on several GPUs: here two CPU processes over gloo."""
import json
import os
import subprocess
import sys

import pytest

import peft_qlora
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


def train_a_copy(rank, model, data_files, out):
    """One of two CPU processes (gloo) taking run()'s steps up to the end of training, the evaluation before training
    included; then checks that both hold the same trained weights."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29574", RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", HF_HUB_OFFLINE="1")
    cfg = peft_qlora.parse_args(list(map(str, train_args(model, data_files, out, "--epochs", "1"))))
    data = peft_qlora.load_data(cfg)
    runtime = peft_qlora.decide_runtime(cfg.precision)
    tokenizer = peft_qlora.check_model(cfg)
    trained, _ = peft_qlora.build_model(cfg, tokenizer, data.task, runtime)
    texts = peft_qlora.tokenize_splits(data, tokenizer, cfg)
    trainer = peft_qlora.make_trainer(cfg, trained, tokenizer, texts, data.task, runtime)
    peft_qlora.evaluate(trainer, texts.test, data.task, "Before training")
    peft_qlora.train(trainer, data.task, len(texts.train))
    weights = torch.cat([p.detach().flatten() for p in trained.parameters() if p.requires_grad])
    copies = [torch.empty_like(weights) for _ in range(2)]
    dist.all_gather(copies, weights)
    assert torch.equal(*copies), f"the processes' trained weights differ by up to {(copies[0] - copies[1]).abs().max()}"
    dist.destroy_process_group()


def test_two_processes_train_one_model_after_evaluating_it(tiny_bert, data_files, tmp_path):
    """The gradients are averaged across the processes, so that each ends with the same weights: the evaluation
    before training once left each process training its own copy (benchmarks/NOTES.md)."""
    import torch.multiprocessing as mp

    mp.spawn(train_a_copy, args=(tiny_bert, data_files, tmp_path / "run"), nprocs=2)


def test_two_processes_stopped_by_sigterm_stop_at_one_step_and_resume_to_the_same_end(tiny_bert, tmp_path):
    """torchrun passes a SIGTERM on to its processes, which agree on one step to stop at, write its checkpoint (each
    its random state) and end; resumed by accelerate launch with as many processes, the run ends where an
    uninterrupted one does. A resume with another number of processes is refused (a step would see other texts)."""
    import signal
    import time

    import torch
    from safetensors.torch import load_file

    from conftest import DATA

    def args(out):  # 512 texts: 32 steps an epoch in each of two processes
        return [*train_args(tiny_bert, {"train": os.path.join(DATA, "imdb_train.parquet"),
                                        "test": os.path.join(DATA, "imdb_test.parquet")}, out),
                "--epochs", "3", "--eval-size", "64"]

    def command(launcher, out, *extra):
        return [sys.executable, *LAUNCHERS[launcher], SCRIPT, *map(str, args(out)), *extra]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    reference = subprocess.run(command("torchrun", tmp_path / "reference"), env=env, capture_output=True, text=True,
                               timeout=600)
    assert reference.returncode == 0, reference.stderr[-5000:]

    out = tmp_path / "run"
    process = subprocess.Popen(command("torchrun", out, "--save-steps", "4"), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    under_way = out / "checkpoints" / "checkpoint-36" / "trainer_state.json"  # inside epoch 2
    deadline = time.time() + 300
    while not under_way.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # to torchrun, as a cluster's scheduler sends it
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0 and not (out / "model").exists()
    [line] = [line for line in stderr.splitlines() if line.startswith("stopped by SIGTERM at step ")]  # one speaks
    step = int(line.split(" at step ")[1].split()[0])
    checkpoint = out / "checkpoints" / f"checkpoint-{step}"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == step and 1 < state["epoch"] < 2
    assert (checkpoint / "rng_state_0.pth").exists() and (checkpoint / "rng_state_1.pth").exists(), "both wrote"

    alone = run_cli(*args(out), "--resume")
    assert alone.returncode == 1 and "differ from the interrupted run's: processes" in alone.stderr

    resumed = subprocess.run(command("accelerate launch", out, "--resume"), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    got, want = (json.loads((folder / "model" / "metrics.json").read_text()) for folder in (out, tmp_path /
                                                                                            "reference"))
    assert got["training"]["resumed"] and got["processes"] == 2
    assert got["training"]["optimizer_steps"] == want["training"]["optimizer_steps"] == 96
    for mine, theirs in zip(got["history"], want["history"], strict=True):
        assert mine["accuracy"] == theirs["accuracy"] and mine["loss"] == pytest.approx(theirs["loss"], abs=1e-4)
    ours, theirs = (load_file(folder / "model" / "adapter_model.safetensors") for folder in (out, tmp_path /
                                                                                             "reference"))
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-4)

"""Nothing a user trained is lost: checkpoints inside epochs (every --save-steps, every --save-minutes), a clean stop on
SIGTERM or Ctrl-C, a killed or stopped run resumed to exactly where an uninterrupted one ends, a full disk said in
one line; a saved model is never clobbered."""
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import peft_qlora
from conftest import DATA, SCRIPT, run_cli, run_main, train_args

VARIANTS = {  # what a resumed run must handle, each with a run that is stopped inside its first epoch
    "texts": [],
    "tokens, accumulation": ["--batching", "tokens", "--micro-batch-size", "4"],
    "regression, validation": ["--label-column", "rating", "--task", "regression", "--validation-size", "64"],
}


def resume_args(tiny_bert, out, variant="texts"):
    """Long enough epochs (512 reviews, 64 steps each with texts) that a run can be stopped inside one."""
    args = train_args(tiny_bert, {"train": os.path.join(DATA, "imdb_train.parquet"),
                                  "test": os.path.join(DATA, "imdb_test.parquet")}, out)
    return args + ["--epochs", "3", "--eval-size", "64", *VARIANTS[variant]]


@functools.cache
def uninterrupted(tiny_bert, folder, variant):
    """The metrics.json and adapter of a run of the variant that nothing stopped (once per variant)."""
    out = folder / variant.replace(", ", "-").replace(" ", "-")
    result = run_cli(*resume_args(tiny_bert, out, variant))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "model" / "metrics.json").read_text()), adapter_weights(out / "model")


@pytest.fixture(scope="module")
def reference(tiny_bert, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    return lambda variant: uninterrupted(tiny_bert, folder, variant)


def adapter_weights(model_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "adapter_model.safetensors"))


def assert_same_end(out, expected):
    """The resumed run ended where the uninterrupted one did: each epoch's metrics, and the trained weights."""
    import torch

    (want, theirs), ours = expected, adapter_weights(out / "model")
    got = json.loads((out / "model" / "metrics.json").read_text())
    assert got["training"]["resumed"] and [h["epoch"] for h in got["history"]] == [1, 2, 3]
    assert got["training"]["optimizer_steps"] == want["training"]["optimizer_steps"]
    # A rate over the whole run would count the steps the interrupted process trained: none is given
    assert got["training"]["train_texts_per_s"] is None and want["training"]["train_texts_per_s"] > 0
    name = peft_qlora.TASKS[want["task"]["kind"]].metric_names[0]
    for mine, reference in zip(got["history"], want["history"]):
        assert mine[name] == pytest.approx(reference[name], abs=1e-6)
        assert mine["loss"] == pytest.approx(reference["loss"], abs=1e-4)
    assert got["after"][name] == pytest.approx(want["after"][name], abs=1e-6)
    assert got["training"].get("best_epoch") == want["training"].get("best_epoch")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-4)


def start(args):
    return subprocess.Popen([sys.executable, SCRIPT, *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def wait_for(path, process, timeout=300):
    deadline = time.time() + timeout
    while not path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"{path} never appeared"


def state(checkpoint):
    return json.loads((checkpoint / peft_qlora.TRAINER_STATE).read_text())


def test_sigkill_right_after_a_checkpoint_inside_the_first_epoch_then_resume_ends_the_same(tiny_bert, tmp_path,
                                                                                         reference, capsys, caplog):
    out = tmp_path / "killed"
    args = resume_args(tiny_bert, out)
    first = out / "checkpoints" / "checkpoint-16"
    process = start(args + ["--save-steps", "16"])
    wait_for(first / peft_qlora.TRAINER_STATE, process)  # written last in a checkpoint
    process.send_signal(signal.SIGKILL)  # as hard as a crash or a lost Colab runtime
    process.wait()
    assert not (out / "model").exists() and state(first)["global_step"] == 16 and state(first)["epoch"] < 1
    # A process killed while writing its next checkpoint leaves it half-written: without trainer_state.json
    half = out / "checkpoints" / "checkpoint-24"
    half.mkdir()
    shutil.copy(first / "adapter_model.safetensors", half)

    # Refused before any weights load, so checked in this process
    status, said = run_main(args, capsys, caplog)
    assert status == 1 and "pass --resume to continue it" in said
    status, said = run_main([*args, "--resume", "--learning-rate", "0.01"], capsys, caplog)
    assert status == 1 and "these differ from the interrupted run's: learning_rate" in said
    settings = out / "checkpoints" / "run_config.json"
    saved = settings.read_text()
    settings.write_text(json.dumps({**json.loads(saved), "fsdp": True}))  # as an FSDP run records itself
    status, said = run_main([*args, "--resume"], capsys, caplog)
    assert status == 1 and "these differ from the interrupted run's: fsdp" in said
    settings.write_text(saved)

    resumed = run_cli(*args, "--resume")  # without --save-steps: how often it saves is not a setting to keep
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Removed {half}, which a stopped process had written only in part" in resumed.stderr
    assert f"Resuming from {first}" in resumed.stderr
    assert_same_end(out, reference("texts"))


@pytest.mark.parametrize("variant, under_way", [("tokens, accumulation", 4),
                                                ("regression, validation", 60)])  # epoch 2: 448 texts, 56 steps each
def test_sigterm_inside_an_epoch_checkpoints_that_step_and_resume_ends_the_same(variant, under_way, tiny_bert, tmp_path,
                                                                              reference):
    """Then moved to another folder (as onto a disk with room) and resumed there: with --validation-size the best
    epoch's checkpoint is found in its new place."""
    out = tmp_path / "stopped"
    args = resume_args(tiny_bert, out, variant)
    process = start(args + ["--save-steps", "4"])
    wait_for(out / "checkpoints" / f"checkpoint-{under_way}" / peft_qlora.TRAINER_STATE, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    step = int(last.split(" at step ")[1].split()[0])
    checkpoint = out / "checkpoints" / f"checkpoint-{step}"
    assert last == (f"stopped by SIGTERM at step {step} of {state(checkpoint)['max_steps']}; its checkpoint is in "
                    f"{checkpoint}: continue with the same command and --resume")
    epoch = state(checkpoint)["epoch"]
    assert state(checkpoint)["global_step"] == step and round(epoch) != epoch, "inside an epoch"
    assert not (out / "model").exists() and "Traceback" not in stderr
    assert f"Epoch {int(epoch) + 1}:" not in stderr, "a stop inside an epoch evaluates nothing"
    if variant == "regression, validation":
        assert state(checkpoint)["best_model_checkpoint"] == str(out / "checkpoints" / "checkpoint-56")

    moved = tmp_path / "moved"
    out.rename(moved)
    resumed = run_cli(*resume_args(tiny_bert, moved, variant), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_end(moved, reference(variant))


def test_the_time_based_default_writes_checkpoints_inside_epochs(tiny_bert, data_files, tmp_path):
    assert peft_qlora.Config.save_minutes == 30, "a long epoch on a slow GPU is covered without a flag"
    args = train_args(tiny_bert, data_files, tmp_path, "--epochs", "1", "--save-minutes", "0.0005")  # every 0.03 s
    assert peft_qlora.main(args) == 0
    saved = json.loads((tmp_path / "model" / "metrics.json").read_text())["training"]["checkpoints"]
    assert saved["save_minutes"] == 0.0005 and saved["save_steps"] is None
    written = saved["written_at_steps"]
    assert written[-1] == 8 and len(written) > 1, "inside the epoch, besides its end (64 texts, 8 a step)"
    assert written == sorted(set(written))

    steps = train_args(tiny_bert, data_files, tmp_path / "steps", "--save-steps", "3", "--save-minutes", "0")
    assert peft_qlora.main(steps) == 0
    saved = json.loads((tmp_path / "steps" / "model" / "metrics.json").read_text())["training"]["checkpoints"]
    assert saved["written_at_steps"] == [3, 6, 8, 9, 12, 15, 16], "every 3 steps, and each epoch's end (8 steps)"


def test_the_first_ctrl_c_asks_to_stop_and_a_second_a_second_later_stops_at_once():
    """Real signals to this process. The SIGINT that torchrun passes on right after the terminal's is not a
    second Ctrl-C."""
    before = signal.getsignal(signal.SIGINT)
    stop = peft_qlora.StopSignal()
    with stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # within a second of the first
        assert stop.received == signal.SIGINT
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGINT, "the first signal is the one said"
        time.sleep(1.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes; it raises before this ends
    assert signal.getsignal(signal.SIGINT) is before and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 300 KiB (tmpfs): room for one of the tiny model's checkpoints (about 190 KiB) but not
    for the next one beside it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs root: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_disk_that_fills_while_a_checkpoint_is_written_keeps_the_previous_one(tiny_bert, small_disk, tmp_path,
                                                                                reference):
    out = small_disk / "run"
    args = resume_args(tiny_bert, out) + ["--images-dir", tmp_path / "images"]
    result = run_cli(*args, "--save-steps", "4")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not write the checkpoint checkpoint-8 (") and "left on its disk" in last
    assert last.endswith(f"removed it; {out / 'checkpoints' / 'checkpoint-4'} is kept: free some space, then "
                         "continue with --resume")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "epoch_start_rng_0.pth",
                                                                      "run_config.json"]

    moved = tmp_path / "run"  # as onto a disk with room
    shutil.copytree(out, moved)
    resumed = run_cli(*resume_args(tiny_bert, moved), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_end(moved, reference("texts"))


def test_resume_without_checkpoints_says_so(tmp_path, tiny_bert, data_files, capsys, caplog):
    status, said = run_main([*train_args(tiny_bert, data_files, tmp_path), "--resume"], capsys, caplog)
    assert status == 1 and "--resume found no checkpoint" in said


def test_a_saved_model_is_replaced_only_on_request(tiny_bert, data_files, tmp_path):
    args = train_args(tiny_bert, data_files, tmp_path)
    assert peft_qlora.main(args) == 0
    saved = adapter_weights(tmp_path / "model")

    assert peft_qlora.main(args + ["--seed", "1"]) == 1  # refused: the first model stays
    assert adapter_weights(tmp_path / "model")["base_model.model.classifier.weight"].equal(
        saved["base_model.model.classifier.weight"])

    assert peft_qlora.main(args + ["--seed", "1", "--overwrite"]) == 0
    replaced = adapter_weights(tmp_path / "model")
    assert not replaced["base_model.model.classifier.weight"].equal(
        saved["base_model.model.classifier.weight"])
    assert json.loads((tmp_path / "model" / "metrics.json").read_text())["config"]["seed"] == 1


class FailingModel:
    """Stands in for a model whose save dies halfway (a full disk, a killed process)."""

    def save_pretrained(self, folder, state_dict=None):  # as peft's: the weights to save, if not the model's own
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, "adapter_model.safetensors"), "wb").write(b"half")
        raise OSError("No space left on device")


def test_a_failed_save_leaves_the_previous_model_whole(tiny_bert, data_files, tmp_path):
    """save() of a trainer whose model's save fails halfway: the model saved before is left as it was."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    assert peft_qlora.main(train_args(tiny_bert, data_files, tmp_path)) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()}
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    trainer = SimpleNamespace(trained_adapter=lambda: (FailingModel(), None), args=SimpleNamespace(output_dir=None),
                              processing_class=AutoTokenizer.from_pretrained(tiny_bert))
    with pytest.raises(OSError, match="No space left"):
        peft_qlora.save(trainer, metrics, str(tmp_path / "model"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "model"], "the half-written copy is gone"

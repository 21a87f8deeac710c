"""Nothing a user trained is lost: an interrupted run resumes to the same end; a saved model is never clobbered."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import peft_qlora
from conftest import DATA, SCRIPT, run_cli, train_args


def resume_args(tiny_bert, out):
    """Long enough epochs (512 reviews, 64 steps each) that the run can be stopped between checkpoints."""
    args = train_args(tiny_bert, {"train": os.path.join(DATA, "imdb_train.parquet"),
                                  "test": os.path.join(DATA, "imdb_test.parquet")}, out)
    return args + ["--epochs", "3", "--eval-size", "64"]


def adapter_weights(model_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "adapter_model.safetensors"))


def test_an_interrupted_run_resumes_to_the_same_end(tiny_bert, tmp_path):
    import torch

    reference = tmp_path / "reference"
    assert run_cli(*resume_args(tiny_bert, reference)).returncode == 0

    out = tmp_path / "interrupted"
    first = out / "checkpoints" / "checkpoint-64" / "trainer_state.json"  # written last in a checkpoint
    process = subprocess.Popen([sys.executable, SCRIPT, *map(str, resume_args(tiny_bert, out))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # as hard as a crash or a lost Colab runtime
    process.wait()
    assert first.exists() and not (out / "model").exists(), "the run should stop during epoch 2"

    refused = run_cli(*resume_args(tiny_bert, out))
    assert refused.returncode == 1 and "pass --resume to continue it" in refused.stderr

    changed = run_cli(*resume_args(tiny_bert, out), "--resume", "--learning-rate", "0.01")
    assert changed.returncode == 1 and "these differ from the interrupted run's: learning_rate" in changed.stderr

    resumed = run_cli(*resume_args(tiny_bert, out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    expected = json.loads((reference / "model" / "metrics.json").read_text())
    assert metrics["training"]["resumed"] and [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    # A rate over the whole run would count the epochs the interrupted process trained: none is given
    assert metrics["training"]["train_texts_per_s"] is None and expected["training"]["train_texts_per_s"] > 0
    for got, want in zip(metrics["history"], expected["history"]):
        assert got["accuracy"] == want["accuracy"] and got["loss"] == pytest.approx(want["loss"], abs=1e-4)
    ours, theirs = adapter_weights(out / "model"), adapter_weights(reference / "model")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-4)


def test_resume_without_checkpoints_says_so(tmp_path, tiny_bert, data_files):
    result = run_cli(*train_args(tiny_bert, data_files, tmp_path), "--resume")
    assert result.returncode == 1 and "--resume found no checkpoint" in result.stderr


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

    def save_pretrained(self, folder):
        open(os.path.join(folder, "adapter_model.safetensors"), "wb").write(b"half")
        raise OSError("No space left on device")


def test_a_failed_save_leaves_the_previous_model_whole(tiny_bert, data_files, tmp_path):
    from transformers import AutoTokenizer

    assert peft_qlora.main(train_args(tiny_bert, data_files, tmp_path)) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()}
    with pytest.raises(OSError, match="No space left"):
        peft_qlora.save(FailingModel(), AutoTokenizer.from_pretrained(tiny_bert), {}, {}, str(tmp_path / "model"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "model"], "the half-written copy is gone"

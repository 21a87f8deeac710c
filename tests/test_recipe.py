"""The recipe (run) through the real command line: what it saves and draws, the losses of a fixed tiny run pinned,
and the saved model served by predict() here and from a fresh process."""
import json
import os

import pytest

from conftest import classes, cpu_runtime, imdb_sample, run_cli, train_args

REVIEWS = ["An absolute delight from start to finish.", "Dull, slow and far too long.", ""]


def test_cli_trains_saves_and_draws(trained):
    out, result = trained
    for name in ("bar_chart.png", "line_chart.png"):
        from matplotlib.image import imread

        path = out / "images" / name
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        height, width, _ = imread(path).shape
        assert height > 200 and width > 300

    metrics = json.loads((out / "model" / "metrics.json").read_text())
    for phase in ("before", "after"):
        assert 0 <= metrics[phase]["accuracy"] <= 1 and 0 <= metrics[phase]["f1"] <= 1
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    for key in ("accuracy", "f1", "loss"):  # the final evaluation is of the last epoch's model, on the same texts
        assert metrics["after"][key] == pytest.approx(metrics["history"][-1][key], abs=1e-6)
    assert metrics["label_names"] == ["neg", "pos"]
    assert metrics["model"]["quantized_layers"] == 2 * 6  # query, key, value, output, intermediate, output.dense
    assert 0 < metrics["model"]["trainable_params"] < metrics["model"]["total_params"]
    assert metrics["model"]["memory_4bit_bytes"] < metrics["model"]["memory_fp32_bytes"]
    assert metrics["precision"] == "fp32" and metrics["versions"]["bitsandbytes"]
    assert "Trainable parameters:" in result.stderr and "Model memory:" in result.stderr
    assert "Training steps: eager (no CUDA GPU)" in result.stderr and "cuda_graphs" not in metrics["training"]
    # Readable: one line per epoch, none of transformers' notices about a head that is new by design
    assert "Epoch 1: accuracy" in result.stderr and "Epoch 2: accuracy" in result.stderr
    for noise in ("LOAD REPORT", "MISSING", "FutureWarning", "{'loss'", "'eval_loss'", "dequantized in"):
        assert noise not in result.stderr, noise
    assert not (out / "checkpoints").exists(), "the saved model supersedes the checkpoints"
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model").stat().st_mode & 0o777 == 0o777 & ~umask, "a normal folder, not a private temp one"
    assert [p.name for p in out.iterdir() if p.name.startswith(".model")] == [], "no staging folder left behind"


# The losses of a fixed tiny run (conftest's fixed_bert, 64 training and 32 test reviews, 2 epochs of 8 steps, fp32
# on the CPU), pinned so that a change that moves a number shows here (benchmarks/NOTES.md says why they last moved).
# With ATen's plain (non-SIMD) kernels, or one thread and MKL's compatible code path, they moved by at most 2e-7.
PINNED_LOSSES = {"before": 0.6605902, "epochs": [(0.9069403, 0.6525244), (0.7629807, 0.6531346)], "after": 0.6531346}


def test_a_fixed_tiny_run_ends_at_the_same_losses(fixed_bert, data_files, tmp_path):
    result = run_cli(*train_args(fixed_bert, data_files, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    got = {"before": metrics["before"]["loss"], "after": metrics["after"]["loss"],
           "epochs": [(epoch["train_loss"], epoch["loss"]) for epoch in metrics["history"]]}
    assert got["before"] == pytest.approx(PINNED_LOSSES["before"], abs=1e-5)
    assert got["after"] == pytest.approx(PINNED_LOSSES["after"], abs=1e-5)
    assert len(got["epochs"]) == 2
    for (train_loss, eval_loss), (pinned_train, pinned_eval) in zip(got["epochs"], PINNED_LOSSES["epochs"]):
        assert train_loss == pytest.approx(pinned_train, abs=1e-5) and eval_loss == pytest.approx(pinned_eval, abs=1e-5)


def load_4bit(model_dir):
    """The saved folder reloaded the way Classifier.load starts: 4-bit base, adapter, prepared layers."""
    from peft import AutoPeftModelForSequenceClassification

    import peft_qlora

    model = AutoPeftModelForSequenceClassification.from_pretrained(
        model_dir, **peft_qlora.quantized_load_kwargs(classes(), cpu_runtime()))
    peft_qlora.prepare_4bit_layers(model)
    return model


def test_saved_folder_loads_with_peft_and_keeps_the_4bit_base(trained):
    import bitsandbytes as bnb
    from peft import AutoPeftModelForSequenceClassification

    model = AutoPeftModelForSequenceClassification.from_pretrained(str(trained[0] / "model"))
    assert model.peft_config["default"].r == 8
    layers = [m for m in load_4bit(str(trained[0] / "model")).modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 12 and layers[0].weight.quant_type == "nf4"


def test_serving_dequantizes_once_and_changes_no_probability(trained):
    import bitsandbytes as bnb
    import torch

    import peft_qlora

    texts = REVIEWS + imdb_sample("test", 40)[0]
    model = load_4bit(str(trained[0] / "model"))
    tokenizer = peft_qlora.load_tokenizer(str(trained[0] / "model"))  # as saved
    in_4bit = peft_qlora.Classifier(model.eval(), tokenizer, classes(), 128, "head+tail", cpu_runtime(),
                                    16).probabilities(texts)
    classifier = peft_qlora.Classifier(peft_qlora.serving_model(model, cpu_runtime()), tokenizer, classes(), 128,
                                       "head+tail", cpu_runtime(), 16)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in classifier.model.modules())
    query = classifier.model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert type(query.base_layer) is torch.nn.Linear and query.base_layer.weight.dtype == torch.float32
    assert classifier.probabilities(texts, 16) == in_4bit, "bit for bit what the 4-bit layers compute"
    head = classifier.model.base_model.model.classifier.modules_to_save["default"]
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    assert classifier.model.config.id2label == {0: "neg", 1: "pos"}


def test_serving_json_holds_what_the_classifier_needs_besides_the_weights(trained):
    import peft_qlora

    saved = json.loads((trained[0] / "model" / peft_qlora.SERVING_FILE).read_text())
    assert saved == {"label_names": ["neg", "pos"], "max_length": 64, "truncation": "head+tail", "window_stride": None,
                     "batch_size": 256, "precision": "fp32",
                     "task": {"kind": "classification", "text_columns": ["text"], "class_weights": None,
                              "temperature": None}}
    assert peft_qlora.Task.from_dict(peft_qlora.read_serving_settings(str(trained[0] / "model"))) == classes()
    # serving.json as 721ac5c wrote it, every task's keys in one: read as the same task
    earlier = {"label_names": ["neg", "pos"], "kind": "classification", "text_columns": ["text"], "threshold": 0.5,
               "target_scale": 1.0, "target_mean": 0.0}
    assert peft_qlora.Task.from_dict(earlier) == classes()
    assert peft_qlora.Task.from_dict({**earlier, "kind": "regression", "label_names": ["score"],
                                      "target_scale": 2.0}) == peft_qlora.Regression(["score"], target_scale=2.0)


def test_a_model_too_large_to_copy_is_served_in_4bit(trained, monkeypatch):
    import types

    import bitsandbytes as bnb
    import psutil

    import peft_qlora

    # No machine here runs short of memory: report 64 kB free, less than the 262 kB fp32 copy would take
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=2**16))
    model = load_4bit(str(trained[0] / "model"))
    served = peft_qlora.serving_model(model, cpu_runtime())
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in served.modules()) == 12
    tokenizer = peft_qlora.load_tokenizer(str(trained[0] / "model"))  # as saved
    classifier = peft_qlora.Classifier(served, tokenizer, classes(), 128, "head+tail", cpu_runtime(), 16)
    assert len(classifier.probabilities(REVIEWS, 16)) == len(REVIEWS)


def test_predict_from_the_shell_prints_json(trained):
    result = run_cli("predict", "--model-dir", trained[0] / "model", *REVIEWS)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout)
    assert [r["text"] for r in rows] == REVIEWS
    for row in rows:
        assert set(row) == {"text", "neg_prob", "pos_prob", "label"}
        assert row["neg_prob"] + row["pos_prob"] == pytest.approx(1, abs=1e-6)
        assert row["label"] == ("pos" if row["pos_prob"] > row["neg_prob"] else "neg")


def test_predict_here_and_in_a_fresh_process_agree_and_follow_a_new_model(tiny_bert, data_files, tmp_path):
    """predict() keeps the model it loaded, and loads afresh once a training run saves a new one in its place."""
    import peft_qlora

    assert peft_qlora.main(train_args(tiny_bert, data_files, tmp_path)) == 0
    model_dir = str(tmp_path / "model")
    texts = REVIEWS + imdb_sample("test", 40)[0]  # more than one batch of 32 in the shell
    in_memory = peft_qlora.predict(texts, model_dir=model_dir)
    assert peft_qlora.cached_classifier(model_dir) is peft_qlora.cached_classifier(model_dir), "loaded once"
    single = peft_qlora.predict(texts[0], model_dir)  # one string in, one dict out
    assert single == {**in_memory[0], "neg_prob": pytest.approx(in_memory[0]["neg_prob"], abs=1e-6),
                      "pos_prob": pytest.approx(in_memory[0]["pos_prob"], abs=1e-6)}

    result = run_cli("predict", "--model-dir", tmp_path / "model", "--batch-size", "32", *texts)
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = json.loads(result.stdout)
    assert [r["label"] for r in fresh] == [r["label"] for r in in_memory]
    for a, b in zip(fresh, in_memory):
        assert a["pos_prob"] == pytest.approx(b["pos_prob"], abs=1e-6)
    spread = max(r["pos_prob"] for r in fresh) - min(r["pos_prob"] for r in fresh)
    assert spread > 1e-3, "the texts get different probabilities, so matching them means something"

    assert peft_qlora.main(train_args(tiny_bert, data_files, tmp_path, "--overwrite", "--seed", "7")) == 0
    retrained = [r["pos_prob"] for r in peft_qlora.predict(texts, model_dir)]
    assert retrained == pytest.approx([p[1] for p in peft_qlora.Classifier.load(model_dir).probabilities(texts)],
                                      abs=1e-6)
    assert retrained != [r["pos_prob"] for r in in_memory], "the new model, not the one loaded before"


def test_compile_trains_the_same_model_and_saves_it_loadable(trained, tiny_bert, data_files, tmp_path):
    out = tmp_path / "compiled"
    result = run_cli(*train_args(tiny_bert, data_files, out, "--fast-path", "compiled"))
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = json.loads((out / "model" / "metrics.json").read_text())
    eager = json.loads((trained[0] / "model" / "metrics.json").read_text())
    # The untrained model, evaluated through the compiled graph, scores as in eager mode. Training then differs:
    # compiled dropout draws its own random masks.
    assert compiled["before"]["loss"] == pytest.approx(eager["before"]["loss"], rel=1e-5)
    assert compiled["before"]["accuracy"] == eager["before"]["accuracy"]
    assert [h["epoch"] for h in compiled["history"]] == [1, 2] and compiled["config"]["fast_path"] == "compiled"
    assert "Compiling 2 layers with torch.compile" in result.stderr, "each of the tiny BERT's layers, in place"
    result = run_cli("predict", "--model-dir", out / "model", *REVIEWS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads(result.stdout)) == len(REVIEWS)

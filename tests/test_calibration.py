"""Predictions users can trust: probabilities calibrated by a temperature fit on held-out texts (and applied by every
way of serving the model), and the model card the saved folder and the merged export carry."""
import json
import math
import re

import numpy as np
import pytest
import torch

import peft_qlora
from conftest import DATA, imdb_sample, run_cli


def sampled(temperature, n=4000, width=3, per_label=False, seed=0):
    """Outputs, and labels drawn from the probabilities the outputs give at `temperature`: the temperature a fit
    should find."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, width)).astype(np.float32)
    scaled = torch.from_numpy(logits) / torch.tensor(temperature)
    if per_label:
        return logits, (rng.random((n, width)) < scaled.sigmoid().numpy()).astype(np.float32)
    return logits, torch.multinomial(scaled.softmax(-1), 1, generator=torch.Generator().manual_seed(seed))[:, 0].numpy()


def test_the_fit_finds_the_temperature_the_labels_were_drawn_at():
    task = peft_qlora.Classification(["a", "b", "c"])
    logits, labels = sampled([2.0])
    (found,) = task.fit_temperature(logits, labels)
    assert found == pytest.approx(2.0, rel=0.1)
    calibrated = peft_qlora.replace(task, temperature=[found])
    figures = calibrated.calibration(logits, labels)["calibration"]
    assert figures["calibrated"]["ece"] < figures["uncalibrated"]["ece"] / 2
    assert figures["calibrated"]["log_loss"] < figures["uncalibrated"]["log_loss"]
    assert figures["calibrated"]["brier"] < figures["uncalibrated"]["brier"]
    outputs = torch.from_numpy(logits)
    assert calibrated.verdicts(logits) == task.verdicts(logits), "no predicted class changes"
    assert [r["label"] for r in calibrated.results(outputs)] == task.verdicts(logits)


def test_multi_label_fits_a_temperature_per_label_and_changes_no_label():
    task = peft_qlora.MultiLabel(["x", "y", "z"], threshold=0.7)
    logits, labels = sampled([0.5, 1.0, 3.0], per_label=True)
    found = task.fit_temperature(logits, labels)
    assert found == pytest.approx([0.5, 1.0, 3.0], rel=0.15)
    calibrated = peft_qlora.replace(task, temperature=found)
    results = calibrated.results(torch.from_numpy(logits))
    assert [r["labels"] for r in results] == task.verdicts(logits), "the threshold applies as trained"
    probs = np.array([[r[f"{n}_prob"] for n in "xyz"] for r in results])
    assert probs[:, 2] == pytest.approx(torch.from_numpy(logits[:, 2] / found[2]).sigmoid().numpy(), abs=1e-6)


def test_expected_calibration_error_is_the_weighted_gap_of_each_bin():
    # Two bins: 0.95 sure and right 3 times in 4, 0.55 sure and right once in 2
    got = peft_qlora.reliability([0.95, 0.95, 0.95, 0.95, 0.55, 0.55], [1, 1, 1, 0, 1, 0], bins=10)
    assert got["ece"] == pytest.approx((4 * 0.2 + 2 * 0.05) / 6)
    assert [(b["count"], b["accuracy"]) for b in got["bins"]] == [(2, 0.5), (4, 0.75)]


def test_the_run_calibrates_on_training_rows_it_did_not_train_on(calibrated):
    out, result = calibrated
    assert "the temperature is fit on 60 others of the training data" in result.stderr
    fit = re.search(r"Calibration: temperature ([\d.]+), fit on 60 held-out texts \(their log loss ([\d.]+) -> "
                    r"([\d.]+)\)", result.stderr)
    assert fit and float(fit[3]) <= float(fit[2]), "the fit lowers the log loss of the texts it is fit on"
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    calibration = metrics["after"]["calibration"]
    assert calibration["temperature"] == [pytest.approx(float(fit[1]), abs=1e-3)]
    for key in ("uncalibrated", "calibrated"):
        assert set(calibration[key]) == {"ece", "log_loss", "brier", "bins"}
        assert sum(b["count"] for b in calibration[key]["bins"]) == 32, "one probability per test text"
    assert "calibrated" not in metrics["before"]["calibration"], "the untrained model has no temperature"
    assert "Calibrated on the test texts: expected calibration error" in result.stderr
    with open(out / "images" / "reliability.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    serving = json.loads((out / "model" / "serving.json").read_text())
    assert serving["task"]["temperature"] == calibration["temperature"]


def test_predict_gives_calibrated_probabilities_and_the_labels_as_trained(calibrated):
    model_dir = str(calibrated[0] / "model")
    texts = ["A fine film.", "Dreadful.", *imdb_sample("test", 4)[0]]
    classifier = peft_qlora.Classifier.load(model_dir)
    (temperature,) = classifier.task.temperature
    logits = classifier.logits(texts)
    expected = (logits / temperature).softmax(-1)
    got = peft_qlora.predict(texts, model_dir=model_dir)
    assert [p for r in got for p in (r["neg_prob"], r["pos_prob"])] == pytest.approx(expected.flatten().tolist(),
                                                                                      abs=1e-6)
    assert [r["label"] for r in got] == [classifier.label_names[i] for i in logits.argmax(-1)]


def test_the_model_card_loads_and_names_the_metrics(calibrated):
    from huggingface_hub import ModelCard

    out = calibrated[0]
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-classification"
    assert card.data.base_model is None, "a local folder is no base model the Hub knows"
    assert {"qlora", "classification"} <= set(card.data.tags)
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [
        (name, round(metrics["after"][name], 4)) for name in ("accuracy", "f1")]
    for said in ("| accuracy |", "Classifier.load", "reliability.png", "| truncation | windows |", "temperature"):
        assert said in card.text, said


def test_the_merged_export_applies_the_temperature_and_has_its_own_card(calibrated, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import pipeline

    model_dir, merged = calibrated[0] / "model", tmp_path / "merged"
    result = run_cli("export", "--model-dir", model_dir, "--merged", merged)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "temperature is folded into the head" in result.stderr and "windows of them" in result.stderr
    card = ModelCard.load(merged / "README.md")
    assert card.data.library_name == "transformers" and "pipeline(" in card.text
    texts = ["A fine film.", "Dreadful and dull."]  # shorter than a window: read alike by both
    classify = pipeline("text-classification", model=str(merged), top_k=None)
    expected = peft_qlora.predict(texts, model_dir=str(model_dir))
    for scores, want in zip(classify(texts), expected):
        got = {s["label"]: s["score"] for s in scores}
        assert got["pos"] == pytest.approx(want["pos_prob"], abs=2e-2)


def test_regression_says_once_that_it_has_nothing_to_calibrate(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="peft_qlora")
    cfg = peft_qlora.Config(train_file=f"{DATA}/imdb_train.parquet", eval_file=f"{DATA}/imdb_test.parquet",
                            label_column="rating", task="regression", train_size=64, eval_size=32)
    data = peft_qlora.load_data(cfg)
    assert data.calibration is None and not math.isnan(data.task.target_scale)
    assert caplog.text.count("Calibration: none, as a regression's outputs are scores") == 1


def test_without_spare_rows_a_tenth_of_the_training_texts_is_held_out(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="peft_qlora")
    cfg = peft_qlora.Config(train_file=f"{DATA}/imdb_train.parquet", eval_file=f"{DATA}/imdb_test.parquet",
                            train_size=None, eval_size=64)
    data = peft_qlora.load_data(cfg)
    assert len(data.calibration) == 51 and len(data.train) == 512 - 51
    assert "51 of the 512 training texts held out to fit the temperature" in caplog.text
    assert not set(data.calibration["text"]) & set(data.train["text"])

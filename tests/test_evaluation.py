"""What a run tells about its model: the per-class report and confusion matrix, a validation split that picks
the best epoch, early stopping, class weights for imbalanced labels, and reporting to TensorBoard."""
import importlib.util
import json
import math
import random

import pytest

import peft_qlora
from conftest import run_cli, run_main, train_args


def test_the_report_and_confusion_matrix_agree_with_the_accuracy(trained):
    out, _ = trained
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    for phase in ("before", "after"):
        result = metrics[phase]
        counts = result["confusion_matrix"]
        assert len(counts) == 2 and sum(map(sum, counts)) == 32, "every test text, once"
        assert result["accuracy"] == pytest.approx((counts[0][0] + counts[1][1]) / 32)
        for i, name in enumerate(["neg", "pos"]):
            row = result["per_class"][name]
            predicted = counts[0][i] + counts[1][i]
            assert row["support"] == sum(counts[i]) == 16  # a balanced draw of 32
            assert row["recall"] == pytest.approx(counts[i][i] / 16)
            assert row["precision"] == pytest.approx(counts[i][i] / predicted if predicted else 0)
    from matplotlib.image import imread

    height, width, _ = imread(out / "images" / "confusion_matrix.png").shape
    assert height > 300 and width > 300


def test_a_validation_split_keeps_the_best_epoch_and_logs_to_tensorboard(tiny_bert, data_files, tmp_path):
    result = run_cli(*train_args(tiny_bert, data_files, tmp_path), "--validation-size", "0.25", "--epochs", "3",
                     "--report-to", "tensorboard")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Data: 48 training, 16 validation and 32 test texts" in result.stderr
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    import pyarrow.parquet as pq

    labels = pq.read_table(data_files["train"]).column("label").to_pylist()
    held_out = [sum(row) for row in metrics["validation_before"]["confusion_matrix"]]
    assert sum(held_out) == 16
    for label, count in enumerate(held_out):  # stratified: each class keeps its share
        assert abs(count - labels.count(label) / 4) <= 1, (held_out, labels.count(label))
    assert sum(map(sum, metrics["after"]["confusion_matrix"])) == 32, "the test texts, evaluated after training"
    history = metrics["history"]
    best = metrics["training"]["best_epoch"]
    assert len(history) == 3 and history[best - 1]["accuracy"] == max(h["accuracy"] for h in history)
    assert f"Kept epoch {best}" in result.stderr

    # The saved model is the kept epoch's: it scores that epoch's validation loss on the held-out texts
    cfg = peft_qlora.parse_args(train_args(tiny_bert, data_files, tmp_path) + ["--validation-size", "0.25"])
    validation = peft_qlora.load_data(cfg).validation
    probabilities = peft_qlora.Classifier.load(str(tmp_path / "model")).probabilities(validation["text"])
    loss = -sum(math.log(p[y]) for p, y in zip(probabilities, validation["labels"])) / len(validation)
    assert loss == pytest.approx(history[best - 1]["loss"], abs=1e-4)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs")).Reload()
    assert [e.value for e in events.Scalars("eval/accuracy")] == pytest.approx([h["accuracy"] for h in history])


def test_early_stopping_ends_the_run_after_epochs_without_progress(tiny_bert, data_files, tmp_path):
    # A learning rate too small to change any prediction: no epoch beats the first
    args = train_args(tiny_bert, data_files, tmp_path) + ["--validation-size", "16", "--epochs", "5",
                                                          "--early-stopping", "1", "--learning-rate", "1e-9"]
    assert peft_qlora.main(args) == 0
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2] and metrics["training"]["best_epoch"] == 1


def cue_texts(n_neg, n_pos, rng):
    """Texts whose one word is a weak cue: 80% of positive texts say "good", 20% of negative ones do."""
    rows = [(f"the film was {'good' if rng.random() < share else 'bad'}", label)
            for label, n, share in ((0, n_neg, 0.2), (1, n_pos, 0.8)) for _ in range(n)]
    rng.shuffle(rows)
    return rows


def test_balanced_class_weights_raise_the_minority_class_recall(tiny_bert, tmp_path):
    """At 9:1, the cue never makes "pos" the likelier class (P(pos | good) = 16 / 52 = 0.31), so the plain loss learns
    to say "neg" to everything; weighted, the classes count equally and "good" means "pos" (0.8). Trained long enough
    (8 epochs) that the tiny model learns the cue whatever the seed (3 epochs did for some seeds only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    for name, (neg, pos) in {"train": (180, 20), "test": (50, 50)}.items():
        rows = cue_texts(neg, pos, rng)
        pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [y for _, y in rows]}),
                       tmp_path / f"{name}.parquet")
    recall = {}
    for weights in ("none", "balanced"):
        out = tmp_path / weights
        result = run_cli("--model", tiny_bert, "--train-file", tmp_path / "train.parquet", "--eval-file",
                         tmp_path / "test.parquet", "--train-size", "all", "--eval-size", "all", "--max-length", "16",
                         "--epochs", "8", "--batch-size", "8", "--learning-rate", "1e-2", "--class-weights", weights,
                         "--calibration", "off",
                         "--output-dir", out, "--images-dir", out / "images")
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = json.loads((out / "model" / "metrics.json").read_text())
        recall[weights] = metrics["after"]["per_class"]["pos"]["recall"]
    assert "Class weights: neg 0.56, pos 5.00" in result.stderr  # 200 / (2 x 180) and 200 / (2 x 20)
    assert recall["balanced"] > recall["none"] + 0.2, recall


def test_class_weights_need_training_texts_of_every_class(tiny_bert, tmp_path):
    # Classes 0..2, of which the data has only 0 and 2: class 1 has nothing to weigh by
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"text {i},{2 * (i % 2)}\n" for i in range(40)))
    (tmp_path / "test.csv").write_text("text,label\na,0\nb,2\n")
    (tmp_path / "out" / "model").mkdir(parents=True)  # an earlier run's model, which must not hide the mistake
    result = run_cli("--model", tiny_bert, "--train-file", tmp_path / "train.csv", "--eval-file",
                     tmp_path / "test.csv", "--train-size", "all", "--eval-size", "all", "--max-length", "64",
                     "--class-weights", "balanced", "--calibration", "off", "--output-dir", tmp_path / "out")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "--class-weights balanced: the training texts have no 1" in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--early-stopping", "2"], "--early-stopping needs --validation-size"),
    (["--validation-size", "0"], "a whole number of texts or a fraction"),
    (["--validation-size", "64"], "--validation-size 64 leaves no training texts"),
    (["--validation-size", "1"], "cannot hold out texts of every class"),
    (["--report-to", "wandb"], "--report-to wandb needs the wandb package"),
])
def test_bad_evaluation_settings_say_what_to_change(flags, message, tiny_bert, data_files, tmp_path, capsys,
                                                    caplog):
    if flags[-1] == "wandb" and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    status, said = run_main([*train_args(tiny_bert, data_files, tmp_path), *flags], capsys, caplog)
    assert status != 0 and message in said, said[-2000:]

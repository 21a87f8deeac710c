"""Every task shape: pairs of texts, multi-label, regression. Each is decided once from the labels, trains end to end
through the command line, and is served the same by predict(), the Classifier, predict --file and a plain
transformers pipeline reading the merged export."""
import json
import math
from dataclasses import replace
import os
import subprocess
import sys

import pytest

import peft_qlora
from conftest import DATA, ROOT, SCRIPT, run_cli, run_main, train_args

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import imdb_tasks  # noqa: E402  the builder of the GPU results' pairs and multi-label tasks


def committed(split, n):
    import pyarrow.parquet as pq

    return pq.read_table(os.path.join(DATA, f"imdb_{split}.parquet")).slice(0, n).to_pydict()


@pytest.fixture(scope="session")
def task_files(tmp_path_factory):
    """Each task's train and test files, from the committed reviews as benchmarks/imdb_tasks.py builds them:
    pairs (same or different sentiment), multi-label (pos/neg and strong, from the rating), regression (the
    rating itself, a 1-10 integer that --task regression reads as a number)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("tasks")
    files = {}
    for split, n in (("train", 64), ("test", 32)):
        rows = committed(split, n)
        tables = {"pairs": imdb_tasks.pairs(rows["text"], rows["label"], seed=0),
                  "multi-label": {"text": rows["text"],
                                  "labels": [imdb_tasks.rating_labels(r) for r in rows["rating"]]},
                  "regression": {"text": rows["text"], "rating": rows["rating"]}}
        for kind, table in tables.items():
            path = folder / f"{kind}_{split}.parquet"
            pq.write_table(pa.table(table), path)
            files.setdefault(kind, {})[split] = str(path)
    return files


TASK_ARGS = {  # each with settings that must work for every task, so that they are exercised on each
    "pairs": ["--text-column", "text", "text_pair", "--validation-size", "16"],
    "multi-label": ["--label-column", "labels", "--class-weights", "balanced", "--batching", "tokens"],
    "regression": ["--label-column", "rating", "--task", "regression", "--validation-size", "16",
                   "--early-stopping", "1", "--epochs", "3"],
}
TASK_LINES = {"pairs": "Task: classification of text pairs (text, text_pair), 2 classes (different, same)",
              "multi-label": "Task: multi-label, 3 labels (neg, pos, strong)",
              "regression": "Task: regression, target mean "}
METRICS = {"pairs": {"accuracy", "f1"}, "multi-label": {"f1_micro", "f1_macro", "subset_accuracy"},
           "regression": {"rmse", "mae", "pearson", "spearman", "r2"}}
CHART = {"pairs": "confusion_matrix.png", "multi-label": "label_f1.png", "regression": "predicted_vs_true.png"}


@pytest.fixture(scope="session")
def trained_tasks(tiny_bert, task_files, tmp_path_factory):
    """The tiny BERT trained once on each task through the command line, keeping each text's head (as the
    pipeline truncates, so that the merged export can be compared on long texts): {task: (folder, process)}."""
    runs = {}
    for kind, args in TASK_ARGS.items():
        out = tmp_path_factory.mktemp(kind)
        result = run_cli(*train_args(tiny_bert, task_files[kind], out), "--truncation", "head", *args)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[kind] = out, result
    return runs


@pytest.mark.parametrize("kind", list(TASK_ARGS))
def test_each_task_trains_and_reports_its_own_metrics(kind, trained_tasks):
    out, result = trained_tasks[kind]
    assert TASK_LINES[kind] in result.stderr, "one line says what auto decided"
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    task = metrics["task"]
    assert task["kind"] == {"pairs": "classification"}.get(kind, kind)
    for phase in ("before", "after", "validation_before"):
        if phase in metrics:
            assert METRICS[kind] <= set(metrics[phase]) and "loss" in metrics[phase]
    assert all(METRICS[kind] <= set(epoch) for epoch in metrics["history"])
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(["bar_chart.png", "line_chart.png",
                                                                         CHART[kind]])
    serving = json.loads((out / "model" / "serving.json").read_text())
    assert serving["task"] == {key: value for key, value in task.items() if key != "label_names"}
    if kind == "pairs":  # stratified by class, and the best epoch by accuracy kept
        assert task["text_columns"] == ["text", "text_pair"]
        assert metrics["training"]["best_epoch"] == max(metrics["history"], key=lambda h: h["accuracy"])["epoch"]
        assert set(metrics["after"]["per_class"]) == {"different", "same"}
    if kind == "multi-label":
        assert task["label_names"] == ["neg", "pos", "strong"] and task["threshold"] == 0.5
        assert set(metrics["after"]["per_label"]) == {"neg", "pos", "strong"}
        assert "Weights of each label's positive texts: neg " in result.stderr
    if kind == "regression":
        ratings = committed("train", 64)["rating"]
        # The targets' spread is the training texts' (48 after the 16 held out), in the rating's units
        assert 1 < task["target_scale"] < 5 and min(ratings) < task["target_mean"] < max(ratings)
        assert 0 < metrics["after"]["rmse"] < 10 and -1 <= metrics["after"]["pearson"] <= 1
        # Lower RMSE is better: the kept epoch has the least, and early stopping ended the run after one epoch
        # without a better one, or ran all three
        history = metrics["history"]
        assert metrics["training"]["best_epoch"] == min(history, key=lambda h: h["rmse"])["epoch"]
        assert len(history) == 3 or history[-1]["rmse"] >= history[-2]["rmse"]
        assert sum(row["count"] for row in metrics["after"]["by_true_value"]) == 32
        assert {row["true"] for row in metrics["after"]["by_true_value"]} <= set(map(float, range(1, 11)))


def example(kind):
    if kind == "pairs":
        return [("An absolute delight from start to finish.", "Dull, slow and far too long."),
                ("A fine film.", "A wonderful, moving film.")]
    return ["An absolute delight from start to finish.", "Dull, slow and far too long.", "Fine."]


def same(got, want):
    """Predictions alike: the same keys and texts and labels, the same numbers but for the batch's padding."""
    got, want = (got, want) if isinstance(got, list) else ([got], [want])
    return len(got) == len(want) and all(
        list(a) == list(b) and all(a[k] == pytest.approx(b[k], abs=1e-5) if isinstance(b[k], float) else a[k] == b[k]
                                   for k in b) for a, b in zip(got, want))


@pytest.mark.parametrize("kind", list(TASK_ARGS))
def test_each_task_predicts_the_same_in_python_and_from_a_reloaded_classifier(kind, trained_tasks):
    model_dir = str(trained_tasks[kind][0] / "model")
    items = example(kind)
    rows = peft_qlora.predict(items, model_dir=model_dir)
    one = peft_qlora.predict(items[0], model_dir=model_dir)
    assert isinstance(one, dict) and same(one, rows[0])
    assert same(peft_qlora.Classifier.load(model_dir)(items), rows)
    if kind == "pairs":
        assert list(rows[0]) == ["text", "text_pair", "different_prob", "same_prob", "label"]
        assert (rows[0]["text"], rows[0]["text_pair"]) == items[0]
        assert rows[0]["label"] == max(("different", "same"), key=lambda name: rows[0][f"{name}_prob"])
        swapped = peft_qlora.predict([items[0][::-1]], model_dir=model_dir)[0]
        assert swapped["same_prob"] != rows[0]["same_prob"], "the order of a pair matters: both texts are read"
    if kind == "multi-label":
        for row in rows:
            assert list(row) == ["text", "neg_prob", "pos_prob", "strong_prob", "labels"]
            assert row["labels"] == [name for name in ("neg", "pos", "strong") if row[f"{name}_prob"] > 0.5]
        assert sum(row[f"{name}_prob"] for name in ("neg", "pos", "strong")) != pytest.approx(1), "sigmoids"
    if kind == "regression":
        assert [list(row) for row in rows] == [["text", "score"]] * 3
        scores = [row["score"] for row in rows]
        # in the ratings' units (1 to 10, mean 5.5), not the standardised ones the loss measures (mean 0): single
        # scores of the tiny model may overshoot the range (11.1 on a CPU with AVX512-BF16)
        assert len(set(scores)) == 3 and 1 < sum(scores) / 3 < 10, scores


def test_a_multi_label_threshold_decides_which_labels_are_given(trained_tasks):
    from dataclasses import replace

    classifier = peft_qlora.Classifier.load(str(trained_tasks["multi-label"][0] / "model"))
    texts = committed("test", 32)["text"]
    probabilities = classifier.probabilities(texts)
    for threshold in (0.2, 0.5, 0.8):
        classifier.task = replace(classifier.task, threshold=threshold)
        given = [row["labels"] for row in classifier(texts)]
        assert given == [[name for name, p in zip(classifier.label_names, probs) if p > threshold]
                         for probs in probabilities]
    assert len({p > 0.5 for probs in probabilities for p in probs}) == 2, "some labels above 0.5, some below"


def read(path):
    import pandas as pd

    return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)


@pytest.mark.parametrize("kind", list(TASK_ARGS))
def test_predict_file_writes_each_task_s_predictions(kind, trained_tasks, task_files, tmp_path):
    model_dir = trained_tasks[kind][0] / "model"
    out = tmp_path / ("out.csv" if kind == "multi-label" else "out.parquet")  # a csv cell holds a list as JSON
    columns = ["text", "text_pair"] if kind == "pairs" else ["text"]
    result = run_cli("predict", "--model-dir", model_dir, "--file", task_files[kind]["test"], "--text-column",
                     *columns, "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    got, source = read(out), read(type(out)(task_files[kind]["test"]))
    assert list(got.columns[:len(source.columns)]) == list(source.columns) and len(got) == len(source) == 32
    items = list(zip(got["text"], got["text_pair"])) if kind == "pairs" else got["text"].tolist()
    expected = peft_qlora.predict(items, model_dir=str(model_dir))
    if kind == "pairs":
        assert got["predicted_label"].tolist() == [row["label"] for row in expected]
        assert got["same_prob"].tolist() == pytest.approx([row["same_prob"] for row in expected], abs=1e-6)
    if kind == "multi-label":
        assert [json.loads(cell) for cell in got["predicted_labels"]] == [row["labels"] for row in expected]
        assert got["strong_prob"].tolist() == pytest.approx([row["strong_prob"] for row in expected], abs=1e-6)
    if kind == "regression":
        assert list(got.columns[len(source.columns):]) == ["predicted_score"]
        assert got["predicted_score"].tolist() == pytest.approx([row["score"] for row in expected], abs=1e-5)


PIPELINE = """import sys, json
sys.modules['peft'] = sys.modules['bitsandbytes'] = None  # as where neither is installed
from transformers import pipeline
classify = pipeline('text-classification', model=sys.argv[1], top_k=None)
print(json.dumps([{d['label']: d['score'] for d in row} for row in classify(json.loads(sys.argv[2]), truncation=True)]))
print(json.dumps([classify.model.config.problem_type, classify.model.config.id2label]))
"""


@pytest.mark.parametrize("kind", list(TASK_ARGS))
def test_each_task_s_merged_export_serves_through_a_plain_pipeline(kind, trained_tasks, tmp_path):
    """The pipeline's inputs as transformers takes them ({"text", "text_pair"} for a pair) on long reviews too,
    truncated as the run truncated them (the head; a pair's longer text first, as the tokenizers' longest_first)."""
    model_dir = trained_tasks[kind][0] / "model"
    out = tmp_path / "merged"
    result = run_cli("export", "--merged", out, "--model-dir", model_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    reviews = committed("test", 6)["text"]
    items = example(kind) + (list(zip(reviews[:3], reviews[3:])) if kind == "pairs" else reviews)
    given = [{"text": a, "text_pair": b} for a, b in items] if kind == "pairs" else items
    served = subprocess.run([sys.executable, "-c", PIPELINE, str(out), json.dumps(given)], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert served.returncode == 0, served.stderr[-3000:]
    scores, (problem_type, id2label) = map(json.loads, served.stdout.strip().split("\n"))
    assert problem_type == peft_qlora.TASKS[{"pairs": "classification"}.get(kind, kind)].problem_type
    expected = peft_qlora.predict(items, model_dir=str(model_dir))
    # fp16 rounds each weight by up to 1 part in 2,048 (tests/test_serving.py: 3e-3 for the tiny model's
    # probabilities); a score is a rating of up to 10
    for got, want in zip(scores, expected):
        if kind == "regression":
            assert id2label == {"0": "score"} and got["score"] == pytest.approx(want["score"], abs=3e-2)
        else:
            assert set(got) == set(id2label.values()) == set(name.removesuffix("_prob") for name in want
                                                             if name.endswith("_prob"))
            for name in got:
                assert got[name] == pytest.approx(want[f"{name}_prob"], abs=3e-3)
    spread = [row.get("score", row.get("same_prob", row.get("strong_prob"))) for row in expected]
    assert max(spread) - min(spread) > 1e-2, "the inputs get different outputs, so matching them means something"


def test_pairs_are_encoded_as_the_tokenizer_encodes_text_with_text_pair(tmp_path):
    """BERT: [CLS] a [SEP] b [SEP], token types 0 then 1. A long pair loses tokens from its longer text first (the
    shorter keeps all of its tokens while it is at most half of what is left, else both keep half), and
    --truncation applies to each text of the pair."""
    from transformers import BertTokenizer

    words = "one two three four five six seven eight nine ten eleven twelve".split()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab))

    def pair(a, b, max_length, truncation="head"):
        encoded = peft_qlora.encode(tokenizer, [a], max_length, truncation, [b])
        ids, types = encoded["input_ids"][0], encoded["token_type_ids"][0]
        assert len(ids) == len(types) <= max_length
        return tokenizer.decode(ids), types

    assert pair("one two", "three", 64) == ("[CLS] one two [SEP] three [SEP]", [0, 0, 0, 0, 1, 1])
    twelve = " ".join(words)
    # 3 special tokens and a budget of 7: the short text keeps its 2, the long one 5
    assert pair(twelve, "one two", 10)[0] == "[CLS] one two three four five [SEP] one two [SEP]"
    assert pair("one two", twelve, 10)[0] == "[CLS] one two [SEP] one two three four five [SEP]"
    # Both longer than half: each keeps half, and the cut follows --truncation within each text
    assert pair(twelve, twelve, 11)[0] == "[CLS] one two three four [SEP] one two three four [SEP]"
    assert pair(twelve, twelve, 11, "tail")[0] == "[CLS] nine ten eleven twelve [SEP] nine ten eleven twelve [SEP]"
    assert pair(twelve, twelve, 11, "head+tail")[0] == ("[CLS] one ten eleven twelve [SEP] one ten eleven twelve "
                                                        "[SEP]")
    # With --truncation head, exactly what the tokenizer's own longest_first keeps (the pipeline's truncation)
    for a, b, n in ((twelve, "one two", 10), ("three four five", twelve, 9), (twelve, twelve, 11)):
        ours = peft_qlora.encode(tokenizer, [a], n, "head", [b])
        theirs = tokenizer(a, b, truncation="longest_first", max_length=n)
        assert ours["input_ids"][0] == theirs["input_ids"] and ours["token_type_ids"][0] == theirs["token_type_ids"]


def test_a_decoder_pads_and_joins_pairs_with_its_end_of_sequence_token(tiny_llama, task_files, tmp_path):
    """A decoder tokenizer without a padding token and whose pair template puts nothing between the two texts (as
    SmolLM2's): padded with its end-of-sequence token, which also joins the texts, in training, in the saved
    tokenizer, and so in predict() and a pipeline reading the export."""
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_llama)
    assert plain("a fine", "film")["input_ids"] == plain("a fine")["input_ids"] + plain("film")["input_ids"]
    out = tmp_path / "run"
    result = run_cli(*train_args(tiny_llama, task_files["pairs"], out), "--text-column", "text", "text_pair",
                     "--epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Pairs of texts are joined by the tokenizer's '<|endoftext|>' token" in result.stderr
    assert "padding with its end-of-sequence token" in result.stderr
    saved = peft_qlora.load_tokenizer(str(out / "model"), pairs=True)
    again = AutoTokenizer.from_pretrained(out / "model")  # as transformers' pipeline reads it
    for tokenizer in (saved, again):
        assert tokenizer("a fine", "film")["input_ids"] == (plain("a fine")["input_ids"] + [plain.eos_token_id]
                                                           + plain("film")["input_ids"])
        assert tokenizer("a fine film")["input_ids"] == plain("a fine film")["input_ids"], "single texts unchanged"
    rows = peft_qlora.predict(example("pairs"), model_dir=str(out / "model"))
    assert [row["label"] in ("different", "same") for row in rows] == [True, True]


def test_a_multi_label_subset_is_balanced_by_each_text_s_rarest_label(tmp_path):
    """"Balanced" for multi-label: texts are drawn evenly across their rarest label (a text without labels in a
    group of its own), so a rare label keeps as many texts as the draw allows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from collections import Counter

    labels = [["common"]] * 80 + [["common", "rare"]] * 10 + [[]] * 30
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(120)], "labels": labels}), path)
    data = peft_qlora.load_data(peft_qlora.parse_args(["--train-file", str(path), "--eval-file", str(path),
                                                       "--calibration", "off",
                                                       "--label-column", "labels", "--train-size", "30",
                                                       "--eval-size", "all"]))
    assert data.task.kind == "multi-label" and data.task.label_names == ["common", "rare"]
    drawn = Counter(tuple(row) for row in data.train["labels"])
    assert drawn == {(1.0, 0.0): 10, (1.0, 1.0): 10, (0.0, 0.0): 10}
    assert len(data.test) == 120


def test_0_1_lists_are_multi_label_with_the_given_names(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": [i % 2, 1, int(i % 3 == 0)]}) + "\n"
                            for i in range(12)))
    args = ["--train-file", str(path), "--eval-file", str(path), "--train-size", "all", "--eval-size", "all",
            "--calibration", "off"]
    data = peft_qlora.load_data(peft_qlora.parse_args(args + ["--label-names", "odd", "any", "third"]))
    assert data.task.label_names == ["odd", "any", "third"] and data.train["labels"][0] == [0.0, 1.0, 1.0]
    assert peft_qlora.load_data(peft_qlora.parse_args(args)).task.label_names == ["0", "1", "2"]


def test_regression_trains_on_the_target_in_units_of_its_spread(tmp_path):
    import statistics

    path = tmp_path / "d.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    scores = [0.5 * i for i in range(20)]
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(20)], "label": scores}), path)
    data = peft_qlora.load_data(peft_qlora.parse_args(["--train-file", str(path), "--eval-file", str(path),
                                                       "--train-size", "all", "--eval-size", "all"]))
    task = data.task
    assert task.kind == "regression" and task.num_labels == 1 and task.label_names == ["score"]
    assert task.target_scale == pytest.approx(statistics.pstdev(scores))
    assert task.target_mean == pytest.approx(statistics.fmean(scores))
    assert sorted(data.train["labels"]) == scores, "in their own units: the loss scales them"


def test_compute_metrics_of_each_task():
    import numpy as np

    multi = peft_qlora.MultiLabel(["a", "b", "c"], threshold=0.5)
    logits = np.array([[2.0, -2.0, 0.1], [-1.0, 3.0, -0.1], [1.0, 1.0, 1.0], [-3.0, -3.0, -3.0]])
    labels = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 0]])  # predicted: 101, 010, 111, 000
    got = multi.metrics(logits, labels)
    # true positives 2 + 1 + 3, false negatives 1 (b's c), no false positives: micro F1 = 12 / 13
    assert got["f1_micro"] == pytest.approx(12 / 13) and got["subset_accuracy"] == 0.75
    assert got["f1_macro"] == pytest.approx((1 + 1 + 0.8) / 3)
    stricter = replace(multi, threshold=0.9).metrics(logits, labels)
    assert stricter["subset_accuracy"] == 0.25, "only the text with no labels is right at 0.9"

    regression = peft_qlora.Regression(["score"], target_scale=2.0, target_mean=5.0)
    true = np.array([2.0, 4.0, 6.0, 8.0])  # the labels, in their own units
    predicted = np.array([[1.5], [2.0], [2.5], [4.0]])  # the outputs, in units of the scale: 3, 4, 5, 8
    got = regression.metrics(predicted, true)
    assert got["rmse"] == pytest.approx(math.sqrt((1 + 0 + 1 + 0) / 4)) and got["mae"] == pytest.approx(0.5)
    assert got["r2"] == pytest.approx(1 - 2 / 20) and got["spearman"] == pytest.approx(1.0)
    assert 0.9 < got["pearson"] < 1
    flat = regression.metrics(np.ones((4, 1)), true)
    assert math.isnan(flat["pearson"]) and math.isnan(flat["spearman"]), "undefined for a constant prediction"


def test_the_regression_loss_is_measured_in_units_of_the_target_s_spread():
    from types import SimpleNamespace

    import torch

    model = torch.nn.Linear(1, 1)  # the hook reads only whether the model trains
    loss = peft_qlora.Regression(["score"], target_scale=2.0).loss_function(model)
    outputs = SimpleNamespace(logits=torch.tensor([[1.0], [2.0]]))
    labels = torch.tensor([4, 2])  # 2 and 1 in units of the spread: errors 1 and 1
    model.train()
    assert loss(outputs, labels, num_items_in_batch=torch.tensor(4)).item() == 0.5, "summed over the step's 4"
    model.eval()
    assert loss(outputs, labels).item() == 1.0
    assert peft_qlora.Classification(["a", "b"]).loss_function(model) is None, "the model's own"
    assert peft_qlora.MultiLabel(["a", "b"]).loss_function(model) is None, "the model's own"
    weighted = peft_qlora.Classification(["a", "b"], class_weights=[1.0, 3.0]).loss_function(model)
    logits, classes = SimpleNamespace(logits=torch.tensor([[0.0, 0.0], [0.0, 0.0]])), torch.tensor([0, 1])
    model.train()
    assert weighted(logits, classes, num_items_in_batch=torch.tensor(2)).item() == pytest.approx(2 * 0.6931, abs=1e-4)
    model.eval()
    assert weighted(logits, classes).item() == pytest.approx(0.6931, abs=1e-4), "plain mean while evaluated"


def test_balanced_weights_per_task():
    multi = peft_qlora.MultiLabel(["a", "b"])
    labels = [[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]  # a: 3 of 4, b: 1 of 4
    assert multi.fitted(labels, balanced=True).class_weights == pytest.approx([1 / 3, 3.0])
    assert multi.fitted(labels, balanced=False).class_weights is None
    # scikit-learn's "balanced": texts / (classes x each class's texts)
    assert peft_qlora.Classification(["x", "y"]).fitted([0, 0, 0, 1], balanced=True).class_weights == \
        pytest.approx([4 / 6, 4 / 2])
    with pytest.raises(peft_qlora.UserError, match="a regression has none"):
        peft_qlora.Regression(["score"]).fitted([1.0, 2.0], balanced=True)
    with pytest.raises(peft_qlora.UserError, match="have no b"):
        multi.fitted([[1.0, 0.0]], balanced=True)


def parquet(path, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return str(path)


def csv(path, lines):
    path.write_text("text,label\n" + "".join(line + "\n" for line in lines))
    return str(path)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


TEXTS = ["great film", "awful film", "loved it", "hated it"]
BAD_INPUT = {
    "labels mixing lists and names": (
        lambda t: ["--train-file", jsonl(t / "m.jsonl", [{"text": x, "label": y} for x, y in
                                                       zip(TEXTS, [["a"], "b", ["a", "b"], []])])],
        "column 'label' mixes lists (multi-label) and single labels (row 1: 'b')"),
    "eval labels the training data never had": (
        lambda t: ["--train-file", parquet(t / "tr.parquet", text=TEXTS, label=[["a"], ["b"], ["a", "b"], []]),
                   "--eval-file", parquet(t / "ev.parquet", text=TEXTS, label=[["a"], ["c"], ["a"], []])],
        "the evaluation data has labels the training data lacks: c"),
    "regression targets that are names": (
        lambda t: ["--train-file", parquet(t / "n.parquet", text=TEXTS, label=["a", "b", "a", "b"]),
                   "--task", "regression"],
        "--task regression needs numbers, but the labels are names"),
    "a NaN target": (
        lambda t: ["--train-file", parquet(t / "nan.parquet", text=TEXTS, label=[1.5, float("nan"), 2.0, 3.0])],
        "1 regression targets that are NaN or infinite (first at row 1: nan)"),
    "an infinite target": (
        lambda t: ["--train-file", parquet(t / "inf.parquet", text=TEXTS, label=[1.5, 2.5, float("inf"), 3.0])],
        "NaN or infinite (first at row 2: inf)"),
    "a pair's second column missing": (
        lambda t: ["--train-file", parquet(t / "p.parquet", text=TEXTS, label=[0, 1, 0, 1]),
                   "--text-column", "text", "hypothesis"],
        "has no column 'hypothesis' (its columns: text, label); name the right one with --text-column"),
    "a pair's second column not texts": (
        lambda t: ["--train-file", parquet(t / "p.parquet", text=TEXTS, other=[1, 2, 3, 4], label=[0, 1, 0, 1]),
                   "--text-column", "text", "other"],
        "column 'other' has 4 values that are not strings (first at row 0: 1)"),
    "three text columns": (
        lambda t: ["--text-column", "a", "b", "c"],
        "--text-column takes one column, or two for pairs of texts; got 3: a b c"),
    "a pair of one column twice": (lambda t: ["--text-column", "text", "text"], "a pair needs two different columns"),
    "a threshold of 1": (lambda t: ["--threshold", "1"], "--threshold 1.0: must be a number in (0, 1)"),
    "a threshold of 0": (lambda t: ["--threshold", "0"], "--threshold 0.0: must be a number in (0, 1)"),
    "multi-label asked of single labels": (
        lambda t: ["--train-file", parquet(t / "s.parquet", text=TEXTS, label=[0, 1, 0, 1]), "--task", "multi-label"],
        "--task multi-label needs a list of labels per row (names, or 0/1 per label), but the labels are integers"),
    "classification asked of fractional scores": (
        lambda t: ["--train-file", parquet(t / "f.parquet", text=TEXTS, label=[0.5, 1.5, 2.0, 3.25]),
                   "--task", "classification"],
        "--task classification needs class ids (integers) or names, but the labels are numbers with fractions"),
    "class weights for a regression": (
        lambda t: ["--train-file", parquet(t / "r.parquet", text=TEXTS, label=[0.5, 1.5, 2.0, 3.25]),
                   "--class-weights", "balanced"],
        "--class-weights balanced weighs classes, and a regression has none"),
    "0/1 lists of different lengths": (
        lambda t: ["--train-file", jsonl(t / "w.jsonl", [{"text": x, "label": y} for x, y in
                                                       zip(TEXTS, [[0, 1], [1, 0], [1, 1, 0], [0, 0]])])],
        "must give 0 or 1 for each label, the same number in every row: the train data's column 'label' has "
        "[1, 1, 0] at row 2"),
    "a word among numbers in a csv": (  # the whole column is read as text, the evaluation file's as numbers
        lambda t: ["--train-file", csv(t / "r.csv", [f"review {i},{i % 10 + 1}" for i in range(60)] + ["one more,ten"]),
                   "--eval-file", csv(t / "e.csv", [f"review {i},{i % 10 + 1}" for i in range(8)]),
                   "--task", "regression"],
        "the train data's column 'label' holds numbers, but 1 rows hold something else (row 60: 'ten')"),
    "a list among names": (
        lambda t: ["--train-file", jsonl(t / "n.jsonl", [{"text": x, "tags": y} for x, y in
                                                       zip(TEXTS, ["a", "b", ["a", "b"], "a"])]),
                   "--label-column", "tags"],
        "the train data's column 'tags' mixes lists (multi-label) and single labels (row 2: ['a', 'b'])"),
    "names in one split, integers in the other": (
        lambda t: ["--train-file", parquet(t / "s.parquet", text=TEXTS, label=["a", "b", "a", "b"]),
                   "--eval-file", parquet(t / "i.parquet", text=TEXTS, label=[0, 1, 0, 1])],
        "the training labels are names (column 'label', row 0: 'a') but the evaluation labels are integers "
        "(column 'label', row 0: 0)"),
    "true and false for labels": (
        lambda t: ["--train-file", parquet(t / "b.parquet", text=TEXTS, label=[True, False, True, False])],
        "the train data's column 'label' holds bool values (row 0: True): labels must be all integers"),
    "a number in lists of names": (
        lambda t: ["--train-file", jsonl(t / "m.jsonl", [{"text": x, "label": y} for x, y in
                                                       zip(TEXTS, [["a"], ["b"], ["a", 3], []])])],
        "the train data's column 'label': multi-label lists hold names, or 0/1 per label; row 2 holds ['a', 3]"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_each_bad_task_input_is_one_clear_line_and_leaves_nothing(case, tiny_bert, tmp_path, capsys, caplog):
    make, expected = BAD_INPUT[case]
    given = make(tmp_path)
    if "--train-file" in given and "--eval-file" not in given:  # the same file for both
        given += ["--eval-file", given[given.index("--train-file") + 1]]
    out = tmp_path / "out"
    status, said = run_main(["--model", tiny_bert, "--train-size", "all", "--eval-size", "all",
                             "--output-dir", out, "--images-dir", out / "images", *given], capsys, caplog)
    assert status in (1, 2) and expected in said, said[-2000:]
    assert "Traceback" not in said and not out.exists()


def test_predict_refuses_inputs_of_the_other_shape(trained_tasks, trained, tmp_path, capsys, caplog):
    pairs, single = str(trained_tasks["pairs"][0] / "model"), str(trained[0] / "model")
    with pytest.raises(TypeError, match="this model classifies pairs of texts"):
        peft_qlora.predict("one text", model_dir=pairs)
    with pytest.raises(TypeError, match=r"got the pair \(.a., .pair.\): this model classifies single texts"):
        peft_qlora.predict([("a", "pair")], model_dir=single)
    with pytest.raises(TypeError, match="got tuple"):
        peft_qlora.predict([("a", "b", "c")], model_dir=pairs)
    status, said = run_main(["predict", "--model-dir", pairs, "one", "two", "three"], capsys, caplog)
    assert status == 1 and "give them two at a time (text, text_pair, ...); got 3 texts" in said
    shell = run_cli("predict", "--model-dir", pairs, "A fine film.", "A dull one.")
    assert shell.returncode == 0, shell.stderr[-3000:]
    assert [(row["text"], row["text_pair"]) for row in json.loads(shell.stdout)] == [("A fine film.", "A dull one.")]
    status, said = run_main(["predict", "--model-dir", pairs, "--file", os.path.join(DATA, "imdb_test.parquet"),
                             "--output", tmp_path / "o.csv"], capsys, caplog)
    assert status == 1 and "classifies pairs of texts: name their two columns" in said
    assert not (tmp_path / "o.csv").exists()


def test_two_processes_train_a_multi_label_task(tiny_bert, task_files, tmp_path):
    """Under torchrun the evaluation gathers every process's outputs before the per-label metrics."""
    from test_multiprocess import LAUNCHERS

    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *LAUNCHERS["torchrun"], SCRIPT,
                             *map(str, train_args(tiny_bert, task_files["multi-label"], out)),
                             "--label-column", "labels", "--epochs", "1"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["task"]["kind"] == "multi-label"
    assert sum(label["support"] for label in metrics["after"]["per_label"].values()) == sum(
        len(labels) for labels in (imdb_tasks.rating_labels(r) for r in committed("test", 32)["rating"]))
    assert metrics["training"]["optimizer_steps"] == 4, "64 texts, 8 per step in each of two processes"

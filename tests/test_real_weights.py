"""Real pretrained weights on real reviews: training must teach the model something.

The checkpoint is the MiniLM (a 6-layer BERT, fp16 weights) that .ci/run points PEFT_QLORA_TEST_MODEL at.
"""
import json
import os
import subprocess
import sys

import pytest

import peft_qlora
from conftest import DATA, ROOT, imdb_sample

MODEL = os.environ.get("PEFT_QLORA_TEST_MODEL", "")
pytestmark = pytest.mark.skipif(not os.path.isdir(MODEL),
                                reason="set PEFT_QLORA_TEST_MODEL to a pretrained BERT-architecture folder")


def test_training_lifts_accuracy_and_the_saved_model_predicts_the_same(tmp_path):
    # 512 reviews, 128 tokens, 2 epochs
    args = ["--model", MODEL, "--train-file", os.path.join(DATA, "imdb_train.parquet"),
            "--eval-file", os.path.join(DATA, "imdb_test.parquet"), "--train-size", "all", "--eval-size", "all",
            "--max-length", "128", "--epochs", "2", "--batch-size", "8", "--learning-rate", "1e-3",
            "--truncation", "head",  # as transformers' pipeline truncates, for the exported model below
            "--output-dir", str(tmp_path), "--images-dir", str(tmp_path / "images")]
    import torch

    assert peft_qlora.main(args) == 0
    saved = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert saved["after"]["accuracy"] - saved["before"]["accuracy"] >= 0.15, saved["history"]

    # The checkpoint is fp16 and has no label names: a naive reload came back in fp16 with LABEL_0/LABEL_1.
    reloaded = peft_qlora.Classifier.load(str(tmp_path / "model"))  # a fresh load, outside predict()'s cache
    assert reloaded.label_names == ["neg", "pos"]
    assert reloaded.model.config.id2label == {0: "neg", 1: "pos"}
    assert reloaded.model.base_model.model.bert.embeddings.word_embeddings.weight.dtype == torch.float32
    texts = imdb_sample("test", 24)[0]
    predicted = peft_qlora.predict(texts, model_dir=str(tmp_path / "model"))
    fresh = reloaded.probabilities(texts, batch_size=64)
    for row, probs in zip(predicted, fresh):
        assert row["neg_prob"] == pytest.approx(probs[0], abs=1e-5)
        assert row["pos_prob"] == pytest.approx(probs[1], abs=1e-5)


    # Exported in 16 bits with LoRA merged, served by a plain pipeline (peft and bitsandbytes made unimportable):
    # the same probabilities as predict() within 1e-3 on the test reviews
    merged = tmp_path / "merged"
    assert peft_qlora.main(["export", "--merged", str(merged), "--model-dir", str(tmp_path / "model")]) == 0
    served = subprocess.run([sys.executable, "-c",
                             "import sys, json\n"
                             "sys.modules['peft'] = sys.modules['bitsandbytes'] = None\n"
                             "from transformers import pipeline\n"
                             "classify = pipeline('text-classification', model=sys.argv[1], top_k=None)\n"
                             "scores = classify(json.loads(sys.argv[2]), truncation=True)\n"
                             "print(json.dumps([{d['label']: d['score'] for d in r} for r in scores]))",
                             str(merged), json.dumps(texts)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert served.returncode == 0, served.stderr[-3000:]
    for got, row in zip(json.loads(served.stdout), predicted):
        assert got["pos"] == pytest.approx(row["pos_prob"], abs=1e-3)


@pytest.mark.parametrize("task", ["regression", "multi-label"])
def test_training_teaches_a_regression_and_a_multi_label_task(task, tmp_path):
    """The rating of 256 committed reviews as a number, or as labels (benchmarks/imdb_tasks.py: pos or neg, and
    strong at the scale's ends); 64 tokens, 2 epochs: the lifts it reached are in benchmarks/NOTES.md ("The test
    suite's time")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import imdb_tasks

    files = {}
    for split in ("train", "test"):
        rows = pq.read_table(os.path.join(DATA, f"imdb_{split}.parquet")).to_pydict()
        labels = rows["rating"] if task == "regression" else [imdb_tasks.rating_labels(r) for r in rows["rating"]]
        files[split] = str(tmp_path / f"{split}.parquet")
        pq.write_table(pa.table({"text": rows["text"], "target": labels}), files[split])
    args = ["--model", MODEL, "--train-file", files["train"], "--eval-file", files["test"], "--label-column", "target",
            "--train-size", "256", "--eval-size", "128", "--max-length", "64", "--epochs", "2", "--batch-size", "8",
            "--calibration", "off", "--output-dir", str(tmp_path / "run"), "--images-dir", str(tmp_path / "images")]
    assert peft_qlora.main(args + (["--task", "regression"] if task == "regression" else [])) == 0
    saved = json.loads((tmp_path / "run" / "model" / "metrics.json").read_text())
    before, after = saved["before"], saved["after"]
    if task == "regression":
        assert after["pearson"] - before["pearson"] >= 0.2 and after["rmse"] < before["rmse"], saved["history"]
    else:
        assert after["f1_micro"] - before["f1_micro"] >= 0.1, saved["history"]
    texts = imdb_sample("test", 8)[0]
    predicted = peft_qlora.predict(texts, model_dir=str(tmp_path / "run" / "model"))
    key = "score" if task == "regression" else "strong_prob"
    fresh = peft_qlora.Classifier.load(str(tmp_path / "run" / "model"))(texts)
    assert [row[key] for row in fresh] == pytest.approx([row[key] for row in predicted], abs=1e-5)

"""Serving a trained model: a notebook's predict() loads it quietly, `predict --file` classifies a whole file in
chunks, and `export --merged` writes a model transformers' pipeline serves without peft or bitsandbytes."""
import json
import os
import subprocess
import sys

import pytest

import peft_qlora
from conftest import DATA, ROOT, imdb_sample, run_cli, run_main, train_args

TEXTS = ["An absolute delight from start to finish.", "Dull, slow and far too long.", "Fine.",
         *imdb_sample("test", 9)[0]]


def python(code, *args):
    """Python code in a fresh process, as a notebook would run it."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)


def test_a_notebook_predict_prints_nothing_but_its_answer(trained):
    result = python("import sys, json; from peft_qlora import predict; "
                    "print(json.dumps(predict(sys.argv[1], model_dir=sys.argv[2])))", "A fine film.",
                    trained[0] / "model")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["text"] == "A fine film."
    assert result.stderr == "", "no load report, warning or progress bar"


def reviews_file(folder, kind):
    """40 committed reviews as a file of this kind, the text under another name and an id column beside it."""
    import pandas as pd

    rows = pd.read_parquet(os.path.join(DATA, "imdb_test.parquet")).head(40)
    rows = rows.rename(columns={"text": "review"}).assign(id=range(40))
    path = folder / f"in.{kind}"
    {"csv": lambda: rows.to_csv(path, index=False), "jsonl": lambda: rows.to_json(path, orient="records", lines=True),
     "parquet": lambda: rows.to_parquet(path)}[kind]()
    return path, rows


def read_predictions(path):
    import pandas as pd

    kind = path.suffix[1:]
    return {"csv": pd.read_csv, "jsonl": lambda p: pd.read_json(p, lines=True), "parquet": pd.read_parquet}[kind](path)


def check_predictions(got, rows, model_dir):
    assert list(got.columns) == ["review", "label", "rating", "id", "predicted_label", "neg_prob", "pos_prob"]
    assert got["id"].tolist() == list(range(40)) and got["review"].tolist() == rows["review"].tolist()
    expected = peft_qlora.predict(rows["review"].tolist(), model_dir=str(model_dir))
    assert got["predicted_label"].tolist() == [r["label"] for r in expected]
    assert got["pos_prob"].tolist() == pytest.approx([r["pos_prob"] for r in expected], abs=1e-6)


def test_predict_file_from_the_shell_keeps_every_row_in_order_with_its_prediction(trained, tmp_path):
    path, rows = reviews_file(tmp_path, "csv")
    out = tmp_path / "out.jsonl"
    result = run_cli("predict", "--model-dir", trained[0] / "model", "--file", path, "--text-column", "review",
                     "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    check_predictions(read_predictions(out), rows, trained[0] / "model")
    assert "Predicting" in result.stderr and f"Wrote 40 rows with their predictions to {out}" in result.stderr


@pytest.mark.parametrize("source, output", [("jsonl", "parquet"), ("parquet", "csv")])
def test_predict_file_reads_and_writes_every_kind(source, output, trained, tmp_path):
    path, rows = reviews_file(tmp_path, source)
    out = tmp_path / f"out.{output}"
    assert peft_qlora.predict_file(str(path), str(out), "review", model_dir=str(trained[0] / "model")) == 40
    check_predictions(read_predictions(out), rows, trained[0] / "model")


def test_predict_file_streams_in_chunks_to_the_same_rows(trained, tmp_path):
    """A million rows must not be held at once: a file of more rows than a chunk (PREDICT_CHUNK) is read, classified
    and written in chunks, each row in order with what predict() gives it."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = peft_qlora.PREDICT_CHUNK + 7
    reviews = [review[:60] for review in imdb_sample("test", 256)[0]]
    texts = [f"{i}: {reviews[i % len(reviews)]}" for i in range(rows)]
    source, out = tmp_path / "many.parquet", tmp_path / "out.parquet"
    pq.write_table(pa.table({"n": list(range(rows)), "text": texts}), source)
    model_dir = str(trained[0] / "model")
    assert peft_qlora.predict_file(str(source), str(out), model_dir=model_dir) == rows
    got = pd.read_parquet(out)
    assert got["n"].tolist() == list(range(rows)) and got["text"].tolist() == texts
    expected = peft_qlora.predict(texts, model_dir=model_dir)
    assert got["predicted_label"].tolist() == [row["label"] for row in expected]
    assert got["pos_prob"].tolist() == pytest.approx([row["pos_prob"] for row in expected], abs=1e-6)


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", ["missing column", "unreadable file", "output exists", "no output", "both",
                                  "unknown output type", "a row without text"])
def test_predict_file_errors_say_what_to_fix(case, trained, tmp_path, capsys, caplog):
    good = write(tmp_path / "good.csv", "text,label\nfine,1\nbad,0\n")
    args, expected = {
        "missing column": (["--file", good, "--text-column", "review", "--output", tmp_path / "o.csv"],
                           "has no column 'review' (its columns: text, label)"),
        "unreadable file": (["--file", write(tmp_path / "x.parquet", "not parquet"), "--output", tmp_path / "o.csv"],
                            "cannot read it as parquet"),
        "output exists": (["--file", good, "--output", good], "exists: choose another name"),
        "no output": (["--file", good], "--file needs --output"),
        "both": (["some text", "--file", good, "--output", tmp_path / "o.csv"], "not both"),
        "unknown output type": (["--file", good, "--output", tmp_path / "o.xlsx"], "unknown file type"),
        "a row without text": (["--file", write(tmp_path / "gap.csv", "text,label\nfine,1\n,0\n"),
                                "--output", tmp_path / "o.csv"], "row 1 holds no text"),
    }[case]
    status, said = run_main(["predict", "--model-dir", trained[0] / "model", *args], capsys, caplog)
    assert status != 0 and expected in said, said[-2000:]
    assert not (tmp_path / "o.csv").exists() and not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_export_merged_serves_through_a_plain_pipeline(tiny_bert, data_files, tmp_path, capsys, caplog):
    """Trained keeping each review's head, as the pipeline truncates, so long reviews compare too."""
    assert peft_qlora.main(train_args(tiny_bert, data_files, tmp_path / "run", "--truncation", "head")) == 0
    model_dir = tmp_path / "run" / "model"
    out = tmp_path / "merged"
    result = run_cli("export", "--merged", out, "--model-dir", model_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    # As where neither peft nor bitsandbytes is installed: importing either fails
    served = python("import sys, json\n"
                    "sys.modules['peft'] = sys.modules['bitsandbytes'] = None\n"
                    "from transformers import pipeline\n"
                    "classify = pipeline('text-classification', model=sys.argv[1], top_k=None)\n"
                    "scores = classify(json.loads(sys.argv[2]), truncation=True)\n"
                    "print(json.dumps([{d['label']: d['score'] for d in r} for r in scores]))\n"
                    "print(classify.model.dtype)", out, json.dumps(TEXTS))
    assert served.returncode == 0, served.stderr[-3000:]
    scores, dtype = served.stdout.strip().split("\n")
    assert dtype == "torch.float16"
    expected = peft_qlora.predict(TEXTS, model_dir=str(model_dir))
    for got, want in zip(json.loads(scores), expected):
        assert set(got) == {"neg", "pos"}, "the real label names"
        # fp16 rounds each weight by up to 1 part in 2,048; this random model's weights are ten times a real one's
        # (so that texts get distinct scores), which moved probabilities by up to 1.3e-3 over three seeds. Real
        # weights are held to 1e-3: tests/test_real_weights.py
        assert got["pos"] == pytest.approx(want["pos_prob"], abs=3e-3)
    spread = max(r["pos_prob"] for r in expected) - min(r["pos_prob"] for r in expected)
    assert spread > 1e-2, "the texts get different probabilities, so matching them means something"

    status, said = run_main(["export", "--merged", out, "--model-dir", model_dir], capsys, caplog)
    assert status != 0 and "exists" in said


def test_export_without_a_trained_model_says_how_to_train(tmp_path, capsys, caplog):
    status, said = run_main(["export", "--merged", tmp_path / "merged", "--model-dir", tmp_path / "nothing"], capsys,
                            caplog)
    assert status == 1 and "Traceback" not in said
    assert "no trained model" in said and not (tmp_path / "merged").exists()

"""Shared fixtures: tiny real models (random weights, their own WordPiece vocabulary) and small data files."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
SCRIPT = os.path.join(ROOT, "peft_qlora.py")
sys.path.insert(0, ROOT)


def run_cli(*args, cwd=ROOT, timeout=600):
    """The real command line in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def imdb_sample(split, n):
    """The first n committed real IMDb reviews of a split, as (texts, labels)."""
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(DATA, f"imdb_{split}.parquet")).slice(0, n)
    return table.column("text").to_pylist(), table.column("label").to_pylist()


@pytest.fixture(scope="session")
def vocab_file(tmp_path_factory):
    from tokenizers import BertWordPieceTokenizer

    texts, _ = imdb_sample("train", 512)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=1000)
    folder = tmp_path_factory.mktemp("vocab")
    wordpiece.save_model(str(folder))
    return str(folder / "vocab.txt")


def save_tiny_model(folder, config, vocab_file):
    import torch
    from transformers import AutoModel, BertTokenizer

    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer = BertTokenizer(vocab=vocab_file)
    assert tokenizer.unk_token_id not in tokenizer("the movie was good")["input_ids"], "the vocabulary loaded"
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, vocab_file):
    """A 2-layer BERT: random weights, the real architecture, so 4-bit layers and LoRA are the real ones."""
    from transformers import BertConfig

    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128,
                        initializer_range=0.2)  # wider than BERT's 0.02, so texts get distinct scores
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"), config, vocab_file)


@pytest.fixture(scope="session")
def data_files(tmp_path_factory):
    """Small train/eval parquet files of real reviews with integer labels (0 = neg, 1 = pos)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("data")
    paths = {}
    for split, n in (("train", 64), ("test", 32)):
        texts, labels = imdb_sample(split, n)
        paths[split] = str(folder / f"{split}.parquet")
        pq.write_table(pa.table({"text": texts, "label": labels}), paths[split])
    return paths


def train_args(model, data_files, out, *extra):
    """Command-line arguments for a quick run on the tiny model."""
    return ["--model", model, "--train-file", data_files["train"], "--eval-file", data_files["test"],
            "--train-size", "all", "--eval-size", "all", "--max-length", "64", "--epochs", "2",
            "--batch-size", "8", "--learning-rate", "1e-3", "--output-dir", str(out),
            "--images-dir", str(out / "images"), *extra]

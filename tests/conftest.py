"""Shared fixtures: tiny real models (random weights, their own WordPiece vocabulary) and small data files.

The test files follow peft_qlora.py's sections: test_cli and test_errors (the settings, the command line, every bad
input), test_recipe (run, end to end, its losses pinned), test_data, test_tasks, test_model and test_decoder (the
steps), test_evaluation (evaluate, train, the charts), test_serving (predict, files, the export), then how the steps
run: test_fast_path, test_sharding, test_batch_planning, test_long_runs, test_multiprocess, and test_workarounds
(bitsandbytes on both kinds of CPU). test_real_weights trains a real pretrained model where one is given;
test_benchmark runs benchmarks/bench.py's smoke test."""
import os
import subprocess
import sys

import pytest

# No hub here: tests that call the script in this process fail fast rather than wait on the network (set before any
# Hugging Face library is imported, which reads it once)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytest.ini's two workers share a 2-core machine: one PyTorch thread each, and in the processes they start (set before
# torch is imported; each worker on both cores made the suite slower than one process, benchmarks/NOTES.md)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
SCRIPT = os.path.join(ROOT, "peft_qlora.py")
sys.path.insert(0, ROOT)


def run_cli(*args, cwd=ROOT, timeout=600):
    """The real command line in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_main(args, capsys, caplog):
    """peft_qlora.main in this process, as the command line calls it: (exit status, what it said on stderr)."""
    import peft_qlora

    try:
        status = peft_qlora.main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors exit with status 2
        status = e.code
    return status, capsys.readouterr().err + caplog.text


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


def save_tiny_model(folder, config, vocab_file=None, tokenizer=None):
    """A model of this config with random weights, saved with a WordPiece tokenizer (or the one given)."""
    import torch
    from transformers import AutoModel, BertTokenizer

    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer = tokenizer or BertTokenizer(vocab=vocab_file)
    assert tokenizer.unk_token_id not in tokenizer("the movie was good")["input_ids"], "the vocabulary loaded"
    tokenizer.save_pretrained(folder)
    return str(folder)


def bpe_tokenizer(bos=False):
    """A byte-level BPE tokenizer as decoder LLMs have, trained on the committed reviews, with an end-of-sequence
    token and no padding token (as Llama 3's); with bos=True it starts every text with a BOS token (Llama 3),
    otherwise it adds no special token (SmolLM2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts, _ = imdb_sample("train", 512)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>", "<|begin|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        bpe.post_processor = processors.TemplateProcessing(single="<|begin|> $A", special_tokens=[("<|begin|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|begin|>")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama (the architecture of Llama 3, Mistral's and SmolLM2's) with a tokenizer that has no padding
    token: random weights, real 4-bit layers."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=0, pad_token_id=None, initializer_range=0.2)
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), config, tokenizer=bpe_tokenizer())


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, vocab_file):
    """A 2-layer BERT: random weights, the real architecture, so 4-bit layers and LoRA are the real ones."""
    from transformers import BertConfig

    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128,
                        initializer_range=0.2)  # wider than BERT's 0.02, so texts get distinct scores
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"), config, vocab_file)


@pytest.fixture(scope="session")
def fixed_bert(tmp_path_factory):
    """The tiny BERT's shape with bert-base-uncased's own WordPiece vocabulary (benchmarks/vocab): the same model in
    every run, where tiny_bert's trained vocabulary breaks its ties differently from run to run."""
    from transformers import AutoTokenizer, BertConfig

    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128, initializer_range=0.2)
    return save_tiny_model(tmp_path_factory.mktemp("fixed-bert"), config,
                           tokenizer=AutoTokenizer.from_pretrained(os.path.join(ROOT, "benchmarks", "vocab")))


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


def cpu_runtime(precision="fp32"):
    """What decide_runtime gives a single process on this machine; bf16 too, which bitsandbytes computes on CPUs."""
    import torch

    import peft_qlora

    return peft_qlora.Runtime(torch.device("cpu"), precision)


def train_args(model, data_files, out, *extra):
    """Command-line arguments for a quick run on the tiny model: every training text trained on, so no calibration
    (it needs texts held out; test_calibration runs it)."""
    return ["--model", model, "--train-file", data_files["train"], "--eval-file", data_files["test"],
            "--train-size", "all", "--eval-size", "all", "--max-length", "64", "--epochs", "2",
            "--batch-size", "8", "--learning-rate", "1e-3", "--calibration", "off", "--output-dir", str(out),
            "--images-dir", str(out / "images"), *extra]


def train_through_cli(model, data_files, out):
    """A quick training run through the real command line: (its output folder, the finished process)."""
    result = run_cli(*train_args(model, data_files, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.fixture(scope="session")
def trained(tiny_bert, data_files, tmp_path_factory):
    """The tiny BERT trained once, shared by the tests that read or serve what the run saved."""
    return train_through_cli(tiny_bert, data_files, tmp_path_factory.mktemp("run"))


def classes(*names):
    """The classification Task of these class names (default IMDb's), as load_data decides it for single texts."""
    import peft_qlora

    return peft_qlora.Classification(list(names or ("neg", "pos")))


@pytest.fixture(scope="session")
def calibrated(tiny_bert, tmp_path_factory):
    """The tiny BERT trained through the command line with the default calibration, reading the committed reviews
    as windows of 32 tokens: 64 of 124 training reviews trained on, so the temperature is fit on the other 60. (its
    output folder, the finished process)"""
    import pyarrow.parquet as pq

    out = tmp_path_factory.mktemp("calibrated")
    train = out / "train.parquet"  # 64 reviews to train on and 60 to spare
    pq.write_table(pq.read_table(os.path.join(DATA, "imdb_train.parquet")).slice(0, 124), train)
    result = run_cli("--model", tiny_bert, "--train-file", train,
                     "--eval-file", os.path.join(DATA, "imdb_test.parquet"), "--train-size", "64", "--eval-size", "32",
                     "--max-length", "32", "--truncation", "windows", "--window-stride", "20", "--epochs", "2",
                     "--batch-size", "16", "--learning-rate", "1e-3", "--output-dir", out,
                     "--images-dir", out / "images")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result

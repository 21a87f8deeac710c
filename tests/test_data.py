"""load_data and tokenize: files of every kind, label names, balanced reproducible subsets."""
import json
from collections import Counter

import pytest

import peft_qlora


def config(*args):
    """The settings of these flags; the small data here leaves too few texts to calibrate on (test_calibration)."""
    return peft_qlora.parse_args(["--calibration", "off", *args])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_string_labels_become_sorted_class_names(tmp_path):
    rows = [{"review": f"text {i}", "sentiment": s} for i, s in enumerate(["positive", "negative"] * 5)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, _, evaluation, task, _ = peft_qlora.load_data(config(
        "--train-file", path, "--eval-file", path, "--text-column", "review", "--label-column", "sentiment",
        "--train-size", "all", "--eval-size", "4"))
    names = task.label_names
    assert task == peft_qlora.Classification(["negative", "positive"], ["review"])
    assert train.column_names == ["text", "labels"] and len(train) == 10 and len(evaluation) == 4
    assert sorted(zip(train["text"], train["labels"])) == sorted(
        (r["review"], names.index(r["sentiment"])) for r in rows)


def test_the_config_names_the_data_used(tmp_path):
    """metrics.json records the config: with local files it names them, and no hub dataset."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}])
    local = config("--train-file", path, "--eval-file", path)
    assert local.dataset is None and local.train_file == path
    assert config().dataset == "stanfordnlp/imdb"


def test_integer_labels_get_imdb_names_or_the_given_ones(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{i % 3}\n" for i in range(9)))
    args = ["--train-file", str(path), "--eval-file", str(path), "--train-size", "all", "--eval-size", "all"]
    assert peft_qlora.load_data(config(*args)).task.label_names == ["0", "1", "2"]
    assert peft_qlora.load_data(config(*args, "--label-names", "x", "y", "z")).task.label_names == ["x", "y", "z"]
    subset = peft_qlora.load_data(config(*args, "--train-size", "2", "--eval-size", "2"))
    assert subset.task.label_names == ["0", "1", "2"]

    binary = tmp_path / "b.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b", "c", "d"], "label": [0, 1, 1, 0]}), binary)
    names = peft_qlora.load_data(config("--train-file", str(binary), "--eval-file", str(binary),
                                        "--train-size", "all", "--eval-size", "all")).task.label_names
    assert names == ["neg", "pos"]


def test_a_local_dataset_folder_goes_through_the_hub_loader(tmp_path, data_files):
    import shutil

    shutil.copy(data_files["train"], tmp_path / "train.parquet")
    shutil.copy(data_files["test"], tmp_path / "test.parquet")
    train, _, evaluation, task, _ = peft_qlora.load_data(config("--dataset", str(tmp_path), "--train-size", "20",
                                                          "--eval-size", "all"))
    assert (len(train), len(evaluation), task.label_names) == (20, 32, ["neg", "pos"])


def test_subsets_are_balanced_and_reproducible(tmp_path):
    path = tmp_path / "d.csv"
    # 90 of class 0 and 30 of class 1: a balanced draw of 40 takes 20 of each.
    path.write_text("text,label\n" + "".join(f"t{i},{int(i % 4 == 0)}\n" for i in range(120)))
    args = ["--train-file", str(path), "--eval-file", str(path), "--train-size", "40", "--eval-size", "70"]
    train, _, evaluation, _, _ = peft_qlora.load_data(config(*args))
    assert Counter(train["labels"]) == {0: 20, 1: 20}
    assert Counter(evaluation["labels"]) == {0: 40, 1: 30}  # class 1 runs out; class 0 fills the rest
    assert len(set(train["text"])) == 40
    again = peft_qlora.load_data(config(*args)).train
    other = peft_qlora.load_data(config(*args, "--seed", "7")).train
    assert again["text"] == train["text"] and other["text"] != train["text"]


def test_tokenize_truncates_and_leaves_padding_to_the_batch(tiny_bert):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    ds = Dataset.from_dict({"text": ["short", "a much longer text " * 50], "labels": [0, 1]})
    out = peft_qlora.tokenize(ds, tokenizer, max_length=16, truncation="head")
    lengths = [len(ids) for ids in out["input_ids"]]
    assert lengths[0] < 16 and lengths[1] == 16
    assert "text" not in out.column_names and out["labels"] == [0, 1]
    by_length = peft_qlora.tokenize(ds.select([1, 0]), tokenizer, 16, "head", sort_by_length=True)
    assert by_length["labels"] == [0, 1]


def token_rows(lengths, labels=None):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [list(range(1, n + 1)) for n in lengths],
                              "labels": labels or [i % 2 for i in range(len(lengths))]})


def test_batch_by_tokens_fills_micro_batches_to_the_budget_and_keeps_every_text_once():
    import random

    import torch

    lengths = [random.Random(i).randint(3, 128) for i in range(300)]
    data = token_rows(lengths, labels=list(range(300)))  # the label names the text
    gpu_like = peft_qlora.Runtime(torch.device("cpu"), "fp32", pad_multiple=64)
    rows = peft_qlora.batch_by_tokens(data, max_tokens=8 * 128, runtime=gpu_like, seed=0)
    seen = [label for row in rows for label in row["labels"]]
    assert sorted(seen) == list(range(300)), "each text in exactly one micro-batch"
    for row in rows:
        texts = [lengths[label] for label in row["labels"]]
        assert [len(ids) for ids in row["input_ids"]] == texts, "token ids travel with their labels"
        assert len(texts) * gpu_like.padded(max(texts)) <= 8 * 128, "padded, a micro-batch fits the budget"
    sizes = [len(row["labels"]) for row in rows]
    assert max(sizes) == 8 * 128 // 64, "16 texts of up to 64 tokens, where 8 of 128 would fill the budget"
    assert len(rows) < 300 / 8, "fewer steps than 8 texts a step"
    again = peft_qlora.batch_by_tokens(data, 8 * 128, gpu_like, seed=0)
    other = peft_qlora.batch_by_tokens(data, 8 * 128, gpu_like, seed=1)
    assert again["labels"] == rows["labels"] and other["labels"] != rows["labels"], "texts of equal length: by seed"


@pytest.mark.parametrize("multiple", [None, 64])
def test_collate_pads_micro_batch_rows_and_single_texts_as_transformers_collator_does(tiny_bert, multiple):
    """Training's batches go through pad_batch, as prediction's do: the same tensors as transformers'
    DataCollatorWithPadding, for a row of texts (tokenize) and a micro-batch row (batch_by_tokens) alike."""
    import torch
    from transformers import AutoTokenizer, DataCollatorWithPadding

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    runtime = peft_qlora.Runtime(torch.device("cpu"), "fp32", pad_multiple=multiple)
    texts = token_rows([2, 3, 5], labels=[1, 0, 1])
    rows = peft_qlora.batch_by_tokens(texts, 1000, runtime, seed=0)
    from_rows = peft_qlora.collate(list(rows), tokenizer.pad_token_id, runtime)
    single = peft_qlora.collate(list(texts), tokenizer.pad_token_id, runtime)
    theirs = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)(list(texts))
    assert set(single) == set(theirs) == {"input_ids", "attention_mask", "labels"}
    for key, expected in theirs.items():
        assert single[key].dtype == expected.dtype and single[key].tolist() == expected.tolist(), key
    assert sorted(map(tuple, from_rows["input_ids"].tolist())) == sorted(map(tuple, single["input_ids"].tolist()))
    assert single["attention_mask"].sum(1).tolist() == [2, 3, 5]
    floats = peft_qlora.collate([{"input_ids": [1, 2], "labels": [1.0, 0.0]}], tokenizer.pad_token_id, runtime)
    assert floats["labels"].dtype == torch.float32, "multi-label and regression targets as the loss takes them"


def test_pad_batch_gives_what_the_tokenizer_pads(tiny_bert):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    encoded = peft_qlora.encode(tokenizer, ["a good film", "a bad one " * 30, ""], 80, "head+tail")
    for multiple in (None, 64):
        padded = peft_qlora.pad_batch(encoded, tokenizer.pad_token_id,
                                      peft_qlora.Runtime(torch.device("cpu"), "fp32", pad_multiple=multiple))
        ids, mask = padded["input_ids"], padded["attention_mask"]
        expected = tokenizer.pad(encoded, return_tensors="pt", pad_to_multiple_of=multiple)
        assert ids.tolist() == expected["input_ids"].tolist() and mask.tolist() == expected["attention_mask"].tolist()
        assert ids.dtype == mask.dtype == torch.long and ids.shape[1] == (128 if multiple else 80)


@pytest.mark.parametrize("truncation, kept", [
    ("head", "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"),
    ("tail", "seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty"),
    ("head+tail", "one two three nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen "
                  "twenty"),
])
def test_truncation_keeps_the_head_the_tail_or_both(truncation, kept, tmp_path):
    from transformers import BertTokenizer

    words = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
             "seventeen eighteen nineteen twenty").split()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab))
    budget = len(kept.split()) + 2
    [ids] = peft_qlora.encode(tokenizer, [" ".join(words)], max_length=budget, truncation=truncation)["input_ids"]
    assert tokenizer.decode(ids) == f"[CLS] {kept} [SEP]"
    [short] = peft_qlora.encode(tokenizer, ["three four"], max_length=budget, truncation=truncation)["input_ids"]
    assert tokenizer.decode(short) == "[CLS] three four [SEP]"


@pytest.mark.parametrize("stride, starts", [(None, [0, 3, 6, 9, 11]), (4, [0, 4, 8, 11])])
def test_windows_read_a_long_text_whole_in_overlapping_windows(stride, starts, tmp_path):
    from transformers import BertTokenizer

    words = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
             "seventeen").split()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab))
    encoded = peft_qlora.encode(tokenizer, ["one two", " ".join(words)], max_length=8, truncation="windows",
                                stride=stride)  # windows of 6 words, the last ending at the text's end
    assert encoded["text_of_row"] == [0] + [1] * len(starts)
    windows = [tokenizer.decode(ids) for ids in encoded["input_ids"]]
    assert windows[0] == "[CLS] one two [SEP]", "a text that fits is one window"
    assert windows[1:] == [f"[CLS] {' '.join(words[s:s + 6])} [SEP]" for s in starts]


def test_windows_evaluate_and_predict_each_text_once(calibrated):
    import re

    import torch

    out, result = calibrated
    seen = re.search(r"Windows of 32 tokens: 64 train texts as (\d+), 32 test texts as (\d+), 60 calibration texts "
                     r"as (\d+)", result.stderr)
    assert seen and all(int(n) > texts for n, texts in zip(seen.groups(), (64, 32, 60))), result.stderr[-2000:]
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert sum(map(sum, metrics["after"]["confusion_matrix"])) == 32, "each test text counted once"
    classifier = peft_qlora.Classifier.load(str(out / "model"))
    text = "A film I will think about for a long time: " * 20
    windows = peft_qlora.encode(classifier.tokenizer, [text], 32, "windows", stride=20)
    assert len(windows["input_ids"]) > 3
    with torch.inference_mode():
        each = [classifier.model(input_ids=torch.tensor([ids])).logits[0] for ids in windows["input_ids"]]
    assert classifier.logits([text], batch_size=2)[0].tolist() == pytest.approx(torch.stack(each).mean(0).tolist(),
                                                                                abs=1e-5)


def test_eval_labels_unseen_in_training_are_refused(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    evaluation = write_jsonl(tmp_path / "e.jsonl", [{"text": "a", "label": "z"}])
    with pytest.raises(peft_qlora.UserError, match="labels the training data lacks: z"):
        peft_qlora.load_data(config("--train-file", train, "--eval-file", evaluation))

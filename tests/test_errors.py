"""Every bad input ends with a clear message and a non-zero exit status, never a traceback."""
import os

import pytest

from conftest import SCRIPT, run_cli, run_main, train_args


def write(path, text):
    path.write_text(text)
    return str(path)


def csv_with(tmp_path, body, name="data.csv"):
    return write(tmp_path / name, "text,label\n" + body)


@pytest.fixture
def good_csv(tmp_path):
    return csv_with(tmp_path, "great film,1\nawful film,0\nloved it,1\nhated it,0\n", "good.csv")


def with_data(data_file, *args):
    """Good data, so the run gets as far as the model."""
    return ["--train-file", data_file, "--eval-file", data_file, "--train-size", "all", "--eval-size", "all",
            "--calibration", "off", *args]


def vision_model(folder):
    """A model folder whose architecture transformers cannot load for sequence classification (only its config:
    the script must refuse it before it looks for weights or a tokenizer)."""
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(folder)
    return str(folder)


def config_only(model, folder):
    """A copy of the model's folder with nothing but its config.json."""
    import shutil

    folder.mkdir()
    shutil.copy(os.path.join(model, "config.json"), folder)
    return str(folder)


def mpnet(tiny_bert, folder):
    """A model folder of an architecture peft has no default LoRA targets for (its config, the tiny BERT's
    tokenizer): refused before its weights are looked for."""
    import shutil

    from transformers import MPNetConfig

    MPNetConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                vocab_size=1000).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        if os.path.exists(os.path.join(tiny_bert, name)):
            shutil.copy(os.path.join(tiny_bert, name), folder)
    return str(folder)


CASES = {
    "missing model folder": (lambda t, g, d: with_data(g, "--model", str(t / "no-such-model")),
                             ["--model", "no-such-model: no such folder"]),
    "model folder that is a file": (lambda t, g, d: with_data(g, "--model", write(t / "model.bin", "x")),
                                    ["model.bin is a file", "config.json"]),
    "model folder without a model": (lambda t, g, d: with_data(g, "--model", str(t)),
                                     ["cannot load model", "The folder needs config.json"]),
    "model folder without tokenizer files": (lambda t, g, d: with_data(g, "--model", config_only(d, t / "bare")),
                                             ["has no vocabulary", "tokenizer files"]),
    "model that cannot classify": (lambda t, g, d: with_data(g, "--model", vision_model(t / "vit")),
                                   ["is a 'vit' model", "no sequence-classification class", "--model"]),
    "hub model unreachable": (lambda t, g, d: with_data(g, "--model", "someone/some-model"),
                              ["cannot load model 'someone/some-model'", "hub may be unreachable"]),
    "hub dataset unreachable": (lambda t, g, d: ["--dataset", "someone/some-data"],
                                ["cannot load dataset 'someone/some-data'", "--train-file"]),
    "missing data file": (lambda t, g, d: ["--train-file", str(t / "nope.csv"), "--eval-file", g],
                          ["--train-file", "nope.csv: no such file"]),
    "unknown file type": (lambda t, g, d: ["--train-file", write(t / "a.txt", "x"), "--eval-file", g],
                          ["unknown file type", ".parquet"]),
    "unreadable file": (lambda t, g, d: ["--train-file", write(t / "bad.parquet", "not parquet"), "--eval-file", g],
                        ["cannot read it as parquet"]),
    "empty file": (lambda t, g, d: ["--train-file", csv_with(t, ""), "--eval-file", g],
                   ["data.csv: cannot read it as csv, or it has no rows"]),
    "missing column": (lambda t, g, d: ["--train-file", g, "--eval-file", g, "--text-column", "review"],
                       ["no column 'review'", "its columns: text, label", "--text-column"]),
    "labels missing": (lambda t, g, d: ["--train-file", csv_with(t, "good,1\nbad,\nfine,1\nmeh,0\n"),
                                        "--eval-file", g],
                       ["1 rows without a label", "rows 1"]),
    "texts not strings": (lambda t, g, d: ["--train-file", write(t / "n.json", '{"text": 5, "label": 1}\n'
                                                                   '{"text": "ok", "label": 0}\n'),
                                           "--eval-file", g],
                          ["not strings", "--text-column"]),
    "one class": (lambda t, g, d: ["--train-file", csv_with(t, "good,1\nfine,1\n"), "--eval-file", g],
                  ["single class"]),
    "label names do not fit": (lambda t, g, d: ["--train-file", g, "--eval-file", g, "--label-names", "a", "b", "c"],
                               ["--label-names gives 3 names"]),
    "subset too large": (lambda t, g, d: ["--train-file", g, "--eval-file", g, "--train-size", "10"],
                         ["--train-size 10 is more than the 4 rows", "--train-size all"]),
    "train file alone": (lambda t, g, d: ["--train-file", g], ["--train-file and --eval-file go together"]),
    "zero epochs": (lambda t, g, d: ["--epochs", "0"], ["--epochs 0: must be a whole number, at least 1"]),
    "zero max length": (lambda t, g, d: ["--max-length", "0"], ["--max-length 0: must be a whole number, at least 1"]),
    "dropout not a number": (lambda t, g, d: ["--lora-dropout", "abc"],
                             ["--lora-dropout", "expected a number, got 'abc'"]),
    "dropout of one": (lambda t, g, d: ["--lora-dropout", "1"], ["--lora-dropout 1.0: must be a number in [0, 1)"]),
    "epochs not whole": (lambda t, g, d: ["--epochs", "1.5"], ["--epochs", "expected a whole number, got '1.5'"]),
    "auto where a number is needed": (lambda t, g, d: ["--train-size", "auto"],
                                      ["--train-size", "expected a whole number or 'all', got 'auto'"]),
    "validation size neither count nor fraction": (lambda t, g, d: ["--validation-size", "1.5"],
                                                   ["--validation-size", "a whole number of texts or a fraction"]),
    "max length too small": (lambda t, g, d: ["--max-length", "4"], ["leaves no room"]),
    "max length over the model's": (lambda t, g, d: with_data(g, "--model", d, "--max-length", "4096"),
                                    ["--max-length 4096 is more than", "128 tokens"]),
    "fp16 without a GPU": (lambda t, g, d: with_data(g, "--precision", "fp16"), ["needs a CUDA GPU", "fp32"]),
    "window stride over the window": (lambda t, g, d: ["--truncation", "windows", "--max-length", "64",
                                                       "--window-stride", "64"],
                                      ["--window-stride 64 is not smaller than the window"]),
    "window stride over the window's text": (lambda t, g, d: with_data(g, "--model", d, "--max-length", "64",
                                                                       "--truncation", "windows",
                                                                       "--window-stride", "63"),
                                             ["--window-stride 63 is not smaller than the window (62 tokens"]),
    "window stride without windows": (lambda t, g, d: ["--window-stride", "8"],
                                      ["--window-stride goes with --truncation windows"]),
    "windows of pairs": (lambda t, g, d: ["--truncation", "windows", "--text-column", "a", "b"],
                         ["--truncation windows reads one long text", "head, tail or head+tail"]),
    "too few texts to calibrate on": (lambda t, g, d: ["--train-file", g, "--eval-file", g, "--train-size", "all",
                                                       "--eval-size", "all"],
                                      ["--calibration temperature fits on held-out texts", "--calibration off"]),
    "search without validation texts": (lambda t, g, d: ["--search", "4"],
                                        ["--search scores each trial on held-out training texts", "--validation-size"]),
    "search of no trials": (lambda t, g, d: ["--search", "0", "--validation-size", "0.1"],
                            ["--search 0: must be a whole number, at least 1"]),
    "an architecture without default LoRA targets": (
        lambda t, g, d: with_data(g, "--model", mpnet(d, t / "mpnet"), "--max-length", "64", "--search", "2",
                                  "--validation-size", "2"),
        ["no default LoRA targets for model type 'mpnet'", "--lora-targets"]),
    "bad LoRA target": (lambda t, g, d: with_data(g, "--model", d, "--max-length", "64",
                                                   "--lora-targets", "attn_nonexistent"),
                        ["--lora-targets attn_nonexistent"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_reported_in_one_line(case, tmp_path, good_csv, tiny_bert, capsys, caplog):
    """main() in this process (an exception escaping it would fail the test); real processes below."""
    make_args, expected = CASES[case]
    status, said = run_main([*make_args(tmp_path, good_csv, tiny_bert), "--output-dir", tmp_path / "out"],
                            capsys, caplog)
    assert status != 0
    for text in expected:
        assert text in said, said[-2000:]
    assert not (tmp_path / "out").exists(), "a run that fails before training leaves nothing behind"


# Checked against the model's weights as they load, which come after the output folder's check
NEEDS_THE_WEIGHTS = {"bad LoRA target"}


@pytest.mark.parametrize("case", sorted(set(CASES) - NEEDS_THE_WEIGHTS))
def test_a_saved_model_hides_no_other_mistake(case, tmp_path, good_csv, tiny_bert, capsys, caplog):
    """After one successful run the output folder holds a model; a later run's other mistakes are still reported
    as themselves, not as "pass --overwrite", and the saved model is left as it was."""
    saved = tmp_path / "out" / "model"
    saved.mkdir(parents=True)
    (saved / "adapter_model.safetensors").write_bytes(b"weights")
    make_args, expected = CASES[case]
    status, said = run_main([*make_args(tmp_path, good_csv, tiny_bert), "--output-dir", tmp_path / "out"],
                            capsys, caplog)
    assert status != 0 and "already holds a trained model" not in said, said[-2000:]
    for text in expected:
        assert text in said, said[-2000:]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model"]
    assert [p.name for p in saved.iterdir()] == ["adapter_model.safetensors"]


def test_a_saved_model_is_named_when_all_else_is_right(tmp_path, good_csv, tiny_bert, capsys, caplog):
    (tmp_path / "out" / "model").mkdir(parents=True)
    status, said = run_main([*with_data(good_csv, "--model", tiny_bert, "--max-length", "64"),
                             "--output-dir", tmp_path / "out"], capsys, caplog)
    assert status == 1 and "already holds a trained model: pass --overwrite" in said, said[-2000:]


@pytest.mark.parametrize("case", ["zero epochs", "missing column", "missing model folder"])
def test_a_real_process_exits_with_the_message_and_no_traceback(case, tmp_path, good_csv, tiny_bert):
    make_args, expected = CASES[case]
    result = run_cli(*make_args(tmp_path, good_csv, tiny_bert), "--output-dir", tmp_path / "out")
    assert result.returncode in (1, 2)  # 2: argparse's usage errors
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for text in expected:
        assert text in result.stderr, result.stderr[-2000:]


def test_no_hub_and_no_arguments_ends_in_one_line_and_leaves_nothing(tmp_path):
    """A user without network who types `python peft_qlora.py`: huggingface_hub's retry notices stay quiet (they
    came twice each, 24 lines), the error says what to do, and no folder is left behind. The hub is pointed at a
    closed local port, so this holds on a machine with network too; it waits out the hub's retries (~25 s)."""
    import subprocess
    import sys

    work = tmp_path / "work"
    work.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}, "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HOME": str(tmp_path / "hf-home")}  # no cached copy of IMDb to fall back on
    result = subprocess.run([sys.executable, SCRIPT], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "cannot load dataset 'stanfordnlp/imdb'" in result.stderr and "--train-file" in result.stderr
    assert "Retry" not in result.stderr and len(result.stderr.splitlines()) == 2, result.stderr
    assert list(work.iterdir()) == []


def test_predict_without_a_trained_model_says_how_to_train(tmp_path):
    result = run_cli("predict", "--model-dir", tmp_path / "nothing", "some text")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no trained model" in result.stderr and "python peft_qlora.py" in result.stderr


def test_predict_rejects_nothing_and_non_strings_with_pythons_exceptions(tmp_path):
    """A wrong type is a TypeError and a wrong value a ValueError (the script's UserError is one), so a notebook's
    `except ValueError` or `except TypeError` catches them; each says what predict() takes."""
    import peft_qlora

    with pytest.raises(ValueError, match="at least one text") as empty:
        peft_qlora.predict([])
    assert isinstance(empty.value, peft_qlora.UserError)
    for wrong, shown in ((123, "int 123"), (None, "NoneType None")):
        with pytest.raises(TypeError, match=f"takes a text or a list of texts, not {shown}"):
            peft_qlora.predict(wrong)
    with pytest.raises(TypeError, match=r"takes texts \(str\); got int 3 in the list"):
        peft_qlora.predict(["fine", 3])
    with pytest.raises(ValueError, match="no trained model"):
        peft_qlora.predict("fine", model_dir=str(tmp_path))


def test_a_plotting_failure_keeps_the_model(tiny_bert, data_files, tmp_path):
    blocker = write(tmp_path / "images-is-a-file", "")
    result = run_cli(*train_args(tiny_bert, data_files, tmp_path), "--images-dir", blocker)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "the model is saved in" in result.stderr and "charts could not be drawn" in result.stderr
    assert (tmp_path / "model" / "adapter_model.safetensors").is_file()


def test_config_checks_its_numbers_in_python_too():
    """The same checks for a notebook's Config(...) as for the command line, naming the flag."""
    import peft_qlora

    import re

    for given, message in (({"lora_r": 0}, "--lora-r 0: must be a whole number, at least 1"),
                           ({"epochs": 2.5}, "--epochs 2.5: must be a whole number, at least 1"),
                           ({"threshold": "high"}, "--threshold high: must be a number in (0, 1)"),
                           ({"learning_rate": -1e-3}, "--learning-rate -0.001: must be a number above 0"),
                           ({"validation_size": 1.5}, "a whole number of texts or a fraction in (0, 1)")):
        with pytest.raises(peft_qlora.UserError, match=re.escape(message)):
            peft_qlora.Config(**given)
    assert peft_qlora.Config(validation_size=10.0).validation_size == 10, "10.0 texts are 10 texts"
    assert isinstance(peft_qlora.Config(validation_size=10.0).validation_size, int)

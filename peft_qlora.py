"""QLoRA fine-tuning of a pretrained transformer for text classification, in one file.

The recipe: load the model in 4-bit NF4, add LoRA adapters (r=8, alpha=16, dropout 0.1) to the
attention query and value matrices, evaluate the untrained model, train with the Hugging Face
Trainer, evaluate again, save the adapter, draw before/after charts, and serve predictions.
Encoders (BERT, RoBERTa, DistilBERT) and decoder LLMs (Llama, Mistral, Qwen, Gemma, SmolLM) alike;
one label per text, several labels per text, a number per text, or pairs of texts.

    pip install -r requirements.txt
    python peft_qlora.py                                    # bert-base-uncased on IMDb, from the hub
    python peft_qlora.py --train-size 500 --eval-size 500   # a quicker run
    python peft_qlora.py --model meta-llama/Meta-Llama-3-8B # a decoder LLM, batches sized to the GPU
    python peft_qlora.py --model path/to/model --train-file train.parquet --eval-file test.parquet
    python peft_qlora.py --label-column rating --task regression   # a number per text (lists of labels: multi-label)
    python peft_qlora.py --text-column premise hypothesis ...      # pairs of texts
    python peft_qlora.py ... --resume                       # continue a run stopped by SIGTERM, Ctrl-C or a crash
    torchrun --nproc_per_node 2 peft_qlora.py ...           # several GPUs (or: accelerate launch peft_qlora.py)
    accelerate launch --config_file fsdp.yaml peft_qlora.py ...    # a model sharded across GPUs (FSDP)
    python peft_qlora.py predict "A wonderful film." "Two hours I will never get back."
    python peft_qlora.py predict --file reviews.csv --output predictions.csv   # a whole file
    python peft_qlora.py export --merged outputs/merged     # a plain transformers model, LoRA merged
    python peft_qlora.py --help                             # every setting

From Python, in a notebook:

    from peft_qlora import predict
    predict("A wonderful film.")   # {'text': ..., 'neg_prob': 0.03, 'pos_prob': 0.97, 'label': 'pos'}

    from peft_qlora import Classifier
    classifier = Classifier.load("outputs/imdb_qlora/model")   # a model of your own to hold and call
    classifier(["A wonderful film.", "A dull one."])

The file reads top to bottom: the settings, the recipe (run), each of its steps in order, serving; then how the
steps run (the device, the fast path, sharding, batch planning, long runs), the workarounds for the libraries, and
the command line.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import functools
import importlib.util
import itertools
import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar, NamedTuple

log = logging.getLogger("peft_qlora")


class UserError(ValueError):
    """Bad input. The command line prints the message, without a traceback, and exits with status 1; in Python it
    is a ValueError, so `except ValueError` catches it."""


# ----------------------------------------------------------------------------------------------
# The settings


def _opt(default: Any, help: str, number: str | None = None, **argparse_kwargs: Any) -> Any:
    """A Config field whose help text lives next to its default; `number` names its rule in NUMBER_RULES."""
    return field(default=default, metadata={"help": help, "number": number, **argparse_kwargs})


# Each numeric setting's rule: (its type, whether a value keeps it, what the value must be). Config checks them all,
# for the command line and for Python alike
NUMBER_RULES = {
    "count": (int, lambda v: v >= 1, "a whole number, at least 1"),
    "positive": (float, lambda v: v > 0, "a number above 0"),
    "non-negative": (float, lambda v: v >= 0, "a number, 0 or more"),
    "probability": (float, lambda v: 0 < v < 1, "a number in (0, 1)"),
    "dropout": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "count or fraction": (float, lambda v: (v >= 1 and float(v).is_integer()) or 0 < v < 1,
                          "a whole number of texts or a fraction in (0, 1)"),
}
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # datasets' readers


def file_builder(path: str) -> str | None:
    """The datasets builder that reads a data file of this kind, by its extension."""
    return FILE_BUILDERS.get(os.path.splitext(path)[1].lower())


@dataclass
class Config:
    # --- data ---
    dataset: str | None = _opt("stanfordnlp/imdb", "dataset on the hub (or a local folder) with train and test "
                               "splits; not used with --train-file")
    train_file: str | None = _opt(None, "local csv, json/jsonl or parquet file to train on, instead of --dataset")
    eval_file: str | None = _opt(None, "local csv, json/jsonl or parquet file to evaluate on (with --train-file)")
    text_column: list[str] = _opt(("text",), "column holding the texts; two names (premise hypothesis) for pairs "
                                  "of texts, each row encoded as the tokenizer encodes text with text_pair", nargs="+")
    label_column: str = _opt("label", "column holding the labels: class ids 0..k-1 or names; lists of names (or of "
                             "0/1 per label) for multi-label; numbers for regression")
    label_names: list[str] | None = _opt(
        None, "names for integer labels 0..k-1, or for the places of 0/1 lists (default for two classes: neg pos, as "
        "IMDb's)", nargs="+")
    task: str = _opt("auto", "what the model learns; auto: from the label column (lists: multi-label, floats: "
                     "regression, else classification); regression also takes integer scores such as a 1-10 rating",
                     choices=["auto", "classification", "multi-label", "regression"])
    threshold: float = _opt(0.5, "multi-label: a label is predicted when its probability is above this",
                            "probability")
    train_size: int | None = _opt(4000, "training texts drawn, or 'all': balanced by label (multi-label: by each "
                                  "text's rarest label), at random for regression", "count", words=("all",))
    eval_size: int | None = _opt(2000, "evaluation (test) texts drawn, or 'all', as --train-size", "count",
                                 words=("all",))
    validation_size: int | float | None = _opt(
        None, "texts held out of the training texts (a number, or a fraction such as 0.1), stratified by label for "
        "classification, at random otherwise: each epoch is evaluated on them and the best epoch is kept; the test "
        "texts are then evaluated only before and after training", "count or fraction")
    max_length: int = _opt(512, "tokens kept per text, special tokens included (BERT's most; 14%% of IMDb's "
                           "reviews are longer, 44%% are longer than 256, and more tokens scored better)", "count")
    truncation: str = _opt("head+tail", "which tokens of a longer text to keep: the first, the last, or the first "
                           "quarter and the last three quarters (a review's verdict is often at its end); windows: "
                           "read it whole, as overlapping windows of --max-length tokens (each a training sample with "
                           "the text's label; their outputs averaged to evaluate and predict)",
                           choices=["head", "tail", "head+tail", "windows"])
    window_stride: int | None = _opt(None, "--truncation windows: tokens from one window's start to the next's; auto: "
                                     "half a window", "count", words=("auto",))
    # --- model and 4-bit quantization (NF4, double quantization, compute in the training precision) ---
    model: str = _opt("bert-base-uncased", "model on the hub or a local folder: any architecture transformers loads "
                      "for sequence classification, encoders and decoder LLMs alike")
    # --- LoRA ---
    lora_r: int = _opt(8, "LoRA rank", "count")
    lora_alpha: int = _opt(16, "LoRA scaling: updates are scaled by alpha / r", "count")
    lora_dropout: float = _opt(0.1, "dropout on the LoRA input", "dropout")
    lora_targets: list[str] | None = _opt(
        None, "modules that get LoRA (default: the attention query and value, from peft's table for the "
        "architecture); all-linear: every 4-bit layer", nargs="+")
    # --- training ---
    epochs: int = _opt(3, "passes over the training set", "count")
    learning_rate: float = _opt(1e-3, "peak learning rate (LoRA and the new head want far more than full "
                                "fine-tuning's ~3e-5)", "positive")
    batch_size: int = _opt(32, "texts per optimizer step on each process (GPU), of --max-length tokens with --batching "
                           "tokens; with N processes a step sees N times as many", "count")
    batching: str = _opt("texts", "texts: --batch-size texts a step, as the notebook does; tokens: each micro-batch "
                         "holds as many texts as fit --micro-batch-size x --max-length tokens once padded, so a step "
                         "on short texts does as much work as one on long texts: faster epochs, fewer steps",
                         choices=["texts", "tokens"])
    micro_batch_size: int | None = _opt(None, "texts per forward pass; auto: as many of --batch-size as fit the "
                                        "GPU's memory at --max-length (measured), the rest by gradient accumulation",
                                        "count", words=("auto",))
    eval_batch_size: int | None = _opt(None, "evaluation and prediction batch size; auto: 256, or as many as fit the "
                                       "GPU's memory (measured)", "count", words=("auto",))
    precision: str = _opt("auto", "auto: bf16 on GPUs with compute capability 8.0+, fp16 on older GPUs (T4), "
                          "fp32 on the CPU", choices=["auto", "bf16", "fp16", "fp32"])
    gradient_checkpointing: str = _opt(
        "auto", "recompute activations in the backward pass: less memory, slower steps; auto: on only when fewer "
        "than 4 texts of --max-length fit a micro-batch without it", choices=["auto", "on", "off"], nargs="?",
        const="on")
    early_stopping: int | None = _opt(None, "stop after this many epochs without a better validation score "
                                      "(accuracy; multi-label: micro F1; regression: RMSE) (needs --validation-size)",
                                      "count")
    class_weights: str = _opt("none", "balanced: weigh each class's loss by the inverse of its share of the training "
                              "texts, for imbalanced labels (multi-label: each label's texts weighed as much as the "
                              "texts without it)", choices=["none", "balanced"])
    fast_path: str = _opt("auto", "how training steps run. graphs: on a single CUDA GPU, each step's forward and "
                          "backward replayed as a CUDA graph, captured once per batch shape (eager with several "
                          "processes or gradient checkpointing); compiled: the same, of layers compiled with "
                          "torch.compile: fewer kernels, after a minute or more of compiling, not yet faster end to "
                          "end (benchmarks/NOTES.md); auto: graphs; off: eager steps",
                          choices=["auto", "graphs", "compiled", "off"])
    liger: str = _opt("auto", "auto: on a CUDA GPU, Liger-Kernel's Triton kernels for RMSNorm, rotary embeddings and "
                      "SwiGLU in the decoder architectures it covers (Llama, Mistral, Qwen, Gemma, ...): faster steps, "
                      "less memory; off: the model's own layers", choices=["auto", "off"])
    search: int | None = _opt(None, "try N settings with Optuna (learning rate, LoRA rank and targets, epochs; the "
                              "first trial the given ones), each trained on the training texts and scored on the "
                              "validation texts (needs --validation-size), a trial whose first epoch is in the bottom "
                              "tenth stopped there; the best settings then train the saved model", "count")
    calibration: str = _opt("temperature", "after training, fit a temperature (one per label for multi-label) on "
                            "held-out texts, so that predicted probabilities match how often the model is right: the "
                            "validation texts, else up to 1,000 rows of the training data not trained on; it changes "
                            "no predicted label; off: the probabilities as trained (a regression has none)",
                            choices=["temperature", "off"])
    seed: int = _opt(42, "seed for the data subset, the new head, LoRA and the data order", type=int)
    # --- output ---
    output_dir: str = _opt("outputs/imdb_qlora",
                           "checkpoints go to OUTPUT_DIR/checkpoints, the model to OUTPUT_DIR/model")
    images_dir: str = _opt("images", "where bar_chart.png and line_chart.png are drawn")
    report_to: str = _opt("none", "where the Trainer also logs the run: tensorboard (into OUTPUT_DIR/logs), wandb, "
                          "mlflow", choices=["none", "tensorboard", "wandb", "mlflow"])
    save_steps: int | None = _opt(None, "also write a checkpoint every N optimizer steps, besides each epoch's end",
                                  "count")
    save_minutes: float = _opt(30.0, "also write a checkpoint once this many minutes have passed since the last one, "
                               "so that a long epoch on a slow GPU is covered; 0: off", "non-negative")
    resume: bool = _opt(False, "continue an interrupted run from its last checkpoint (written at each epoch's end, "
                        "every --save-steps and --save-minutes, and on SIGTERM or Ctrl-C)")
    overwrite: bool = _opt(False, "replace the model (and checkpoints) an earlier run left in --output-dir")

    def __post_init__(self):
        """Every check that needs no file content and no framework, in one place; each names the flag and the fix."""
        for f in fields(self):
            rule, value = f.metadata["number"], getattr(self, f.name)
            if rule and value is not None:
                kind, keeps, must_be = NUMBER_RULES[rule]
                whole = isinstance(value, int) or (kind is float and isinstance(value, float))
                if isinstance(value, bool) or not whole or not keeps(value):
                    raise UserError(f"--{f.name.replace('_', '-')} {value}: must be {must_be}")
        if isinstance(self.validation_size, float) and self.validation_size >= 1:
            self.validation_size = int(self.validation_size)  # 10.0 texts are 10 texts
        self.text_column = [self.text_column] if isinstance(self.text_column, str) else list(self.text_column)
        if len(self.text_column) > 2:
            raise UserError(f"--text-column takes one column, or two for pairs of texts; got {len(self.text_column)}: "
                            f"{' '.join(self.text_column)}")
        if len(set(self.text_column)) < len(self.text_column):
            raise UserError(f"--text-column {' '.join(self.text_column)}: a pair needs two different columns")
        if bool(self.train_file) != bool(self.eval_file):
            raise UserError("--train-file and --eval-file go together: give both, or neither to use --dataset")
        if self.train_file:
            self.dataset = None  # not used: metrics.json records the files instead
        for flag, path in (("--train-file", self.train_file), ("--eval-file", self.eval_file)):
            if path and file_builder(path) is None:
                raise UserError(f"{flag} {path}: unknown file type; use .csv, .json, .jsonl or .parquet")
            if path and not os.path.isfile(path):
                raise UserError(f"{flag} {path}: no such file")
        if self.max_length < 8:
            raise UserError(f"--max-length {self.max_length} leaves no room for text: use 8 or more")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise UserError(f"--batch-size {self.batch_size} is not a multiple of --micro-batch-size "
                            f"{self.micro_batch_size}: each optimizer step adds up whole micro-batches")
        if self.search and not self.validation_size:
            raise UserError("--search scores each trial on held-out training texts, never on the test texts: add "
                            "--validation-size (a number of texts, or a fraction such as 0.1)")
        if self.early_stopping and not self.validation_size:
            raise UserError("--early-stopping needs --validation-size: the epochs are compared on held-out "
                            "training texts, never on the test texts")
        if self.window_stride and self.truncation != "windows":
            raise UserError("--window-stride goes with --truncation windows")
        if self.window_stride and self.window_stride >= self.max_length:
            raise UserError(f"--window-stride {self.window_stride} is not smaller than the window (--max-length "
                            f"{self.max_length}): windows would skip text; use a smaller stride")
        if self.truncation == "windows" and len(self.text_column) == 2:
            raise UserError("--truncation windows reads one long text as windows; a pair of texts is cut instead "
                            "(--truncation head, tail or head+tail)")
        if self.lora_targets and "all-linear" in self.lora_targets and len(self.lora_targets) > 1:
            raise UserError("--lora-targets all-linear stands alone: it already names every 4-bit layer")
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise UserError(f"--report-to {self.report_to} needs the {self.report_to} package: "
                            f"pip install {self.report_to}")
        if os.path.isfile(self.model):
            raise UserError(f"--model {self.model} is a file: give the folder holding its config.json, weights and "
                            "tokenizer files")
        # A hub name is NAME or ORG/NAME; anything else is a folder, which must exist (the hub would only say the
        # name is invalid, after its retries)
        if not os.path.exists(self.model) and (os.path.isabs(self.model) or self.model.startswith((".", "~"))
                                               or self.model.count("/") > 1):
            raise UserError(f"--model {self.model}: no such folder (a hub model is named NAME or ORG/NAME)")

    @property
    def model_source(self) -> str:
        """--model as from_pretrained gets it: a local folder made absolute, as the adapter records it."""
        return os.path.abspath(self.model) if os.path.isdir(self.model) else self.model

    @property
    def model_dir(self) -> str:
        return os.path.join(self.output_dir, MODEL_FOLDER)

    @property
    def checkpoints_dir(self) -> str:
        return os.path.join(self.output_dir, "checkpoints")


MODEL_FOLDER = "model"  # inside --output-dir: where the trained model is saved, and predict() looks
DEFAULT_MODEL_DIR = os.path.join(Config.output_dir, MODEL_FOLDER)
# What trains besides LoRA, so it stays out of 4-bit and is saved with the adapter: the new classification head
# (score for decoder LLMs), and BERT's pooler, the dense layer between the encoder and BERT's one-layer head
# (RoBERTa's and DistilBERT's heads hold such a layer themselves). Training the pooler too closed about half the gap
# to full fine-tuning (benchmarks/NOTES.md).
HEAD_MODULES = ("pre_classifier", "classifier", "score", "pooler")
# The skip list matches whole module names or their ends: BERT's pooler is "pooler", holding "pooler.dense".
UNQUANTIZED_MODULES = HEAD_MODULES + ("pooler.dense",)
# Architectures peft has no default LoRA targets for.
EXTRA_LORA_TARGETS = {"distilbert": ["q_lin", "v_lin"]}
DEFAULT_EVAL_BATCH = 256  # no gradients, so larger than training's; larger was slower (benchmarks/NOTES.md)


# ----------------------------------------------------------------------------------------------
# The recipe


def run(cfg: Config) -> dict:
    """The notebook, step by step: load the data, build the 4-bit model with LoRA, evaluate it, train it, evaluate
    it again, save it, draw the charts. Every check comes before the model's weights load (the data's first, then
    what the model's config tells, then the output folder's, so that it hides none of the others). How the steps
    run (the device, CUDA graphs, several processes, sharding, checkpoints) is make_trainer's to decide, below.
    Returns what it saved in metrics.json."""
    data = load_data(cfg)
    task = data.task  # what the model learns, decided once from the labels
    with quiet_transformers():
        runtime = decide_runtime(cfg.precision)
        tokenizer = check_model(cfg)
        check_output_dir(cfg, runtime)
        texts = tokenize_splits(data, tokenizer, cfg)
        cfg, search = search_settings(cfg, task, texts, tokenizer, runtime)  # as given, or the best found (--search)
        model, model_info = build_model(cfg, tokenizer, task, runtime)
        trainer = make_trainer(cfg, model, tokenizer, texts, task, runtime)
        metrics = {"before": evaluate(trainer, texts.test, task, "Before training")}
        if texts.validation:  # where the per-epoch line starts
            metrics["validation_before"] = evaluate(trainer, texts.validation, task, "Validation before training")
        metrics["history"], metrics["training"] = train(trainer, task, len(texts.train))
        task = calibrate(trainer, texts.calibration, task)  # a temperature for the probabilities (--calibration)
        metrics["after"] = evaluate(trainer, texts.test, task, "After training")  # the best epoch's, if kept
        metrics.update(describe_run(cfg, task, model_info, trainer, runtime), search=search)
        saved = save(trainer, metrics, cfg.model_dir)  # before the charts, so that drawing them cannot lose it
    if saved:  # one process saves and draws for all
        draw(metrics, task, cfg.images_dir)
    return metrics


# ----------------------------------------------------------------------------------------------
# Step 1: the data


class Splits(NamedTuple):
    train: Any  # datasets.Dataset with columns text (and text_pair for pairs) and labels (what the loss compares)
    validation: Any  # held out of train (--validation-size), or None
    test: Any
    task: Task
    calibration: Any = None  # held-out texts the temperature is fit on (--calibration), or None


def load_data(cfg: Config) -> Splits:
    """The training and test texts, the task decided from their labels, subsets drawn, labels made what the loss
    compares (class ids, 0/1 per label, targets as numbers in their own units), and the validation and calibration
    texts held out."""
    from datasets import Dataset
    if cfg.train_file:
        splits = {"train": read_file(cfg.train_file, "--train-file"), "test": read_file(cfg.eval_file, "--eval-file")}
    else:
        splits = read_hub_dataset(cfg.dataset)
    columns = {split: read_columns(ds, cfg, split) for split, ds in splits.items()}
    labels = {split: split_labels for split, (_, split_labels) in columns.items()}
    kind = decide_task(cfg.task, *(label_kind(labels[split], split, cfg.label_column) for split in ("train", "test")))
    class_names = getattr(splits["train"].features[cfg.label_column], "names", None)  # a ClassLabel's
    task, to_target, group = TASKS[kind].from_labels(labels, cfg, class_names)

    def table(split: str, rows: list[int]):
        texts, split_labels = columns[split]
        return Dataset.from_dict({**{name: [column[i] for i in rows] for name, column in
                                    zip(("text", "text_pair"), texts)},
                                  "labels": [to_target(split_labels[i]) for i in rows]})

    chosen = {}
    for split, size, flag in (("train", cfg.train_size, "--train-size"), ("test", cfg.eval_size, "--eval-size")):
        if size is not None and size > len(labels[split]):
            raise UserError(f"{flag} {size} is more than the {len(labels[split])} rows of the {split} data: "
                            f"ask for fewer, or {flag} all")
        chosen[split] = (balanced_subset(group(labels[split]), size, cfg.seed) if size is not None
                         else range(len(labels[split])))
    train, test = table("train", chosen["train"]), table("test", chosen["test"])
    validation = calibration = None
    if cfg.validation_size:
        train, validation = hold_out(train, cfg.validation_size, cfg.seed, task.stratified)
    if cfg.calibration == "off" or not task.calibrates:
        if cfg.calibration != "off":
            log.info("Calibration: none, as a regression's outputs are scores, not probabilities")
    elif validation:
        calibration = validation
    else:  # rows of the training data not drawn (up to CALIBRATION_TEXTS), drawn as those were
        spare = sorted(set(range(len(labels["train"]))) - set(chosen["train"]))
        if len(spare) >= MIN_CALIBRATION_TEXTS:
            drawn = balanced_subset(group([labels["train"][i] for i in spare]), min(CALIBRATION_TEXTS, len(spare)),
                                    cfg.seed)
            calibration = table("train", [spare[i] for i in drawn])
        else:
            train, calibration = hold_out_for_calibration(train, cfg.seed, task)
    task = task.fitted(train["labels"], cfg.class_weights == "balanced")
    log.info("Data: %d training, %s%d test texts%s", len(train),
             f"{len(validation)} validation and " if validation else "", len(test),
             f"; the temperature is fit on {len(calibration)} " + ("validation texts" if calibration is validation else
                                                                  "others of the training data") if calibration else "")
    log.info("Task: %s", task.describe())
    return Splits(train, validation, test, task, calibration)


# The texts a temperature is fit on: fit on 256 texts, the CPU quick start's halved its test texts' calibration error,
# fit on 1,000 it cut it to a third (benchmarks/NOTES.md); more only cost an evaluation
CALIBRATION_TEXTS = 1000
MIN_CALIBRATION_TEXTS = 50


def hold_out_for_calibration(train, seed: int, task: Task):
    """(the rest, the calibration texts) where the training data has no rows to spare (--train-size all): a tenth
    of the training texts, at most CALIBRATION_TEXTS, held out, which the model then does not train on."""
    size = min(CALIBRATION_TEXTS, len(train) // 10)
    if size < MIN_CALIBRATION_TEXTS:
        raise UserError(f"--calibration temperature fits on held-out texts, and {len(train)} training texts leave too "
                        f"few ({size}; at least {MIN_CALIBRATION_TEXTS}): train on a subset (--train-size), hold out "
                        "--validation-size texts, or pass --calibration off")
    log.info("Calibration: %d of the %d training texts held out to fit the temperature (the training data has no "
             "other rows; --validation-size to choose them, --calibration off to train on all)", size, len(train))
    return hold_out(train, size, seed, task.stratified)


def read_file(path: str, flag: str):
    """A data file Config has checked exists and has a known kind."""
    try:
        return open_data_file(path)
    except Exception as e:  # datasets, pandas and pyarrow each raise their own kind
        raise UserError(f"{flag} {path}: cannot read it as {file_builder(path)}, or it has no rows "
                        f"({type(e).__name__}: {e})") from e


def open_data_file(path: str, streaming: bool = False):
    """A local data file as a datasets Dataset, or read lazily as an IterableDataset: through Dataset.from_csv and
    its kin, which, unlike load_dataset, send no usage count to the hub for a local file."""
    import datasets
    from datasets import Dataset, IterableDataset
    kind = IterableDataset if streaming else Dataset
    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # its "Generating train split" bar, for a file read in a second or two
    try:
        return {"csv": kind.from_csv, "json": kind.from_json, "parquet": kind.from_parquet}[file_builder(path)](path)
    finally:
        if bars:
            datasets.enable_progress_bars()


def read_hub_dataset(name: str) -> dict:
    from datasets import load_dataset
    log.info("Loading dataset %s", name)
    try:
        with quiet_hub():
            ds = load_dataset(name)
    except Exception as e:  # network, hub and format errors all mean "cannot load this"
        raise UserError(f"cannot load dataset {name!r} ({type(e).__name__}: {e}). The hub may be unreachable: "
                        "--train-file and --eval-file take local csv, json/jsonl or parquet files") from e
    missing = [s for s in ("train", "test") if s not in ds]
    if missing:
        raise UserError(f"dataset {name!r} has no {' or '.join(missing)} split (it has: {', '.join(ds)}); "
                        "use --train-file and --eval-file")
    return {"train": ds["train"], "test": ds["test"]}


def read_columns(ds, cfg: Config, split: str) -> tuple[list[list[str]], list]:
    """(the text columns, the labels) of a split, each checked: present, texts that are strings, no label missing."""
    missing = [c for c in (*cfg.text_column, cfg.label_column) if c not in ds.column_names]
    if missing:
        flags = " and ".join(sorted({"--label-column" if c == cfg.label_column else "--text-column" for c in missing}))
        raise UserError(f"the {split} data has no column {' or '.join(map(repr, missing))} (its columns: "
                        f"{', '.join(ds.column_names)}); name the right one with {flags}")
    if len(ds) == 0:
        raise UserError(f"the {split} data has no rows")
    texts = [ds[column] for column in cfg.text_column]
    for column, values in zip(cfg.text_column, texts):
        bad = [i for i, t in enumerate(values) if not isinstance(t, str)]
        if bad:
            raise UserError(f"the {split} data's column {column!r} has {len(bad)} values that are not strings (first "
                            f"at row {bad[0]}: {values[bad[0]]!r}); check --text-column")
    labels = list(ds[cfg.label_column])
    unlabelled = [i for i, y in enumerate(labels) if y is None]
    if unlabelled:
        raise UserError(f"the {split} data's column {cfg.label_column!r} has {len(unlabelled)} rows without a label "
                        f"(rows {', '.join(map(str, unlabelled[:5]))}); fill them in or drop those rows (multi-label: "
                        "an empty list for a text without labels)")
    return texts, labels


class LabelKind(NamedTuple):
    """What a split's labels are (int: class ids, name, number: floats, list: multi-label), where they are (the
    split, the column), and the first row, as an error names them."""
    kind: str
    split: str
    column: str
    example: tuple[int, Any]

    def __str__(self) -> str:
        what = {"int": "integers", "name": "names", "number": "numbers with fractions", "list": "lists"}[self.kind]
        return f"{what} (column {self.column!r}, row {self.example[0]}: {self.example[1]!r})"


def label_kind(labels: list, split: str, column: str) -> LabelKind:
    """The kind of a split's labels, the same for every row; an error names the column and the first row that
    differs."""
    where = f"the {split} data's column {column!r}"
    lists = [isinstance(y, (list, tuple)) for y in labels]
    if any(lists) and not all(lists):
        row = lists.index(False) if lists.count(True) >= lists.count(False) else lists.index(True)
        raise UserError(f"{where} mixes lists (multi-label) and single labels (row {row}: {labels[row]!r}): give "
                        "every row a list, an empty one for a text without labels")
    if all(lists):
        kinds = [{type(v) for v in y} for y in labels]
        found = set().union(*kinds)
        if not (found <= {int} or found <= {str}):
            odd = min(found - {str} if str in found else found - {int}, key=lambda k: k.__name__)
            row = next(i for i, k in enumerate(kinds) if odd in k)
            raise UserError(f"{where}: multi-label lists hold names, or 0/1 per label; row {row} holds "
                            f"{labels[row]!r} among lists of {'names' if str in found else 'integers'}")
        return LabelKind("list", split, column, (0, labels[0]))
    kinds = {type(y) for y in labels}
    if kinds <= {str}:
        numeric = [i for i, y in enumerate(labels) if is_number(y)]
        if 0.9 * len(labels) <= len(numeric) < len(labels):  # a few names among numbers: a mistake in those rows
            rows = sorted(set(range(len(labels))) - set(numeric))
            raise UserError(f"{where} holds numbers, but {len(rows)} rows hold something else (row {rows[0]}: "
                            f"{labels[rows[0]]!r}{', ...' if len(rows) > 1 else ''}); fix or drop those rows")
        return LabelKind("name", split, column, (0, labels[0]))
    for kind, allowed in (("int", {int}), ("number", {int, float})):
        if kinds <= allowed:
            row = next((i for i, y in enumerate(labels) if isinstance(y, float)), 0)
            return LabelKind(kind, split, column, (row, labels[row]))
    row = next(i for i, y in enumerate(labels) if type(y) not in (int, float))
    raise UserError(f"{where} holds {type(labels[row]).__name__} values (row {row}: {labels[row]!r}): labels must "
                    "be all integers, all names, all numbers or all lists")


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def decide_task(requested: str, train: LabelKind, evaluation: LabelKind) -> str:
    """The task the labels call for (--task auto), or the one asked for if the labels allow it."""
    if train.kind != evaluation.kind and {train.kind, evaluation.kind} != {"int", "number"}:
        raise UserError(f"the training labels are {train} but the evaluation labels are {evaluation}")
    kinds = {train.kind, evaluation.kind}
    found = "multi-label" if "list" in kinds else "regression" if "number" in kinds else "classification"
    if requested in ("auto", found) or (requested == "regression" and kinds == {"int"}):
        return found if requested == "auto" else requested
    needs = {"classification": "class ids (integers) or names", "multi-label": "a list of labels per row (names, "
             "or 0/1 per label)", "regression": "numbers"}[requested]
    raise UserError(f"--task {requested} needs {needs}, but the labels are {train}: that is {found} (--task auto, "
                    f"or {found})")


def balanced_subset(labels: list[int], size: int, seed: int) -> list[int]:
    """`size` row indices drawn at random, as evenly across the labels as the data allows."""
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    pools = [rng.sample(rows, len(rows)) for _, rows in sorted(by_label.items())]
    chosen: list[int] = []
    while len(chosen) < size:
        for pool in pools:
            if pool and len(chosen) < size:
                chosen.append(pool.pop())
    rng.shuffle(chosen)
    return chosen


def hold_out(train, size: int | float, seed: int, stratify: bool):
    """(the rest, the held-out texts): `size` texts or that fraction (scikit-learn), stratified by label or at
    random."""
    from sklearn.model_selection import train_test_split
    if isinstance(size, int) and size >= len(train):
        raise UserError(f"--validation-size {size} leaves no training texts out of {len(train)}: hold out fewer")
    try:
        rest, held = train_test_split(range(len(train)), test_size=size, random_state=seed,
                                      stratify=train["labels"] if stratify else None)
    except ValueError as e:  # a class with one text, or fewer held-out texts than classes
        raise UserError(f"--validation-size {size}: cannot hold out texts of every class ({e}); hold out more, or "
                        "train on more texts") from e
    return train.select(sorted(rest)), train.select(sorted(held))


# ----------------------------------------------------------------------------------------------
# The task: what the model learns, decided once from the labels (load_data) and passed down. What differs between one
# label per text, several labels per text and a number per text lives in its class: its labels, its loss, its
# metrics and the one that picks the best epoch, its chart, what predict() returns, its export. Pairs of texts are
# any of them with two text columns.


METRIC_NAMES = {"accuracy": "accuracy", "f1": "F1", "f1_micro": "micro F1", "f1_macro": "macro F1",
                "subset_accuracy": "subset accuracy", "rmse": "RMSE", "mae": "MAE", "pearson": "Pearson",
                "spearman": "Spearman", "r2": "R²"}


@dataclass(frozen=True)
class Task:
    """What every task shares; each kind below adds its own."""
    label_names: list[str]  # the classes in id order; multi-label: the labels; regression: ["score"]
    text_columns: list[str] = field(default_factory=lambda: ["text"])  # one text per row, or a pair
    class_weights: list[float] | None = None  # --class-weights balanced: each class's (or label's) loss weight
    temperature: list[float] | None = None  # --calibration: the outputs are divided by it (one per label, or one)

    kind: ClassVar[str]
    problem_type: ClassVar[str]  # transformers' name, which picks the model's own loss
    metric_names: ClassVar[tuple[str, ...]]  # the first picks the best epoch and drives early stopping
    greater_is_better: ClassVar[bool] = True
    labels_word: ClassVar[str] = "classes"
    stratified: ClassVar[bool] = False  # the validation texts held out evenly across the classes
    own_loss: ClassVar[bool] = True  # without class weights the model's own loss (problem_type's) is the task's
    calibrates: ClassVar[bool] = True  # its outputs are probabilities, which a temperature can calibrate
    per_label: ClassVar[bool] = False  # each output a probability of its own (multi-label), with its own temperature
    verdict: ClassVar[tuple[str, str]] = ("label", "predicted_label")  # predict()'s key, predict --file's column
    chart_file: ClassVar[str]  # the chart of where the trained model errs

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def pairs(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def best_metric(self) -> str:
        return self.metric_names[0]

    @property
    def bar_panels(self) -> tuple[tuple[str, ...], ...]:
        """The metrics bar_chart draws, in panels that share a scale."""
        return (self.metric_names[:2],)

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    @staticmethod
    def from_dict(saved: dict) -> Task:
        """The task a saved model serves, from its serving.json."""
        cls = TASKS[saved["kind"]]
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def headline(self, values: dict, prefix: str = "") -> str:
        """The task's first two metrics, as a line says them: "accuracy 0.9012, F1 0.9034"."""
        return ", ".join(f"{METRIC_NAMES[name]} {values[prefix + name]:.4f}" for name in self.metric_names[:2])

    def describe(self) -> str:
        shown = ", ".join(self.label_names[:10]) + (", ..." if len(self.label_names) > 10 else "")
        return f"{self.kind}{self.of_pairs}, {len(self.label_names)} {self.labels_word} ({shown})"

    @property
    def of_pairs(self) -> str:
        return f" of text pairs ({', '.join(self.text_columns)})" if self.pairs else ""

    def fitted(self, targets: list, balanced: bool) -> Task:
        """The task as the training texts (those not held out) set it: with --class-weights balanced, the weights."""
        if len(targets) < 10 * self.num_labels:
            log.warning("Only %d training texts for %d %s: too few to learn from; use more (--train-size)",
                        len(targets), self.num_labels, self.labels_word)
        if not balanced:
            return self
        hot = self.one_hot(targets)
        absent = [name for name, count in zip(self.label_names, hot.sum(axis=0)) if count == 0]
        if absent:
            raise UserError(f"--class-weights balanced: the training texts have no {', '.join(absent)}, so it "
                            "cannot be weighed; train on texts of every class")
        weights = self.balanced_weights(hot.sum(axis=0), len(hot))
        log.info("%s: %s", self.weights_said, ", ".join(f"{n} {w:.2f}" for n, w in zip(self.label_names, weights)))
        return replace(self, class_weights=weights.tolist())

    def loss_function(self, model):
        """The Trainer's loss hook (compute_loss_func), or None where the model's own loss is the task's. With class
        weights, each class's loss is weighted while the model trains, and the plain mean is taken while it is
        evaluated, so that evaluation losses compare across runs. While training, the summed loss is divided by the
        labels of the whole optimizer step, as the Trainer expects of the hook under gradient accumulation (balanced
        weights average 1 over the training texts, so this is their weighted mean)."""
        if self.class_weights is None and self.own_loss:
            return None
        on_device = {}  # the weights copied to the GPU once: a step captured as a CUDA graph cannot copy from the host

        def loss(outputs, labels, num_items_in_batch=None):
            import torch
            logits, weight = outputs.logits.float(), None
            if self.class_weights is not None and model.training:
                if logits.device not in on_device:
                    on_device[logits.device] = torch.tensor(self.class_weights, device=logits.device)
                weight = on_device[logits.device]
            divisor = labels.numel() if num_items_in_batch is None or not model.training else num_items_in_batch
            return self.summed_loss(logits, labels, weight) / divisor

        return loss

    def probe_labels(self, batch: int, device):
        """Labels of the right shape and type for the batches that measure a step's memory."""
        import torch
        return torch.tensor([self.blank_label] * batch, device=device)

    def start_head(self, model) -> None:
        """Sets the new head up before training (regression: at the targets' mean)."""

    def report(self, true, predicted) -> dict:
        """Each class's (or label's) precision, recall, F1 and support."""
        from sklearn.metrics import classification_report
        report = classification_report(true, predicted, labels=list(range(self.num_labels)),
                                       target_names=self.label_names, output_dict=True, zero_division=0)
        return {name: {key: report[name][key] for key in ("precision", "recall", "f1-score", "support")}
                for name in self.label_names}

    def results(self, logits) -> list[dict]:
        """What predict() says of each text: each class's (or label's) probability, calibrated, and the verdict,
        which calibration does not change."""
        return [{**{f"{name}_prob": p for name, p in zip(self.label_names, probs)}, self.verdict[0]: verdict}
                for probs, verdict in zip(self.probabilities(logits), self.verdicts(logits.cpu().numpy()))]

    def calibrated(self, logits):
        """The outputs divided by the temperature (none before calibration): what the probabilities come from."""
        return logits if self.temperature is None else logits / logits.new_tensor(self.temperature)

    def fit_temperature(self, logits, labels) -> list[float]:
        """The temperature (one per output for multi-label) that minimises the task's loss on held-out texts, as
        Guo et al. (2017) fit it; dividing by one number keeps every output's order, so no predicted label changes."""
        import torch
        outputs, targets = torch.from_numpy(logits).double(), torch.from_numpy(labels)
        log_t = torch.zeros(self.num_labels if self.per_label else 1, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

        def loss():
            optimizer.zero_grad()
            value = self.summed_loss(outputs / log_t.exp(), targets, None)
            value.backward()
            return value

        optimizer.step(loss)
        return log_t.detach().clamp(-4, 4).exp().tolist()  # a label never seen held out would drift without end

    def calibration(self, logits, labels) -> dict:
        """Expected calibration error, log loss and Brier score of the probabilities as trained, and with the
        temperature where there is one, each with its reliability diagram's bins."""
        import torch
        outputs = torch.from_numpy(logits).float()
        figures = {"uncalibrated": self.calibration_figures(self.probabilities(outputs, calibrated=False), labels)}
        if self.temperature is not None:
            figures.update(temperature=self.temperature,
                           calibrated=self.calibration_figures(self.probabilities(outputs), labels))
        return {"calibration": figures}

    @property
    def result_columns(self) -> dict:
        """The keys of a prediction that predict --file writes, each with the column it goes to."""
        return {self.verdict[0]: self.verdict[1], **{f"{name}_prob": f"{name}_prob" for name in self.label_names}}

    def merge_head(self, model) -> None:
        """Makes the merged export's head compute what predict() reports: its outputs divided by the temperature
        (regression: the score in its units)."""
        if self.temperature is not None:
            scale_outputs(output_layer(model, self), [1 / t for t in self.temperature])


@dataclass(frozen=True)
class Classification(Task):
    """One class per text (or pair): cross-entropy, accuracy and F1, the confusion matrix, each class's
    probability."""
    kind = "classification"
    problem_type = "single_label_classification"
    metric_names = ("accuracy", "f1")  # F1 of class 1 (pos) for two classes, else the mean over classes
    stratified = True
    blank_label = 0
    weights_said = "Class weights"
    chart_file = "confusion_matrix.png"

    @classmethod
    def from_labels(cls, labels: dict, cfg: Config, class_names: list[str] | None):
        """(the task, each label as its class id, the groups a subset is balanced over). The class names: the
        dataset's own, the string labels sorted, or --label-names."""
        train, evaluation = labels["train"], labels["test"]
        if isinstance(train[0], str):
            names = sorted(set(train))
        else:
            lowest = min(min(train), min(evaluation))
            if lowest < 0:
                split, rows = ("train", train) if lowest in train else ("test", evaluation)
                raise UserError(f"integer labels must be 0..k-1; the {split} data's column {cfg.label_column!r} has "
                                f"{lowest} at row {rows.index(lowest)}")
            count = max(max(train), max(evaluation)) + 1
            names = cfg.label_names or class_names or (["neg", "pos"] if count == 2 else [str(i) for i in range(count)])
            if len(names) != count:
                raise UserError(f"the data has labels 0..{count - 1} ({count} classes) but --label-names gives "
                                f"{len(names)} names: give one name per class, in order")
        if len(set(train)) < 2:
            raise UserError(f"the training data has a single class ({train[0]!r}); classification needs two or more")
        unseen = sorted(set(evaluation) - set(train), key=str)
        if unseen:
            raise UserError(f"the evaluation data has labels the training data lacks: {', '.join(map(str, unseen))}; "
                            "a model cannot learn a class it never sees")
        to_id = {name: i for i, name in enumerate(names)}.__getitem__ if isinstance(train[0], str) else int
        return cls(list(names), list(cfg.text_column)), to_id, lambda split: [to_id(y) for y in split]

    def one_hot(self, targets):
        import numpy as np
        return np.eye(self.num_labels)[targets]

    def balanced_weights(self, counts, texts: int):
        """Each class's weight, the inverse of its share of the training texts (scikit-learn's "balanced")."""
        return texts / (self.num_labels * counts)

    def summed_loss(self, logits, labels, weight):
        from torch.nn import functional
        return functional.cross_entropy(logits, labels, reduction="sum", weight=weight)

    def metrics(self, outputs, labels) -> dict:
        from sklearn.metrics import accuracy_score, f1_score
        predictions = outputs.argmax(-1)
        return {"accuracy": accuracy_score(labels, predictions),
                "f1": f1_score(labels, predictions, average="binary" if outputs.shape[-1] == 2 else "macro")}

    def details(self, outputs, labels) -> dict:
        """Each class's figures, and the confusion matrix (rows: the true class, columns: the predicted one)."""
        from sklearn.metrics import confusion_matrix
        predicted = outputs.argmax(-1)
        return {"per_class": self.report(labels, predicted),
                "confusion_matrix": confusion_matrix(labels, predicted, labels=list(range(self.num_labels))).tolist()}

    def chart(self, metrics: dict):
        return confusion_chart(metrics["after"]["confusion_matrix"], self.label_names)

    def probabilities(self, logits, calibrated: bool = True) -> list[list[float]]:
        return (self.calibrated(logits) if calibrated else logits).softmax(-1).tolist()

    def verdicts(self, outputs) -> list[str]:
        return [self.label_names[i] for i in outputs.argmax(-1)]

    def calibration_figures(self, probs, labels) -> dict:
        """Of the most probable class: how sure, and how often right (the reliability diagram); the log loss and
        the Brier score (summed over the classes) of every class's probability."""
        import numpy as np
        probs = np.asarray(probs)
        chosen = probs[np.arange(len(labels)), labels]
        return {**reliability(probs.max(-1), probs.argmax(-1) == labels),
                "log_loss": float(-np.log(np.clip(chosen, 1e-12, 1)).mean()),
                "brier": float(((probs - np.eye(self.num_labels)[labels]) ** 2).sum(-1).mean())}


@dataclass(frozen=True)
class MultiLabel(Task):
    """Any number of labels per text: binary cross-entropy per label, micro and macro F1 and subset accuracy at a
    threshold, each label's F1, each label's probability and the labels over the threshold."""
    threshold: float = 0.5  # a label is predicted above this probability

    kind = "multi-label"
    problem_type = "multi_label_classification"
    metric_names = ("f1_micro", "f1_macro", "subset_accuracy")  # subset: every label of the text right
    labels_word = "labels"
    per_label = True
    weights_said = "Weights of each label's positive texts"
    verdict = ("labels", "predicted_labels")
    chart_file = "label_f1.png"

    @classmethod
    def from_labels(cls, labels: dict, cfg: Config, class_names: list[str] | None):
        """(the task, each row as 0/1 per label, the groups a subset is balanced over: each text's rarest label). The
        labels: the training lists' names sorted, or one per place of 0/1 lists (--label-names, or 0, 1, ...)."""
        train, evaluation = labels["train"], labels["test"]
        names_given = any(isinstance(v, str) for y in train + evaluation for v in y)
        if names_given:
            names = sorted({v for y in train for v in y})
            unseen = sorted({v for y in evaluation for v in y} - set(names))
            if unseen:
                raise UserError(f"the evaluation data has labels the training data lacks: {', '.join(unseen)}; a "
                                "model cannot learn a label it never sees")
        else:
            width = len(train[0])
            for split in ("train", "test"):
                odd = next((i for i, y in enumerate(labels[split]) if len(y) != width or not set(y) <= {0, 1}), None)
                if odd is not None:
                    raise UserError(f"multi-label lists of integers must give 0 or 1 for each label, the same number "
                                    f"in every row: the {split} data's column {cfg.label_column!r} has "
                                    f"{labels[split][odd]!r} at row {odd}, where row 0 of the training data has "
                                    f"{width} places; or give lists of label names")
            names = cfg.label_names or [str(i) for i in range(width)]
            if len(names) != width:
                raise UserError(f"the 0/1 lists have {width} places but --label-names gives {len(names)} names")
        if len(names) < 2:
            raise UserError(f"the training data has a single label ({', '.join(names) or 'none'}); multi-label needs "
                            "two or more")

        def to_target(y) -> list[float]:
            return [float(name in y) for name in names] if names_given else [float(v) for v in y]

        def rarest(split_labels: list) -> list[int]:  # each text's rarest label in its split, -1 for none
            hot = [to_target(y) for y in split_labels]
            counts = [sum(column) for column in zip(*hot)]
            return [min((i for i, v in enumerate(h) if v), key=counts.__getitem__, default=-1) for h in hot]

        return cls(list(names), list(cfg.text_column), threshold=cfg.threshold), to_target, rarest

    @property
    def blank_label(self) -> list[float]:
        return [0.0] * self.num_labels

    def one_hot(self, targets):
        import numpy as np
        return np.array(targets)

    def balanced_weights(self, counts, texts: int):
        """Each label's weight on its positive texts, its negatives over its positives (binary cross-entropy's
        pos_weight), so that the texts with a label weigh as much as those without it."""
        return (texts - counts) / counts

    def summed_loss(self, logits, labels, weight):
        from torch.nn import functional
        return functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="sum",
                                                           pos_weight=weight)

    def predicted(self, outputs):
        """1 where a label's probability (the sigmoid of its output) is above the threshold, that is where the output
        is above the threshold's log-odds (no exp to overflow on large outputs)."""
        import math
        return (outputs > math.log(self.threshold / (1 - self.threshold))).astype(int)

    def metrics(self, outputs, labels) -> dict:
        from sklearn.metrics import accuracy_score, f1_score
        predictions = self.predicted(outputs)
        return {"f1_micro": f1_score(labels, predictions, average="micro", zero_division=0),
                "f1_macro": f1_score(labels, predictions, average="macro", zero_division=0),
                "subset_accuracy": accuracy_score(labels, predictions)}

    def details(self, outputs, labels) -> dict:
        return {"per_label": self.report(labels.astype(int), self.predicted(outputs))}

    def chart(self, metrics: dict):
        return label_f1_chart(metrics["before"]["per_label"], metrics["after"]["per_label"])

    def probabilities(self, logits, calibrated: bool = True) -> list[list[float]]:
        return (self.calibrated(logits) if calibrated else logits).sigmoid().tolist()

    def verdicts(self, outputs) -> list[list[str]]:
        """The labels over the threshold as trained and evaluated: --threshold is a probability before
        calibration, so calibration changes no label (at 0.5 the calibrated probabilities agree)."""
        return [[name for name, on in zip(self.label_names, row) if on] for row in self.predicted(outputs)]

    def calibration_figures(self, probs, labels) -> dict:
        """Of every label of every text, as a yes/no question: how sure, how often yes, the log loss and the Brier
        score."""
        import numpy as np
        p, y = np.asarray(probs).reshape(-1), labels.reshape(-1)
        clipped = np.clip(p, 1e-12, 1 - 1e-12)
        return {**reliability(p, y), "log_loss": float(-(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)).mean()),
                "brier": float(((p - y) ** 2).mean())}


@dataclass(frozen=True)
class Regression(Task):
    """A number per text: the mean squared error in units of the targets' spread, RMSE, Pearson, MAE, Spearman and
    R² in the target's own units, the predictions against the true values, a score."""
    # The model's output is the target divided by its standard deviation (the loss compares them so), the head's bias
    # (where it has one) starting at the mean: the head starts where the targets are, and AdamW's steps, about the
    # learning rate in size, reach them in a few steps whatever the target's units. Outputs are multiplied back.
    target_scale: float = 1.0
    target_mean: float = 0.0  # in the target's own units

    kind = "regression"
    problem_type = "regression"
    metric_names = ("rmse", "pearson", "mae", "spearman", "r2")  # in the target's own units
    greater_is_better = False
    own_loss = False
    calibrates = False
    blank_label = 0.0
    verdict = ("score", "predicted_score")
    chart_file = "predicted_vs_true.png"

    @property
    def num_labels(self) -> int:
        return 1

    @property
    def bar_panels(self) -> tuple[tuple[str, ...], ...]:
        return ("rmse",), ("pearson",)  # RMSE in the target's units, Pearson's correlation in [-1, 1]

    def describe(self) -> str:
        return (f"regression{self.of_pairs}, target mean {self.target_mean:.4g}, standard deviation "
                f"{self.target_scale:.4g} (trained in units of it)")

    @classmethod
    def from_labels(cls, labels: dict, cfg: Config, class_names: list[str] | None):
        """(the task, each label a float, checked finite, the groups a subset is drawn over: one, so at random)."""
        import math
        for split, values in labels.items():
            bad = [i for i, y in enumerate(values) if not math.isfinite(y)]
            if bad:
                raise UserError(f"the {split} data's column {cfg.label_column!r} has {len(bad)} regression targets "
                                f"that are NaN or infinite (first at row {bad[0]}: {values[bad[0]]}); fill them in or "
                                "drop those rows")
        return cls(["score"], list(cfg.text_column)), float, lambda split: [0] * len(split)

    def fitted(self, targets: list[float], balanced: bool) -> Task:
        """The task with the training targets' mean and standard deviation, which the loss measures in."""
        import statistics
        if balanced:
            raise UserError("--class-weights balanced weighs classes, and a regression has none: leave it out")
        scale = statistics.pstdev(targets) if len(targets) > 1 else 0.0
        if not scale > 0:
            raise UserError(f"every training target is {targets[0]}: a regression needs targets that differ")
        return replace(self, target_scale=scale, target_mean=statistics.fmean(targets))

    def summed_loss(self, logits, labels, weight):
        from torch.nn import functional
        return functional.mse_loss(logits[:, 0], labels.to(logits.dtype) / self.target_scale, reduction="sum")

    def start_head(self, model) -> None:
        """The head's bias, where it has one, at the targets' mean: the untrained model predicts the mean. Decoders'
        heads (score) have no bias and learn it."""
        import torch
        bias = output_layer(model, self).bias
        if bias is not None:
            with torch.no_grad():
                bias.fill_(self.target_mean / self.target_scale)

    def metrics(self, outputs, labels) -> dict:
        import numpy as np
        from scipy.stats import pearsonr, spearmanr  # scipy comes with scikit-learn
        from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
        predicted, true = outputs.reshape(-1) * self.target_scale, labels.reshape(-1)
        constant = np.ptp(predicted) == 0 or np.ptp(true) == 0  # correlation is undefined: NaN, without scipy's warning
        return {"rmse": float(np.sqrt(mean_squared_error(true, predicted))),
                "mae": mean_absolute_error(true, predicted),
                "pearson": float("nan") if constant else float(pearsonr(predicted, true)[0]),
                "spearman": float("nan") if constant else float(spearmanr(predicted, true)[0]),
                "r2": r2_score(true, predicted)}

    def details(self, outputs, labels) -> dict:
        """The predictions for each true value (or for each twentieth of their range, if the targets take more than
        20 values): how many, their mean and quartiles."""
        import numpy as np
        true, predicted = labels.reshape(-1), outputs.reshape(-1) * self.target_scale
        values = np.unique(true)
        if len(values) <= 20:
            centres, bins = values, np.searchsorted(values, true)
        else:
            edges = np.linspace(values[0], values[-1], 21)
            centres, bins = (edges[:-1] + edges[1:]) / 2, np.clip(np.searchsorted(edges, true, side="right") - 1, 0, 19)
        summary = []
        for i, centre in enumerate(centres):
            chosen = predicted[bins == i]
            if len(chosen):
                p25, p75 = np.percentile(chosen, [25, 75])
                summary.append({"true": float(centre), "count": int(len(chosen)), "mean": float(chosen.mean()),
                                "p25": float(p25), "p75": float(p75)})
        return {"by_true_value": summary}

    def chart(self, metrics: dict):
        return predicted_chart(metrics["after"]["by_true_value"])

    def probabilities(self, logits):
        raise UserError("a regression model gives scores, not probabilities: call the Classifier, or predict()")

    def calibration(self, logits, labels) -> dict:
        return {}

    def results(self, logits) -> list[dict]:
        """Each text's predicted value, in the target's units."""
        return [{"score": score} for score in (logits[:, 0] * self.target_scale).tolist()]

    @property
    def result_columns(self) -> dict:
        return {"score": "predicted_score"}

    def merge_head(self, model) -> None:
        """The output in the target's units, as a pipeline returns it unchanged."""
        scale_outputs(output_layer(model, self), [self.target_scale])


TASKS = {task.kind: task for task in (Classification, MultiLabel, Regression)}


def reliability(confidence, outcome, bins: int = 15) -> dict:
    """The expected calibration error of these probabilities (how sure) against what happened (1 or 0): the
    mean gap between them in each of `bins` equal-width bins of confidence, weighted by the bin's share of the
    probabilities; and the bins, as the reliability diagram draws them."""
    import numpy as np
    confidence, outcome = np.asarray(confidence, dtype=float), np.asarray(outcome, dtype=float)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    rows = [{"confidence": float(confidence[which == b].mean()), "accuracy": float(outcome[which == b].mean()),
             "count": int((which == b).sum())} for b in range(bins) if (which == b).any()]
    return {"ece": sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows) / len(confidence),
            "bins": rows}


# ----------------------------------------------------------------------------------------------
# Step 2: the 4-bit model with LoRA


def check_model(cfg: Config):
    """--model checked from its config and tokenizer, before its weights load (and before the output folder is, so
    that this mistake is not hidden behind --overwrite): transformers has a sequence-classification class for it,
    and it reads --max-length tokens. Returns its tokenizer."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
    config = load_pretrained(AutoConfig, cfg.model_source)
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise UserError(f"{cfg.model} is a {config.model_type!r} model, for which transformers has no sequence-"
                        "classification class: choose a --model that AutoModelForSequenceClassification loads "
                        "(BERT, RoBERTa, DistilBERT, Llama, Mistral, Qwen2, Gemma, ...)")
    tokenizer = load_tokenizer(cfg.model_source, pairs=len(cfg.text_column) == 2)
    positions = min(tokenizer.model_max_length, getattr(config, "max_position_embeddings", None) or 10**9)
    if cfg.max_length > positions:
        raise UserError(f"--max-length {cfg.max_length} is more than {cfg.model} reads ({positions} tokens)")
    lora_targets(cfg, config.model_type)
    window = cfg.max_length - tokenizer.num_special_tokens_to_add()
    if cfg.window_stride and cfg.window_stride >= window:
        raise UserError(f"--window-stride {cfg.window_stride} is not smaller than the window ({window} tokens of text "
                        f"in --max-length {cfg.max_length}): windows would skip text; use a smaller stride")
    return tokenizer


def lora_targets(cfg: Config, model_type: str) -> list[str]:
    """The modules LoRA goes on: --lora-targets, or the attention query and value from peft's table for the
    architecture (a --search tries those and all-linear)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
    targets = cfg.lora_targets or PEFT_TARGETS.get(model_type) or EXTRA_LORA_TARGETS.get(model_type)
    if not targets:
        raise UserError(f"no default LoRA targets for model type {model_type!r}: name its attention projections "
                        "with --lora-targets (for example --lora-targets q_proj v_proj), or use all-linear")
    return targets


def load_tokenizer(source: str, pairs: bool = False):
    """The tokenizer, padding on the right with a padding token (pad_token), and for pairs a separator between the
    two texts (join_pairs). Decoders' classification heads read the last token that is not padding, and right
    padding keeps every text's positions as in pretraining."""
    from transformers import AutoTokenizer
    tokenizer = load_pretrained(AutoTokenizer, source)
    if len(tokenizer) <= len(tokenizer.all_special_ids):  # transformers 5 builds an empty one if the files are missing
        raise UserError(f"the tokenizer of {source} has no vocabulary, only its special tokens: the model's folder "
                        "needs its tokenizer files (tokenizer.json, or vocab.txt for BERT)")
    pad_token(tokenizer, source)
    tokenizer.padding_side = "right"
    if pairs:
        join_pairs(tokenizer, source)
    return tokenizer


def build_model(cfg: Config, tokenizer, task: Task, runtime: Runtime):
    """QLoRA: the 4-bit base, frozen, LoRA adapters, the trainable head, all started from --seed. Returns (model,
    what metrics.json records of it)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import set_seed
    set_seed(cfg.seed)  # the new head and the LoRA matrices start from it
    started = time.perf_counter()
    model = load_base_model(cfg.model_source, task, runtime)
    load_seconds = time.perf_counter() - started
    task.start_head(model)
    model.config.pad_token_id = tokenizer.pad_token_id  # where a decoder's head finds each text's last token
    # peft's prepare_model_for_kbit_training would freeze the base too, but it upcasts every weight that is not
    # 4-bit to fp32 (twice the memory for a frozen embedding); here only what trains is fp32. Gradient
    # checkpointing is the Trainer's, when the batch plan asks for it.
    model.requires_grad_(False)
    quantized_layers = prepare_4bit_layers(model)
    targets = lora_targets(cfg, model.config.model_type)
    heads = list(trainable_heads(model))
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout,
                      # peft's shorthand for every linear layer but the head, or the modules named
                      target_modules="all-linear" if list(targets) == ["all-linear"] else list(targets),
                      modules_to_save=list(heads))  # a copy: peft appends its own guesses to the list
    try:
        # LoRA's weights in the dtype the head trains in (load_base_model says which)
        model = get_peft_model(model, lora, autocast_adapter_dtype=runtime.trained_dtype == torch.float32)
    except ValueError as e:
        raise UserError(f"--lora-targets {' '.join(targets)}: {e}") from e
    trainable, total = model.get_nb_trainable_parameters()
    targeted = {name.rsplit(".", 1)[-1] for name in model.peft_config["default"].target_modules}
    info = {"trainable_params": trainable, "total_params": total, "quantized_layers": quantized_layers,
            "lora_targets": sorted(targeted), "trained_heads": heads,
            # get_memory_footprint counts parameters and buffers as they are stored (4-bit packed two per byte)
            "memory_4bit_bytes": model.get_memory_footprint(), "memory_fp32_bytes": 4 * total}
    log.info("Model: %s (loaded in %.0f s), %d layers in 4-bit NF4, LoRA on %s, trained head: %s", cfg.model,
             load_seconds, quantized_layers, ", ".join(info["lora_targets"]), ", ".join(heads))
    log.info("Trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    log.info("Model memory: %.1f MB in 4-bit vs %.1f MB in fp32 (%.0f%% smaller)", info["memory_4bit_bytes"] / 1e6,
             info["memory_fp32_bytes"] / 1e6, 100 * (1 - info["memory_4bit_bytes"] / info["memory_fp32_bytes"]))
    return model, info


def load_base_model(source: str, task: Task, runtime: Runtime):
    """The base model in 4-bit NF4, with a head for this task."""
    from transformers import AutoModelForSequenceClassification
    with loading_threads(runtime):
        model, loading = load_pretrained(AutoModelForSequenceClassification, source, output_loading_info=True,
                                         **quantized_load_kwargs(task, runtime))
    # transformers' own report (quieted) lists the new head as missing; only other missing weights are news
    missing = [key for key in loading["missing_keys"] if not set(key.split(".")) & set(HEAD_MODULES)]
    if missing:
        log.warning("%s lacks %d weights, which start random: %s", source, len(missing), ", ".join(missing[:10]))
    # What trains is fp32: fp16 mixed precision (a T4) can only unscale fp32 gradients, and small updates to 16-bit
    # weights would round away. Sharded (FSDP), it is in the compute dtype like everything in its wrapped layer, and
    # accelerate keeps fp32 copies of it, which the optimizer updates.
    for head in trainable_heads(model).values():
        head.to(runtime.trained_dtype)
    return model


def quantized_load_kwargs(task: Task, runtime: Runtime) -> dict:
    """from_pretrained arguments for a 4-bit NF4 model with this task's head, used for training and for reloading."""
    from transformers import BitsAndBytesConfig
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # the default is fp4; NF4 suits normally distributed weights
        bnb_4bit_use_double_quant=True,  # quantize the quantization constants too: ~0.4 bits/param less
        bnb_4bit_compute_dtype=runtime.dtype,  # the default is fp32: slow on a GPU
        bnb_4bit_quant_storage=runtime.quant_storage,  # the packed 4-bit weights' dtype (Runtime says why)
        llm_int8_skip_modules=list(UNQUANTIZED_MODULES),  # replaces transformers' own list, so name the head
    )
    return dict(**head_config(task), quantization_config=quantization,
                # What stays unquantized (embeddings, norms) is frozen: the compute dtype is enough, half of fp32
                # (Llama 3's 128,256-token embedding: 1.05 GB instead of 2.1)
                dtype=runtime.dtype, device_map={"": runtime.load_device})


def head_config(task: Task) -> dict:
    """from_pretrained arguments for the task's head: its outputs, their names, and the problem type, which picks
    the model's own loss (cross-entropy, binary cross-entropy per label, mean squared error)."""
    return dict(num_labels=task.num_labels, id2label=dict(enumerate(task.label_names)),
                label2id={name: i for i, name in enumerate(task.label_names)}, problem_type=task.problem_type)


def trainable_heads(model) -> dict:
    """The modules that train besides LoRA, by name: the new classification head, and BERT's pooler."""
    heads = {name: module for name, module in model.named_children() if name in HEAD_MODULES}
    # BERT's pooler sits inside the encoder (DeBERTa's is a child, found above; RoBERTa builds without one)
    pooler = getattr(model.base_model, "pooler", None)
    if "pooler" not in heads and pooler is not None:
        heads["pooler"] = pooler
    return heads


def output_layer(model, task: Task):
    """The head's last linear layer, which computes the task's outputs (BERT's classifier, a decoder's score)."""
    import torch
    layers = [m for head in trainable_heads(model).values() for m in head.modules()
              if isinstance(m, torch.nn.Linear) and m.out_features == task.num_labels]
    if not layers:
        raise RuntimeError(f"no linear layer of {task.num_labels} outputs in the head "
                           f"{', '.join(trainable_heads(model))}")
    return layers[-1]


def scale_outputs(layer, factors: list[float]) -> None:
    """Multiplies each output of a linear layer by its factor (one factor: all of them), in place."""
    import torch
    with torch.no_grad():
        scale = torch.tensor(factors, dtype=layer.weight.dtype, device=layer.weight.device)
        layer.weight.mul_(scale[:, None])
        if layer.bias is not None:
            layer.bias.mul_(scale)


# ----------------------------------------------------------------------------------------------
# Step 3: the texts as tokens


class Tokenized(NamedTuple):
    train: Any
    validation: Any  # or None
    test: Any
    calibration: Any = None


def tokenize_splits(data: Splits, tokenizer, cfg: Config) -> Tokenized:
    """Each split tokenised once; the evaluated ones sorted by length, so that texts of similar length share a
    batch (their order does not matter)."""
    def tokens(dataset, sort_by_length: bool):
        return dataset and tokenize(dataset, tokenizer, cfg.max_length, cfg.truncation, cfg.window_stride,
                                    sort_by_length)

    train, validation, test = tokens(data.train, False), tokens(data.validation, True), tokens(data.test, True)
    calibration = validation if data.calibration is data.validation else tokens(data.calibration, True)
    texts = Tokenized(train, validation, test, calibration)
    if cfg.truncation == "windows":
        log.info("Windows of %d tokens: %s", cfg.max_length, ", ".join(
            f"{len(set(dataset['text_index']))} {name} texts as {len(dataset)}" for name, dataset
            in zip(texts._fields, texts) if dataset and (name != "calibration" or calibration is not validation)))
    return texts


def tokenize(dataset, tokenizer, max_length: int, truncation: str, stride: int | None = None,
             sort_by_length: bool = False):
    """Token ids of every text (encode); padding happens per batch, so short texts stay cheap. With --truncation
    windows a row per window, with its text's label and its text's index (text_index)."""
    def encoded(batch: dict, indices: list[int]) -> dict:
        out = encode(tokenizer, batch["text"], max_length, truncation, batch.get("text_pair"), stride)
        rows = out.pop("text_of_row", None)
        if rows is not None:
            out.update(labels=[batch["labels"][i] for i in rows], text_index=[indices[i] for i in rows])
        return out

    texts = [name for name in ("text", "text_pair") if name in dataset.column_names]
    dataset = dataset.map(encoded, batched=True, with_indices=True, desc="Tokenising",
                          remove_columns=texts + (["labels"] if truncation == "windows" else []))
    if sort_by_length:
        lengths = [len(ids) for ids in dataset["input_ids"]]
        dataset = dataset.select(sorted(range(len(lengths)), key=lengths.__getitem__))
    return dataset


def encode(tokenizer, texts: list[str], max_length: int, truncation: str, pairs: list[str] | None = None,
           stride: int | None = None) -> dict:
    """Token ids of each text, or of each pair of texts (texts[i], pairs[i]) in the tokenizer's pair template, cut to
    max_length (special tokens included) by kept_positions, or read as windows (window_positions), a row each, with
    text_of_row saying whose. With pairs also token_type_ids, where the model reads them (BERT: 0 for the first text
    and its [CLS] [SEP], 1 for the second)."""
    # Whole texts, cut below; verbose=False drops the "longer than the maximum length" warning this would raise
    tokens = tokenizer(texts, pairs, return_special_tokens_mask=True, verbose=False)
    columns = ["input_ids"] + (["token_type_ids"] if pairs and "token_type_ids" in tokenizer.model_input_names else [])
    encoded = {name: [] for name in columns}
    windows = truncation == "windows"
    if windows:
        encoded["text_of_row"] = []
    for row, ids in enumerate(tokens["input_ids"]):
        kept = [range(len(ids))]
        if len(ids) > max_length:
            # which text each token is of: None for special tokens, 0 for the text, 1 for a pair's second text
            parts = (tokens.sequence_ids(row) if pairs else
                     [None if special else 0 for special in tokens["special_tokens_mask"][row]])
            kept = (window_positions(parts, max_length, stride) if windows else
                    [kept_positions(parts, max_length, truncation)])
        for keep in kept:
            for name in columns:
                encoded[name].append([tokens[name][row][i] for i in keep])
            if windows:
                encoded["text_of_row"].append(row)
    return encoded


def window_positions(parts: list[int | None], max_length: int, stride: int | None) -> list[list[int]]:
    """The windows over a too-long text's positions: each its special tokens (None in parts) around as many of its
    tokens as max_length leaves room for, a window starting every `stride` tokens (default half a window), the last
    ending where the text ends."""
    text = [i for i, part in enumerate(parts) if part is not None]
    before, after = list(range(text[0])), list(range(text[-1] + 1, len(parts)))
    size = max_length - len(before) - len(after)
    starts = list(range(0, len(text) - size, stride or max(1, size // 2))) + [len(text) - size]
    return [before + text[start:start + size] + after for start in starts]


def kept_positions(parts: list[int | None], max_length: int, truncation: str) -> list[int]:
    """The positions of a too-long encoding that max_length keeps: every special token (None in parts), and of each
    text its first tokens, its last, or its first quarter and last three quarters (--truncation). A pair loses
    tokens from its longer text first, as the tokenizers' longest_first does: the shorter keeps all of its tokens
    if it is at most half of what is left, else both keep half."""
    texts = [[i for i, part in enumerate(parts) if part == text] for text in (0, 1)]
    texts = [positions for positions in texts if positions]
    budget = max_length - sum(part is None for part in parts)
    sizes = [len(positions) for positions in texts]
    if len(sizes) == 2:
        shorter = sizes.index(min(sizes))
        sizes[shorter] = min(sizes[shorter], budget // 2)
        sizes[1 - shorter] = min(sizes[1 - shorter], budget - sizes[shorter])
    else:
        sizes = [min(sizes[0], budget)] if sizes else []
    cut = set()
    for positions, size in zip(texts, sizes):
        head = {"head": size, "tail": 0, "head+tail": size // 4}[truncation]
        cut.update(positions[head:len(positions) - (size - head)])
    return [i for i in range(len(parts)) if i not in cut]


def pad_batch(encoded: dict, pad_id: int, runtime: Runtime) -> dict:
    """The tensors of these texts (encode's input_ids, and token_type_ids for pairs where the model reads them),
    padded on the right to the runtime's multiple, with their attention_mask: what tokenizer.pad returns, built with
    numpy in one step rather than text by text in Python, which was several times slower (benchmarks/NOTES.md).
    Training's batches and prediction's are padded here."""
    import numpy as np
    import torch
    lengths = np.array([len(ids) for ids in encoded["input_ids"]])
    mask = np.arange(runtime.padded(int(lengths.max()))) < lengths[:, None]
    tensors = {}
    for name, rows in encoded.items():
        padded = np.full(mask.shape, pad_id if name == "input_ids" else 0, dtype=np.int64)
        padded[mask] = np.fromiter(itertools.chain.from_iterable(rows), np.int64, count=int(lengths.sum()))
        tensors[name] = torch.from_numpy(padded)
    tensors["attention_mask"] = torch.from_numpy(mask.astype(np.int64))
    return tensors


# ----------------------------------------------------------------------------------------------
# Steps 4 and 5: evaluate, train


def evaluate(trainer, dataset, task: Task, phase: str) -> dict:
    """The task's metrics and the loss on the dataset, with where the model errs (Task.details)."""
    with explain_out_of_memory(f"evaluating ({phase.lower()})", "lower --eval-batch-size or --max-length"):
        output = trainer.predict(dataset, metric_key_prefix="eval")
    logits, labels = by_text(output.predictions, output.label_ids, dataset)
    raw = output.metrics
    metrics = {**task.metrics(logits, labels), "loss": raw["eval_loss"], "runtime_s": raw["eval_runtime"],
               "samples_per_s": raw["eval_samples_per_second"], **task.details(logits, labels),
               **task.calibration(logits, labels)}
    log.info("%s: %s (%.1f s)", phase, task.headline(metrics), metrics["runtime_s"])
    if "calibrated" in metrics.get("calibration", {}):
        before, after = metrics["calibration"]["uncalibrated"], metrics["calibration"]["calibrated"]
        log.info("Calibrated on the test texts: expected calibration error %.3f -> %.3f, log loss %.3f -> %.3f, "
                 "Brier score %.3f -> %.3f", before["ece"], after["ece"], before["log_loss"], after["log_loss"],
                 before["brier"], after["brier"])
    return metrics


def by_text(outputs, labels, dataset):
    """Each text's outputs and label, in order: a text read as windows (--truncation windows) gets the mean of its
    windows' outputs, each window as much a part of it as any other (for one label per text, the geometric mean of
    their probabilities; for multi-label, a label is found where the windows together say so)."""
    if "text_index" not in dataset.column_names:
        return outputs, labels
    import numpy as np
    _, rows, counts = np.unique(dataset["text_index"], return_inverse=True, return_counts=True)
    combined = np.zeros((len(counts), *outputs.shape[1:]), dtype=np.float64)
    np.add.at(combined, rows, outputs)
    first = np.full(len(counts), len(rows))
    np.minimum.at(first, rows, np.arange(len(rows)))
    return (combined / counts.reshape(-1, *[1] * (outputs.ndim - 1))).astype(outputs.dtype), labels[first]


def calibrate(trainer, dataset, task: Task) -> Task:
    """The task with a temperature fit on the held-out texts (--calibration), or as it was without them."""
    if dataset is None:
        return task
    with explain_out_of_memory("calibrating", "lower --eval-batch-size or --max-length"):
        output = trainer.predict(dataset, metric_key_prefix="eval")
    logits, labels = by_text(output.predictions, output.label_ids, dataset)
    calibrated = replace(task, temperature=task.fit_temperature(logits, labels))
    figures = calibrated.calibration(logits, labels)["calibration"]
    log.info("Calibration: temperature %s, fit on %d held-out texts (their log loss %.3f -> %.3f)",
             ", ".join(f"{t:.3f}" for t in calibrated.temperature), len(labels),
             figures["uncalibrated"]["log_loss"], figures["calibrated"]["log_loss"])
    return calibrated


def train(trainer, task: Task, texts: int) -> tuple[list[dict], dict]:
    """Trains on `texts` training texts, evaluating after every epoch, from the checkpoint to resume from if there is
    one. Returns (the history per epoch, the training run's figures)."""
    with explain_out_of_memory("training", f"lower --micro-batch-size (this run: {trainer.plan.micro_batch}) or "
                               "--max-length, or turn on --gradient-checkpointing; the checkpoints written so far "
                               f"stay in {trainer.args.output_dir}: continue with --resume"):
        result = trainer.train(resume_from_checkpoint=trainer.resume_from)
    history: dict[int, dict] = {}
    for entry in trainer.state.log_history:
        epoch = history.setdefault(round(entry["epoch"]), {"epoch": round(entry["epoch"])})
        if f"eval_{task.best_metric}" in entry:
            epoch.update({name: entry[f"eval_{name}"] for name in task.metric_names}, loss=entry["eval_loss"],
                         eval_runtime_s=entry["eval_runtime"])
        elif "loss" in entry:
            epoch["train_loss"] = entry["loss"]
    seconds = result.metrics["train_runtime"]
    run = {"train_runtime_s": seconds,
           # texts, not the Trainer's samples (a micro-batch each with --batching tokens); a resumed run trained only
           # the steps left
           "train_texts_per_s": None if trainer.resume_from else texts * trainer.state.epoch / seconds,
           "optimizer_steps": trainer.state.global_step, **trainer.record(), "resumed": trainer.resume_from is not None}
    log.info("Trained %d epoch%s in %.1f s, peak memory %.0f MB", len(history), "s" if len(history) > 1 else "",
             seconds, run["peak_memory_bytes"] / 1e6)
    evaluated = [history[e] for e in sorted(history) if task.best_metric in history[e]]
    if trainer.args.load_best_model_at_end:  # the Trainer reloaded the best epoch's weights
        run["best_epoch"] = next(h["epoch"] for h in evaluated if h[task.best_metric] == trainer.state.best_metric)
        log.info("Kept epoch %d, the best by %s on the validation texts", run["best_epoch"],
                 METRIC_NAMES[task.best_metric])
    return evaluated, run


@contextlib.contextmanager
def explain_out_of_memory(doing: str, remedy: str):
    """A GPU out of memory is the user's to fix by a setting: say which, in one line."""
    import torch
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise UserError(f"the GPU ran out of memory {doing}: {remedy}") from e


# ----------------------------------------------------------------------------------------------
# Step 6: save


def describe_run(cfg: Config, task: Task, model_info: dict, trainer, runtime: Runtime) -> dict:
    """What metrics.json says of the run besides its results: the task, the model, the batches, the device, the
    settings and the versions."""
    return {"label_names": task.label_names, "task": task.to_dict(), "model": model_info,
            "batches": trainer.plan._asdict(), "precision": runtime.precision, "processes": runtime.num_processes,
            "device": device_name(runtime), "config": asdict(cfg), "versions": versions()}


def versions() -> dict:
    import importlib
    # From the modules, not package metadata: a copied-in package (no metadata) must not crash the run
    modules = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "sklearn")
    return {"python": sys.version.split()[0],
            **{m: getattr(importlib.import_module(m), "__version__", "unknown") for m in modules}}


SERVING_FILE = "serving.json"  # beside the adapter: what serving needs besides the weights


def save(trainer, metrics: dict, model_dir: str) -> bool:
    """The adapter (LoRA and the trained head, not the 4-bit base), the tokenizer, metrics.json and SERVING_FILE
    (what Classifier.load needs besides the weights), written whole into model_dir (replaced_whole): a crash never
    leaves half a model where predict() would load it, and an older model is replaced only by a whole one. Then the
    checkpoints go: the saved model supersedes them. Returns whether this process wrote it (one writes for all)."""
    adapter = trainer.trained_adapter()
    if adapter is None:
        return False
    model, weights = adapter
    serving = {"label_names": metrics["label_names"], "max_length": metrics["config"]["max_length"],
               "truncation": metrics["config"]["truncation"], "window_stride": metrics["config"]["window_stride"],
               "batch_size": metrics["batches"]["eval_batch"],
               "precision": metrics["precision"],
               "task": {key: value for key, value in metrics["task"].items() if key != "label_names"}}
    with replaced_whole(model_dir) as staging:
        model.save_pretrained(staging, state_dict=weights)
        trainer.processing_class.save_pretrained(staging)
        for name, content in (("metrics.json", metrics), (SERVING_FILE, serving)):
            with open(os.path.join(staging, name), "w") as f:
                json.dump(content, f, indent=2)
        model_card(metrics, model_dir).save(os.path.join(staging, "README.md"))  # in place of peft's template
    shutil.rmtree(trainer.args.output_dir)
    log.info("Saved the model to %s", model_dir)
    return True


def model_card(metrics: dict, folder: str, merged: bool = False):
    """The folder's README.md, as the Hub and the tools around it read it (huggingface_hub's ModelCard): YAML
    metadata (the base model, the library, the pipeline tag, tags, the dataset where it is the hub's, the test
    metrics), then what the model is, its results before and after training, its settings, how to load and call
    it, and the charts drawn."""
    import math
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    cfg, task = metrics["config"], Task.from_dict({**metrics["task"], "label_names": metrics["label_names"]})
    data_name = cfg["dataset"] or os.path.basename(cfg["eval_file"])
    path = os.path.abspath(folder)
    name = os.path.basename(os.path.dirname(path) if os.path.basename(path) == MODEL_FOLDER else path)
    after = metrics.get("after", {})
    data = ModelCardData(
        base_model=None if os.path.exists(cfg["model"]) else cfg["model"],  # a local folder is none the Hub knows
        library_name="transformers" if merged else "peft", pipeline_tag="text-classification",
        tags=["qlora", "lora", "peft", "4-bit", "bitsandbytes", task.kind], model_name=name,
        datasets=[cfg["dataset"]] if cfg["dataset"] else None, metrics=list(task.metric_names),
        eval_results=[EvalResult(task_type="text-classification", dataset_type=cfg["dataset"] or "local",
                                 dataset_name=data_name, dataset_split="test", metric_type=metric,
                                 metric_value=round(float(after[metric]), 4))
                      for metric in task.metric_names if metric in after and math.isfinite(after[metric])] or None)
    lines = [f"# {name}", "", f"QLoRA fine-tuning of {cfg['model']} (4-bit NF4 base, LoRA r={cfg['lora_r']}, alpha="
             f"{cfg['lora_alpha']}) for {task.describe()}, with peft_qlora.py, on {data_name}"
             + (": LoRA merged into the dequantized base, a plain transformers model." if merged else ".")]
    if after:
        lines += ["", "## Results on the test texts" + (" (of the 4-bit model it was merged from)" if merged else ""),
                  "", "| metric | before training | after training |", "| --- | --- | --- |",
                  *(f"| {METRIC_NAMES[m]} | {metrics['before'][m]:.4f} | {after[m]:.4f} |" for m in task.metric_names)]
    calibration = after.get("calibration", {})
    if "calibrated" in calibration:
        lines += ["", f"Probabilities are calibrated (temperature {', '.join(f'{t:.3f}' for t in task.temperature)}):"
                  f" expected calibration error on the test texts {calibration['uncalibrated']['ece']:.3f} as trained,"
                  f" {calibration['calibrated']['ece']:.3f} calibrated."]
    shown = ("model", "dataset", "train_file", "eval_file", "train_size", "eval_size", "validation_size", "max_length",
             "truncation", "window_stride", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "epochs",
             "learning_rate", "batch_size", "class_weights", "calibration", "search", "seed")
    lines += ["", "## Settings", "", "| setting | value |", "| --- | --- |",
              *(f"| {key} | {cfg[key]} |" for key in shown if cfg.get(key) is not None),
              f"| precision | {metrics['precision']} |", "", "## How to use", "", "```python"]
    if merged:
        lines += ["from transformers import pipeline", "",
                  f'classify = pipeline("text-classification", model="{folder}")', 'classify("A wonderful film.")',
                  "```"]
    else:
        lines += ["from peft_qlora import Classifier, predict", "",
                  f'predict("A wonderful film.", model_dir="{folder}")', f'classifier = Classifier.load("{folder}")',
                  'classifier(["A wonderful film.", "A dull one."])', "```",
                  "", f'From the shell: `python peft_qlora.py predict --model-dir {folder} "A wonderful film."`, or a '
                  "whole file with `--file reviews.csv --output predictions.csv`. `python peft_qlora.py export "
                  f"--model-dir {folder} --merged OUT` writes a plain transformers model that "
                  '`pipeline("text-classification", model=OUT)` loads.']
    charts = ["bar_chart.png", "line_chart.png", task.chart_file] + ["reliability.png"] * ("calibrated" in calibration)
    lines += ["", "## Charts", "", f"Drawn by the training run into {cfg['images_dir']}: "
              + ", ".join(charts + ["search.png"] * bool(metrics.get("search"))) + "."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# Step 7: the charts


def draw(metrics: dict, task: Task, images_dir: str) -> list[str]:
    """bar_chart.png: the task's two headline metrics before and after training; line_chart.png: the metric that
    picks the best epoch, per epoch; and the task's chart of where the trained model errs (Task.chart_file)."""
    figures = {"bar_chart.png": bar_chart(metrics, task), "line_chart.png": line_chart(metrics, task),
               task.chart_file: task.chart(metrics)}
    if "calibrated" in metrics["after"].get("calibration", {}):
        figures["reliability.png"] = reliability_chart(metrics["after"]["calibration"], task)
    if metrics.get("search"):
        figures["search.png"] = search_chart(metrics["search"])
    paths = [os.path.join(images_dir, name) for name in figures]
    try:
        os.makedirs(images_dir, exist_ok=True)
        for path, figure in zip(paths, figures.values()):
            figure.savefig(path, dpi=120)
    except OSError as e:
        model_dir = os.path.join(metrics["config"]["output_dir"], MODEL_FOLDER)
        raise UserError(f"the model is saved in {model_dir}, but the charts could not be drawn in --images-dir "
                        f"{images_dir}: {e}") from e
    log.info("Charts: %s", ", ".join(paths))
    return paths


def bar_chart(metrics: dict, task: Task):
    """The task's two headline metrics before and after training, side by side (in panels, Task.bar_panels)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    panels = task.bar_panels
    bar = Figure(figsize=(6 if len(panels) == 1 else 8, 4), layout="constrained")
    axes = bar.subplots(1, len(panels), squeeze=False)[0]
    width = 0.38
    phases = (("before training", metrics["before"]), ("after training", metrics["after"]))
    for ax, shown in zip(axes, panels):
        top = max(1.0, *(abs(values[name]) for _, values in phases for name in shown))
        for offset, (phase, values) in zip((-width / 2, width / 2), phases):
            bars = ax.bar([i + offset for i in range(len(shown))], [values[name] for name in shown], width,
                          label=phase)
            ax.bar_label(bars, fmt="%.3f", padding=2)
        ax.set_xticks(range(len(shown)), [METRIC_NAMES[name] for name in shown])
        ax.set_ylim(min(0, *(values[name] for _, values in phases for name in shown)) * 1.25,
                    1.25 * top)  # headroom for the legend above bars that reach the top
        ax.legend(loc="upper center", ncol=2)
    axes[0].set_ylabel("score on the test set")
    bar.suptitle(f"QLoRA fine-tuning of {os.path.basename(metrics['config']['model'].rstrip('/'))}")
    return bar


def line_chart(metrics: dict, task: Task):
    """The metric that picks the best epoch (accuracy, micro F1 or RMSE), per epoch, on the texts each epoch was
    evaluated on: the validation texts if the run held some out, else the test texts."""
    from matplotlib.figure import Figure
    start = metrics.get("validation_before", metrics["before"])
    texts = "validation" if "validation_before" in metrics else "test"
    name = task.best_metric
    line = Figure(figsize=(6, 4), layout="constrained")
    ax = line.subplots()
    epochs = [0] + [h["epoch"] for h in metrics["history"]]
    values = [start[name]] + [h[name] for h in metrics["history"]]
    ax.plot(epochs, values, marker="o", label="after each epoch of training")
    ax.axhline(start[name], color="gray", linestyle="--", label=f"before training ({start[name]:.3f})")
    for x, y in zip(epochs[1:], values[1:]):
        ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center")
    best = metrics["training"].get("best_epoch")
    if best:
        ax.plot([best], [values[epochs.index(best)]], marker="o", markersize=14, fillstyle="none", color="C3",
                linestyle="none", label=f"kept: epoch {best}")
    ax.set_xticks(epochs)
    ax.set_xlabel("epoch (0 = untrained)")
    ax.set_ylabel(f"{METRIC_NAMES[name]} on the {texts} set" + ("" if task.greater_is_better else " (lower is better)"))
    ax.set_ylim(0, 1.05 if task.greater_is_better else 1.2 * max(values))
    ax.set_title(f"{METRIC_NAMES[name][0].upper()}{METRIC_NAMES[name][1:]} per epoch")
    ax.legend(loc="lower right" if task.greater_is_better else "upper right")
    return line


def reliability_chart(calibration: dict, task: Task):
    """The reliability diagram on the test texts before and after calibration: in each bin of confidence, how often
    the model was right against how sure it was (multi-label: how often a label was there against its
    probability); a calibrated model's points lie on the diagonal."""
    from matplotlib.figure import Figure
    figure = Figure(figsize=(6, 5), layout="constrained")
    ax = figure.subplots()
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfectly calibrated")
    for key, name in (("uncalibrated", "as trained"), ("calibrated", "calibrated")):
        bins = calibration[key]["bins"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                label=f"{name} (expected calibration error {calibration[key]['ece']:.3f})")
    sure = "probability of each label" if task.per_label else "probability of the predicted class"
    ax.set_xlabel(f"{sure} (bins of 1/15)")
    ax.set_ylabel("share of labels present" if task.per_label else "share predicted right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Reliability on the test set")
    ax.legend(loc="upper left")
    return figure


def search_chart(search: dict):
    """The search's trials: each one's validation score against its learning rate, marked by its LoRA rank and
    targets, the trials stopped after their first epoch hollow (their first epoch's score), the best ringed."""
    from matplotlib.figure import Figure
    figure = Figure(figsize=(7, 5), layout="constrained")
    ax = figure.subplots()
    styles = {"given": "o", "all-linear": "s"}
    for trial in search["trials"]:
        colour = f"C{[4, 8, 16, 32].index(trial['lora_r'])}"
        ax.scatter(trial["learning_rate"], trial["score"], s=20 + 6 * trial["lora_r"],
                   marker=styles[trial["lora_targets"]], edgecolors=colour,
                   facecolors="none" if trial["state"] == "pruned" else colour)
        ax.annotate(f"{trial['trial']} ({trial['epochs']} ep)", (trial["learning_rate"], trial["score"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    best = next(t for t in search["trials"] if t["trial"] == search["best"])
    ax.scatter(best["learning_rate"], best["score"], s=400, facecolors="none", edgecolors="C3", label="best")
    for targets, marker in (("the given targets", "o"), ("all-linear", "s")):
        ax.scatter([], [], marker=marker, color="gray", label=f"LoRA on {targets}")
    ax.scatter([], [], marker="o", facecolors="none", edgecolors="gray", label="stopped after its first epoch")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (marker size and colour: LoRA rank 4, 8, 16, 32)")
    ax.set_ylabel(f"best {METRIC_NAMES[search['metric']]} on the validation texts")
    ax.set_title("The search's trials (number, epochs)")
    ax.legend(loc="best", fontsize=8)
    return figure


def label_f1_chart(before: dict, after: dict):
    """Multi-label: each label's F1 on the test set before and after training, with its support."""
    from matplotlib.figure import Figure
    names = list(after)
    figure = Figure(figsize=(7, max(3, 1 + 0.45 * len(names))), layout="constrained")
    ax = figure.subplots()
    height = 0.38
    for offset, (phase, values) in zip((height / 2, -height / 2), (("before training", before),
                                                                    ("after training", after))):
        bars = ax.barh([len(names) - 1 - i + offset for i in range(len(names))],
                       [values[name]["f1-score"] for name in names], height, label=phase)
        ax.bar_label(bars, fmt="%.3f", padding=2)
    ax.set_yticks(range(len(names)), [f"{name} ({int(after[name]['support'])})" for name in reversed(names)])
    ax.set_xlim(0, 1.2)
    ax.set_xlabel("F1 on the test set")
    ax.set_title("Each label's F1 (its texts in the test set)")
    ax.legend(loc="lower right")
    return figure


def predicted_chart(summary: list[dict]):
    """Regression: the mean prediction for each true value, with the middle half of the predictions, against the
    line where the prediction equals the truth."""
    from matplotlib.figure import Figure
    true = [row["true"] for row in summary]
    figure = Figure(figsize=(6, 5), layout="constrained")
    ax = figure.subplots()
    ax.fill_between(true, [row["p25"] for row in summary], [row["p75"] for row in summary], alpha=0.3,
                    label="middle half of the predictions")
    ax.plot(true, [row["mean"] for row in summary], marker="o", label="mean prediction")
    low, high = min(true[0], *(row["p25"] for row in summary)), max(true[-1], *(row["p75"] for row in summary))
    ax.plot([low, high], [low, high], color="gray", linestyle="--", label="prediction = true value")
    ax.set_xlabel("true value")
    ax.set_ylabel("predicted value")
    ax.set_title("Predictions against true values (test set)")
    ax.legend(loc="upper left")
    return figure


def confusion_chart(counts: list[list[int]], label_names: list[str]):
    """The confusion matrix as scikit-learn draws it, each cell with its count and its share of the true class's
    texts (the row), sized to stay readable up to 20 classes."""
    import numpy as np
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay
    counts = np.array(counts)
    shares = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    k = len(label_names)
    side = max(4.5, 2.5 + 0.7 * k)
    figure = Figure(figsize=(side, side), layout="constrained")
    ax = figure.subplots()
    display = ConfusionMatrixDisplay(shares, display_labels=label_names)
    display.plot(ax=ax, cmap="Blues", colorbar=False, im_kw={"vmin": 0, "vmax": 1},
                 xticks_rotation=45 if k > 4 else "horizontal")
    for (i, j), text in np.ndenumerate(display.text_):
        text.set_text(f"{counts[i, j]}\n{shares[i, j]:.0%}")
        text.set_fontsize(10 if k <= 6 else max(7, 13 - k // 3))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (shares of its row)")
    ax.set_title("Where the trained model errs (test set)")
    return figure


# ----------------------------------------------------------------------------------------------
# Serving: predict(), the Classifier, whole files, the merged export


class Classifier:
    """A trained model that classifies texts (or pairs of texts, or scores them: its Task), loaded from the folder a
    training run saved:

        classifier = Classifier.load("outputs/imdb_qlora/model")
        classifier(["Loved it.", "Hated it."])   # [{'text': ..., 'neg_prob': ..., 'pos_prob': ..., 'label': ...}, ...]
    """

    def __init__(self, model, tokenizer, task: Task, max_length: int, truncation: str, runtime: Runtime,
                 batch_size: int, window_stride: int | None = None):
        self.model, self.tokenizer, self.task, self.runtime = model, tokenizer, task, runtime
        self.max_length, self.truncation, self.window_stride = max_length, truncation, window_stride
        self.batch_size = batch_size  # the evaluation batch the training run chose, unless a call gives another

    @property
    def label_names(self) -> list[str]:
        return self.task.label_names

    @classmethod
    def load(cls, model_dir: str) -> Classifier:
        """The saved model, reloaded as it was trained and made ready to serve (serving_model), quietly: a
        notebook's predict() prints nothing it did not ask for."""
        with quiet_transformers():
            model, tokenizer, settings, runtime = load_trained(model_dir)
            return cls(serving_model(model, runtime), tokenizer, Task.from_dict(settings), settings["max_length"],
                       settings["truncation"], runtime, settings["batch_size"], settings.get("window_stride"))

    def __call__(self, texts, batch_size: int | None = None):
        """One text or pair (returns a dict) or a list of them (returns a list of dicts), as predict()."""
        items, single = inputs_to_classify(texts, self.task.pairs)
        results = [{**({"text": item[0], "text_pair": item[1]} if self.task.pairs else {"text": item}), **result}
                   for item, result in zip(items, self.task.results(self.logits(items, batch_size)))]
        return results[0] if single else results

    def probabilities(self, texts: list, batch_size: int | None = None) -> list[list[float]]:
        """Each class's probability (softmax) for each text or pair; multi-label: each label's (sigmoid)."""
        return self.task.probabilities(self.logits(texts, batch_size))

    def logits(self, texts: list, batch_size: int | None = None):
        """The model's outputs for each text (or pair), in batches, truncated to the training length (or the mean of
        its windows' outputs), in order."""
        import torch
        batch_size = batch_size or self.batch_size
        device = self.runtime.device
        autocast = torch.autocast(device.type, dtype=self.runtime.dtype, enabled=self.runtime.precision != "fp32")
        # Texts of similar length batch together with little padding; sorting by characters rather than tokens
        # lets each batch be tokenised just before it runs
        length = (lambda i: len(texts[i][0]) + len(texts[i][1])) if self.task.pairs else (lambda i: len(texts[i]))
        order = sorted(range(len(texts)), key=length)
        batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]

        def prepare(batch: list[int]):  # (the batches of rows, the text each row is of): windows add rows
            chosen = [texts[i] for i in batch]
            encoded = encode(self.tokenizer, [t[0] for t in chosen] if self.task.pairs else chosen, self.max_length,
                             self.truncation, [t[1] for t in chosen] if self.task.pairs else None, self.window_stride)
            rows = encoded.pop("text_of_row", range(len(batch)))
            pieces = [pad_batch({name: ids[start:start + batch_size] for name, ids in encoded.items()},
                                self.tokenizer.pad_token_id, self.runtime) for start in range(0, len(rows), batch_size)]
            # pinned, the copies to the GPU wait for nothing
            pieces = [{k: t.pin_memory() for k, t in p.items()} if device.type == "cuda" else p for p in pieces]
            return pieces, [batch[row] for row in rows]

        logits, owners = [], []
        with torch.inference_mode(), autocast, attention_kernels(device):
            for pieces, owned in prepared_ahead(prepare, batches):
                owners += owned
                for tensors in pieces:
                    with explain_out_of_memory(f"predicting in batches of {batch_size}", "pass a smaller batch_size "
                                               "(--batch-size in the shell)"):
                        # The logits stay on the device: nothing here waits for the GPU to finish a batch
                        logits.append(self.model(**{k: t.to(device, non_blocking=True) for k, t in tensors.items()})
                                      .logits.float())
        outputs = torch.cat(logits)
        owners = torch.tensor(owners, device=outputs.device)
        summed = outputs.new_zeros(len(texts), outputs.shape[1]).index_add_(0, owners, outputs)
        return summed / torch.bincount(owners, minlength=len(texts))[:, None]  # each text's mean over its windows


def prepared_ahead(prepare, batches: list, ahead: int = 2):
    """prepare(batch) for each batch, in order, computed on a second thread `ahead` batches in advance: the
    tokenizer (Rust, which releases the GIL) works on the next batches while the model runs this one."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.submit(prepare, batch))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def load_trained(model_dir: str, dequantized: bool = False):
    """A saved model, reloaded as it was trained: the same 4-bit base, head size, label names and padding; with
    dequantized=True its base turned into plain nn.Linear layers holding the same weights before the adapter goes
    on (peft merges LoRA only into those). Returns (the peft model, its tokenizer, its serving settings, the
    runtime)."""
    import torch
    from peft import PeftConfig, PeftModel
    settings = read_serving_settings(model_dir)
    task = Task.from_dict(settings)
    runtime = replace(decide_runtime("auto"), fsdp=False)  # served whole, in one process
    base = load_base_model(PeftConfig.from_pretrained(model_dir).base_model_name_or_path, task, runtime)
    if dequantized:
        base.dequantize(dtype=torch.float32)  # exact: fp32 holds every NF4 value
    tokenizer = load_tokenizer(model_dir, task.pairs)  # as saved: with the padding token and pair template chosen
    base.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(base, model_dir)  # the adapter, and the trained head over the fp32 copy
    if not dequantized:
        prepare_4bit_layers(model)
    return model, tokenizer, settings, runtime


def read_serving_settings(model_dir: str) -> dict:
    """SERVING_FILE of a saved model, with the task's label names: what Task.from_dict reads."""
    path = os.path.join(model_dir, SERVING_FILE)
    if not os.path.isfile(path):
        raise UserError(f"no trained model in {model_dir}: train one with `python peft_qlora.py` "
                        "(or point model_dir / --model-dir at the folder a run saved)")
    with open(path) as f:
        settings = json.load(f)
    return {**settings, **settings["task"], "label_names": settings["label_names"]}


def serving_model(model, runtime: Runtime):
    """A trained model made ready to serve: in evaluation mode and, where it fits, dequantized once.

    bitsandbytes turns each 4-bit weight back into the compute dtype at every call, then multiplies in that
    dtype. Doing it once gives the same probabilities, bit for bit, faster (benchmarks/NOTES.md). It is done
    only while the 16-bit copy takes at most a quarter of the memory the process may still use: a model too
    large for that, which is what 4 bits are for, is served in 4 bits."""
    import bitsandbytes as bnb
    import psutil  # installed with accelerate
    import torch
    model.eval()
    device = runtime.device
    weights = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    free = (gpu_memory_limit(device) - torch.cuda.memory_allocated(device) if device.type == "cuda"
            else psutil.virtual_memory().available)
    if 0 < weights * runtime.dtype.itemsize <= free / 4:
        model.dequantize(dtype=runtime.dtype)  # transformers swaps each Linear4bit for an nn.Linear holding the copy
        log.info("Serving with the 4-bit weights dequantized once to %s (%.0f MB)", runtime.precision,
                 weights * runtime.dtype.itemsize / 1e6)
    padding_attention(model, runtime, graphs=False)
    return model


def inputs_to_classify(texts, pairs: bool | None = False) -> tuple[list, bool]:
    """(the items, whether one was given): one text or a list (any iterable) of texts; for a model of pairs, one
    pair (a tuple of two texts) or a list of pairs; with pairs=None either, as predict() checks before it reads
    which its model takes. A TypeError or ValueError that says what predict() takes otherwise."""
    def is_pair(item) -> bool:
        return isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, str) for t in item)

    single = isinstance(texts, str) or (pairs is not False and isinstance(texts, tuple) and is_pair(texts))
    try:
        items = [texts] if single else list(texts)
    except TypeError:
        takes = "a pair of texts or a list of pairs" if pairs else "a text or a list of texts"
        raise TypeError(f"predict() takes {takes}, not {type(texts).__name__} {texts!r}") from None
    if not items:
        raise UserError("predict() needs at least one text")
    for item in items:
        if (isinstance(item, str) and not pairs) or (is_pair(item) and pairs is not False):
            continue
        if pairs:
            raise TypeError("this model classifies pairs of texts: predict() takes a pair (text, text_pair) or a list "
                            f"of pairs; got {type(item).__name__} {item!r}")
        if is_pair(item):
            raise TypeError(f"predict() takes texts (str); got the pair {item!r}: this model classifies single texts")
        raise TypeError(f"predict() takes texts (str); got {type(item).__name__} {item!r} in the list")
    return [tuple(item) for item in items] if pairs else items, single


def predict(texts, model_dir: str = DEFAULT_MODEL_DIR, batch_size: int | None = None):
    """Classify one text (returns a dict) or a list of texts (returns a list of dicts).

    Each dict is {"text", "<name>_prob" for each class, "label"}; for IMDb {"text", "neg_prob", "pos_prob",
    "label"} with label "neg" or "pos". A model trained on pairs takes a pair ("premise", "hypothesis") or a list of
    pairs, and adds "text_pair"; a multi-label model gives "labels", the list of labels over its threshold, beside
    each label's probability; a regression model gives {"text", "score"}. Loads the model saved in model_dir (default
    outputs/imdb_qlora/model) once and keeps it until a new model is saved there (Classifier.load does the same
    without keeping it). Runs on a GPU if there is one, else on the CPU, in batches of batch_size texts (default:
    the evaluation batch the training run chose). Texts longer than the training --max-length are truncated; an
    empty text is classified like any other (the model sees only its special tokens) and gets the model's prior
    guess.
    """
    inputs_to_classify(texts, pairs=None)  # what no model takes, before the folder is read
    inputs_to_classify(texts, Task.from_dict(read_serving_settings(model_dir)).pairs)  # before the model loads
    return cached_classifier(model_dir)(texts, batch_size)


def cached_classifier(model_dir: str) -> Classifier:
    """Classifier.load(model_dir), kept for later calls while the folder holds the same saved model: a training
    run that saves a new one there replaces the whole folder, so the adapter file's identity tells them apart."""
    path = os.path.abspath(model_dir)
    weights = os.path.join(path, "adapter_model.safetensors")
    saved = os.stat(weights) if os.path.exists(weights) else None
    return _load_once(path, (saved.st_ino, saved.st_mtime_ns) if saved else None)


@functools.lru_cache(maxsize=2)
def _load_once(path: str, saved: tuple | None) -> Classifier:
    return Classifier.load(path)


PREDICT_CHUNK = 10_000  # rows read, classified and written at a time: the memory a file of any length takes


def predict_file(path: str, output: str, text_column: str | list[str] = "text", model_dir: str = DEFAULT_MODEL_DIR,
                 batch_size: int | None = None) -> int:
    """Classifies every row of a csv, json/jsonl or parquet file into `output` (csv, JSON lines or parquet), in
    order, each row with its columns and its prediction (the predicted label and each class's probability; the
    labels over the threshold, a list, and each label's; or the predicted score). A model of pairs reads two
    columns, named in text_column. Reads, classifies and writes PREDICT_CHUNK rows at a time; `output` appears
    whole or not at all. Returns the number of rows."""
    import pyarrow as pa
    from tqdm.auto import tqdm
    columns = [text_column] if isinstance(text_column, str) else list(text_column)
    task = Task.from_dict(read_serving_settings(model_dir))
    if len(columns) != (2 if task.pairs else 1):
        takes = "pairs of texts: name their two columns" if task.pairs else "single texts: name one column"
        raise UserError(f"the model in {model_dir} classifies {takes} with --text-column (given: {' '.join(columns)})")
    chunks = read_chunks(path, PREDICT_CHUNK)
    first = next(chunks, None)  # the file's columns are checked before the model loads
    missing = [c for c in columns if first is not None and c not in first]
    if missing:
        raise UserError(f"--file {path} has no column {missing[0]!r} (its columns: {', '.join(first)}); name the "
                        "right one with --text-column")
    classifier = cached_classifier(model_dir)
    added = task.result_columns
    done = 0
    with (replaced_whole(output) as staging, TableWriter(staging, file_builder(output)) as writer,
          tqdm(total=count_rows(path), unit=" rows", desc="Predicting") as bar):
        for chunk in itertools.chain([first] if first else [], chunks):
            taken = [c for c in added.values() if c in chunk]
            if taken:
                raise UserError(f"--file {path} already has a column {taken[0]!r}, which the predictions add")
            texts = [chunk[c] for c in columns]
            for column, values in zip(columns, texts):
                bad = next((i for i, t in enumerate(values) if not isinstance(t, str)), None)
                if bad is not None:
                    raise UserError(f"--file {path}: row {done + bad} holds no text in {column!r} ({values[bad]!r}); "
                                    "fill it in or drop the row")
            rows = classifier(list(zip(*texts)) if task.pairs else texts[0], batch_size)  # a dict per row
            table = pa.table(chunk)
            for key, column in added.items():
                values = [row[key] for row in rows]
                table = table.append_column(column, pa.array(values, pa.float64() if key.endswith("_prob")
                                                             or key == "score" else None))
            writer.write(table)
            done += len(rows)
            bar.update(len(rows))
    log.info("Wrote %d rows with their predictions to %s", done, output)
    return done


def read_chunks(path: str, size: int):
    """The rows of a data file, `size` at a time, each chunk a dict of columns; datasets streams the file."""
    try:
        yield from open_data_file(path, streaming=True).iter(size)
    except Exception as e:  # datasets, pandas and pyarrow each raise their own kind
        raise UserError(f"--file {path}: cannot read it as {file_builder(path)} ({type(e).__name__}: {e})") from e


def count_rows(path: str) -> int | None:
    """A parquet file's rows, from its footer (the progress bar's total); None for other kinds."""
    import pyarrow.parquet as pq
    try:
        return pq.ParquetFile(path).metadata.num_rows if file_builder(path) == "parquet" else None
    except Exception:  # unreadable: read_chunks says why
        return None


class TableWriter:
    """Writes pyarrow tables one after another into one file of this kind (a file_builder name): csv, JSON lines
    or parquet (pyarrow's own csv and parquet writers; pandas for JSON lines). Each table has the first's columns."""

    def __init__(self, path: str, kind: str):
        self.kind, self.file, self.writer, self.schema = kind, open(path, "wb"), None, None

    def write(self, table) -> None:
        import pyarrow as pa
        import pyarrow.csv
        import pyarrow.parquet as pq
        if self.kind == "json":
            self.file.write(table.to_pandas().to_json(orient="records", lines=True, force_ascii=False).encode())
            return
        if self.kind == "csv":  # a csv cell holds no list (a multi-label prediction): written as JSON text
            for i, column in enumerate(table.columns):
                if pa.types.is_list(column.type):
                    table = table.set_column(i, table.field(i).name,
                                             pa.array([json.dumps(v) for v in column.to_pylist()], pa.string()))
        if self.writer is None:
            make = pq.ParquetWriter if self.kind == "parquet" else pyarrow.csv.CSVWriter
            self.writer, self.schema = make(self.file, table.schema), table.schema
        self.writer.write_table(table.cast(self.schema))  # a later chunk may infer another type (nulls only)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()
        self.file.close()


def export_merged(model_dir: str, out: str) -> str:
    """The trained model as a plain transformers model in 16 bits: the 4-bit base dequantized (the weights the
    model was trained and evaluated with, not the original checkpoint's), the LoRA weights merged into it, the
    trained head, the label names and padding. transformers.pipeline("text-classification", model=out) loads
    it without peft or bitsandbytes; it truncates texts at their head, where predict() keeps head+tail."""
    import torch
    with quiet_transformers():
        model, tokenizer, settings, _ = load_trained(model_dir, dequantized=True)
        merged = model.merge_and_unload()  # LoRA into the fp32 weights, the trained head in place of the new one
        task = Task.from_dict(settings)
        task.merge_head(merged)
        dtype = torch.bfloat16 if settings["precision"] == "bf16" else torch.float16  # fp16 for a T4
        merged.to(dtype)
        tokenizer.model_max_length = settings["max_length"]  # where the pipeline truncates
        with open(os.path.join(model_dir, "metrics.json")) as f:
            metrics = json.load(f)
        with replaced_whole(out) as staging:
            merged.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            model_card(metrics, out, merged=True).save(os.path.join(staging, "README.md"))
    log.info("Wrote %s: %s in %s with LoRA merged, %s", out, type(merged).__name__, str(dtype)[6:], task.describe())
    if settings["truncation"] != "head":
        log.info("pipeline(..., truncation=True) keeps the first %d tokens of a longer text; this model was trained "
                 "on %s, as predict() reads them", settings["max_length"],
                 "windows of them" if settings["truncation"] == "windows" else f"their {settings['truncation']}")
    if task.temperature is not None:
        log.info("The calibration's temperature is folded into the head: the pipeline's probabilities are "
                 "calibrated, as predict()'s are")
    return out


# ----------------------------------------------------------------------------------------------
# The settings search (--search N): Optuna's trials, each the recipe's training scored on the validation texts


SEARCH_FILE = "search.journal"  # in --output-dir: Optuna's record of every trial, which --resume continues


def search_settings(cfg: Config, task: Task, texts: Tokenized, tokenizer, runtime: Runtime) -> tuple[Config, dict]:
    """The settings to train the saved model with: as given, or with --search N the best of N trials (their first
    the given settings, so the search ends at least as well as they do). Optuna's TPE sampler draws each trial's
    settings, a trial trains as the recipe does and is scored by its best epoch on the validation texts, the same
    score that picks the saved model's epoch; a trial whose first epoch is in the bottom tenth of the trials so
    far is stopped there. The best settings then train the saved model anew with the same seed and texts, through
    the same steps as any run (calibration, checkpoints, --resume), rather than keeping a trial's model. Returns
    (the settings, what metrics.json says of the search; None without one)."""
    if not cfg.search:
        return cfg, None
    if runtime.num_processes > 1:
        raise UserError("--search runs its trials one after another in one process: launch it without torchrun or "
                        "accelerate launch (on one GPU), then train on several with the settings it found")
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    journal = os.path.join(cfg.output_dir, SEARCH_FILE)
    if not cfg.resume:  # check_output_dir has made sure an earlier search may go (--overwrite)
        remove_path(journal)
    os.makedirs(cfg.output_dir, exist_ok=True)
    study = optuna.create_study(
        storage=JournalStorage(JournalFileBackend(journal)), study_name="search",
        load_if_exists=True, direction="maximize" if task.greater_is_better else "minimize",
        # Half the trials drawn at random, the rest by TPE: Optuna's default of 10 random ones would make a search
        # of 8 a random search.
        sampler=optuna.samplers.TPESampler(n_startup_trials=max(2, cfg.search // 2), seed=cfg.seed),
        # Only a first epoch far behind stops a trial: one of a longer schedule (more epochs, so its learning rate
        # decays later) trails at its first epoch and may still end ahead (benchmarks/NOTES.md)
        pruner=optuna.pruners.PercentilePruner(10.0, n_startup_trials=2, n_warmup_steps=0))
    states = optuna.trial.TrialState
    done = [t for t in study.trials if t.state in (states.COMPLETE, states.PRUNED)]
    if not study.trials:  # the given settings first
        study.enqueue_trial(trial_params(cfg))
    stopped = [t for t in study.trials if t.state in (states.FAIL, states.RUNNING)]  # by a signal, or killed
    if stopped and not any(t.state == states.WAITING for t in study.trials):
        study.enqueue_trial(stopped[-1].params)  # that trial again
    if done:
        log.info("Search: %d of %d trials done before, continuing", len(done), cfg.search)
    if len(done) < cfg.search:
        try:
            study.optimize(lambda trial: run_trial(cfg, trial, task, texts, tokenizer, runtime),
                           n_trials=cfg.search - len(done), gc_after_trial=True)  # one trial's model in memory
        except Interrupted as e:  # Optuna marked the trial failed; --resume runs it again
            import signal
            finished = sum(t.state in (states.COMPLETE, states.PRUNED) for t in study.trials)
            raise Interrupted(f"stopped by {signal.Signals(e.status - 128).name} during trial "
                              f"{study.trials[-1].number + 1} of the search: its {finished} finished trials are kept "
                              f"in {journal}; continue with the same command and --resume (that trial starts again)",
                              e.status - 128) from None
    trials = [{"trial": t.number + 1, "state": t.state.name.lower(), **t.params,
               "score": t.value if t.state == states.COMPLETE else t.intermediate_values[1],
               "epochs_trained": t.user_attrs.get("epochs_trained"), "seconds": t.user_attrs.get("seconds")}
              for t in study.trials if t.state in (states.COMPLETE, states.PRUNED)]
    best = study.best_trial
    seconds = time.perf_counter() - started + sum(t["seconds"] or 0 for t in trials[:len(done)])
    first = trials[0]["seconds"]
    log.info("Search: %d trials (%d stopped after their first epoch) in %.0f s, %.1fx one run with the given settings "
             "(trial 1, %.0f s); best %s %.4f on the validation texts (the given settings: %.4f): %s", len(trials),
             sum(t["state"] == "pruned" for t in trials), seconds, seconds / first, first,
             METRIC_NAMES[task.best_metric], best.value, trials[0]["score"],
             ", ".join(f"{k} {v:.2g}" if isinstance(v, float) else f"{k} {v}" for k, v in best.params.items()))
    remove_path(os.path.join(cfg.output_dir, "search"))  # the trials' folders
    resume = cfg.resume and latest_checkpoint(cfg.checkpoints_dir) is not None  # the saved model's own training
    return (replace(cfg, **trial_settings(best.params, cfg), resume=resume),
            {"trials": trials, "best": best.number + 1, "metric": task.best_metric, "seconds": seconds,
             "given_settings_seconds": first})


def trial_params(cfg: Config) -> dict:
    """A trial's settings as Optuna records them, from a Config (the given settings, the first trial). LoRA goes on
    the given targets (default: the attention query and value) or on every 4-bit layer (all-linear)."""
    return {"learning_rate": cfg.learning_rate, "lora_r": cfg.lora_r, "epochs": cfg.epochs,
            "lora_targets": "all-linear" if cfg.lora_targets == ["all-linear"] else "given"}


def trial_settings(params: dict, cfg: Config) -> dict:
    """The Config settings of a trial's parameters (LoRA alpha twice the rank, as the defaults have it)."""
    return {"learning_rate": params["learning_rate"], "lora_r": params["lora_r"], "lora_alpha": 2 * params["lora_r"],
            "epochs": params["epochs"],
            "lora_targets": ["all-linear"] if params["lora_targets"] == "all-linear" else cfg.lora_targets}


def run_trial(cfg: Config, trial, task: Task, texts: Tokenized, tokenizer, runtime: Runtime) -> float:
    """One trial: the model built and trained with the trial's settings, evaluated on the validation texts after
    each epoch, no checkpoint kept; its score is its best epoch's. Raises optuna.TrialPruned where the pruner
    stopped it after its first epoch."""
    import optuna
    from transformers import TrainerCallback
    started = time.perf_counter()
    settings = trial_settings({
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-3, log=True),
        "lora_r": trial.suggest_categorical("lora_r", [4, 8, 16, 32]),
        "epochs": trial.suggest_int("epochs", 1, 5),
        "lora_targets": trial.suggest_categorical("lora_targets", ["given", "all-linear"])}, cfg)
    folder = os.path.join(cfg.output_dir, "search", f"trial-{trial.number}")
    trial_cfg = replace(cfg, **settings, output_dir=folder, overwrite=True, resume=False, early_stopping=None)
    log.info("Search: trial %d of %d%s: %s", trial.number + 1, cfg.search,
             " (the given settings)" * (trial.number == 0),
             ", ".join(f"{k} {v:.2g}" if isinstance(v, float) else f"{k} {v}" for k, v in trial.params.items()))

    class FirstEpoch(TrainerCallback):  # the first epoch's score, for the pruner
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if round(state.epoch) == 1:
                trial.report(metrics[f"eval_{task.best_metric}"], 1)
                control.should_training_stop = trial.should_prune()

    try:
        model, _ = build_model(trial_cfg, tokenizer, task, runtime)
        trainer = make_trainer(trial_cfg, model, tokenizer, texts, task, runtime)
        trainer.args.save_strategy, trainer.args.load_best_model_at_end = "no", False  # scores only, no checkpoint
        trainer.add_callback(FirstEpoch)
        history, _ = train(trainer, task, len(texts.train))
    finally:
        remove_path(folder)
    scores = [h[task.best_metric] for h in history]
    trial.set_user_attr("epochs_trained", len(history))
    trial.set_user_attr("seconds", time.perf_counter() - started)
    if len(history) < trial_cfg.epochs:
        raise optuna.TrialPruned()
    return max(scores) if task.greater_is_better else min(scores)


# ----------------------------------------------------------------------------------------------
# How the steps run: where this process computes, in which precision, with how many others, and the Trainer that
# runs the recipe's steps so (eager, CUDA graphs, compiled layers, DDP, FSDP), decided once here


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class Runtime:
    device: Any  # torch.device: this process's GPU, or the CPU
    precision: str  # bf16, fp16 or fp32: mixed-precision training, and the dtype of every frozen weight
    process_index: int = 0  # this process's rank under torchrun or accelerate launch
    num_processes: int = 1
    # Lengths rounded up to a multiple of 64 on a GPU: few distinct shapes, so the work of each new shape (cuBLAS's
    # and the attention kernels' choices) is done for 8 shapes up to 512 tokens, not hundreds. None on the CPU.
    pad_multiple: int | None = None
    fsdp: bool = False  # the processes shard the model between them (accelerate launch with FSDP_CONFIG), not copy it

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    @property
    def dtype(self):
        import torch
        return getattr(torch, DTYPES[self.precision])

    def padded(self, length: int) -> int:
        """The length a batch whose longest text has `length` tokens is padded to."""
        return -(-length // self.pad_multiple) * self.pad_multiple if self.pad_multiple else length

    # FSDP flattens each wrapped layer into one tensor of one dtype, and shards only float tensors: the packed 4-bit
    # weights are stored in the compute dtype (the same bytes, read as floats), and what trains stays in it too,
    # accelerate keeping the fp32 copies the optimizer updates. Each process loads the model onto the CPU, where
    # bitsandbytes quantizes it, and shard() moves one wrapped layer at a time to its GPU, keeping its shard: no GPU
    # ever holds the whole model.
    @property
    def trained_dtype(self):
        import torch
        return self.dtype if self.fsdp else torch.float32

    @property
    def quant_storage(self):
        import torch
        return self.dtype if self.fsdp else torch.uint8

    @property
    def load_device(self):
        return "cpu" if self.fsdp else self.device


def decide_runtime(requested_precision: str) -> Runtime:
    """This process's device, rank and precision, and whether FSDP shards the model. Under torchrun or accelerate
    launch, accelerate's PartialState joins the process group (NCCL on GPUs, gloo on CPUs) and gives each process
    its own GPU."""
    import torch
    from accelerate import PartialState
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # set by accelerate launch's FSDP config
    if fsdp:
        check_fsdp(torch.cuda.is_available())
    state = PartialState(cpu=not torch.cuda.is_available())
    device = state.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return Runtime(device, choose_precision(requested_precision, device), state.process_index, state.num_processes,
                   pad_multiple=64 if device.type == "cuda" else None, fsdp=fsdp)


def choose_precision(requested: str, device) -> str:
    """bf16 where the GPU computes it natively (compute capability 8.0+), fp16 on older GPUs, fp32 on the CPU."""
    import torch
    if device.type != "cuda":
        if requested in ("bf16", "fp16"):
            raise UserError(f"--precision {requested} needs a CUDA GPU and none is visible; "
                            "on the CPU use --precision fp32 (what auto picks)")
        return "fp32"
    major, minor = torch.cuda.get_device_capability(device)
    if requested == "auto":
        return "bf16" if major >= 8 else "fp16"
    if requested == "bf16" and major < 8:
        raise UserError(f"--precision bf16 needs compute capability 8.0+, this GPU has {major}.{minor}: "
                        "use --precision fp16 (what auto picks)")
    return requested


def device_name(runtime: Runtime) -> str:
    import platform
    import torch
    if runtime.device.type == "cuda":
        name = torch.cuda.get_device_name(runtime.device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{runtime.num_processes} processes on {name}" if runtime.num_processes > 1 else name


def make_trainer(cfg: Config, model, tokenizer, texts: Tokenized, task: Task, runtime: Runtime):
    """The Trainer the recipe evaluates, trains and saves with, and how its steps run, decided once: under FSDP the
    model sharded first (shard), then the batches that fit (choose_batches, measured on the model as it will run),
    then the step path (step_path: CUDA graphs, eager or sharded, of compiled layers or not), the output folder
    and its checkpoints (long runs). Several processes without FSDP each train a copy, which DDP keeps equal."""
    from transformers import EarlyStoppingCallback
    from transformers.trainer_callback import ProgressCallback
    if cfg.liger == "auto" and runtime.device.type == "cuda":  # before the batches are measured: it saves memory
        liger_kernels(model)
    wrapped = shard(model, runtime) if runtime.fsdp else model
    plan = choose_batches(cfg, wrapped, runtime, task)
    path, compiled = step_path(cfg, runtime, plan)
    padding_attention(model, runtime, graphs=path == "graphs")
    if compiled:
        compile_layers(model)
    checkpoints, resume_from = prepare_output_dir(cfg, runtime)
    schedule = checkpoint_schedule(cfg.save_steps, cfg.save_minutes, runtime)
    callbacks = [EarlyStoppingCallback(cfg.early_stopping)] if cfg.early_stopping else []
    callbacks.append(schedule)
    if cfg.report_to == "tensorboard" and runtime.is_main:  # into OUTPUT_DIR/logs, which outlives the checkpoints
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback
        callbacks.append(TensorBoardCallback(SummaryWriter(os.path.join(cfg.output_dir, "logs"))))
    trainer_class = {"graphs": graphed_trainer, "sharded": sharded_trainer, "eager": recipe_trainer}[path]()
    evaluated = texts.validation or texts.test  # what each epoch is evaluated on
    trainer = trainer_class(
        plan=plan, resume_from=resume_from, schedule=schedule,
        model=model, args=training_arguments(cfg, task, plan, runtime, checkpoints, bool(texts.validation)),
        # --batching tokens: each row a micro-batch filled to what choose_batches measured
        train_dataset=(batch_by_tokens(texts.train, plan.micro_batch * runtime.padded(cfg.max_length), runtime,
                                       cfg.seed) if cfg.batching == "tokens" else texts.train),
        eval_dataset=evaluated,
        data_collator=functools.partial(collate, pad_id=tokenizer.pad_token_id, runtime=runtime),
        processing_class=tokenizer, callbacks=callbacks, compute_loss_func=task.loss_function(model),
        compute_metrics=lambda output: task.metrics(*by_text(output.predictions, output.label_ids, evaluated)))
    trainer.compiled = compiled  # read by the graphed Trainer: a capture that fails retries uncompiled
    trainer.remove_callback(ProgressCallback)  # for one that prints less
    trainer.add_callback(epoch_progress(task))
    if runtime.fsdp:  # the Trainer was made with the unwrapped model, which it inspects, and trains the sharded one
        trainer.model = trainer.model_wrapped = wrapped
    elif runtime.num_processes > 1:
        # A copy in each process, whose gradients DDP averages. Wrapped before the first evaluation: that evaluation
        # marks the model as prepared by accelerate (in evaluation mode, unwrapped), and the Trainer's own
        # preparation for training then leaves it unwrapped, each process training its own copy on its share of
        # the texts (benchmarks/NOTES.md)
        trainer.model_wrapped = trainer.accelerator.prepare_model(model)
    return trainer


def training_arguments(cfg: Config, task: Task, plan: BatchPlan, runtime: Runtime, checkpoints: str,
                       validation: bool):
    """The recipe's training settings (learning rate, warm-up, weight decay, epochs, an evaluation and a checkpoint
    per epoch, the best epoch kept when there are validation texts), with the batches planned and the precision."""
    from transformers import TrainingArguments
    keep_best = validation
    by_tokens = cfg.batching == "tokens"
    return TrainingArguments(
        output_dir=checkpoints,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=1 if by_tokens else plan.micro_batch,  # tokens: a row is a micro-batch
        gradient_accumulation_steps=plan.accumulation,
        per_device_eval_batch_size=plan.eval_batch,
        **checkpointing_arguments(plan.gradient_checkpointing),
        learning_rate=cfg.learning_rate,
        warmup_steps=0.1,  # a fraction of all steps: the new head starts random
        weight_decay=0.01,
        **sharded_optimizer(runtime),
        bf16=runtime.precision == "bf16",
        fp16=runtime.precision == "fp16",
        use_cpu=runtime.device.type == "cpu",
        ddp_find_unused_parameters=False,  # every trainable weight takes part in every step: skip the search
        eval_strategy="epoch",
        # texts: batches of similar lengths (shuffled in groups), little padding; tokens: micro-batches shuffled
        train_sampling_strategy="random" if by_tokens else "group_by_length",
        save_strategy="epoch",  # a checkpoint per epoch for --resume; checkpoint_schedule adds those inside epochs
        # --resume needs only the latest; with the best kept too, 2, as at 1 the Trainer deletes the latest when
        # training ends, which for a run stopped by a signal is the checkpoint to resume from
        save_total_limit=2 if keep_best else 1,
        load_best_model_at_end=keep_best,
        metric_for_best_model=task.best_metric if keep_best else None,
        greater_is_better=task.greater_is_better,
        logging_strategy="epoch",  # one mean training loss per epoch, beside that epoch's evaluation
        # The filter replaces a NaN loss in the log by the mean so far (the gradients are the same either way): shown
        # as it is instead, and without the GPU sync per micro-batch that the check costs
        logging_nan_inf_filter=False,
        disable_tqdm=False,  # the default follows transformers' verbosity, which quiet_transformers lowers
        label_names=["labels"],  # a peft model hides its forward signature, so say where the labels are
        # The tokenised datasets hold only the model's inputs; the Trainer would read which those are from the model's
        # forward signature, which a sharded model's wrapper hides (forward(*args, **kwargs)): it would drop them all
        remove_unused_columns=False,
        dataloader_num_workers=2 if runtime.device.type == "cuda" else 0,  # pad the next batches while the GPU works
        seed=cfg.seed,
        report_to=cfg.report_to if cfg.report_to in ("wandb", "mlflow") else "none",  # tensorboard: make_trainer's
    )


def collate(rows: list[dict], pad_id: int, runtime: Runtime) -> dict:
    """The data loader's collate function: the texts padded into one batch (pad_batch), with their labels, and
    without an attention mask where no text is padded (padding_attention). A row of batch_by_tokens (training
    with --batching tokens) holds a whole micro-batch of texts, a row of tokenize one."""
    import torch
    texts = []
    for row in rows:
        if row["input_ids"] and isinstance(row["input_ids"][0], list):  # a micro-batch: a list per text
            texts += [dict(zip(row, values)) for values in zip(*row.values())]
        else:
            texts.append(row)
    inputs = [name for name in texts[0] if name not in ("labels", "text_index")]
    batch = pad_batch({name: [text[name] for text in texts] for name in inputs}, pad_id, runtime)
    if batch["attention_mask"].all():  # no padding: said here, on the CPU, rather than read from the GPU in the step
        del batch["attention_mask"]  # (transformers' models read None as every token attended to)
    batch["labels"] = torch.tensor([text["labels"] for text in texts])
    return batch


@functools.cache
def recipe_trainer():
    """The Trainer, with what this script's runs add to it: the batch plan, the checkpoint to resume from, the
    checkpoint schedule and its clean stop on a signal (stopped_cleanly), PyTorch's attention kernels for padded
    batches (attention_kernels), the figures metrics.json records, and the weights save() writes."""
    import torch
    from transformers import Trainer

    class RecipeTrainer(Trainer):
        def __init__(self, *args, plan: BatchPlan, resume_from: str | None, schedule, **kwargs):
            super().__init__(*args, **kwargs)
            self.plan, self.resume_from, self.schedule = plan, resume_from, schedule

        def train(self, *args, **kwargs):
            from transformers import set_seed
            # From --seed whatever ran before (each evaluation draws from the random state): a search's trial and the
            # run with its settings train alike
            set_seed(self.args.seed)
            if self.args.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.args.device)
            with attention_kernels(self.args.device), stopped_cleanly(self, self.schedule):
                return super().train(*args, **kwargs)

        def predict(self, *args, **kwargs):
            """The outputs and the loss; the recipe's evaluate computes the metrics, of each text (by_text)."""
            compute_metrics, self.compute_metrics = self.compute_metrics, None
            try:
                with attention_kernels(self.args.device):
                    return super().predict(*args, **kwargs)
            finally:
                self.compute_metrics = compute_metrics

        def _get_eval_sampler(self, eval_dataset):
            """The evaluated texts in their order (sorted by length already), which by_text reads each row's text
            from: transformers would group them by length at random as it groups the training texts."""
            return torch.utils.data.SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

        def record(self) -> dict:
            """What metrics.json says of how training ran: the peak memory, the checkpoints written."""
            return {"peak_memory_bytes": peak_memory(self.args.device), "checkpoints": self.schedule.record()}

        def trained_adapter(self):
            """(the model whose adapter save() writes, its trained weights or None for peft's own choice), in the
            process that writes; None in the others."""
            return (self.model, None) if self.args.should_save else None

    return RecipeTrainer


def peak_memory(device) -> int:
    """Peak GPU memory allocated by tensors, or on the CPU the process's peak resident memory."""
    import resource
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def epoch_progress(task: Task):
    """The Trainer's progress bar for training, with one line per epoch's evaluation instead of its raw metric
    dictionaries, and an evaluation bar only outside training (inside, the training bar shows the progress)."""
    from transformers.trainer_callback import ProgressCallback

    class EpochProgress(ProgressCallback):
        def on_prediction_step(self, args, state, control, **kwargs):
            if self.training_bar is None:
                super().on_prediction_step(args, state, control, **kwargs)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and f"eval_{task.best_metric}" in logs:
                self.training_bar.write(f"Epoch {round(logs['epoch'])}: {task.headline(logs, 'eval_')}, "
                                        f"loss {logs['eval_loss']:.4f}",
                                        file=self.training_bar.fp)  # with the bar and the log, not on stdout

    return EpochProgress()


@contextlib.contextmanager
def attention_kernels(device):
    """PyTorch's attention (SDPA) on a GPU without its cuDNN kernel, which it picks for padded batches on recent
    GPUs and which builds a plan for every new shape: the flash and memory-efficient kernels compute the same
    attention, and steps on real, padded batches were faster with them (benchmarks/NOTES.md). Nothing changes on
    the CPU."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


# ----------------------------------------------------------------------------------------------
# The fast path: training steps replayed as CUDA graphs, layers compiled


def step_path(cfg: Config, runtime: Runtime, plan: BatchPlan) -> tuple[str, bool]:
    """How the training steps run, said in one line: ("graphs" (StepGraphs), "sharded" (FSDP, eager) or "eager",
    whether the layers are compiled). An eager QLoRA step at bert-base's shape kept the GPU busy a third to a half of
    its wall time: the rest was the CPU running bitsandbytes' and peft's Python for every layer while the GPU
    waited; a graph launches a whole step's kernels at once, and compiled layers fuse the small ones
    (benchmarks/NOTES.md)."""
    compiled = cfg.fast_path == "compiled"
    reason = ("--fast-path off" if cfg.fast_path == "off" else
              "no CUDA GPU" if runtime.device.type != "cuda" else
              "FSDP" if runtime.fsdp else
              "several processes, whose gradients are averaged during the backward pass" if runtime.num_processes > 1
              else "gradient checkpointing" if plan.gradient_checkpointing else None)
    layers = ", of compiled layers" if compiled else ""
    if reason:
        log.info("Training steps: eager (%s)%s", reason, layers)
    else:
        log.info("Training steps: CUDA graphs, one captured per batch shape%s (--fast-path off for eager steps)",
                 layers)
    return ("graphs" if reason is None else "sharded" if runtime.fsdp else "eager"), compiled


class StepGraphs:
    """Training steps (forward and backward: step(tensors) -> loss) replayed as CUDA graphs, one per shape of the
    input tensors. A shape's first step runs eagerly, so that all a step prepares for a new shape as it first runs
    (compiled code, kernels' choices) is in place: none of it can be captured. Its second step is captured, then
    replayed, and every later batch of that shape replays the capture with its tensors copied in. The graphs share
    one memory pool, and write the gradients into tensors bound to the trainable parameters once; the optimizer,
    gradient clipping and the loss scaler stay outside them. Dropout, compiled or not, draws new random numbers at
    every replay (PyTorch advances the generator's offset). A capture that fails is warned of once: with compiled
    layers, the layers run uncompiled from then on and the graphs go on (summary() says why); without, the steps run
    eagerly."""

    def __init__(self, parameters, compiled: bool = False):
        import torch
        self.params = [p for p in parameters if p.requires_grad]
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.compiled = compiled
        self.uncompiled: str | None = None  # why compiled layers stopped being compiled, if they did
        self.graphs: dict = {}  # shape key -> (graph, its input tensors, its loss tensor)
        self.seen: set = set()  # the shape keys that ran once eagerly
        self.pool = self.stream = None  # made at the first capture
        self.counts = {"captured": 0, "replayed": 0, "eager": 0}
        self.failure: str | None = None

    def __call__(self, step, tensors: dict, key: tuple = ()):
        """The loss of step(tensors), computed by this shape's graph (captured if need be), or eagerly."""
        import torch
        self.bind_gradients()
        key = (*key, *((name, tuple(t.shape), t.dtype) for name, t in sorted(tensors.items())))
        if key in self.graphs:
            graph, static, loss = self.graphs[key]
            for name, tensor in tensors.items():
                static[name].copy_(tensor, non_blocking=True)
            graph.replay()
            self.counts["replayed"] += 1
            return loss.clone()  # the graphs share a pool: another graph's replay may write where this loss is
        if self.failure or key not in self.seen:
            self.seen.add(key)
            self.counts["eager"] += 1
            return step(tensors)
        static = {name: tensor.clone() for name, tensor in tensors.items()}  # outside the graphs' pool
        try:
            if self.pool is None:
                self.pool, self.stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
            graph = torch.cuda.CUDAGraph()
            # thread_local: the data loader's threads may use CUDA (pinned memory) while this thread captures.
            # Compiling cannot be captured: code this shape's eager step did not compile refuses the capture (and
            # says which guards failed) rather than run uncompiled inside a graph said to be of compiled layers; once
            # the layers run uncompiled, they stay so inside the capture too
            stance = "fail_on_recompile" if self.compiled else "force_eager"
            with (torch.compiler.set_stance(stance),
                  torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local")):
                loss = step(static)
        except RuntimeError as e:  # what CUDA refused to capture; a mistake in the step itself recurs eagerly below
            lines = str(e).splitlines() or [""]
            guards = [line.strip() for line in lines if line.strip().startswith("- ")]  # each compiled version's
            return self.refused(step, tensors, " ".join([f"{type(e).__name__}: {lines[0]}", *guards]))
        self.graphs[key] = (graph, static, loss)
        self.counts["captured"] += 1
        graph.replay()  # the capture recorded the step without computing it
        return loss.clone()

    def refused(self, step, tensors: dict, failure: str):
        """After a capture that failed: the step run eagerly, and the runs after it without compiled layers (then
        captured again) or eagerly."""
        import torch
        if torch.cuda.is_available():  # a capture left unfinished leaves the generator expecting to be captured
            generator = torch.cuda.default_generators[torch.cuda.current_device()]
            generator.graphsafe_set_state(generator.clone_state())
        if self.compiled:
            log.warning("A training step of compiled layers could not be captured as a CUDA graph (%s): CUDA graphs "
                        "of the uncompiled layers from here on", failure)
            torch.compiler.set_stance("force_eager")
            self.compiled, self.uncompiled = False, failure
        else:
            self.failure = failure
            log.warning("A training step could not be captured as a CUDA graph (%s): eager steps from here on",
                        failure)
        self.counts["eager"] += 1
        return step(tensors)

    def summary(self) -> dict:
        """What metrics.json records of the graphs: the steps captured, replayed and eager, why captures stopped
        (failure) and why compiled layers stopped being compiled (uncompiled), each None where they did not."""
        return {**self.counts, "failure": self.failure, "uncompiled": self.uncompiled}

    def bind_gradients(self) -> None:
        """Each trainable parameter's .grad is its own tensor, which the graphs accumulate into: zeroed in place
        where the Trainer dropped the gradients after an optimizer step, taking over any gradient another step
        made."""
        import torch
        dropped = [g for p, g in zip(self.params, self.grads) if p.grad is None]
        if dropped:
            torch._foreach_zero_(dropped)
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:
                if p.grad is not None:
                    g.copy_(p.grad)
                p.grad = g


NUM_ITEMS = "num_items_in_batch"  # the Trainer's count of the optimizer step's labels, a graph input like the batch


@functools.cache
def graphed_trainer():
    """The Trainer with its training_step run through StepGraphs: the Trainer's own step (its loss, the scaling for
    gradient accumulation and the loss scaler, the backward pass) is what each graph records."""
    import torch

    class GraphedTrainer(recipe_trainer()):
        step_graphs: StepGraphs | None = None
        compiled = False  # whether the model's layers are compiled (make_trainer sets it)

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.step_graphs is None:
                self.step_graphs = StepGraphs(model.parameters(), compiled=self.compiled)
            tensors = dict(self._prepare_inputs(inputs))
            counted = torch.is_tensor(num_items_in_batch)
            if counted:
                tensors[NUM_ITEMS] = num_items_in_batch.to(self.args.device)

            def step(given: dict):
                given = dict(given)
                items = given.pop(NUM_ITEMS, num_items_in_batch)
                return super(GraphedTrainer, self).training_step(model, given, items)

            # What the Trainer's step reads besides the tensors, fixed in a capture: the micro-batches the loss is
            # divided among (fewer in an epoch's last step), and an item count given as a number
            key = (self.current_gradient_accumulation_steps, None if counted else num_items_in_batch)
            return self.step_graphs(step, tensors, key)

        def train(self, *args, **kwargs):
            result = super().train(*args, **kwargs)
            if self.step_graphs is not None:  # None where no step was left to train (a run resumed at its end)
                counts = self.step_graphs.counts
                log.info("Micro-batches: %d replayed from %d CUDA graphs (their captures included), %d eager",
                         counts["replayed"] + counts["captured"], counts["captured"], counts["eager"])
            return result

        def record(self) -> dict:
            if self.step_graphs is None:
                return super().record()
            return {**super().record(), "cuda_graphs": self.step_graphs.summary()}

    return GraphedTrainer


def liger_kernels(model) -> list[str]:
    """Liger-Kernel's Triton kernels in place of the decoder's RMSNorm, rotary embeddings and SwiGLU MLP, through
    its own per-architecture API, where it covers the architecture: fused kernels, fewer activations kept (the
    evidence in benchmarks/NOTES.md). Its fused cross-entropy stays off: it would replace the classifier's forward
    with a language model's. Returns the kernels applied (none for an encoder such as BERT)."""
    import inspect
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        log.info("Liger-Kernel: not used (%s; pip install liger-kernel, or --liger off)", e)
        return []
    # Its first use of each kernel looks for optional backends (CuTe DSL, cuTile) and warns of each it cannot
    # import; the Triton kernels run without them
    logging.getLogger("liger_kernel.backends.registry").setLevel(logging.ERROR)
    base = model.get_base_model()
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(base.config.model_type)
    if apply is None:
        return []
    switches = inspect.signature(apply).parameters  # each kernel a flag, on by default: rms_norm, rope, swiglu, ...
    losses = [name for name in switches if "cross_entropy" in name]
    kernels = [name for name, p in switches.items() if p.default is True and name not in losses]
    apply(model=base, **dict.fromkeys(losses, False))
    log.info("Liger-Kernel: %s as Triton kernels (--liger off for the model's own)", ", ".join(kernels))
    return kernels


def compile_layers(model) -> int:
    """torch.compile each of the model's repeated layers in place (regional compilation, as accelerate's
    compile_regions does; in place, so the saved weights keep their names): one compilation serves every layer,
    and with dynamic shapes a new batch shape needs no new one. Returns how many layers were compiled."""
    import torch
    stacks = [m for m in model.modules()
              if isinstance(m, torch.nn.ModuleList) and len(m) > 1 and len({type(layer) for layer in m}) == 1]
    for stack in stacks:
        for layer in stack:
            layer.compile(dynamic=True)
    log.info("Compiling %d layers with torch.compile as they first run", sum(map(len, stacks)))
    return sum(map(len, stacks))


PADDING_ATTENTION = "sdpa_by_padding"  # transformers' name for the attention padding_attention registers


def padding_attention(model, runtime: Runtime, graphs: bool) -> bool:
    """Attention that follows each batch's padding, read from the batch's tensors, never from their values. An
    unpadded batch (collate leaves its mask out) runs PyTorch's attention unmasked, the same in a CUDA graph's
    capture as eagerly: transformers decides from the mask's values, and while a stream is captured it cannot read
    them, so it would mask every batch in the graph (the slower memory-efficient kernel instead of flash attention;
    compiled layers meet a mask their warm-up step did not compile for, which the capture refuses). On a GPU with
    flash attention (compute capability 8.0+, 16-bit precision) a padded batch runs flash attention too, each row cut
    into two segments, its tokens and its padding (segment_bounds, segment_attention): tokens attend to tokens as the
    mask has them, padding to padding, which nothing reads; no mask and no shape that depends on the data, so a graph
    captures it (benchmarks/NOTES.md). Done through transformers' own registries of attention functions and mask
    builders, for models on PyTorch's attention ("sdpa"); others keep theirs. Returns whether padded batches run as
    segments."""
    import inspect
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import (AttentionMaskInterface, bidirectional_mask_function,
                                            causal_mask_function, sdpa_mask)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    segments = (runtime.device.type == "cuda" and runtime.precision != "fp32"
                and torch.cuda.get_device_capability(runtime.device) >= (8, 0))
    if model.config._attn_implementation not in ("sdpa", PADDING_ATTENTION) or not (graphs or segments):
        return False
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    # The flags by which transformers' mask builders may drop a mask (causal, bidirectional), all off
    never_drop = {name: False for name in inspect.signature(sdpa_mask).parameters if name.startswith("allow_is_")}

    def mask(attention_mask=None, **kwargs):
        plain = (kwargs.get("mask_function") in (causal_mask_function, bidirectional_mask_function)
                 and kwargs.get("local_size") is None)  # no window, nothing added to the mask
        if attention_mask is None and plain:
            return None  # no padding: PyTorch's attention unmasked (is_causal for a decoder)
        whole = (plain and kwargs.get("q_length") == kwargs.get("kv_length") == attention_mask.shape[-1]
                 and not kwargs.get("q_offset") and not kwargs.get("kv_offset"))  # no cache
        if segments and whole:
            return segment_bounds(attention_mask)
        return sdpa_mask(attention_mask=attention_mask, **{**kwargs, **never_drop})

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        if attention_mask is None or attention_mask.ndim != 1:  # a mask (or none): PyTorch's attention
            return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        is_causal=is_causal, **kwargs)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        return segment_attention(query, key, value, attention_mask, dropout, scaling, causal, runtime.dtype), None

    AttentionInterface.register(PADDING_ATTENTION, attention)
    AttentionMaskInterface.register(PADDING_ATTENTION, mask)
    model.set_attn_implementation(PADDING_ATTENTION)
    if segments:
        log.info("Attention: flash attention for padded batches too, each text's tokens apart from its padding")
    return segments


def segment_bounds(mask):
    """Cumulative offsets (int32, 2B + 1) cutting each row of a B x S padding mask (pad_batch's: each row's tokens
    in one run at one end) in two: its tokens and its padding, in the order they stand (a row whose first position
    is a token is padded on the right). Computed on the mask's device: nothing waits for its values."""
    import torch
    rows, length = mask.shape
    real = mask.sum(1)
    first = torch.where(mask[:, 0].bool(), real, length - real)
    starts = torch.arange(rows, device=mask.device) * length
    bounds = torch.stack([starts, starts + first], 1).flatten()
    return torch.cat([bounds, bounds.new_full((1,), rows * length)]).to(torch.int32)


def segment_attention(query, key, value, bounds, dropout: float, scaling: float | None, causal: bool, dtype):
    """Flash attention within the segments bounds cut the rows into (flash attention's variable-length form, the
    operator under PyTorch's own flash path: its public form has no dropout), in `dtype`, as autocast runs PyTorch's
    attention. B x H x S x D in (key and value may have fewer heads), B x S x H x D out: transformers' layout."""
    import torch
    rows, heads, length, dim = query.shape

    def packed(t):
        return t.transpose(1, 2).reshape(rows * length, t.shape[1], dim).to(dtype)

    out = torch.ops.aten._flash_attention_forward(packed(query), packed(key), packed(value), bounds, bounds, length,
                                                  length, dropout, causal, False, scale=scaling)[0]
    out = out.view(rows, length, heads, dim)
    return out if torch.is_autocast_enabled(query.device.type) else out.to(query.dtype)


# ----------------------------------------------------------------------------------------------
# Sharding: the model split across processes by FSDP (accelerate launch --config_file fsdp.yaml)


FSDP_CONFIG = "fsdp.yaml"  # beside this script: accelerate launch --config_file fsdp.yaml peft_qlora.py ...
TRAINED_WEIGHTS = "trained_weights.safetensors"  # in each checkpoint under FSDP: what trains, gathered


def check_fsdp(cuda: bool) -> None:
    """What FSDP needs here, as accelerate launch's environment says, each refusal in one line."""
    if os.environ.get("FSDP_VERSION", "1") != "1":
        raise UserError(f"fsdp_version {os.environ['FSDP_VERSION']} is not supported here: use fsdp_version 1, as "
                        f"{FSDP_CONFIG} does")
    if os.environ.get("FSDP_USE_ORIG_PARAMS", "false").lower() == "true":
        raise UserError(f"fsdp_use_orig_params true is not supported here: set it to false, as {FSDP_CONFIG} does "
                        "(each wrapped layer then holds one flat tensor of one dtype)")
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise UserError(f"fsdp_offload_params true is not supported here: set it to false, as {FSDP_CONFIG} does, and "
                        "shard the model across more GPUs (with it, sharding a model larger than the GPU ran out of "
                        "GPU memory: benchmarks/NOTES.md)")
    if not cuda:
        raise UserError("FSDP shards the model across CUDA GPUs and none is visible: on the CPU, launch without "
                        f"--config_file {FSDP_CONFIG} (torchrun or accelerate launch --multi_gpu copy the model "
                        "instead)")


@contextlib.contextmanager
def loading_threads(runtime: Runtime):
    """Under FSDP the model loads onto the CPU, where bitsandbytes quantizes it with torch's CPU threads, of which
    accelerate launch and torchrun give each process one (OMP_NUM_THREADS=1): while it loads, each process on this
    machine takes its share of the cores (benchmarks/NOTES.md)."""
    import torch
    threads = torch.get_num_threads()
    if runtime.fsdp:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", runtime.num_processes))
        torch.set_num_threads(max(threads, len(os.sched_getaffinity(0)) // local_processes))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def shard(model, runtime: Runtime):
    """The model wrapped in units, as the Trainer would wrap it when it first trains (peft's policy: a unit per
    transformer layer and one per trainable leaf, as a unit mixing trained and frozen weights cannot be flattened;
    computing in the dtype the 4-bit weights are stored in). Each unit moves from the CPU to this process's GPU as it
    is wrapped, and only this process's shard of it stays there. Done before the batches are measured (on the wrapped
    model) and before the first evaluation: left to that evaluation, the wrapping used the plain policy, and
    transformers then trained the unwrapped model (benchmarks/NOTES.md). Returns the wrapped model."""
    import torch
    from accelerate import Accelerator
    from transformers.distributed.fsdp import update_fsdp_plugin_peft
    check_one_dtype(model, runtime)
    model.hf_device_map = {"": runtime.device}  # accelerate refuses to train a 4-bit model mapped elsewhere
    # The FSDP settings accelerate launch passed; the Trainer makes its own Accelerator later with the same ones
    accelerator = Accelerator(mixed_precision="no" if runtime.precision == "fp32" else runtime.precision)
    update_fsdp_plugin_peft(model, accelerator)
    torch.cuda.reset_peak_memory_stats(runtime.device)
    # accelerate keeps what trains as fp32 copies, which the optimizer updates (warnings quieted by quiet_transformers)
    wrapped = accelerator.prepare_model(model)
    log.info("FSDP: the model in %d shard%s; this process holds %.1f MB of it on its GPU (%.1f MB at most while "
             "sharding it)", runtime.num_processes, "s" if runtime.num_processes > 1 else "",
             torch.cuda.memory_allocated(runtime.device) / 1e6, torch.cuda.max_memory_allocated(runtime.device) / 1e6)
    return wrapped


def check_one_dtype(model, runtime: Runtime) -> None:
    """Under FSDP every weight is in the compute dtype, the packed 4-bit ones included, so each wrapped layer
    flattens into one tensor; says so in one line, or raises if a weight is not."""
    other = sorted({f"{name} ({p.dtype})" for name, p in model.named_parameters() if p.dtype != runtime.dtype})
    if other:
        raise RuntimeError(f"FSDP needs every weight in {runtime.dtype}; these are not: {', '.join(other[:5])}")
    heads = ", ".join(trainable_heads(model.get_base_model()))
    log.info("FSDP: every weight in %s (the 4-bit ones stored as %s), one dtype per wrapped layer; what trains "
             "(LoRA, %s) is updated in fp32 copies that accelerate keeps, and computes in %s",
             runtime.precision, runtime.precision, heads, runtime.precision)


def sharded_optimizer(runtime: Runtime) -> dict:
    """TrainingArguments for the optimizer under FSDP with fp16: torch's fused AdamW (transformers' default) fails on
    the inf flag that FSDP's gradient scaler hands it ("output with shape [] doesn't match the broadcast shape [1]");
    the unfused one takes it, at no cost worth a note for the few weights LoRA trains."""
    return {"optim": "adamw_torch"} if runtime.fsdp and runtime.precision == "fp16" else {}


@functools.cache
def sharded_trainer():
    """The Trainer under FSDP, which writes into each checkpoint the trained weights (LoRA and the head, gathered)
    and each process's part of the optimizer's state, and reads them back where it resumes from one (the weights
    also where it loads the best epoch's). Its own FSDP checkpoints hold the head but no LoRA weight (peft names the
    weights by paths that FSDP's wrappers lengthen), and it resumed with no optimizer state at all
    (benchmarks/NOTES.md)."""
    import torch
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    class ReadBack(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step:  # resumed from that step's checkpoint, which the Trainer has read
                checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                load_trained_weights(model, checkpoint)
                optimizer = kwargs["optimizer"]
                optimizer.load_state_dict(torch.load(optimizer_part(checkpoint, args.process_index),
                                                     weights_only=True))

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if args.load_best_model_at_end and state.best_model_checkpoint:  # after the Trainer loaded its part
                load_trained_weights(model, state.best_model_checkpoint)

    class ShardedTrainer(recipe_trainer()):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(ReadBack)

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
            super().save_model(output_dir, _internal_call)
            weights = trained_weights(self.model_wrapped)  # every process takes part
            # Before the checkpoint's trainer_state.json, which marks it whole; FSDP's own parts come after
            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            if self.args.should_save:
                save_file(weights, os.path.join(output_dir, TRAINED_WEIGHTS))
            torch.save(self.optimizer.state_dict(), optimizer_part(output_dir, self.args.process_index))

        def trained_adapter(self):
            """Every process holds a shard of each weight: all take part in gathering the trained ones."""
            weights = trained_weights(self.model_wrapped)
            if not self.args.should_save:
                return None
            return weightless_copy(self.accelerator.unwrap_model(self.model_wrapped)), weights

    return ShardedTrainer


def optimizer_part(checkpoint: str, rank: int) -> str:
    """Where a process keeps its part of the optimizer's state (that of its shards) in a checkpoint under FSDP."""
    return os.path.join(checkpoint, f"optimizer_shard_{rank}.pt")


def trained_units(wrapped):
    """The wrapped units holding trained weights, each with the name its module has in the unwrapped model. A
    unit's own weights are one flat tensor on the module it wraps, trained or frozen as a whole."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    for path, unit in wrapped.named_modules():
        if isinstance(unit, FSDP) and any(p.requires_grad for p in unit.module.parameters(recurse=False)):
            yield path.replace("_fsdp_wrapped_module.", ""), unit


def trained_weights(wrapped) -> dict:
    """The trained weights (LoRA, the head) gathered whole from the processes' shards, one unit at a time, named
    as in the unwrapped model. The frozen 4-bit base, which is not saved, is not gathered: for a model larger than
    one GPU it would not fit there, nor in one process's memory."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    weights = {}
    for prefix, unit in trained_units(wrapped):
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            weights.update({f"{prefix}.{name}": weight.detach().cpu().clone()
                            for name, weight in unit.named_parameters()})
    return weights


def load_trained_weights(wrapped, checkpoint: str) -> None:
    """The trained weights a checkpoint holds (TRAINED_WEIGHTS), each copied whole into its unit, which keeps this
    process's shard of it."""
    from safetensors.torch import load_file
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    saved = load_file(os.path.join(checkpoint, TRAINED_WEIGHTS))
    for prefix, unit in trained_units(wrapped):
        with FSDP.summon_full_params(unit, recurse=False, writeback=True):
            for name, weight in unit.named_parameters():
                weight.data.copy_(saved[f"{prefix}.{name}"])


def weightless_copy(model):
    """The model's structure without weights (on the meta device), by which peft names the trained weights for the
    adapter under FSDP: peft names them by the modules' paths, which FSDP's wrappers lengthen, and leaves out the
    LoRA weights of a wrapped layer (benchmarks/NOTES.md)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification
    config = model.peft_config["default"]
    with torch.device("meta"):
        base = AutoModelForSequenceClassification.from_config(model.get_base_model().config)
    structure = get_peft_model(base, copy.deepcopy(config))  # which appends its guesses of the head to the copy's
    structure.peft_config["default"] = config  # saved as the model's own
    return structure


# ----------------------------------------------------------------------------------------------
# Batch planning: batches that fit the GPU


# Batches are planned to fill at most this share of the GPU memory a process may use; the rest absorbs the
# allocator's fragmentation (on a T4's 15 GiB: batches sized for a peak of 11.2 GiB).
MEMORY_SHARE = 0.75
# Gradient checkpointing costs a second forward pass; it turns on by itself only when fewer texts than this fit a
# micro-batch without it (a T4 training an 8B model), where it lets several times as many fit.
MIN_MICRO_BATCH = 4


class BatchPlan(NamedTuple):
    micro_batch: int  # texts per forward pass on each process
    accumulation: int  # micro-batches per optimizer step
    eval_batch: int
    gradient_checkpointing: bool


def plan_batches(cfg: Config, budget: int | None, measure) -> BatchPlan:
    """The batch sizes and gradient checkpointing the user set; the rest chosen so that a step fits `budget`
    bytes of GPU memory. measure(training, checkpointing) gives what a step at --max-length costs: (bytes, bytes
    per text), or None if one text does not fit. Without a budget (the CPU) the defaults."""
    checkpointing = cfg.gradient_checkpointing == "on"
    micro, eval_batch = cfg.micro_batch_size, cfg.eval_batch_size
    if budget is not None and (micro is None or cfg.gradient_checkpointing == "auto"):
        fits = texts_that_fit(budget, measure(True, checkpointing))
        if cfg.gradient_checkpointing == "auto" and fits < min(micro or cfg.batch_size, MIN_MICRO_BATCH):
            checkpointing = True
            fits = texts_that_fit(budget, measure(True, True))
        if fits < 1 and micro is None:
            raise UserError(f"one text of --max-length {cfg.max_length} tokens does not fit the GPU's memory for "
                            "training: use a shorter --max-length, or a GPU with more memory")
        if micro is None:  # the largest micro-batch that fits and adds up to --batch-size
            micro = max(d for d in range(1, min(fits, cfg.batch_size) + 1) if cfg.batch_size % d == 0)
    if budget is not None and eval_batch is None:
        eval_batch = min(DEFAULT_EVAL_BATCH, texts_that_fit(budget, measure(False, False)))
        if eval_batch < 1:
            raise UserError(f"one text of --max-length {cfg.max_length} tokens does not fit the GPU's memory for "
                            "evaluation: use a shorter --max-length, or a GPU with more memory")
    micro = micro or cfg.batch_size
    return BatchPlan(micro, cfg.batch_size // micro, eval_batch or DEFAULT_EVAL_BATCH, checkpointing)


def texts_that_fit(budget: int, cost: tuple[int, int] | None) -> int:
    if cost is None:
        return 0
    fixed, per_text = cost
    return max(0, (budget - fixed) // max(per_text, 1))


def gpu_memory_limit(device) -> int:
    """Bytes of GPU memory this process may hold in all: what it holds and what is free, or less under a cap
    (torch.cuda.set_per_process_memory_fraction, or PYTORCH_CUDA_ALLOC_CONF's per_process_memory_fraction)."""
    import torch
    free, total = torch.cuda.mem_get_info(device)
    return int(min(total * torch.cuda.get_per_process_memory_fraction(device),
                   free + torch.cuda.memory_reserved(device)))


def memory_budget(device) -> int:
    """Bytes of GPU memory the batches may take: MEMORY_SHARE of the limit, less what the model already holds."""
    import torch
    return int(MEMORY_SHARE * gpu_memory_limit(device)) - torch.cuda.memory_allocated(device)


def memory_cost(model, runtime: Runtime, task: Task, length: int, training: bool, checkpointing: bool):
    """What a training step (or an evaluation batch) of texts of `length` tokens adds to the GPU memory in use:
    (bytes, bytes per text), from batches of 1 and 2 texts (after a first run that warms up), Adam's two moments
    included; None if one text does not fit."""
    import torch
    if checkpointing:
        enable_checkpointing(model)
    model.train(training)
    device = runtime.device
    autocast = torch.autocast(device.type, dtype=runtime.dtype, enabled=runtime.precision != "fp32")
    base = torch.cuda.memory_allocated(device)
    peaks = []
    try:
        with torch.random.fork_rng(devices=[device]):  # the probe takes no random numbers from the run
            for batch in (1, 1, 2):
                torch.cuda.reset_peak_memory_stats(device)
                ids = torch.randint(model.config.vocab_size, (batch, length), device=device)
                labels = task.probe_labels(batch, device)
                with autocast, torch.set_grad_enabled(training):
                    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
                    if training:
                        loss.backward()
                del loss
                model.zero_grad(set_to_none=True)
                peaks.append(torch.cuda.max_memory_allocated(device) - base)
    except torch.OutOfMemoryError:
        return None
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    optimizer = 8 * sum(p.numel() for p in model.parameters() if p.requires_grad) if training else 0
    one, two = peaks[1], peaks[2]
    return 2 * one - two + optimizer, two - one


def agree(plan: BatchPlan, runtime: Runtime) -> BatchPlan:
    """One plan for all processes, each having measured its own GPU: the smallest batches, checkpointing if any
    needed it (every process must take the same steps)."""
    if runtime.num_processes == 1:
        return plan
    from accelerate.utils import gather_object
    plans = [BatchPlan(*p) for p in gather_object([tuple(plan)])]
    micro = min(p.micro_batch for p in plans)
    return BatchPlan(micro, plan.micro_batch * plan.accumulation // micro, min(p.eval_batch for p in plans),
                     any(p.gradient_checkpointing for p in plans))


def choose_batches(cfg: Config, model, runtime: Runtime, task: Task) -> BatchPlan:
    """plan_batches for this run: on a GPU, measured at --max-length rounded up as the batches are padded."""
    budget, measure = None, None
    if runtime.device.type == "cuda":
        length = min(runtime.padded(cfg.max_length), getattr(model.config, "max_position_embeddings",
                                                             cfg.max_length))
        budget, measure = memory_budget(runtime.device), functools.partial(memory_cost, model, runtime, task, length)
    plan = agree(plan_batches(cfg, budget, measure), runtime)
    tokens = f" x {runtime.padded(cfg.max_length)} tokens" if cfg.batching == "tokens" else ""
    log.info("Batches: %d texts%s per optimizer step%s as %d micro-batch%s of %d%s%s%s; evaluation in batches of %d%s",
             cfg.batch_size, tokens, f" on each of {runtime.num_processes} processes" if runtime.num_processes > 1
             else "", plan.accumulation, "es" if plan.accumulation > 1 else "", plan.micro_batch, tokens,
             " (more texts where they are shorter)" if tokens else "",
             f" (measured to fit {budget / 2**30:.1f} GiB)" if budget is not None else "", plan.eval_batch,
             ", gradient checkpointing on" if plan.gradient_checkpointing else "")
    return plan


def batch_by_tokens(dataset, max_tokens: int, runtime: Runtime, seed: int):
    """The tokenised training texts grouped into micro-batches of at most max_tokens tokens once padded, one
    micro-batch a row: texts of about the same length together, as many as fit. A fixed count of texts makes a
    step over short texts cheap for the GPU but not for the CPU, which launches the same kernels for any batch, so
    the GPU waits; filled batches keep it busy. The groups are formed once (texts of equal length in a seeded
    random order); the Trainer shuffles the order of the micro-batches every epoch."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset
    table = dataset.with_format("arrow")[:]
    lengths = pc.list_value_length(table["input_ids"]).to_pylist()
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lengths.__getitem__)
    sizes = [0]
    for i in order:  # longer and longer texts: each new text sets the padded length of its micro-batch
        if sizes[-1] and (sizes[-1] + 1) * runtime.padded(lengths[i]) > max_tokens:
            sizes.append(0)
        sizes[-1] += 1
    offsets = pa.array(list(itertools.accumulate(sizes, initial=0)), pa.int32())
    ordered = table.take(order)
    return Dataset(pa.table({name: pa.ListArray.from_arrays(offsets, ordered[name].combine_chunks())
                             for name in ordered.column_names}))


# ----------------------------------------------------------------------------------------------
# Long runs: the output folder, checkpoints inside epochs, a clean stop on a signal, resuming, whole writes


def check_output_dir(cfg: Config, runtime: Runtime) -> None:
    """Refuses to overwrite what an earlier run trained, to start over an interrupted run unasked, or to resume one
    with other settings. Writes nothing: prepare_output_dir does, once the run is ready to train."""
    checkpoints = cfg.checkpoints_dir
    if os.path.exists(cfg.model_dir) and not cfg.overwrite:
        raise UserError(f"{cfg.model_dir} already holds a trained model: pass --overwrite to replace it once the new "
                        "one is saved, or choose another --output-dir")
    search = os.path.join(cfg.output_dir, SEARCH_FILE)
    searched = cfg.search and os.path.isfile(search)
    if cfg.resume and latest_checkpoint(checkpoints) is None and not searched:
        raise UserError(f"--resume found no checkpoint in {checkpoints}: run without --resume to start afresh")
    if not cfg.resume and not cfg.overwrite and (checkpoint_folders(checkpoints) or searched):
        raise UserError(f"{checkpoints if checkpoint_folders(checkpoints) else search} holds an interrupted "
                        f"{'run' if checkpoint_folders(checkpoints) else 'search'}: pass --resume to continue it, or "
                        "--overwrite to start over")
    if cfg.resume and latest_checkpoint(checkpoints) is not None:
        with open(os.path.join(checkpoints, "run_config.json")) as f:
            saved = json.load(f)
        settings = run_settings(cfg, runtime)
        changed = {k for k in settings.keys() | saved.keys() if saved.get(k) != settings.get(k)}
        if changed:
            raise UserError("--resume continues a run with the same settings, but these differ from the "
                            f"interrupted run's: {', '.join(sorted(changed))}")


def prepare_output_dir(cfg: Config, runtime: Runtime) -> tuple[str, str | None]:
    """Readies OUTPUT_DIR/checkpoints for this run: a new run clears what --overwrite replaces and records its
    settings for --resume; a resumed run keeps its latest whole checkpoint, removing any written after it only in
    part. Called once the model and the data are ready, so that a run failing before leaves nothing behind. Only the
    main process writes. Returns (the folder, the checkpoint to resume from or None)."""
    checkpoints = cfg.checkpoints_dir
    if not cfg.resume and runtime.is_main:
        shutil.rmtree(checkpoints, ignore_errors=True)
        os.makedirs(checkpoints)
        with open(os.path.join(checkpoints, "run_config.json"), "w") as f:
            json.dump(run_settings(cfg, runtime), f, indent=2)
    if cfg.resume and runtime.is_main:
        for path in remove_half_written(checkpoints):
            log.warning("Removed %s, which a stopped process had written only in part", path)
        find_best_here(latest_checkpoint(checkpoints))
    wait_for_everyone()
    resume_from = latest_checkpoint(checkpoints) if cfg.resume else None
    if resume_from:
        log.info("Resuming from %s", resume_from)
    return checkpoints, resume_from


def find_best_here(checkpoint: str) -> None:
    """A checkpoint records the best epoch's checkpoint (with --validation-size) by its path: if the output folder
    was moved since (to a disk with room, say), the same checkpoint is named where it is now, which the Trainer would
    otherwise pass over, ending with the last epoch instead of the best."""
    path = os.path.join(checkpoint, TRAINER_STATE)
    with open(path) as f:
        saved = json.load(f)
    best = saved.get("best_model_checkpoint")
    here = best and os.path.join(os.path.dirname(checkpoint), os.path.basename(best))
    if best and not os.path.isdir(best) and os.path.isdir(here):
        saved["best_model_checkpoint"] = here
        with open(path, "w") as f:
            json.dump(saved, f, indent=2)


def run_settings(cfg: Config, runtime: Runtime) -> dict:
    """The settings that decide what a run computes (a resumed run must keep them). How the batches are split
    in memory, whether their steps run as CUDA graphs, compiled or through Liger's kernels, how often checkpoints
    are written and where the output folder is (moved to a disk with room, say) do not change what they compute, so
    a resumed run may change them."""
    settings = asdict(cfg)
    for key in ("resume", "overwrite", "output_dir", "images_dir", "eval_batch_size", "micro_batch_size",
                "gradient_checkpointing", "fast_path", "liger", "save_steps", "save_minutes"):
        settings.pop(key)
    if cfg.search:  # what the search chose: its journal holds it
        for key in ("learning_rate", "lora_r", "lora_alpha", "lora_targets", "epochs"):
            settings.pop(key)
    settings["processes"] = runtime.num_processes  # the texts an optimizer step sees
    if runtime.fsdp:  # its checkpoints hold what trains in other files (sharded_trainer)
        settings["fsdp"] = True
    return settings


# The Trainer writes it into a checkpoint last: a checkpoint folder without it is half-written
TRAINER_STATE = "trainer_state.json"


def checkpoint_folders(checkpoints: str) -> list[str]:
    """The checkpoint folders the Trainer wrote (checkpoint-STEP), oldest first, whole or not."""
    names = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
    steps = sorted(int(step) for step in (name.removeprefix("checkpoint-") for name in names
                                          if name.startswith("checkpoint-")) if step.isdigit())
    return [os.path.join(checkpoints, f"checkpoint-{step}") for step in steps]


def latest_checkpoint(checkpoints: str) -> str | None:
    """The newest whole checkpoint: one that a process stopped while writing (killed, or out of disk) is passed
    over, as the Trainer wrote the checkpoint before it whole and deletes that one only once the new one is."""
    whole = [path for path in checkpoint_folders(checkpoints) if os.path.isfile(os.path.join(path, TRAINER_STATE))]
    return whole[-1] if whole else None


def remove_half_written(checkpoints: str) -> list[str]:
    """Removes the checkpoint folders newer than the latest whole one; returns their paths."""
    latest = latest_checkpoint(checkpoints)
    folders = checkpoint_folders(checkpoints)
    newer = folders[folders.index(latest) + 1:] if latest else folders
    for path in newer:
        shutil.rmtree(path, ignore_errors=True)
    return newer


class Interrupted(Exception):
    """Training stopped on a signal. The command line prints the message, naming --resume, and exits with status
    128 + the signal's number, as a shell reports a process the signal ended (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.status = 128 + signal_number


class StopSignal:
    """While training (a context): SIGTERM and the first Ctrl-C (SIGINT) ask it to stop after the current optimizer
    step (checkpoint_schedule writes a checkpoint there), as preemptible machines send SIGTERM shortly before they
    kill; a second Ctrl-C stops at once. A SIGINT within a second of the first is not that second one: torchrun and
    accelerate launch pass the terminal's Ctrl-C on to their processes, which the terminal already reached."""

    def __init__(self):
        self.received: int | None = None  # the number of the signal that asked to stop
        self.at = 0.0
        self.previous: dict = {}

    def __enter__(self):
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():  # only it may take signals
            for number in (signal.SIGTERM, signal.SIGINT):
                self.previous[number] = signal.signal(number, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def handle(self, number: int, frame) -> None:
        import signal
        if self.received is None:
            self.received, self.at = number, time.monotonic()
        elif number == signal.SIGINT and time.monotonic() - self.at > 1.0:
            raise KeyboardInterrupt


def checkpoint_schedule(save_steps: int | None, save_minutes: float, runtime: Runtime):
    """A Trainer callback that writes a checkpoint inside an epoch every save_steps optimizer steps, once
    save_minutes have passed since the last checkpoint, and at the step its StopSignal (.stop) arrived, after which
    training stops (an epoch's last step is left to the epoch's own checkpoint and evaluation). Under several
    processes they agree at every step (one all-reduce), so all write, and stop, at the same step.

    It also keeps each epoch's order when a run resumes inside it: the Trainer's length-grouped sampler draws the
    epoch's order from the global random state at the epoch's start, but restores the checkpoint's random state only
    after it has skipped the batches already trained. The state at each epoch's start is kept beside the
    checkpoints (a file per process), and a run resuming inside that epoch starts it from there."""
    import torch
    from transformers import TrainerCallback

    class CheckpointSchedule(TrainerCallback):
        def __init__(self):
            self.stop = StopSignal()
            self.last = time.monotonic()
            self.written: list[int] = []
            self.stopped_inside_epoch = False

        def on_epoch_begin(self, args, state, control, **kwargs):
            path = os.path.join(args.output_dir, f"epoch_start_rng_{runtime.process_index}.pth")
            epoch = int(state.epoch)  # whole epochs trained; inside an epoch only when a run resumes there
            if state.epoch > epoch and os.path.isfile(path):
                saved = torch.load(path)
                if saved["epoch"] == epoch:
                    torch.set_rng_state(saved["cpu"])
            elif state.epoch == epoch:
                with replaced_whole(path) as staging:
                    torch.save({"epoch": epoch, "cpu": torch.get_rng_state()}, staging)

        def on_step_end(self, args, state, control, **kwargs):
            due = bool(save_steps) and state.global_step % save_steps == 0
            due = due or (save_minutes > 0 and time.monotonic() - self.last >= 60 * save_minutes)
            due, stopping = any_process(runtime, due, self.stop.received is not None)
            epoch_end = abs(state.epoch - round(state.epoch)) < 1e-9
            if stopping:
                control.should_training_stop = True
                self.stopped_inside_epoch = not epoch_end
            if (due or stopping) and not epoch_end:
                control.should_save = True
            return control

        def on_epoch_end(self, args, state, control, **kwargs):
            if self.stopped_inside_epoch:  # not the epoch's end: no evaluation, log or second checkpoint
                control.should_evaluate = control.should_save = control.should_log = False
            return control

        def on_save(self, args, state, control, **kwargs):
            self.last = time.monotonic()
            self.written.append(state.global_step)

        def record(self) -> dict:
            """What metrics.json says of the checkpoints: how often, and at which steps this process wrote them."""
            return {"save_steps": save_steps, "save_minutes": save_minutes, "written_at_steps": self.written}

    return CheckpointSchedule()


def any_process(runtime: Runtime, *flags: bool) -> list[bool]:
    """Each flag, true if it is true in any process of the run."""
    if runtime.num_processes == 1:
        return list(flags)
    import torch
    import torch.distributed as dist
    together = torch.tensor([float(flag) for flag in flags], device=runtime.device)
    dist.all_reduce(together, op=dist.ReduceOp.MAX)
    return [bool(value) for value in together.tolist()]


@contextlib.contextmanager
def stopped_cleanly(trainer, schedule):
    """Training under the schedule's StopSignal, each way it can end short said in one line that names --resume: a
    signal (Interrupted, after the checkpoint at its step), a second Ctrl-C (Interrupted, at once), a checkpoint
    that could not be written (a UserError: the half-written one removed, the one before kept)."""
    import signal
    checkpoints = trainer.args.output_dir
    try:
        with schedule.stop:
            yield
    except KeyboardInterrupt:
        latest = latest_checkpoint(checkpoints)
        said = (f"the last whole checkpoint is {latest}; continue with the same command and --resume" if latest else
                "no checkpoint was written yet")
        raise Interrupted(f"stopped at once by a second Ctrl-C at step {trainer.state.global_step}: {said}",
                          signal.SIGINT) from None
    except Exception as e:
        half = remove_half_written(checkpoints) if trainer.args.should_save else []
        if not half:
            raise
        free = shutil.disk_usage(checkpoints).free / 2**20
        latest = latest_checkpoint(checkpoints)
        raise UserError(f"could not write the checkpoint {os.path.basename(half[-1])} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}; {free:.0f} MiB left on its disk), removed it; "
                        + (f"{latest} is kept: free some space, then continue with --resume" if latest else
                           "there is no earlier checkpoint: free some space and run again")) from e
    finally:  # a progress bar an error left open would share its line with the error's
        for callback in trainer.callback_handler.callbacks:
            if getattr(callback, "training_bar", None) is not None:
                callback.training_bar.close()
                callback.training_bar = None
    received = schedule.stop.received
    if received is not None:
        step = trainer.state.global_step
        raise Interrupted(f"stopped by {signal.Signals(received).name} at step {step} of {trainer.state.max_steps}; "
                          f"its checkpoint is in {os.path.join(checkpoints, f'checkpoint-{step}')}: continue with the "
                          "same command and --resume", received)


def wait_for_everyone() -> None:
    """A barrier across the processes of a multi-process run; nothing in a single process."""
    from accelerate import PartialState
    PartialState().wait_for_everyone()


@contextlib.contextmanager
def replaced_whole(path: str):
    """A path beside `path` to write a file or a folder into: once the block ends, what was written there takes
    `path`'s place (an older one there is removed only then); if the block fails, it is removed. So `path` is whole
    or as it was, whatever stops the process: the saved model, the merged export, predict --file's output and each
    epoch's random state are written this way."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(path)}.partial")
    retired = staging + "-old"
    if os.path.isdir(retired) and not os.path.exists(path):  # a process killed between the two renames below
        os.rename(retired, path)
    for leftover in (staging, retired):  # of a process killed while writing
        remove_path(leftover)
    try:
        yield staging
        if os.path.isdir(path):  # a folder cannot replace a folder in one step: the old one steps aside first
            os.rename(path, retired)
        os.replace(staging, path)
    finally:
        remove_path(staging)
        remove_path(retired)


def remove_path(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


# ----------------------------------------------------------------------------------------------
# Workarounds for the libraries: quiet imports and loading, bitsandbytes' 4-bit layers, pad tokens, version shims


@contextlib.contextmanager
def quiet_hub():
    """huggingface_hub without its notices, each retry of an unreachable hub among them (printed twice, 24 lines
    before the error that says what to do). The caller's setting is restored afterwards."""
    from huggingface_hub.utils import logging as hub_logging
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(verbosity)


def import_bitsandbytes_offline() -> None:
    """Imports bitsandbytes (peft imports it, and transformers imports peft) without its CPU-kernel fetch.

    On a CPU with AVX512-BF16, bitsandbytes' import asks the `kernels` package for a CPU kernel from the hub
    (kernels-community/quantization-bitsandbytes): compiled code from the network, tried in every process, and a
    warning when it cannot be had (without `kernels`, offline, or untrusted). That kernel serves only the repacked
    CPU inference path, which prepare_4bit_layers turns off, so this import keeps `kernels` out (a None in
    sys.modules makes Python's import raise ImportError) and bitsandbytes keeps its own library's kernel. Its CPU
    backend's logger is held at ERROR for the import alone: its later warnings, and everyone else's, still show.
    Nothing happens if bitsandbytes is already imported."""
    if "bitsandbytes" in sys.modules:
        return
    notices = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level, kernels = notices.level, sys.modules.get("kernels")
    notices.setLevel(logging.ERROR)
    sys.modules["kernels"] = None
    try:
        import bitsandbytes  # noqa: F401
    finally:
        notices.setLevel(level)
        del sys.modules["kernels"]
        if kernels is not None:  # a kernels module the caller had imported is theirs again
            sys.modules["kernels"] = kernels


@contextlib.contextmanager
def quiet_transformers():
    """transformers and peft at work without their notices: bitsandbytes' import (import_bitsandbytes_offline),
    the load report listing a new head as missing (load_base_model says what matters), the weight-loading bars,
    deprecation warnings that peft triggers in transformers, the dequantization notice, huggingface_hub's
    retries. The caller's settings are restored afterwards."""
    import warnings
    from transformers.utils import logging as hf_logging
    import_bitsandbytes_offline()
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), quiet_hub():
            warnings.simplefilter("ignore", FutureWarning)
            # accelerate's notice, per wrapped layer, of the fp32 copies it keeps under FSDP (check_one_dtype says it)
            warnings.filterwarnings("ignore", message="Upcasted low precision parameters")
            warnings.filterwarnings("ignore", message="FSDP upcast of low precision parameters")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(auto_class, source: str, **kwargs):
    """from_pretrained, with a missing model, a folder without one or an unreachable hub reported as the user's to
    fix."""
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:  # ValueError: a config.json without a model_type, among others
        where = ("The folder needs config.json, the weights and the tokenizer files" if os.path.isdir(source) else
                 "The hub may be unreachable: --model also takes a local folder with config.json, the weights and "
                 "the tokenizer files")
        raise UserError(f"cannot load model {source!r}: {e}\n{where}") from e


def pad_token(tokenizer, source: str) -> None:
    """Decoder LLMs often ship without a padding token (Llama 3, Mistral): they get their end-of-sequence token
    (else the unknown token), said in one line."""
    if tokenizer.pad_token is not None:
        return
    stand_in = tokenizer.eos_token or tokenizer.unk_token
    if stand_in is None:
        raise UserError(f"the tokenizer of {source} has no padding, end-of-sequence or unknown token to pad with")
    tokenizer.pad_token = stand_in
    log.info("The tokenizer has no padding token: padding with its %s token %r (id %d)",
             "end-of-sequence" if stand_in == tokenizer.eos_token else "unknown", stand_in, tokenizer.pad_token_id)


def join_pairs(tokenizer, source: str) -> None:
    """A tokenizer whose pair template puts nothing between the two texts (SmolLM2's, GPT-2's: "$A $B") gets one
    that does: its separator token, else its end-of-sequence token, between them, written into the tokenizer's own
    template, so that the saved tokenizer, predict() and a pipeline given text_pair all encode pairs alike. BERT's
    ([CLS] a [SEP] b [SEP]) and Llama 3's (<|begin_of_text|> a <|begin_of_text|> b) are kept."""
    from tokenizers import processors
    if not tokenizer.is_fast:
        raise UserError(f"the tokenizer of {source} has no tokenizer.json (a fast tokenizer): pairs of texts need one")
    parts = tokenizer("a", "b").sequence_ids()
    if None in parts[parts.index(0):parts.index(1)]:  # a special token between the texts already
        return
    separator = tokenizer.sep_token or tokenizer.eos_token
    if separator is None:
        raise UserError(f"the tokenizer of {source} has no separator or end-of-sequence token to join pairs of texts")
    template = json.loads(tokenizer.backend_tokenizer.to_str())["post_processor"] or {"type": None}
    if template["type"] == "TemplateProcessing":  # its own template, the separator put before the second text
        pair = list(template["pair"])
        second = next(i for i, item in enumerate(pair) if item.get("Sequence", {}).get("id") == "B")
        pair.insert(second, {"SpecialToken": {"id": separator, "type_id": 0}})
        single, pair = ([f"{item['SpecialToken']['id']}:{item['SpecialToken']['type_id']}" if "SpecialToken" in item
                         else f"${item['Sequence']['id']}:{item['Sequence']['type_id']}" for item in items]
                        for items in (template["single"], pair))
        specials = {token["id"]: token["ids"][0] for token in template["special_tokens"].values()}
    elif template["type"] in (None, "ByteLevel"):  # no template: the texts as they are
        single, pair, specials = ["$A"], ["$A:0", separator, "$B:1"], {}
    else:
        raise UserError(f"the tokenizer of {source} joins pairs with a {template['type']} step this script cannot "
                        "extend: give pairs a tokenizer with a separator between them")
    specials[separator] = tokenizer.convert_tokens_to_ids(separator)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=list(specials.items()))
    log.info("Pairs of texts are joined by the tokenizer's %r token (its template put nothing between them)",
             separator)


def prepare_4bit_layers(model) -> int:
    """Checks the head escaped quantization and readies the 4-bit layers; returns how many there are."""
    import bitsandbytes as bnb
    import torch
    layers = 0
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            layers += 1
            # bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel at the first no-grad forward
            # pass, and a later training step then fails ("a view of a leaf Variable ... in-place
            # operation"); the unpacked path computes the same result.
            module.support_avx512bf16_for_cpu = False
            module.register_forward_pre_hook(autocast_input)
            # bitsandbytes casts the bias to the compute dtype in place at the first forward pass; done here,
            # the forward pass mutates nothing, so torch.compile (--fast-path compiled) traces it without a graph break.
            if module.bias is not None:
                module.bias.data = module.bias.data.to(module.compute_dtype)
            if any(part in HEAD_MODULES for part in name.split(".")):
                raise RuntimeError(f"{name} was quantized to 4 bits; the classification head must stay "
                                   f"{torch.nn.Linear.__name__}")
    if layers == 0:
        raise UserError("no layer was quantized to 4 bits: the model has no nn.Linear layers bitsandbytes can replace")
    return layers


def autocast_input(module, args: tuple):
    """Under autocast nn.Linear computes and returns the autocast dtype, but bitsandbytes' Linear4bit returns
    its input's dtype: fp32 after every layer norm, which adds a cast per layer and doubles the activation
    memory kept for the backward pass. Handing it the compute dtype makes it behave like nn.Linear."""
    import torch
    x = args[0]
    if torch.is_autocast_enabled(x.device.type) and x.dtype != module.compute_dtype:
        return (x.to(module.compute_dtype), *args[1:])
    return None


def checkpointing_arguments(on: bool) -> dict:
    """TrainingArguments for gradient checkpointing, non-reentrant (it needs no gradient on the frozen embeddings'
    output, and works with DDP), under transformers 5.24's name (activation_checkpointing) or 5.17's."""
    from transformers import TrainingArguments
    name = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
            else "gradient_checkpointing")
    return {name: on, f"{name}_kwargs": {"use_reentrant": False}}


def enable_checkpointing(model) -> None:
    """Gradient checkpointing turned on as training turns it on (checkpointing_arguments), under either name."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


# ----------------------------------------------------------------------------------------------
# The command line: python peft_qlora.py [flags], predict, export


def parse_args(argv: list[str] | None) -> Config:
    """Config's fields as flags (--lora-r for lora_r), each with its help and default; Config checks the values."""
    parser = argparse.ArgumentParser(
        description="Fine-tune a transformer for text classification with QLoRA. "
                    "'peft_qlora.py predict TEXT ...' (or --file) classifies texts with the saved model; "
                    "'peft_qlora.py export --merged OUT' writes it as a plain transformers model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(Config):
        kwargs = {key: value for key, value in f.metadata.items() if key not in ("number", "words")}
        flag = "--" + f.name.replace("_", "-")
        if f.default is False:
            parser.add_argument(flag, action="store_true", **kwargs)
            continue
        words = f.metadata.get("words", ())
        if f.metadata["number"]:
            kwargs["type"] = functools.partial(parse_number, kind=NUMBER_RULES[f.metadata["number"]][0], words=words)
        kwargs.setdefault("type", str)
        # --help shows the word ("auto") for a default of None; argparse parses it like a given value
        parser.add_argument(flag, default=words[0] if words and f.default is None else f.default, **kwargs)
    try:
        return Config(**vars(parser.parse_args(argv)))
    except UserError as e:
        parser.error(str(e))


def parse_number(text: str, kind: type, words: tuple[str, ...] = ()) -> int | float | None:
    """A number flag's value as its kind (int or float), or None for one of its words ("all", "auto"); Config checks
    its range."""
    if text in words:
        return None
    try:
        return kind(text)
    except ValueError:
        expected = ("a whole number" if kind is int else "a number") + "".join(f" or {w!r}" for w in words)
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def parse_predict_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="peft_qlora.py predict",
                                     description="Classify texts with a saved model: prints JSON, or with --file "
                                                 "writes each row of a file with its prediction to --output.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("texts", nargs="*", help="texts to classify; a model of pairs takes them two at a time "
                                                 "(text, text_pair, text, text_pair, ...)")
    parser.add_argument("--file", help="csv, json/jsonl or parquet file whose rows to classify (read in chunks)")
    parser.add_argument("--text-column", default=["text"], nargs="+",
                        help="--file's column holding the texts; two for a model of pairs")
    parser.add_argument("--output", help="where --file's rows go, in order, each with the predicted label and one "
                                         "probability column per class: csv, json/jsonl (JSON lines) or parquet")
    parser.add_argument("--model-dir", default=DEFAULT_MODEL_DIR, help="folder a training run saved")
    parser.add_argument("--batch-size", type=functools.partial(parse_number, kind=int, words=("auto",)),
                        default="auto",
                        help="texts per batch; auto: the evaluation batch the training run chose")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: must be at least 1")
    if bool(args.texts) == bool(args.file):
        parser.error("give the texts to classify, or --file with --output, not both" if args.texts else
                     "give the texts to classify, or --file FILE --output OUT")
    if args.file:
        for flag, path in (("--file", args.file), ("--output", args.output)):
            if not path:
                parser.error("--file needs --output: where the rows with their predictions go")
            if file_builder(path) is None:
                parser.error(f"{flag} {path}: unknown file type; use .csv, .json, .jsonl or .parquet")
        if not os.path.isfile(args.file):
            parser.error(f"--file {args.file}: no such file")
        if os.path.exists(args.output):
            parser.error(f"--output {args.output} exists: choose another name, or remove it first")
    elif args.output:
        parser.error("--output goes with --file")
    return args


def parse_export_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="peft_qlora.py export",
                                     description="Write a trained model as a plain transformers model in 16 bits "
                                                 "(LoRA merged into the dequantized base, the trained head, the label "
                                                 "names), which transformers.pipeline loads without peft or "
                                                 "bitsandbytes.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--merged", required=True, metavar="OUT", help="the folder to write (must not exist)")
    parser.add_argument("--model-dir", default=DEFAULT_MODEL_DIR, help="folder a training run saved")
    args = parser.parse_args(argv)
    if os.path.exists(args.merged):
        parser.error(f"--merged {args.merged} exists: choose another folder, or remove it first")
    return args


def texts_given(texts: list[str], model_dir: str) -> list:
    """The texts of the predict command: as they are, or for a model of pairs taken two at a time."""
    if not Task.from_dict(read_serving_settings(model_dir)).pairs:
        return texts
    if len(texts) % 2:
        raise UserError(f"the model in {model_dir} classifies pairs of texts: give them two at a time (text, "
                        f"text_pair, ...); got {len(texts)} texts")
    return list(zip(texts[::2], texts[1::2]))


def end_process_group() -> None:
    """Leave a multi-process run's process group cleanly (NCCL warns otherwise); nothing in a single process."""
    if "torch" in sys.modules:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The libraries' loggers stay at WARNING (datasets, for one, reports at INFO which frameworks it found); this
    # script's own messages are for the user. One process speaks for a multi-process run (torchrun and accelerate
    # launch set RANK); the others warn only.
    logging.basicConfig(format="%(message)s")
    log.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    # matplotlib's "building the font cache" (once per machine, when that takes over 5 s) is not for our users
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    try:
        if argv[:1] == ["predict"]:
            args = parse_predict_args(argv[1:])
            if args.file:
                predict_file(args.file, args.output, args.text_column, args.model_dir, args.batch_size)
            else:
                print(json.dumps(predict(texts_given(args.texts, args.model_dir), args.model_dir, args.batch_size),
                                 indent=2))
        elif argv[:1] == ["export"]:
            args = parse_export_args(argv[1:])
            export_merged(args.model_dir, args.merged)
        else:
            run(parse_args(argv))
    except UserError as e:
        log.error("error: %s", e)
        return 1
    except Interrupted as e:  # every process stopped at the same step; one says so
        if os.environ.get("RANK", "0") == "0":
            log.error("%s", e)
        return e.status
    except KeyboardInterrupt:  # Ctrl-C outside training: nothing trained is lost, nothing to say but that
        log.error("stopped by Ctrl-C")
        return 128 + 2
    finally:
        end_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

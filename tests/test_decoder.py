"""Decoder LLMs as classifiers: a tokenizer without a padding token, the `score` head, frozen weights in the
compute dtype, `all-linear`, truncation with a BOS or no special token, and the errors a user can meet."""
import json

import pytest

import peft_qlora
from conftest import classes, cpu_runtime, imdb_sample, run_cli, train_args, train_through_cli

# Of very different lengths, so that batched together the short ones are padded
TEXTS = ["Superb.", "Dull, slow and far too long; I left before the end and do not regret it at all.", "Fine",
         *imdb_sample("test", 6)[0]]
LLAMA_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def trained_decoder(tiny_llama, data_files, tmp_path_factory):
    return train_through_cli(tiny_llama, data_files, tmp_path_factory.mktemp("decoder-run"))


def test_a_decoder_without_padding_token_trains_and_saves_one(trained_decoder, tiny_llama):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny_llama).pad_token is None, "the model ships without one"
    out, result = trained_decoder
    assert "no padding token: padding with its end-of-sequence token '<|endoftext|>'" in result.stderr
    assert "Liger-Kernel" not in result.stderr, "its kernels are a GPU's: nothing on a CPU"
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["model"]["quantized_layers"] == 2 * 7  # q, k, v, o, gate, up, down in each layer
    assert metrics["model"]["lora_targets"] == ["q_proj", "v_proj"] and metrics["model"]["trained_heads"] == ["score"]
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    saved = AutoTokenizer.from_pretrained(out / "model")
    assert saved.pad_token == "<|endoftext|>" and saved.padding_side == "right"


def test_padding_changes_no_prediction_after_reloading(trained_decoder):
    """The head reads each text's last real token: a text scores the same alone as beside longer ones, which needs
    the padding token set on the reloaded model too."""
    model_dir = trained_decoder[0] / "model"
    batched = run_cli("predict", "--model-dir", model_dir, *TEXTS)  # one batch, padded to its longest text
    assert batched.returncode == 0, batched.stderr[-3000:]
    batched = json.loads(batched.stdout)
    classifier = peft_qlora.Classifier.load(str(model_dir))  # in this process, outside the CLI
    assert classifier.model.config.pad_token_id == classifier.tokenizer.pad_token_id is not None
    alone = classifier.probabilities(TEXTS, batch_size=1)  # no padding at all
    for row, probs in zip(batched, alone):
        assert row["pos_prob"] == pytest.approx(probs[1], abs=1e-5)
    spread = max(p[1] for p in alone) - min(p[1] for p in alone)
    assert spread > 1e-3, "the texts get different probabilities, so matching them means something"


def test_frozen_weights_stay_in_the_compute_dtype_and_what_trains_in_fp32(tiny_llama):
    """bf16 here (bitsandbytes computes it on CPUs too): the embedding and the norms are frozen and stay bf16,
    where peft's prepare_model_for_kbit_training would upcast them; LoRA and the head train in fp32."""
    import torch

    cfg = peft_qlora.parse_args(["--model", tiny_llama, "--max-length", "64"])
    tokenizer = peft_qlora.check_model(cfg)
    model, info = peft_qlora.build_model(cfg, tokenizer, classes(), cpu_runtime("bf16"))
    base = model.base_model.model
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert base.model.norm.weight.dtype == torch.bfloat16
    assert base.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "score.modules_to_save" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert model.config.pad_token_id == tokenizer.pad_token_id == tokenizer.eos_token_id

    batch = tokenizer(["a fine film", "a dull one, through and through"], padding=True, return_tensors="pt")
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, labels=torch.tensor([1, 0])).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_all_linear_puts_lora_on_every_4bit_layer_and_none_on_the_head(arch, tiny_llama, tiny_bert):
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    cfg = peft_qlora.parse_args(["--model", tiny_llama if arch == "llama" else tiny_bert, "--max-length", "64",
                                 "--lora-targets", "all-linear"])
    tokenizer = peft_qlora.check_model(cfg)
    model, info = peft_qlora.build_model(cfg, tokenizer, classes(), cpu_runtime())
    with_lora = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    four_bit = {n.removesuffix(".base_layer") for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert with_lora == four_bit and len(four_bit) == info["quantized_layers"]
    if arch == "llama":
        assert info["lora_targets"] == LLAMA_LINEAR
    assert not any(head in name for name in with_lora for head in ("score", "classifier", "pooler"))


@pytest.mark.parametrize("bos", [False, True], ids=["no special token", "BOS only"])
@pytest.mark.parametrize("truncation, body, kept", [
    ("head", 6, "one two three four five six"),
    ("tail", 6, "seven eight nine ten eleven twelve"),
    ("head+tail", 8, "one two seven eight nine ten eleven twelve"),  # a quarter from the head
])
def test_truncation_of_decoder_tokenizers(bos, truncation, body, kept):
    """Decoder tokenizers add a BOS (Llama 3) or nothing (SmolLM2), where BERT's add [CLS] and [SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "one two three four five six seven eight nine ten eleven twelve".split()
    vocab = {token: i for i, token in enumerate(["<s>", "</s>", "<unk>", *words])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        word_level.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    prefix = "<s> " if bos else ""
    [ids] = peft_qlora.encode(tokenizer, [" ".join(words)], max_length=body + bos, truncation=truncation)["input_ids"]
    assert tokenizer.decode(ids) == prefix + kept
    [short] = peft_qlora.encode(tokenizer, ["three four"], max_length=body + bos, truncation=truncation)["input_ids"]
    assert tokenizer.decode(short) == prefix + "three four"


def test_running_out_of_gpu_memory_says_what_to_change_and_keeps_finished_epochs(tiny_bert, tmp_path, caplog,
                                                                                   monkeypatch):
    """No GPU here to run out of: the second epoch's first step raises the error PyTorch raises on one."""
    import os

    import torch
    from transformers import Trainer

    from conftest import DATA

    args = train_args(tiny_bert, {"train": os.path.join(DATA, "imdb_train.parquet"),
                                  "test": os.path.join(DATA, "imdb_test.parquet")}, tmp_path)
    args += ["--train-size", "64", "--eval-size", "32"]  # 8 steps an epoch
    real_step, steps = Trainer.training_step, []

    def step_then_fail(self, *a, **kw):
        steps.append(1)
        if len(steps) > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, *a, **kw)

    monkeypatch.setattr(Trainer, "training_step", step_then_fail)
    assert peft_qlora.main(args) == 1
    message = caplog.records[-1].getMessage()
    assert "ran out of memory training" in message and "--micro-batch-size (this run: 8)" in message
    assert "--gradient-checkpointing" in message and "--resume" in message
    assert (tmp_path / "checkpoints" / "checkpoint-8").is_dir() and not (tmp_path / "model").exists()

    monkeypatch.setattr(Trainer, "training_step", real_step)
    assert peft_qlora.main(args + ["--resume", "--micro-batch-size", "4"]) == 0  # smaller steps may resume it
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert metrics["training"]["resumed"] and [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["batches"]["micro_batch"] == 4 and metrics["batches"]["accumulation"] == 2

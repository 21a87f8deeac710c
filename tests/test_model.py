"""build_model: the QLoRA recipe on real 4-bit layers, for BERT, RoBERTa and DistilBERT; the precision choice."""
import pytest

import peft_qlora
from conftest import classes, cpu_runtime, save_tiny_model

SMALL = dict(vocab_size=1000, hidden_size=64, num_attention_heads=2, max_position_embeddings=130)


@pytest.fixture(scope="module")
def tiny_models(tiny_bert, vocab_file, tmp_path_factory):
    from transformers import DistilBertConfig, RobertaConfig

    roberta = RobertaConfig(num_hidden_layers=2, intermediate_size=128, pad_token_id=0, **SMALL)
    distilbert = DistilBertConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=2, hidden_dim=128,
                                  max_position_embeddings=128)
    return {"bert": tiny_bert,
            "roberta": save_tiny_model(tmp_path_factory.mktemp("tiny-roberta"), roberta, vocab_file),
            "distilbert": save_tiny_model(tmp_path_factory.mktemp("tiny-distilbert"), distilbert, vocab_file)}


EXPECTED = {  # LoRA targets peft (or this script, for DistilBERT) picks, and the heads that train
    "bert": (["query", "value"], ["classifier", "pooler"]),
    "roberta": (["query", "value"], ["classifier"]),
    "distilbert": (["q_lin", "v_lin"], ["pre_classifier", "classifier"]),
}


@pytest.mark.parametrize("arch", EXPECTED)
def test_build_model_quantizes_the_body_and_trains_adapters_and_head(arch, tiny_models):
    import bitsandbytes as bnb
    import torch

    cfg = peft_qlora.parse_args(["--model", tiny_models[arch], "--max-length", "64"])
    tokenizer = peft_qlora.check_model(cfg)
    model, info = peft_qlora.build_model(cfg, tokenizer, classes(), cpu_runtime())
    targets, heads = EXPECTED[arch]
    assert info["lora_targets"] == targets and info["trained_heads"] == heads

    quantized = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == info["quantized_layers"] == 12
    weight = next(iter(quantized.values())).weight
    assert weight.quant_type == "nf4" and weight.quant_state.nested  # NF4 with double quantization

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if "lora_" in n} == set(targets)
    from peft.utils import ModulesToSaveWrapper

    wrappers = {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules()
                if isinstance(m, ModulesToSaveWrapper)}
    assert set(wrappers) == set(heads)
    for head in heads:
        module = wrappers[head].modules_to_save["default"]
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in linears)
    assert info["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)

    # Evaluate first, then a training step: on AVX512-BF16 CPUs the order once broke bitsandbytes.
    batch = tokenizer(["a fine film", "a dull one"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()
    loss = model(**batch, labels=torch.tensor([1, 0])).loss
    loss.backward()
    lora_grad = next(p.grad for n, p in model.named_parameters() if "lora_B" in n)
    assert lora_grad is not None and lora_grad.abs().sum() > 0


def test_the_trainable_count_is_lora_plus_head_and_pooler(tiny_bert):
    cfg = peft_qlora.parse_args(["--model", tiny_bert, "--max-length", "64"])
    tokenizer = peft_qlora.check_model(cfg)
    _, info = peft_qlora.build_model(cfg, tokenizer, classes("a", "b", "c"), cpu_runtime())
    hidden, layers, r = 64, 2, 8
    lora = layers * 2 * r * (hidden + hidden)  # query and value, A (r x in) and B (out x r)
    head = hidden * 3 + 3
    pooler = hidden * hidden + hidden
    assert info["trainable_params"] == lora + head + pooler
    assert info["memory_4bit_bytes"] < info["memory_fp32_bytes"]


@pytest.mark.parametrize("capability, requested, expected", [
    ((7, 5), "auto", "fp16"),  # T4: no native bf16
    ((8, 0), "auto", "bf16"),  # A100
    ((9, 0), "auto", "bf16"),  # H100
    ((7, 5), "fp32", "fp32"),
    ((9, 0), "fp16", "fp16"),
])
def test_precision_follows_the_gpu(monkeypatch, capability, requested, expected):
    import torch

    # A T4's or an A100's compute capability cannot exist on this machine: report it for the device asked about
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert peft_qlora.choose_precision(requested, torch.device("cuda", 0)) == expected


def test_bf16_is_refused_on_a_t4(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(peft_qlora.UserError, match="compute capability 8.0"):
        peft_qlora.choose_precision("bf16", torch.device("cuda", 0))


def test_the_cpu_trains_in_fp32():
    import torch

    assert peft_qlora.choose_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(peft_qlora.UserError, match="needs a CUDA GPU"):
        peft_qlora.choose_precision("bf16", torch.device("cpu"))

"""FSDP (accelerate launch --config_file fsdp.yaml): what a machine without GPUs can check. FSDP itself runs only on
CUDA GPUs; its runs are in benchmarks/NOTES.md."""
import os
import subprocess
import sys

import pytest

import peft_qlora
from conftest import ROOT, SCRIPT, classes, data_files, train_args  # noqa: F401  (data_files: a fixture)

CONFIG = os.path.join(ROOT, peft_qlora.FSDP_CONFIG)


def test_the_shipped_config_is_what_fsdp_qlora_needs():
    """As peft's and bitsandbytes' FSDP-QLoRA guides set it, read as accelerate launch reads it."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(CONFIG)
    fsdp = config.fsdp_config
    assert config.distributed_type == "FSDP" and fsdp["fsdp_version"] == 1
    assert fsdp["fsdp_use_orig_params"] is False, "one flat tensor of one dtype per wrapped layer"
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True and fsdp["fsdp_sync_module_states"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT" and fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_under_fsdp_every_weight_is_in_the_compute_dtype(arch, tiny_bert, tiny_llama, caplog):
    """One dtype per wrapped layer: the packed 4-bit weights stored as bf16, LoRA and the head left in bf16 (accelerate
    keeps the fp32 copies the optimizer updates). Without FSDP, what trains is fp32 and the 4-bit weights uint8.
    The model computes a loss and gradients either way."""
    import logging

    import bitsandbytes as bnb
    import torch

    caplog.set_level(logging.INFO, logger="peft_qlora")
    cfg = peft_qlora.parse_args(["--model", tiny_bert if arch == "bert" else tiny_llama, "--max-length", "64"])
    tokenizer = peft_qlora.check_model(cfg)
    for fsdp in (True, False):
        runtime = peft_qlora.Runtime(torch.device("cpu"), "bf16", fsdp=fsdp)
        model, info = peft_qlora.build_model(cfg, tokenizer, classes(), runtime)
        four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert four_bit and {m.weight.dtype for m in four_bit} == {torch.bfloat16 if fsdp else torch.uint8}
        trained = {p.dtype for p in model.parameters() if p.requires_grad}
        assert trained == {torch.bfloat16 if fsdp else torch.float32}
        if fsdp:
            assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, "frozen, trained and 4-bit alike"
        batch = tokenizer(["a fine film", "a dull one, through and through"], padding=True, return_tensors="pt")
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch, labels=torch.tensor([1, 0])).loss
        loss.backward()
        assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    heads = ", ".join(info["trained_heads"])
    assert (f"FSDP: every weight in bf16 (the 4-bit ones stored as bf16), one dtype per wrapped layer; what trains "
            f"(LoRA, {heads}) is updated in fp32 copies that accelerate keeps, and computes in bf16") in caplog.text


def test_the_fsdp_wrapping_puts_one_dtype_in_each_unit(tiny_llama):
    """The units FSDP would form (the Trainer's policy: a unit per transformer layer and per trainable leaf, peft's
    fsdp_auto_wrap_policy) each hold parameters of one dtype, and each trainable leaf is a unit of its own."""
    import torch
    from peft.utils.other import fsdp_auto_wrap_policy

    cfg = peft_qlora.parse_args(["--model", tiny_llama, "--max-length", "64"])
    model, _ = peft_qlora.build_model(cfg, peft_qlora.check_model(cfg), classes(),
                                      peft_qlora.Runtime(torch.device("cpu"), "bf16", fsdp=True))
    policy = fsdp_auto_wrap_policy(model)
    units = [module for module in model.modules() if policy(module=module, recurse=False, nonwrapped_numel=1)]
    assert units, "the policy wraps something"
    for unit in units:
        assert len({p.dtype for p in unit.parameters()}) == 1
    trainable_leaves = [m for m in model.modules() if not list(m.children()) and any(p.requires_grad for p in
                                                                                     m.parameters(recurse=False))]
    assert all(leaf in units for leaf in trainable_leaves)


@pytest.mark.parametrize("env, message", [
    ({"FSDP_VERSION": "2"}, "fsdp_version 2 is not supported here: use fsdp_version 1, as fsdp.yaml does"),
    ({"FSDP_USE_ORIG_PARAMS": "true"}, "fsdp_use_orig_params true is not supported here: set it to false"),
    ({}, "FSDP shards the model across CUDA GPUs and none is visible: on the CPU, launch without --config_file "
         "fsdp.yaml"),
])
def test_fsdp_is_refused_in_one_line_where_it_cannot_run(env, message, tiny_bert, data_files, tmp_path):
    """As accelerate launch --config_file fsdp.yaml sets the environment, with one setting changed."""
    result = subprocess.run([sys.executable, SCRIPT, *map(str, train_args(tiny_bert, data_files, tmp_path / "run"))],
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_FSDP": "true", **env},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and message in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_the_real_launcher_with_the_shipped_config_is_refused_on_the_cpu(tiny_bert, data_files, tmp_path):
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIG,
                             "--num_processes", "1", SCRIPT, *map(str, train_args(tiny_bert, data_files,
                                                                                  tmp_path / "run"))],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and not (tmp_path / "run").exists()
    assert "error: FSDP shards the model across CUDA GPUs and none is visible" in result.stderr

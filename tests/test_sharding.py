"""FSDP (accelerate launch --config_file fsdp.yaml): what a machine without GPUs can check. accelerate runs FSDP only
on CUDA GPUs (its runs are in benchmarks/NOTES.md); here: the shipped config, the dtype plan, where the model loads,
the refusals, and the script's own handling of a sharded model's trained weights under torch's FSDP on two CPU
processes."""
import os
import subprocess
import sys

import pytest

import peft_qlora
from conftest import ROOT, SCRIPT, classes, train_args

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
            peft_qlora.check_one_dtype(model, runtime)  # what shard() checks and says before it wraps the model
        batch = tokenizer(["a fine film", "a dull one, through and through"], padding=True, return_tensors="pt")
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch, labels=torch.tensor([1, 0])).loss
        loss.backward()
        assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    heads = ", ".join(info["trained_heads"])
    assert (f"FSDP: every weight in bf16 (the 4-bit ones stored as bf16), one dtype per wrapped layer; what trains "
            f"(LoRA, {heads}) is updated in fp32 copies that accelerate keeps, and computes in bf16") in caplog.text


def test_under_fsdp_the_model_loads_onto_the_cpu_not_the_gpu(tiny_llama):
    """No GPU ever holds the whole model under FSDP: it loads onto the CPU, where bitsandbytes quantizes it, and
    shard() moves one wrapped layer at a time to each process's GPU, keeping its shard. Built here for a GPU run on a
    machine without one: were anything loaded onto the GPU, this would fail."""
    import bitsandbytes as bnb
    import torch

    cfg = peft_qlora.parse_args(["--model", tiny_llama, "--max-length", "64"])
    gpu = torch.device("cuda", 0)
    model, _ = peft_qlora.build_model(cfg, peft_qlora.check_model(cfg), classes(),
                                      peft_qlora.Runtime(gpu, "bf16", fsdp=True))
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(m.weight.bnb_quantized and m.weight.quant_state.absmax.device.type == "cpu"
                            for m in four_bit)


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
    ({"FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params true is not supported here: set it to false"),
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


def shard_and_gather(rank, model_path, out):
    """One of two CPU processes (gloo) that shard the real 4-bit model with torch's FSDP as the Trainer does
    (peft's wrap policy: a unit per decoder layer and per trained leaf; FULL_SHARD), then gather, save and load its
    trained weights with the script's functions. Rank 0 saves the unwrapped model's adapter first, for comparison."""
    import torch
    import torch.distributed as dist
    from accelerate.utils import extract_model_from_parallel
    from peft.utils.other import fsdp_auto_wrap_policy
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29571")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    cfg = peft_qlora.parse_args(["--model", model_path, "--max-length", "64"])
    model, _ = peft_qlora.build_model(cfg, peft_qlora.check_model(cfg), classes(),
                                      peft_qlora.Runtime(torch.device("cpu"), "bf16", rank, 2, fsdp=True))
    trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        model.save_pretrained(os.path.join(out, "unwrapped"))
    wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False,
                   device_id=torch.device("cpu"))
    assert any("_fsdp_wrapped_module" in name for name, _ in model.named_modules()), "the layers are units"
    weights = peft_qlora.trained_weights(wrapped)
    assert weights.keys() == trained.keys() and all(torch.equal(weights[k], trained[k]) for k in trained)
    if rank == 0:
        # As ShardedTrainer.trained_adapter names them: the model found inside the wrapper, as accelerate unwraps it
        unwrapped = extract_model_from_parallel(wrapped)
        assert unwrapped is model
        peft_qlora.weightless_copy(unwrapped).save_pretrained(os.path.join(out, "sharded"), state_dict=weights)
        os.makedirs(os.path.join(out, "checkpoint"))
        save_file({name: weight + 1 for name, weight in weights.items()},
                  os.path.join(out, "checkpoint", peft_qlora.TRAINED_WEIGHTS))
    dist.barrier()
    peft_qlora.load_trained_weights(wrapped, os.path.join(out, "checkpoint"))
    again = peft_qlora.trained_weights(wrapped)
    assert all(torch.equal(again[k], trained[k] + 1) for k in trained), "each shard took its part"
    dist.destroy_process_group()


def test_the_trained_weights_of_a_sharded_model_are_gathered_saved_and_loaded_whole(tiny_llama, tmp_path):
    """What the FSDP runs save (trained_weights, named by weightless_copy) is the adapter peft saves for the same
    model unwrapped: the LoRA weights included, which peft 0.21 leaves out when it names a sharded model's weights
    itself; and a checkpoint's trained weights load back into every shard. Two real processes, torch's FSDP on
    the CPU (accelerate runs FSDP only on GPUs; benchmarks/NOTES.md has the GPU runs)."""
    import json

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    mp.spawn(shard_and_gather, args=(tiny_llama, str(tmp_path)), nprocs=2)
    unwrapped, sharded = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("unwrapped", "sharded"))
    assert any("lora_A" in key for key in sharded) and any("score" in key for key in sharded)
    assert sharded.keys() == unwrapped.keys() and all(sharded[k].equal(unwrapped[k]) for k in unwrapped)
    configs = [json.loads((tmp_path / name / "adapter_config.json").read_text()) for name in ("unwrapped", "sharded")]
    assert configs[0] == configs[1]

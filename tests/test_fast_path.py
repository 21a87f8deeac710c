"""The fast path: training steps replayed as CUDA graphs on a single GPU, eager everywhere else.

A CUDA graph cannot be captured here (no GPU): these tests check the choice of path, that the Trainer built for
graphs trains exactly as the plain one where its capture fails (as it does here, and would on a GPU that refuses
one), and the gradients the graphs write into. On a GPU, benchmarks/bench.py --check-graphs compares graphed and
eager training (benchmarks/NOTES.md)."""
import logging
import os

import pytest

import peft_qlora
from conftest import classes, cpu_runtime


def gpu_runtime(processes=1):
    """A runtime as decide_runtime gives on a GPU (a device object needs no GPU to exist)."""
    import torch

    return peft_qlora.Runtime(torch.device("cuda", 0), "bf16", num_processes=processes, pad_multiple=64)


PLAN = peft_qlora.BatchPlan(32, 1, 256, False)


@pytest.mark.parametrize("flags, runtime, plan, reason", [
    ([], gpu_runtime, PLAN, None),
    (["--fast-path", "off"], gpu_runtime, PLAN, "--fast-path off"),
    ([], cpu_runtime, PLAN, "no CUDA GPU"),
    ([], lambda: gpu_runtime(processes=2), PLAN, "several processes"),
    ([], gpu_runtime, PLAN._replace(gradient_checkpointing=True), "gradient checkpointing"),
    (["--fast-path", "compiled"], gpu_runtime, PLAN, None),
    (["--fast-path", "compiled"], cpu_runtime, PLAN, "no CUDA GPU"),
])
def test_graphs_run_on_a_single_gpu_and_the_log_says_why_not_elsewhere(flags, runtime, plan, reason, caplog):
    caplog.set_level(logging.INFO, logger="peft_qlora")
    path, compiled = peft_qlora.step_path(peft_qlora.parse_args(flags), runtime(), plan)
    assert path == ("graphs" if reason is None else "eager") and compiled == ("compiled" in flags)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Training steps:")]
    assert len(lines) == 1
    assert ("Training steps: CUDA graphs" in lines[0]) if reason is None else (f"eager ({reason}" in lines[0])
    assert ("of compiled layers" in lines[0]) == compiled


def test_whether_steps_are_graphed_is_not_a_setting_a_resumed_run_must_keep():
    cfg = peft_qlora.parse_args(["--fast-path", "compiled"])
    assert "fast_path" not in peft_qlora.run_settings(cfg, cpu_runtime())
    with pytest.raises(SystemExit):
        peft_qlora.parse_args(["--fast-path", "on"])  # auto, graphs, compiled or off


def train_tiny(tiny_bert, data_files, tmp_path, graphs):
    """The tiny BERT trained one epoch through make_trainer: class weights (the loss hook with the Trainer's item
    count), two micro-batches a step, and a last step of one micro-batch (60 texts in micro-batches of 4). With
    graphs, the Trainer make_trainer builds on a GPU, which no GPU here can choose: its captures fail."""
    import torch

    cfg = peft_qlora.parse_args(["--model", tiny_bert, "--train-file", data_files["train"], "--eval-file",
                                 data_files["test"], "--train-size", "60", "--eval-size", "all", "--max-length", "64",
                                 "--epochs", "1", "--batch-size", "8", "--micro-batch-size", "4",
                                 "--class-weights", "balanced", "--calibration", "off", "--output-dir", str(tmp_path)])
    data = peft_qlora.load_data(cfg)
    runtime = cpu_runtime()
    tokenizer = peft_qlora.check_model(cfg)
    model, _ = peft_qlora.build_model(cfg, tokenizer, data.task, runtime)
    trainer = peft_qlora.make_trainer(cfg, model, tokenizer, peft_qlora.tokenize_splits(data, tokenizer, cfg),
                                      data.task, runtime)
    assert type(trainer) is peft_qlora.recipe_trainer() and trainer.plan == (4, 2, 256, False)
    if graphs:
        trainer.__class__ = peft_qlora.graphed_trainer()
    result = trainer.train()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(w).all() for w in weights.values())
    return trainer, result.training_loss, weights


def test_where_a_capture_fails_the_graphed_trainer_warns_once_and_trains_exactly_as_the_plain_one(
        tiny_bert, data_files, tmp_path, caplog):
    plain, plain_loss, plain_weights = train_tiny(tiny_bert, data_files, tmp_path / "plain", graphs=False)
    graphed, graphed_loss, graphed_weights = train_tiny(tiny_bert, data_files, tmp_path / "graphed", graphs=True)
    assert graphed_loss == plain_loss
    for name, weight in plain_weights.items():
        assert graphed_weights[name].equal(weight), name
    # 15 micro-batches: each shape's first eager, the first repeated shape's capture refused (no GPU), all eager
    assert graphed.step_graphs.counts == {"captured": 0, "replayed": 0, "eager": 15}
    assert graphed.step_graphs.failure.startswith("RuntimeError: Tried to instantiate dummy base class")
    warnings = [r.getMessage() for r in caplog.records if "could not be captured as a CUDA graph" in r.getMessage()]
    assert len(warnings) == 1 and "eager steps from here on" in warnings[0]
    assert not hasattr(plain, "step_graphs") and "cuda_graphs" not in plain.record()
    assert graphed.record()["cuda_graphs"] == {**graphed.step_graphs.counts, "failure": graphed.step_graphs.failure,
                                               "uncompiled": None}


def test_gradients_accumulate_in_the_tensors_the_graphs_write_into():
    import torch

    layer = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    graphs = peft_qlora.StepGraphs([*layer.parameters(), frozen])
    assert len(graphs.params) == 2, "only what trains"
    x = torch.randn(4, 3)

    def step(tensors):
        loss = layer(tensors["x"]).sum()
        loss.backward()
        return loss.detach()

    graphs(step, {"x": x})  # the run's first step: eager, into the bound tensors
    assert [p.grad for p in graphs.params] == graphs.grads and all(p.grad is g for p, g in zip(graphs.params,
                                                                                             graphs.grads))
    first = [g.clone() for g in graphs.grads]
    layer.zero_grad()  # as the Trainer does after an optimizer step: the gradients dropped
    assert layer.weight.grad is None
    graphs.bind_gradients()
    assert all(p.grad is g and not g.any() for p, g in zip(graphs.params, graphs.grads)), "zeroed in place"
    layer.weight.grad = torch.full_like(layer.weight, 2.0)  # a gradient another step made
    graphs.bind_gradients()
    assert layer.weight.grad is graphs.grads[0] and (graphs.grads[0] == 2).all(), "taken over, not lost"
    layer.zero_grad()
    graphs.failure = "no GPU here"  # eager from now on, as after a refused capture
    graphs(step, {"x": x})
    graphs(step, {"x": x})  # accumulated: twice the first step's gradients
    for g, once in zip(graphs.grads, first):
        assert torch.allclose(g, 2 * once)
    assert graphs.counts["eager"] == 3


LIGER_PROBE = """
import logging
import sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
import peft_qlora
from conftest import classes, cpu_runtime
cfg = peft_qlora.Config(model=sys.argv[1])
model, _ = peft_qlora.build_model(cfg, peft_qlora.load_tokenizer(cfg.model), classes(), cpu_runtime())
print(peft_qlora.liger_kernels(model))
layer = model.get_base_model().model.layers[0]
print(layer.mlp.forward.__qualname__, layer.input_layernorm.forward.__qualname__)
"""


def test_liger_kernels_replace_a_decoders_layers_through_its_api(tiny_llama):
    """Liger's kernels are Triton (a GPU's): here only the patching is checked, in a process of its own since Liger
    patches the architecture's module too. Its fused cross-entropy stays off: the classifier keeps its forward."""
    import subprocess
    import sys

    pytest.importorskip("liger_kernel", reason="requirements.txt installs Liger-Kernel on Linux only")
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", LIGER_PROBE, tiny_llama], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1",
                                 "PYTHONPATH": os.pathsep.join([os.path.dirname(here), here])})
    assert result.returncode == 0, result.stderr[-3000:]
    kernels, forwards = result.stdout.splitlines()[-2:]
    assert kernels == "['rope', 'rms_norm', 'swiglu']"
    assert forwards == "LigerSwiGLUMLP.forward LigerRMSNorm.forward"
    assert "Liger-Kernel: rope, rms_norm, swiglu as Triton kernels" in result.stderr


def test_liger_kernels_leave_an_encoder_alone(tiny_bert):
    pytest.importorskip("liger_kernel", reason="requirements.txt installs Liger-Kernel on Linux only")
    model, _ = peft_qlora.build_model(peft_qlora.Config(model=tiny_bert), peft_qlora.load_tokenizer(tiny_bert),
                                      classes(), cpu_runtime())
    assert peft_qlora.liger_kernels(model) == []


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_attention_is_masked_where_the_batch_has_padding_and_by_nothing_else(arch, tiny_bert, tiny_llama):
    """On the graphs path, whether attention is masked follows the batch (collate leaves an unpadded batch's mask
    out), never the mask's values: transformers decides from the values, except while a CUDA graph is captured,
    when it masks every batch (slower attention in the graph than in the eager step, and compiled layers refused).
    The logits are the same either way."""
    import torch
    from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

    folder = {"bert": tiny_bert, "llama": tiny_llama}[arch]
    tokenizer = peft_qlora.load_tokenizer(folder)
    model, _ = peft_qlora.build_model(peft_qlora.Config(model=folder), tokenizer, classes(), cpu_runtime())
    model.eval()
    ids = torch.randint(5, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(ids)

    def mask(attention_mask):
        embeddings = model.get_input_embeddings()(ids)
        if arch == "bert":
            return create_bidirectional_mask(config=model.config, inputs_embeds=embeddings,
                                             attention_mask=attention_mask)
        return create_causal_mask(config=model.config, inputs_embeds=embeddings, attention_mask=attention_mask,
                                  past_key_values=None, position_ids=torch.arange(16).expand(4, -1))

    with torch.no_grad():
        assert mask(ones) is None, "transformers drops a mask of ones, read from its values"
        before = model(input_ids=ids, attention_mask=ones).logits
        assert not peft_qlora.padding_attention(model, cpu_runtime(), graphs=True), "no flash attention on a CPU"
        assert model.config._attn_implementation == peft_qlora.PADDING_ATTENTION
        assert mask(None) is None, "no mask given: attention unmasked"
        kept = mask(ones)
        assert kept is not None and bool(kept.diagonal(dim1=-2, dim2=-1).all()), "a mask given is kept, all ones too"
        torch.testing.assert_close(model(input_ids=ids).logits, before)
        torch.testing.assert_close(model(input_ids=ids, attention_mask=ones).logits, before)
        padded = ones.clone()
        padded[0, 12:] = 0
        assert not bool(mask(padded)[0, ..., 12:].any()), "padding masked"


def test_segments_cut_each_row_into_its_tokens_and_its_padding():
    """segment_bounds, what flash attention reads for a padded batch on a GPU: rows padded on the right (pad_batch's)
    or on the left, full rows and a row of one token (the attention needs a GPU: tests/test_gpu.py)."""
    import torch

    length = 16
    for left in (False, True):
        real = torch.tensor([length, 1, 7, 15, length])
        positions = torch.arange(length)
        mask = ((positions >= length - real[:, None]) if left else (positions < real[:, None])).long()
        bounds = peft_qlora.segment_bounds(mask).tolist()
        assert len(bounds) == 2 * len(real) + 1 and bounds[-1] == len(real) * length
        for row, n in enumerate(real.tolist()):
            start, cut, end = (b - row * length for b in bounds[2 * row:2 * row + 3])
            assert (start, end) == (0, length)
            tokens = range(cut, end) if left and n < length else range(start, cut)
            assert list(tokens) == mask[row].nonzero().flatten().tolist(), (left, row, bounds)


@pytest.fixture
def flash_attention_here(monkeypatch):
    """What a GPU with flash attention gives padding_attention, on this CPU: its capability, and a reference kernel
    standing in for flash attention's variable-length form (CUDA only), computing each segment's attention on its own
    with PyTorch's attention in float32. What it checks is the script's part: the cut, the layout of the packed
    tensors, grouped key/value heads, causality, the scale, and which batches take the segments."""
    import torch

    def reference(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask,
                  scale=None, **rest):
        assert cum_seq_q is cum_seq_k and dropout_p == 0.0 and query.dtype == torch.bfloat16
        calls.append(cum_seq_q.tolist())
        out = torch.zeros_like(query)
        groups = query.shape[1] // key.shape[1]
        bounds = cum_seq_q.tolist()
        for start, end in zip(bounds, bounds[1:]):
            if end > start:
                q, k, v = (t[start:end].transpose(0, 1).float() for t in (query, key, value))
                k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
                attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
                out[start:end] = attended.transpose(0, 1).to(out.dtype)
        return out, None, None, None, None

    calls = []  # each call's segment bounds
    library = torch.library.Library("aten", "IMPL")
    library.impl("_flash_attention_forward", reference, "CPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    yield peft_qlora.Runtime(torch.device("cuda"), "bf16"), calls
    library._destroy()


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_padded_batches_attend_within_segments_as_masked_attention_does(arch, tiny_bert, tiny_llama,
                                                                        flash_attention_here):
    """On a GPU with flash attention, a padded batch's attention runs over each text's tokens apart from its padding:
    the same logits on real tokens as PyTorch's masked attention (within bf16's rounding, which the segments run in),
    for an encoder and for a decoder with fewer key/value heads than query heads; an unpadded batch stays
    unmasked."""
    import torch

    folder = {"bert": tiny_bert, "llama": tiny_llama}[arch]
    tokenizer = peft_qlora.load_tokenizer(folder)
    model, _ = peft_qlora.build_model(peft_qlora.Config(model=folder), tokenizer, classes(), cpu_runtime())
    model.eval()
    generator = torch.Generator().manual_seed(0)
    lengths = (40, 13, 64, 1, 27)
    texts = [torch.randint(5, 1000, (n,), generator=generator).tolist() for n in lengths]
    batch = peft_qlora.pad_batch({"input_ids": texts}, tokenizer.pad_token_id or 0, cpu_runtime())
    runtime, calls = flash_attention_here
    with torch.no_grad():
        masked = model(**batch).logits
        assert not calls
        assert peft_qlora.padding_attention(model, runtime, graphs=False)
        assert model.config._attn_implementation == peft_qlora.PADDING_ATTENTION
        segments = model(**batch).logits
        torch.testing.assert_close(segments, masked, rtol=2e-2, atol=2e-2 * float(masked.abs().max()))
        assert len(calls) == 2, "each layer's attention over the segments"
        width = batch["input_ids"].shape[1]
        tokens_then_padding = [b for row, n in enumerate(lengths) for b in (row * width, row * width + n)]
        assert calls[0] == tokens_then_padding + [len(lengths) * width]
        model(input_ids=batch["input_ids"][:, :1])
        assert len(calls) == 2, "no padding: PyTorch's attention, unmasked"


def test_collate_leaves_the_mask_out_of_a_batch_without_padding():
    import torch

    runtime = peft_qlora.Runtime(torch.device("cpu"), "fp32", pad_multiple=4)
    full = peft_qlora.collate([{"input_ids": [5] * 8, "labels": 0}, {"input_ids": [6] * 8, "labels": 1}], 0, runtime)
    assert "attention_mask" not in full and full["input_ids"].shape == (2, 8)
    padded = peft_qlora.collate([{"input_ids": [5] * 8, "labels": 0}, {"input_ids": [6] * 7, "labels": 1}], 0,
                                runtime)
    assert padded["attention_mask"].sum(1).tolist() == [8, 7]

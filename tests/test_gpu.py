"""Paths that only a CUDA GPU takes: run on the GPU machine (`python -m pytest tests/test_gpu.py`), skipped with the
reason elsewhere."""
import json

import pytest

import peft_qlora
from conftest import run_cli, train_args

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_liger_kernels_train_a_decoder_as_its_own_layers_do(tiny_llama, data_files, tmp_path):
    """The same run with Liger-Kernel's RMSNorm, rotary embeddings and SwiGLU and with the model's own layers: the
    same losses within what kernels computing in another order give, each run in a process of its own (Liger's
    patches reach the architecture's module, not just the model)."""
    histories = {}
    for liger in ("auto", "off"):
        out = tmp_path / liger
        result = run_cli(*train_args(tiny_llama, data_files, out, "--liger", liger))
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("Liger-Kernel: rope, rms_norm, swiglu as Triton kernels" in result.stderr) == (liger == "auto")
        assert "could not be imported" not in result.stderr
        histories[liger] = json.loads((out / "model" / "metrics.json").read_text())["history"]
    for on, off in zip(histories["auto"], histories["off"], strict=True):
        assert on["train_loss"] == pytest.approx(off["train_loss"], rel=2e-2)
        assert on["loss"] == pytest.approx(off["loss"], rel=2e-2)


@pytest.fixture(scope="module")
def bert_without_dropout(tmp_path_factory, vocab_file):
    """The tiny BERT with no dropout of its own: eager, graphed and compiled steps then compute the same numbers, up
    to the order kernels add in."""
    from transformers import BertConfig

    from conftest import save_tiny_model

    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128, initializer_range=0.2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return save_tiny_model(tmp_path_factory.mktemp("bert-without-dropout"), config, vocab_file)


def trained(model, data_files, out, *flags):
    """A run through the command line: (its metrics.json, what it logged)."""
    result = run_cli(*train_args(model, data_files, out, "--lora-dropout", "0", *flags))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "model" / "metrics.json").read_text()), result.stderr


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_graphed_and_compiled_graphed_steps_train_as_eager_steps_do(bert_without_dropout, data_files, tmp_path,
                                                                    precision):
    """Eager steps, CUDA graphs, and CUDA graphs of compiled layers: the same losses within what kernels adding in
    another order give; fp16 (a T4's precision) through its loss scaler too. Each graphed run captured its shapes and
    replayed them, with no capture refused."""
    runs = {}
    for name, flags in (("eager", ["--fast-path", "off"]), ("graphs", []),
                         ("compiled", ["--fast-path", "compiled"])):
        metrics, log = trained(bert_without_dropout, data_files, tmp_path / name, "--precision", precision, *flags)
        refused = [line for line in log.splitlines() if "could not be captured" in line]
        assert not refused, refused
        runs[name] = metrics
    assert "cuda_graphs" not in runs["eager"]["training"]
    for name in ("graphs", "compiled"):
        counts = runs[name]["training"]["cuda_graphs"]
        assert counts["captured"] >= 1 and counts["replayed"] > counts["captured"]
        assert counts["failure"] is None and counts["uncompiled"] is None, "compiled code captured, not refused"
        for graphed, eager in zip(runs[name]["history"], runs["eager"]["history"], strict=True):
            assert graphed["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-2), name
            assert graphed["loss"] == pytest.approx(eager["loss"], rel=1e-2), name


def test_dropout_draws_new_numbers_at_each_replay_of_compiled_layers():
    """A compiled layer with dropout, captured: each replay drops another half of the outputs, as eager steps do."""
    import torch

    layer = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Dropout(0.5)).cuda()
    layer.compile(dynamic=True)
    graphs = peft_qlora.StepGraphs(layer.parameters(), compiled=True)
    x = torch.ones(64, 256, device="cuda")

    def step(tensors):
        out = layer(tensors["x"])
        out.sum().backward()
        return (out == 0).flatten().float()  # which outputs were dropped

    dropped = [graphs(step, {"x": x}) for _ in range(5)]  # eager, captured, replayed thrice
    assert graphs.counts == {"captured": 1, "replayed": 3, "eager": 1}
    assert graphs.failure is None and graphs.uncompiled is None, "the compiled layer captured"
    assert all(0.45 < float(d.mean()) < 0.55 for d in dropped), "about half dropped each time"
    for i, a in enumerate(dropped):
        for b in dropped[i + 1:]:
            assert 0.4 < float((a != b).float().mean()) < 0.6, "independent masks"


def test_a_capture_refused_mid_step_falls_back_uncompiled_then_eager_with_dropout_still_working(caplog):
    """A step CUDA cannot capture (it reads a value back to the CPU): with compiled layers, the step runs eagerly and
    the layers uncompiled from then on; refused again, the steps run eagerly. Dropout keeps working after each refused
    capture (an unfinished capture leaves the random generator expecting one)."""
    import torch

    layer = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Dropout(0.5)).cuda()
    graphs = peft_qlora.StepGraphs(layer.parameters(), compiled=True)
    x = torch.ones(8, 32, device="cuda")

    def step(tensors):
        out = layer(tensors["x"])
        loss = out.sum()
        loss.backward()
        float(loss)  # a copy to the CPU: refused while capturing
        return loss.detach()

    try:
        losses = [graphs(step, {"x": x}) for _ in range(4)]
    finally:
        torch.compiler.set_stance("default")
    assert all(torch.isfinite(loss) for loss in losses)
    assert graphs.counts == {"captured": 0, "replayed": 0, "eager": 4} and graphs.failure and graphs.uncompiled
    messages = [r.getMessage() for r in caplog.records if "could not be captured" in r.getMessage()]
    assert len(messages) == 2 and "uncompiled layers from here on" in messages[0] and "eager steps" in messages[1]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_padded_batches_attend_as_segments_as_they_do_masked(arch, tiny_bert, tiny_llama):
    """A padded batch's flash attention over each text's tokens apart from its padding gives the logits and LoRA
    gradients that PyTorch's masked attention gives, within bf16's rounding: an encoder, and a decoder whose key and
    value heads are fewer than its query heads."""
    import torch

    from conftest import classes

    folder = {"bert": tiny_bert, "llama": tiny_llama}[arch]
    runtime = peft_qlora.decide_runtime("bf16")
    tokenizer = peft_qlora.load_tokenizer(folder)
    model, _ = peft_qlora.build_model(peft_qlora.Config(model=folder, lora_dropout=0.0), tokenizer, classes(),
                                      runtime)
    model.eval()  # no dropout: both ways compute the same numbers
    generator = torch.Generator().manual_seed(0)
    texts = [torch.randint(5, 1000, (n,), generator=generator).tolist() for n in (100, 37, 64, 1, 90, 128)]
    batch = {k: t.cuda() for k, t in peft_qlora.pad_batch({"input_ids": texts}, tokenizer.pad_token_id or 0,
                                                          runtime).items()}
    trained = [p for p in model.parameters() if p.requires_grad]

    def logits_and_gradients():
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(**batch).logits.float()
        (logits * torch.tensor([1.0, -2.0], device="cuda")).sum().backward()
        return [logits.detach()] + [p.grad.float().clone() for p in trained]

    masked = logits_and_gradients()
    assert peft_qlora.padding_attention(model, runtime, graphs=False), "segments on a GPU with flash attention"
    segments = logits_and_gradients()
    for a, b in zip(segments, masked, strict=True):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * float(b.abs().max()))


def test_segment_attention_captured_draws_new_dropout_at_each_replay():
    """Segment attention with dropout in a CUDA graph: each replay drops other attention weights, as eager steps
    do (flash attention draws them from the generator the graph registers)."""
    import torch

    q, k, v = (torch.randn(4, 2, 64, 32, device="cuda", requires_grad=True) for _ in range(3))
    mask = (torch.arange(64, device="cuda") < torch.tensor([64, 10, 33, 50], device="cuda")[:, None]).long()
    bounds = peft_qlora.segment_bounds(mask)
    graphs = peft_qlora.StepGraphs([q, k, v], compiled=False)

    def step(tensors):
        out = peft_qlora.segment_attention(q, k, v, tensors["bounds"], 0.5, None, False, torch.bfloat16)
        out.float().sum().backward()
        return out.detach().clone()

    outs = [graphs(step, {"bounds": bounds}) for _ in range(4)]  # eager, captured, replayed twice
    assert graphs.counts == {"captured": 1, "replayed": 2, "eager": 1} and graphs.failure is None
    for i, a in enumerate(outs):
        assert torch.isfinite(a).all()
        for b in outs[i + 1:]:
            assert not torch.equal(a, b), "new dropout each step"

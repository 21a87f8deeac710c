"""Paths that only a CUDA GPU takes: run on the GPU machine (`python -m pytest tests/test_gpu.py`), skipped with the
reason elsewhere."""
import json

import pytest

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

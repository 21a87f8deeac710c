"""FSDP is refused in one line: it does not train here yet (benchmarks/NOTES.md, issue 19). torchrun and accelerate
launch --multi_gpu, which give each GPU its own 4-bit copy, are tested in tests/test_multiprocess.py."""
import os
import subprocess
import sys

from conftest import ROOT, SCRIPT, train_args

CONFIG = os.path.join(ROOT, "benchmarks", "fsdp.yaml")
REFUSAL = ("error: FSDP does not train here yet: on an H200 the 4-bit model was sharded and evaluated, but its first "
           "optimizer step failed (README: Several GPUs). Launch with torchrun or accelerate launch --multi_gpu "
           "instead: each GPU then holds its own 4-bit copy")


def test_accelerate_launch_with_an_fsdp_config_is_refused_in_one_line(tiny_bert, data_files, tmp_path):
    """The real launcher with the FSDP attempts' config, on this machine's CPU."""
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIG,
                             "--num_processes", "1", SCRIPT, *map(str, train_args(tiny_bert, data_files,
                                                                                  tmp_path / "run"))],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and not (tmp_path / "run").exists()
    assert REFUSAL in result.stderr.splitlines(), result.stderr[-3000:]

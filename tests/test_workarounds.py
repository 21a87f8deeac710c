"""bitsandbytes on the two kinds of CPU: with AVX512-BF16 its import tries to fetch a CPU kernel from the hub and
warns when it cannot, and its 4-bit layers repack their weights for inference; without it, neither. The script
must be quiet, offline and give the same results on both. Whichever CPU runs the tests, each case below runs in real
processes in which bitsandbytes sees the CPU flag the case names (a CPU of the other kind cannot exist here, as a
T4 cannot), and in which any network look-up is refused and reported."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SCRIPT, train_args

# Python imports this file at start-up from PYTHONPATH. The flag is bitsandbytes.functional.has_avx512bf16, which
# bitsandbytes asks once, as its CPU backend and each 4-bit layer are made.
SITECUSTOMIZE = '''
import importlib.abc, importlib.machinery, sys

FLAG = {flag}


class CpuFlag(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.has_avx512bf16 = lambda: FLAG

        spec.loader.exec_module = exec_module
        return spec


def no_network(event, args):
    if event == "socket.getaddrinfo" or (event == "socket.connect" and isinstance(args[1], tuple)):
        sys.stderr.write(f"network: {{event}} {{args}}\\n")
        raise OSError("this test allows no network")


sys.meta_path.insert(0, CpuFlag())
sys.addaudithook(no_network)
'''

CASES = {"with AVX512-BF16": True, "without AVX512-BF16": False}


def as_on_cpu(flag, folder):
    """The environment of a process whose bitsandbytes sees this CPU flag, with the hub reachable as far as the
    libraries know (HF_HUB_OFFLINE unset), so that a look-up would be tried, and refused by the audit hook."""
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(flag=flag))
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["PYTHONPATH"] = os.pathsep.join([str(folder), ROOT])
    return env


def test_training_is_the_same_quiet_offline_run_on_either_cpu(tiny_bert, data_files, tmp_path):
    metrics = {}
    for case, flag in CASES.items():
        out = tmp_path / case.replace(" ", "-")
        result = subprocess.run([sys.executable, SCRIPT, *map(str, train_args(tiny_bert, data_files, out))],
                                env=as_on_cpu(flag, tmp_path / f"site-{flag}"), capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        for noise in ("network:", "gemm_4bit", "kernels", "bitsandbytes"):
            assert noise not in result.stderr, (case, noise, result.stderr[-3000:])
        metrics[case] = json.loads((out / "model" / "metrics.json").read_text())
    with_flag, without = metrics.values()
    # The repacked path is for inference only, and turned off: both CPUs train and evaluate the same numbers
    for phase in ("before", "after"):
        for key in ("accuracy", "f1", "loss"):
            assert with_flag[phase][key] == pytest.approx(without[phase][key], abs=1e-6), (phase, key)
    assert [h["train_loss"] for h in with_flag["history"]] == pytest.approx(
        [h["train_loss"] for h in without["history"]], abs=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_a_notebook_predict_is_quiet_and_offline_on_either_cpu(case, trained, tmp_path):
    code = ("import importlib, json, logging, sys, torch\n"
            "from peft_qlora import predict\n"
            "answer = predict(sys.argv[1], model_dir=sys.argv[2])\n"
            "print(json.dumps({'label': answer['label'],\n"
            "    # registered by bitsandbytes' import only where it took the AVX512-BF16 branch\n"
            "    'avx512bf16_branch': torch._C._dispatch_has_kernel_for_dispatch_key('bitsandbytes::gemv_4bit', 'CPU'),\n"
            "    'its_logger_warns_again': logging.getLogger('bitsandbytes.backends.cpu.ops').isEnabledFor(30),\n"
            "    'kernels_imports_again': bool(importlib.import_module('kernels'))}))\n")
    result = subprocess.run([sys.executable, "-c", code, "A fine film.", trained[0] / "model"], cwd=tmp_path,
                            env=as_on_cpu(CASES[case], tmp_path / "site"), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == "", "no notice from bitsandbytes' import and no network look-up"
    facts = json.loads(result.stdout)
    assert facts["label"] in ("neg", "pos")
    assert facts["avx512bf16_branch"] is CASES[case], "bitsandbytes took the branch of the CPU the case names"
    # Held back for the import alone: not a silence of the logger, nor of kernels (requirements-test.txt has it,
    # so a fetch that got through would be tried, and reported above)
    assert facts["its_logger_warns_again"] and facts["kernels_imports_again"]

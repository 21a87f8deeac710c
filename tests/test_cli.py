"""The command line's surface: importing is free, --help documents every setting."""
import dataclasses
import os
import subprocess
import sys

import peft_qlora
from conftest import ROOT, run_cli


def test_import_loads_no_framework_and_writes_nothing(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import peft_qlora; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'transformers', 'peft', 'datasets', 'bitsandbytes', 'matplotlib', 'sklearn'}))")
    result = subprocess.run([sys.executable, "-c", code, ROOT], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert os.listdir(tmp_path) == []


def test_help_documents_every_setting_and_the_predict_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for f in dataclasses.fields(peft_qlora.Config):
        assert "--" + f.name.replace("_", "-") in result.stdout
    assert "predict TEXT" in result.stdout
    predict_help = run_cli("predict", "--help")
    assert predict_help.returncode == 0 and "--model-dir" in predict_help.stdout


def test_the_command_line_prints_its_own_messages_not_the_libraries(tmp_path):
    """After main() has configured logging, the script's INFO messages show and the libraries' INFO messages do
    not (on a GPU machine datasets announced "JAX version ... available" in every run)."""
    code = ("import logging, sys; sys.path.insert(0, sys.argv[1]); import peft_qlora\n"
            "status = peft_qlora.main(['predict', '--model-dir', sys.argv[2], 'a text'])\n"
            "logging.getLogger('datasets.config').info('library notice')\n"
            "peft_qlora.log.info('script message')\n"
            "sys.exit(status)\n")
    result = subprocess.run([sys.executable, "-c", code, ROOT, str(tmp_path)], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "RANK"})
    assert result.returncode == 1 and "no trained model" in result.stderr, result.stderr
    assert "script message" in result.stderr and "library notice" not in result.stderr, result.stderr

"""peft_qlora.py with --no-pooler: the classifier trains alone beside LoRA, as in the notebook, instead of
with BERT's pooler. The comparison behind training the pooler by default (README, "Closing the gap").

    python benchmarks/experiments/train_pooler.py --no-pooler --epochs 2 --model ... --train-file ... --eval-file ...

Every other flag goes to peft_qlora.py. (The runs in benchmarks/results/accuracy_lever_*.json were made before
the pooler became the default, by an earlier form of this script that added the pooler instead.)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import peft  # noqa: E402

import peft_qlora  # noqa: E402

if "--no-pooler" in sys.argv:
    sys.argv.remove("--no-pooler")
    Original = peft.LoraConfig

    def classifier_only(*args, **kwargs):  # build_model imports LoraConfig from peft when it runs
        kwargs["modules_to_save"] = [m for m in kwargs.get("modules_to_save") or [] if m != "pooler"]
        return Original(*args, **kwargs)

    peft.LoraConfig = classifier_only
sys.exit(peft_qlora.main(sys.argv[1:]))

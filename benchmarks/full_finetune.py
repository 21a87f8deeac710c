"""Full fine-tuning of the same checkpoint on the same data, to set beside peft_qlora.py's QLoRA results.

Takes peft_qlora.py's flags (data, the task and its columns, subsets, --max-length, --truncation, epochs, batch size,
precision, seed) and trains every weight of the unquantized model (fp32 weights, bf16/fp16 mixed precision on a
GPU) instead of LoRA adapters on a 4-bit base, through the same data pipeline, task, batch planning, Trainer
settings and evaluation; several GPUs through torchrun as peft_qlora.py. Full fine-tuning needs a far lower
learning rate than LoRA, for example --learning-rate 3e-5.

    python benchmarks/full_finetune.py --model ../shared/models/minilm-l6-h384-uncased \\
        --train-file ../shared/data/imdb/train.parquet --eval-file ../shared/data/imdb/test.parquet \\
        --learning-rate 3e-5 --output-dir outputs/full_finetune

Writes OUTPUT_DIR/metrics.json in peft_qlora's layout; it keeps no model.
"""
import json
import logging
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import peft_qlora  # noqa: E402


def main():
    cfg = peft_qlora.parse_args(sys.argv[1:])  # before the frameworks load: --help needs none of them
    import torch
    from transformers import AutoModelForSequenceClassification, set_seed

    logging.basicConfig(format="%(message)s")  # as peft_qlora.main: the libraries at WARNING, the script's own at INFO
    logging.getLogger("peft_qlora").setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    runtime = peft_qlora.decide_runtime(cfg.precision)
    set_seed(cfg.seed)
    data = peft_qlora.load_data(cfg)
    tokenizer = peft_qlora.check_model(cfg)
    task = data.task
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.model, **peft_qlora.head_config(task), dtype=torch.float32, device_map={"": runtime.device})
    task.start_head(model)  # as peft_qlora.build_model (regression: at the targets' mean)
    model.config.pad_token_id = tokenizer.pad_token_id
    params = sum(p.numel() for p in model.parameters())
    texts = peft_qlora.tokenize_splits(data, tokenizer, cfg)
    trainer = peft_qlora.make_trainer(cfg, model, tokenizer, texts, task, runtime)
    before = peft_qlora.evaluate(trainer, texts.test, task, "Before training")
    history, run = peft_qlora.train(trainer, task, len(texts.train))
    after = peft_qlora.evaluate(trainer, texts.test, task, "After training")
    model_info = {"trainable_params": params, "total_params": params, "memory_fp32_bytes": 4 * params}
    metrics = {"method": "full fine-tuning", "before": before, "after": after, "history": history, "training": run,
               **peft_qlora.describe_run(cfg, task, model_info, trainer, runtime)}
    if runtime.is_main:
        shutil.rmtree(cfg.checkpoints_dir)  # a comparison run: nothing to resume
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        print(json.dumps({k: metrics[k] for k in ("before", "after", "training")}, indent=2))
    peft_qlora.end_process_group()


if __name__ == "__main__":
    main()

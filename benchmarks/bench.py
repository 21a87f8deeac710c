"""Training and prediction speed of peft_qlora.py against the notebook's recipe and two unquantized baselines.

On a bert-base-shaped model (random BertConfig() weights: the same FLOPs and bytes as bert-base-uncased) at
--max-length 512, in one run on one card:

  qlora   this project's training path with its defaults (peft_qlora.build_model and make_trainer)
  naive   the notebook's recipe: 4-bit base through prepare_model_for_kbit_training's defaults, every review
          padded to 512, random order, default Trainer settings (batch 8), bf16
  lora    plain LoRA (same config) on a bf16 base, no quantization, the project's data pipeline
  full    full fine-tuning in bf16 mixed precision, the project's data pipeline
  qlora-compile, lora-compile   the same with torch.compile (peft_qlora.py --compile); the epoch includes
          the compilation, the fixed-shape rate does not (its warm-up does)

For each: a fixed shape (a plain loop of training steps on batches of 512-token reviews): reviews/s, tokens/s,
peak memory and the fraction of the FLOP bound (the card's bf16 matmul rate, measured in the same run);
and one epoch of the Trainer over real IMDb reviews: wall time, reviews/s, real tokens/s, peak memory.
Then predict() throughput with the QLoRA model.

    python benchmarks/bench.py --data ../shared/data/imdb/train.parquet --epoch-reviews 8000   # GPU, ~10 minutes
    python benchmarks/bench.py --tiny --data tests/data/imdb_train.parquet       # CPU smoke test

Prints a table and writes --out (default benchmarks/results.json).
"""
import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import peft_qlora  # noqa: E402

MODES = ("qlora", "naive", "lora", "full", "qlora-compile", "lora-compile")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="parquet of reviews (text column): real lengths for the epoch")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model and a few steps: a smoke test for CPUs")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32, help="fixed-shape loop batch; the project's default too")
    p.add_argument("--steps", type=int, default=20, help="timed steps of the fixed-shape loop")
    p.add_argument("--epoch-reviews", default="all", help="reviews in the timed epoch, or 'all'")
    p.add_argument("--predict-reviews", type=int, default=5000)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--out", default=os.path.join(HERE, "results.json"))
    return p.parse_args()


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_memory():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def matmul_peak_tflops():
    """The card's dense bf16 matrix-multiply rate, measured: the FLOP bound's numerator."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def flops_per_review(config, seq, full):
    """Matrix FLOPs of one review: forward, plus activation gradients (and weight gradients for full)."""
    d, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    linear = layers * (4 * d * d + 2 * d * ff)
    forward = 2 * linear * seq + layers * 4 * seq * seq * d  # projections and MLP; QK^T and AV
    return forward * (3 if full else 2)


def make_model_folder(tiny):
    """A randomly initialised BERT saved with the bert-base-uncased WordPiece vocabulary."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    config = (BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
              if tiny else BertConfig())
    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="bench-model-")
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(os.path.join(HERE, "vocab")).save_pretrained(folder)
    return folder, config


def build(mode, folder, cfg, runtime):
    """The model each recipe trains."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = ["neg", "pos"]
    mode = mode.removesuffix("-compile")  # torch.compile wraps the same model
    if mode == "qlora":
        model, tokenizer, _ = peft_qlora.build_model(cfg, labels, runtime)
        return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    device = {"": runtime.device}
    half = runtime.dtype
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                      target_modules=["query", "value"])
    if mode == "naive":  # the same 4-bit model (a quantized head would crash), prepared with peft's defaults
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, **peft_qlora.quantized_load_kwargs(labels, runtime))
        return get_peft_model(prepare_model_for_kbit_training(model), lora), tokenizer
    if mode == "lora":
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, dtype=half,
                                                                   device_map=device)
        model = get_peft_model(model, lora)
        for p in model.parameters():  # adapters and head train in fp32, as in the QLoRA path
            if p.requires_grad:
                p.data = p.data.float()
        return model, tokenizer
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, dtype=torch.float32,
                                                               device_map=device)
    return model, tokenizer


def fixed_shape(model, args, runtime, vocab_size):
    """Training steps on full 512-token batches in a plain loop: the rate the FLOP bound is compared with."""
    import torch

    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab_size, (args.batch_size, args.max_length), generator=gen).to(device)
    labels = torch.randint(0, 2, (args.batch_size,), generator=gen).to(device)
    mask = torch.ones_like(ids)
    model.train()
    autocast = torch.autocast(device.type, dtype=runtime.dtype, enabled=runtime.precision != "fp32")

    def step():
        with autocast:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(3):
        step()
    sync()
    warmup = time.perf_counter() - start  # with torch.compile: mostly the compilation
    reset_memory()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    return args.steps * args.batch_size / seconds, peft_qlora.peak_memory(device), warmup


def predict_rate(classifier, texts, batch_size):
    """predict()'s classification of texts, after a warm-up batch: (reviews/s, the probabilities)."""
    peft_qlora.classify(classifier, texts[:256], batch_size)
    sync()
    start = time.perf_counter()
    probabilities = peft_qlora.classify(classifier, texts, batch_size)
    sync()
    return len(texts) / (time.perf_counter() - start), probabilities


def one_epoch(mode, model, tokenizer, texts, cfg, runtime, workdir):
    """One epoch of the Trainer over real reviews, as each recipe feeds them."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    data = Dataset.from_dict({"text": texts, "labels": [i % 2 for i in range(len(texts))]})
    if mode == "naive":
        data = data.map(lambda b: tokenizer(b["text"], padding="max_length", truncation=True,
                                            max_length=cfg.max_length), batched=True, remove_columns=["text"])
        trainer = Trainer(model=model, train_dataset=data, args=TrainingArguments(
            output_dir=workdir, num_train_epochs=1, bf16=runtime.precision == "bf16", label_names=["labels"],
            save_strategy="no", report_to="none", disable_tqdm=True))
    else:
        data = peft_qlora.tokenize(data, tokenizer, cfg.max_length, cfg.truncation)
        plan = peft_qlora.BatchPlan(cfg.batch_size, 1, peft_qlora.DEFAULT_EVAL_BATCH, False)  # the batch asked for
        trainer = peft_qlora.make_trainer(model, tokenizer, data, data.select(range(8)), cfg, runtime, plan, workdir,
                                          evaluate_each_epoch=False, save_checkpoints=False)  # time training alone
    reset_memory()
    start = time.perf_counter()
    trainer.train()
    sync()
    seconds = time.perf_counter() - start
    # Tokens each review really has at this length (padding not counted), the same for every recipe
    real_tokens = sum(map(len, peft_qlora.encode(tokenizer, texts, cfg.max_length, "head")))
    return {"epoch_s": seconds, "epoch_reviews_per_s": len(texts) / seconds,
            "epoch_tokens_per_s": real_tokens / seconds,
            "epoch_peak_memory_gib": peft_qlora.peak_memory(runtime.device) / 2**30,
            "batch_size": trainer.args.per_device_train_batch_size, "epochs": trainer.state.epoch,
            "optimizer_steps": trainer.state.global_step}


def main():
    args = parse_args()  # first: --help needs none of the frameworks
    import pyarrow.parquet as pq
    import torch

    texts = pq.read_table(args.data, columns=["text"]).column("text").to_pylist()
    epoch_texts = texts if args.epoch_reviews == "all" else texts[:int(args.epoch_reviews)]
    folder, config = make_model_folder(args.tiny)
    runtime = peft_qlora.decide_runtime("auto")
    workdir = tempfile.mkdtemp(prefix="bench-run-")
    # One epoch: the timed epoch of every mode covers each review once
    cfg = peft_qlora.parse_args(["--model", folder, "--max-length", str(args.max_length), "--epochs", "1",
                                 "--batch-size", str(args.batch_size), "--output-dir", workdir])
    peak = matmul_peak_tflops()
    rows = {}
    for mode in args.modes:
        compiled = mode.endswith("-compile")
        mode_cfg = dataclasses.replace(cfg, compile=compiled)
        reset_memory()
        model, tokenizer = build(mode, folder, mode_cfg, runtime)
        rate, memory, warmup = fixed_shape(torch.compile(model) if compiled else model, args, runtime,
                                           config.vocab_size)
        row = {"reviews_per_s": rate, "tokens_per_s": rate * args.max_length, "peak_memory_gib": memory / 2**30,
               "warmup_s": warmup}
        if peak:
            flops = flops_per_review(config, args.max_length, full=mode == "full")
            row["flop_bound_fraction"] = rate * flops / (peak * 1e12)
        del model
        torch._dynamo.reset()  # the epoch compiles afresh, so its time includes the compilation
        reset_memory()
        model, tokenizer = build(mode, folder, mode_cfg, runtime)  # fresh weights and optimizer for the epoch
        row.update(one_epoch(mode, model, tokenizer, epoch_texts, mode_cfg, runtime, workdir))
        if mode == "qlora":  # served as predict() serves it
            classifier = peft_qlora.make_classifier(model, tokenizer, ["neg", "pos"], args.max_length,
                                                    cfg.truncation, runtime, peft_qlora.DEFAULT_EVAL_BATCH)
            row["predict_reviews_per_s"], _ = predict_rate(classifier, texts[:args.predict_reviews],
                                                           peft_qlora.DEFAULT_EVAL_BATCH)
        rows[mode] = row
        del model
        print(mode, json.dumps(row), flush=True)
        result = report(rows, args, peak, runtime, len(epoch_texts), len(texts))  # after each mode: a partial
    print_table(result)


def report(rows, args, peak, runtime, epoch_reviews, all_reviews):
    """The results so far, written to --out."""
    result = {"device": peft_qlora.device_name(runtime), "precision": runtime.precision, "bf16_matmul_tflops": peak,
              "max_length": args.max_length, "batch_size": args.batch_size, "epoch_reviews": epoch_reviews,
              "tiny": args.tiny, "versions": peft_qlora.versions(), "modes": rows, "command": " ".join(sys.argv)}
    for mode, row in rows.items():  # an epoch over every review of --data, from the rate on epoch_reviews;
        # not for compiled modes on a part of the data: their time includes the one-off compilation
        partial_compiled = mode.endswith("-compile") and epoch_reviews < all_reviews
        row["full_epoch_s"] = None if partial_compiled else all_reviews / row["epoch_reviews_per_s"]
    result["ratios"] = {f"{q}_vs_{m}": {"epoch_speed": r["epoch_s"] / rows[q]["epoch_s"],
                                        "fixed_shape_speed": rows[q]["reviews_per_s"] / r["reviews_per_s"],
                                        "peak_memory": rows[q]["peak_memory_gib"] / r["peak_memory_gib"]}
                        for q in rows if q.startswith("qlora") for m, r in rows.items() if not m.startswith("qlora")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


def print_table(result):
    rows, peak, device = result["modes"], result["bf16_matmul_tflops"], result["device"]
    matmul = f", bf16 matmul {peak:.0f} TFLOP/s" if peak else ""
    print(f"\n{device}, {result['precision']}, seq {result['max_length']}, batch {result['batch_size']}, "
          f"epoch rate measured on {result['epoch_reviews']} reviews{matmul}")
    print("| mode | reviews/s (fixed shape) | tokens/s | % FLOP bound | peak GiB | epoch s (all reviews) | "
          "epoch reviews/s | epoch tokens/s | epoch peak GiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, r in rows.items():
        bound = f"{100 * r['flop_bound_fraction']:.1f}" if "flop_bound_fraction" in r else "n/a"
        full_epoch = "n/a" if r["full_epoch_s"] is None else f"{r['full_epoch_s']:.1f}"
        print(f"| {mode} | {r['reviews_per_s']:.1f} | {r['tokens_per_s']:.0f} | {bound} | {r['peak_memory_gib']:.2f} | "
              f"{full_epoch} | {r['epoch_reviews_per_s']:.1f} | {r['epoch_tokens_per_s']:.0f} | "
              f"{r['epoch_peak_memory_gib']:.2f} |")
    if "qlora" in rows:
        print(f"\npredict(): {rows['qlora']['predict_reviews_per_s']:.1f} reviews/s")
    for name, ratio in result["ratios"].items():
        print(f"{name}: epoch {ratio['epoch_speed']:.2f}x faster, fixed shape {ratio['fixed_shape_speed']:.2f}x, "
              f"peak memory {ratio['peak_memory']:.2f}x")


if __name__ == "__main__":
    main()

"""Training and prediction speed of peft_qlora.py against the notebook's recipe and two unquantized baselines.

On a bert-base-shaped model (random BertConfig() weights: the same FLOPs and bytes as bert-base-uncased) at
--max-length 512, in one run on one card:

  qlora   this project's training path with its defaults (peft_qlora.build_model and make_trainer)
  naive   the notebook's recipe: 4-bit base through prepare_model_for_kbit_training's defaults, every review
          padded to 512, random order, default Trainer settings (batch 8), bf16
  lora    plain LoRA (same config) on a bf16 base, no quantization, the project's data pipeline
  full    full fine-tuning in bf16 mixed precision, the project's data pipeline
  qlora-compile, lora-compile   the same with peft_qlora.py --fast-path compiled (each repeated layer compiled); the
          epoch includes the compilation, the fixed-shape rate does not (its warm-up does)
  qlora-16bit   qlora with its LoRA matrices and head stored in the training dtype instead of fp32, updated there
          (no fp32 master copies): a speed probe only, the most that fewer casts around LoRA and the head can gain;
          bf16 only (fp16's loss scaler unscales fp32 gradients alone)

Every mode but naive trains its steps the way peft_qlora.py would (peft_qlora.step_path: CUDA graphs on
a single GPU, unless --fast-path off). For each: a fixed shape (a plain loop of training steps on batches of
512-token reviews): reviews/s, tokens/s, peak memory, the fraction of the FLOP bound (the card's bf16 matmul
rate, measured in the same run), and a step's wall time against its GPU kernel time (torch.profiler over eager
steps of the same loop); and one epoch of the Trainer over real IMDb reviews: wall time, reviews/s, real
tokens/s, the FLOP-bound fraction over the real lengths, the share of padding, peak memory (allocated and
reserved). With the QLoRA model: the Trainer's evaluation rate, predict()'s rate over the same reviews, and the
wall time of the shell's `peft_qlora.py predict` of two texts with the model saved. --check-graphs N trains N
reviews for one epoch three times from the same seed, eager twice and with CUDA graphs, with dropout off and on,
and compares the losses and trained weights; --default-run TEST times `peft_qlora.py` with its defaults on --data and TEST. Then each of
issue 16's and issue 28's targets, with its figure and whether it is met.

    python benchmarks/bench.py --data ../shared/data/imdb/train.parquet --modes qlora lora full   # GPU, minutes
    python benchmarks/bench.py --data train.parquet --model ../shared/models/minilm-l6-h384-uncased --modes qlora
    python benchmarks/bench.py --data train.parquet --modes --check-graphs 1024 --default-run test.parquet
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

IMDB = peft_qlora.Classification(["neg", "pos"])  # what every benchmark here trains: IMDb's two classes

MODES = ("qlora", "naive", "lora", "full", "qlora-compile", "lora-compile", "qlora-16bit")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="parquet of reviews (text column): real lengths for the epoch")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model and a few steps: a smoke test for CPUs")
    p.add_argument("--model", help="a model folder to measure instead of the random bert-base-shaped one")
    p.add_argument("--batching", choices=["tokens", "texts"], help="peft_qlora.py's --batching for every mode but "
                   "naive (default: the script's)")
    p.add_argument("--pad-multiple", type=int, help="pad batches to a multiple of this many tokens instead of the "
                   "script's choice (64 on a GPU)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32, help="fixed-shape loop batch; the project's default too")
    p.add_argument("--steps", type=int, default=20, help="timed steps of the fixed-shape loop")
    p.add_argument("--epoch-reviews", default="all", help="reviews in the timed epoch, or 'all'")
    p.add_argument("--predict-reviews", type=int, default=5000, help="reviews predict() and the Trainer's "
                   "evaluation classify")
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    p.add_argument("--fast-path", choices=["graphs", "off"], default="graphs", help="peft_qlora.py's --fast-path "
                   "for every mode but naive (the -compile modes: compiled, unless off)")
    p.add_argument("--check-graphs", type=int, default=0, metavar="N", help="train N reviews with and without CUDA "
                   "graphs and compare")
    p.add_argument("--default-run", metavar="TEST", help="time peft_qlora.py with its defaults, trained on --data "
                   "and evaluated on this parquet")
    p.add_argument("--run-args", default="", help="flags added to --default-run's command, e.g. '--train-size all "
                   "--eval-size all'")
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


def make_model_folder(tiny, model=None):
    """A randomly initialised BERT saved with the bert-base-uncased WordPiece vocabulary, or the given model folder."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, BertConfig, BertForSequenceClassification

    if model:
        return model, AutoConfig.from_pretrained(model)
    config = (BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
              if tiny else BertConfig())
    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="bench-model-")
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(os.path.join(HERE, "vocab")).save_pretrained(folder)
    return folder, config


def build(mode, folder, cfg, runtime):
    """The model each recipe trains, and its tokenizer."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    mode = mode.removesuffix("-compile")  # compile_layers compiles the same model
    if mode in ("qlora", "qlora-16bit"):
        tokenizer = peft_qlora.check_model(cfg)
        model, _ = peft_qlora.build_model(cfg, tokenizer, IMDB, runtime)
        if mode == "qlora-16bit":
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(runtime.dtype)
        return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if mode == "naive":  # the same 4-bit model (a quantized head would crash), prepared with peft's defaults
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, **peft_qlora.quantized_load_kwargs(IMDB, runtime))
        lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                          target_modules=["query", "value"])
        return get_peft_model(prepare_model_for_kbit_training(model), lora), tokenizer
    # lora: a 16-bit base; full: every weight in fp32, bf16 mixed precision
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=2, dtype=runtime.dtype if mode == "lora" else torch.float32,
        device_map={"": runtime.device})
    if mode == "full":
        return model, tokenizer
    # QLoRA's settings: the same LoRA, and the same modules trained beside it (the head, BERT's pooler)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=["query", "value"],
                      modules_to_save=list(peft_qlora.trainable_heads(model)))
    model = get_peft_model(model, lora)
    for p in model.parameters():  # adapters and heads train in fp32, as in the QLoRA path
        if p.requires_grad:
            p.data = p.data.float()
    return model, tokenizer


def fixed_shape(model, args, runtime, vocab_size, graphs, compiled):
    """Training steps on full 512-token batches in a plain loop: the rate the FLOP bound is compared with. With
    graphs, forward and backward run through peft_qlora.StepGraphs, as the script's steps do. Returns (reviews/s,
    peak memory, warm-up s, wall ms a step, GPU kernel ms a step of the eager loop, or None on a CPU)."""
    import torch

    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, vocab_size, (args.batch_size, args.max_length), generator=gen),
             "labels": torch.randint(0, 2, (args.batch_size,), generator=gen)}
    batch = {name: t.to(device) for name, t in batch.items()}  # no padding, so no attention mask (as collate gives)
    model.train()
    autocast = torch.autocast(device.type, dtype=runtime.dtype, enabled=runtime.precision != "fp32")
    step_graphs = peft_qlora.StepGraphs(model.parameters(), compiled) if graphs else None

    def forward_backward(tensors):
        with autocast:
            loss = model(**tensors).loss
        loss.backward()
        return loss.detach()

    def step(run=forward_backward):
        run(batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def graphed(tensors):
        return step_graphs(forward_backward, tensors)

    kernel_ms, kernel_table = None, None
    with peft_qlora.attention_kernels(runtime.device):  # the attention kernels training uses
        start = time.perf_counter()
        for _ in range(3):
            step()
        sync()
        warmup = time.perf_counter() - start  # compiled: mostly the compilation
        if device.type == "cuda":  # the GPU's work in a step, from eager steps
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                sync()
            kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
            kernel_ms = sum(e.self_device_time_total for e in kernels) / 5 / 1000
            kernel_table = [{"kernel": e.key[:120], "calls_per_step": e.count / 5,
                             "ms_per_step": e.self_device_time_total / 5 / 1000}
                            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]]
            kernel_table.append({"kernel": "all", "calls_per_step": sum(e.count for e in kernels) / 5,
                                 "ms_per_step": kernel_ms})
        if graphs:
            for _ in range(3):  # the first call is eager, the second captures
                step(graphed)
            sync()
        reset_memory()
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(graphed if graphs else forward_backward)
        sync()
        seconds = time.perf_counter() - start
    return (args.steps * args.batch_size / seconds, peft_qlora.peak_memory(device), warmup,
            seconds / args.steps * 1000, kernel_ms, kernel_table)


def predict_rate(classifier, texts, batch_size):
    """predict()'s classification of texts, after a warm-up batch: (reviews/s, the probabilities, the share of the
    wall time the GPU spent in kernels)."""
    classifier.probabilities(texts[:256], batch_size)
    sync()
    start = time.perf_counter()
    probabilities = classifier.probabilities(texts, batch_size)
    sync()
    seconds = time.perf_counter() - start
    kernels = kernel_seconds(lambda: classifier.probabilities(texts, batch_size))
    return len(texts) / seconds, probabilities, kernels / seconds


def kernel_seconds(run):
    """The GPU's kernel time while run() runs (torch.profiler, in a pass of its own: profiling slows the CPU), or
    nan on a CPU. Against the same work's unprofiled wall time it says how much a faster launch (CUDA graphs) could
    gain: at a share near 1 the GPU never waits."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return float("nan")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        sync()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6


def evaluation_rate(trainer, tokenizer, texts, cfg, runtime):
    """The Trainer's evaluation of the trained model over texts, tokenised beforehand as the script does: (reviews/s,
    after a warm-up on the first 256; the share of the wall time the GPU spent in kernels)."""
    from datasets import Dataset

    data = peft_qlora.tokenize(Dataset.from_dict({"text": texts, "labels": [i % 2 for i in range(len(texts))]}),
                               tokenizer, cfg.max_length, cfg.truncation, sort_by_length=True)
    with peft_qlora.attention_kernels(runtime.device):
        trainer.predict(data.select(range(min(256, len(data)))))
        sync()
        start = time.perf_counter()
        trainer.predict(data)
        sync()
        seconds = time.perf_counter() - start
        return len(texts) / seconds, kernel_seconds(lambda: trainer.predict(data)) / seconds


def shell_predict_seconds(trainer, cfg, runtime, workdir):
    """Wall time of `python peft_qlora.py predict TEXT TEXT` in a fresh process, with the trained model saved as a
    training run saves it: what a user waits for in the shell."""
    import subprocess

    model_dir = os.path.join(workdir, "model")
    peft_qlora.save(trainer, {"label_names": IMDB.label_names, "task": IMDB.to_dict(), "config": dataclasses.asdict(cfg),
                              "batches": trainer.plan._asdict(), "precision": runtime.precision}, model_dir)
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(os.path.dirname(HERE), "peft_qlora.py"), "predict", "--model-dir",
                    model_dir, "A wonderful film.", "Two hours I will never get back."], check=True,
                   capture_output=True)
    return time.perf_counter() - start


def training_alone(trainer):
    """The script's Trainer without the evaluation and the checkpoint it adds at each epoch's end, so that an epoch's
    time is its training steps' (full fine-tuning's checkpoint would be the whole model and its optimizer)."""
    trainer.args.eval_strategy = trainer.args.save_strategy = "no"  # read at each epoch's end
    return trainer


def one_epoch(mode, model, tokenizer, texts, cfg, runtime, workdir, config):
    """One epoch of the Trainer over real reviews, as each recipe feeds them. Returns (figures, the Trainer)."""
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
        trainer = training_alone(peft_qlora.make_trainer(
            cfg, model, tokenizer, peft_qlora.Tokenized(data, None, data.select(range(8))), IMDB, runtime))
    padding = padding_share(trainer)
    reset_memory()
    with peft_qlora.attention_kernels(runtime.device):
        start = time.perf_counter()
        trainer.train()
        sync()
        seconds = time.perf_counter() - start
    # Tokens each review really has at this length (padding not counted), the same for every recipe
    lengths = list(map(len, peft_qlora.encode(tokenizer, texts, cfg.max_length, "head")["input_ids"]))
    flops = sum(flops_per_review(config, n, full=mode == "full") for n in lengths)
    graphs = getattr(trainer, "step_graphs", None)
    return {"epoch_s": seconds, "epoch_reviews_per_s": len(texts) / seconds,
            "epoch_tokens_per_s": sum(lengths) / seconds, "epoch_tflops": flops / seconds / 1e12,
            "epoch_peak_memory_gib": peft_qlora.peak_memory(runtime.device) / 2**30,
            "epoch_peak_reserved_gib": peak_reserved(runtime.device) / 2**30, "epoch_padding_share": padding,
            "cuda_graphs": None if graphs is None else graphs.summary(),
            "batch_size": trainer.args.per_device_train_batch_size, "micro_batches": len(trainer.train_dataset),
            "epochs": trainer.state.epoch, "optimizer_steps": trainer.state.global_step,
            "reviews_per_step": len(texts) / trainer.state.global_step}, trainer


def padding_share(trainer):
    """The share of the epoch's batch tokens that are padding, over the Trainer's own batches (collated on the CPU,
    in a pass of their own)."""
    real = padded = 0
    for batch in trainer.get_train_dataloader():
        tokens = batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else tokens  # none: no padding
        padded += tokens
    return 1 - real / padded


def peak_reserved(device):
    """The most the allocator held from the GPU, the CUDA graphs' memory pool included (which the allocated peak
    does not count once a capture ends)."""
    import torch

    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0


def check_graphs(folder, cfg, runtime, texts):
    """One epoch of QLoRA over texts trained from the same seed, eager and with CUDA graphs, with every dropout off
    (then both compute the same numbers, up to the GPU's own non-determinism) and on (then their random numbers
    differ): for each pair, the mean training losses and how far apart the trained weights end."""
    return {"without_dropout": compare_graphs(folder, cfg, runtime, texts, dropout=False),
            "with_dropout": compare_graphs(folder, cfg, runtime, texts, dropout=True)}


def compare_graphs(folder, cfg, runtime, texts, dropout):
    """The eager and graphed runs of check_graphs: losses, and the largest weight difference over the largest
    weight."""
    import torch
    import torch._dynamo
    from datasets import Dataset
    from transformers import set_seed

    runs = {}
    modes = [("eager", False, False), ("eager_again", False, False), ("graphs", True, False)]
    if runtime.device.type == "cuda":  # elsewhere the steps are eager, and compiling on a CPU is slow
        modes.append(("compiled_graphs", True, True))
    for name, graphs, compiled in modes:
        set_seed(cfg.seed)
        model, tokenizer = build("qlora", folder, cfg, runtime)
        if not dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        data = peft_qlora.tokenize(Dataset.from_dict({"text": texts, "labels": [i % 2 for i in range(len(texts))]}),
                                   tokenizer, cfg.max_length, cfg.truncation)
        run_cfg = dataclasses.replace(cfg, fast_path="compiled" if compiled else "graphs" if graphs else "off",
                                      output_dir=tempfile.mkdtemp(prefix="bench-check-"))
        trainer = training_alone(peft_qlora.make_trainer(
            run_cfg, model, tokenizer, peft_qlora.Tokenized(data, None, data.select(range(8))), IMDB, runtime))
        result = trainer.train()
        graph_counts = getattr(trainer, "step_graphs", None)
        runs[name] = {"train_loss": result.training_loss,
                      "cuda_graphs": graph_counts and graph_counts.summary(),
                      "weights": {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}}
        del model, trainer
        torch._dynamo.reset()
        reset_memory()
    eager, again, graphed = (runs[name]["weights"] for name in ("eager", "eager_again", "graphs"))
    compiled = runs.get("compiled_graphs")  # None on a CPU
    scale = max(w.abs().max().item() for w in eager.values())

    def apart(a, b):
        return max((a[n] - b[n]).abs().max().item() for n in a) / scale

    # Two eager runs differ too (the GPU's atomics in attention's backward pass, amplified by Adam over the steps):
    # their difference is the floor the graphed run is compared with
    return {"reviews": len(texts), "train_loss_eager": runs["eager"]["train_loss"],
            "train_loss_eager_again": runs["eager_again"]["train_loss"],
            "train_loss_graphs": runs["graphs"]["train_loss"], "cuda_graphs": runs["graphs"]["cuda_graphs"],
            "train_loss_compiled_graphs": compiled and compiled["train_loss"],
            "compiled_cuda_graphs": compiled and compiled["cuda_graphs"],
            "weights_max_abs": scale, "relative_difference": apart(eager, graphed),
            "relative_difference_compiled_graphs": compiled and apart(eager, compiled["weights"]),
            "relative_difference_eager_again": apart(eager, again),
            "weights_finite": bool(all(torch.isfinite(w).all()
                                       for run in runs.values() for w in run["weights"].values()))}


def default_run(folder, train_file, test_file, extra_flags):
    """`python peft_qlora.py --model FOLDER --train-file --eval-file` with every other setting its default (but
    extra_flags), in a fresh process: the whole command's wall time, and what its metrics.json says of the run."""
    import subprocess

    out = tempfile.mkdtemp(prefix="bench-default-")
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(os.path.dirname(HERE), "peft_qlora.py"), "--model", folder,
                    "--train-file", train_file, "--eval-file", test_file, "--output-dir", out, "--images-dir",
                    os.path.join(out, "images"), *extra_flags], check=True)
    seconds = time.perf_counter() - start
    with open(os.path.join(out, "model", "metrics.json")) as f:
        metrics = json.load(f)
    training = metrics["training"]
    return {"command_s": seconds, "train_runtime_s": training["train_runtime_s"],
            "train_texts_per_s": training["train_texts_per_s"], "epochs": len(metrics["history"]),
            "train_texts": metrics["config"]["train_size"], "cuda_graphs": training.get("cuda_graphs"),
            "peak_memory_gib": training["peak_memory_bytes"] / 2**30, "accuracy_before": metrics["before"]["accuracy"],
            "accuracy": metrics["after"]["accuracy"], "f1": metrics["after"]["f1"]}


def main():
    args = parse_args()  # first: --help needs none of the frameworks
    import pyarrow.parquet as pq
    import torch

    texts = pq.read_table(args.data, columns=["text"]).column("text").to_pylist()
    epoch_texts = texts if args.epoch_reviews == "all" else texts[:int(args.epoch_reviews)]
    folder, config = make_model_folder(args.tiny, args.model)
    runtime = peft_qlora.decide_runtime("auto")
    if args.pad_multiple:
        runtime = dataclasses.replace(runtime, pad_multiple=args.pad_multiple)
    workdir = tempfile.mkdtemp(prefix="bench-run-")
    # One epoch: the timed epoch of every mode covers each review once, in batches of the size asked for
    cfg = peft_qlora.parse_args(["--model", folder, "--max-length", str(args.max_length), "--epochs", "1",
                                 "--batch-size", str(args.batch_size), "--micro-batch-size", str(args.batch_size),
                                 "--eval-batch-size", str(peft_qlora.DEFAULT_EVAL_BATCH),
                                 "--gradient-checkpointing", "off", "--output-dir", workdir,
                                 "--fast-path", args.fast_path]
                                + (["--batching", args.batching] if args.batching else []))
    peak = matmul_peak_tflops()
    rows, extra = {}, {}
    if args.check_graphs:
        extra["graph_check"] = check_graphs(folder, cfg, runtime, texts[:args.check_graphs])
        print("graph check", json.dumps(extra["graph_check"]), flush=True)
    if args.default_run:
        extra["default_run"] = default_run(folder, args.data, args.default_run, args.run_args.split())
        print("default run", json.dumps(extra["default_run"]), flush=True)
    for mode in args.modes:
        compiled = mode.endswith("-compile")
        mode_cfg = dataclasses.replace(cfg, fast_path="compiled") if compiled and args.fast_path != "off" else cfg
        if mode == "full":  # Liger-Kernel (decoders only) is applied through the peft model, which full lacks
            mode_cfg = dataclasses.replace(mode_cfg, liger="off")
        reset_memory()
        model, tokenizer = build(mode, folder, mode_cfg, runtime)
        path, _ = peft_qlora.step_path(mode_cfg, runtime,
                                       peft_qlora.BatchPlan(args.batch_size, 1, peft_qlora.DEFAULT_EVAL_BATCH, False))
        graphs = mode != "naive" and path == "graphs"
        peft_qlora.padding_attention(model, runtime, graphs)  # as make_trainer sets the model up
        if compiled:
            peft_qlora.compile_layers(model)
        rate, memory, warmup, wall_ms, kernel_ms, kernel_table = fixed_shape(model, args, runtime, config.vocab_size,
                                                                             graphs, compiled)
        row = {"reviews_per_s": rate, "tokens_per_s": rate * args.max_length, "peak_memory_gib": memory / 2**30,
               "warmup_s": warmup, "step_wall_ms": wall_ms, "step_kernel_ms": kernel_ms, "fixed_shape_graphs": graphs,
               "step_kernels": kernel_table}
        if peak:
            flops = flops_per_review(config, args.max_length, full=mode == "full")
            row["flop_bound_fraction"] = rate * flops / (peak * 1e12)
        del model
        torch._dynamo.reset()  # the epoch compiles afresh, so its time includes the compilation
        reset_memory()
        model, tokenizer = build(mode, folder, mode_cfg, runtime)  # fresh weights and optimizer (make_trainer compiles)
        epoch, trainer = one_epoch(mode, model, tokenizer, epoch_texts, mode_cfg, runtime, workdir, config)
        row.update(epoch)
        if peak:
            row["epoch_flop_bound_fraction"] = row["epoch_tflops"] / peak
        if mode == "qlora":  # the trained model evaluated by the Trainer, from the shell, and served as predict()
            served = texts[:args.predict_reviews]
            row["evaluation_reviews_per_s"], row["evaluation_kernel_share"] = evaluation_rate(
                trainer, tokenizer, served, mode_cfg, runtime)
            row["shell_predict_s"] = shell_predict_seconds(trainer, mode_cfg, runtime, workdir)
            classifier = peft_qlora.Classifier(peft_qlora.serving_model(model, runtime), tokenizer, IMDB,
                                               args.max_length, cfg.truncation, runtime, peft_qlora.DEFAULT_EVAL_BATCH)
            row["predict_reviews_per_s"], _, row["predict_kernel_share"] = predict_rate(
                classifier, served, peft_qlora.DEFAULT_EVAL_BATCH)
        rows[mode] = row
        del model, trainer
        print(mode, json.dumps(row), flush=True)
        report(rows, extra, args, peak, runtime, len(epoch_texts), len(texts), cfg, config)  # after each mode
    print_table(report(rows, extra, args, peak, runtime, len(epoch_texts), len(texts), cfg, config))


# Issue 16's baselines, measured before the fast path (benchmarks/NOTES.md): the QLoRA epoch's peak memory at
# bert-base shape, and SmolLM2's training rate with the defaults, both on an H200
BASELINE_EPOCH_PEAK_GIB = 5.16
BASELINE_SMOLLM2_TEXTS_PER_S = 99.5
MINILM_DEFAULT_ACCURACY, MINILM_ALL_IMDB_ACCURACY = 0.886, 0.9223


def which_model(args, config) -> str:
    """The model a target is set for: bert-base (the random shape), minilm, smollm2, or other."""
    if args.tiny:
        return "tiny"
    if not args.model:
        return "bert-base"
    return {("bert", 384): "minilm", ("llama", 576): "smollm2"}.get((config.model_type, config.hidden_size), "other")


def targets(rows, extra, epoch_reviews, all_reviews, device, model, args):
    """Issue 16's and issue 28's targets that this run measured: (target, figure, met)."""
    out = []
    q = rows.get("qlora")
    for base, floor in (("full", 1.2), ("lora", 1.0)):
        if q and base in rows:
            ratio = q["epoch_reviews_per_s"] / rows[base]["epoch_reviews_per_s"]
            out.append((f"1. QLoRA's epoch >= {floor}x {base}'s ({'full fine-tuning' if base == 'full' else 'bf16 LoRA'})",
                        f"{ratio:.2f}x", ratio >= floor))
    if q and model == "bert-base":
        out.append((f"1. QLoRA's epoch peak memory <= {BASELINE_EPOCH_PEAK_GIB} GiB (judged on the allocator's "
                    "reserved peak, the CUDA graphs' pool included)",
                    f"reserved {q['epoch_peak_reserved_gib']:.2f} GiB, allocated {q['epoch_peak_memory_gib']:.2f} GiB",
                    q["epoch_peak_reserved_gib"] <= BASELINE_EPOCH_PEAK_GIB))
        if epoch_reviews == all_reviews:
            out.append((f"2. an epoch of all {all_reviews:,} reviews in at most 16 s on an H100 (QLoRA)",
                        f"{q['epoch_s']:.1f} s on {device}", q["epoch_s"] <= 16 and "H100" in device))
        if "epoch_flop_bound_fraction" in q:
            out.append(("2. at least 20% of the FLOP bound over real lengths (QLoRA)",
                        f"{100 * q['epoch_flop_bound_fraction']:.1f}%", q["epoch_flop_bound_fraction"] >= 0.20))
    run = extra.get("default_run")
    all_data = run and run["train_texts"] is None
    if run and model == "bert-base" and not all_data:
        out.append(("3. the default run's 3 training epochs in at most 12 s, captures included",
                    f"{run['train_runtime_s']:.1f} s", run["train_runtime_s"] <= 12 and run["epochs"] == 3))
        out.append(("3. the whole default command in at most 45 s", f"{run['command_s']:.1f} s", run["command_s"] <= 45))
    if run and model == "smollm2" and not all_data:
        floor = 3 * BASELINE_SMOLLM2_TEXTS_PER_S
        out.append((f"4. SmolLM2-135M with the defaults: at least {floor:.1f} reviews/s (3x {BASELINE_SMOLLM2_TEXTS_PER_S})",
                    f"{run['train_texts_per_s']:.1f}", run["train_texts_per_s"] >= floor))
    if q and q["step_kernel_ms"] and args.batch_size == 32 and args.max_length == 512:
        ratio = q["step_wall_ms"] / q["step_kernel_ms"]
        out.append(("5. a QLoRA step at 32 x 512: GPU kernels at most 28 ms, wall time within 1.15x of them",
                    f"{q['step_wall_ms']:.1f} / {q['step_kernel_ms']:.1f} ms = {ratio:.2f}x",
                    ratio <= 1.15 and q["step_kernel_ms"] <= 28))
    if run and model == "minilm":
        expected, within = (MINILM_ALL_IMDB_ACCURACY, 0.003) if all_data else (MINILM_DEFAULT_ACCURACY, 0.005)
        out.append((f"6. MiniLM {'on all of IMDb' if all_data else 'with the defaults'}: accuracy within "
                    f"{100 * within:.1f} points of {expected}", f"{run['accuracy']:.4f}",
                    abs(run["accuracy"] - expected) <= within))
    check = extra.get("graph_check")
    if check:
        same = check["without_dropout"]
        floor = same["relative_difference_eager_again"]
        out.append(("without dropout, CUDA-graph training ends as near eager training as a second eager run does "
                    "(weights: at most 2x that run's difference, or 1e-3; mean loss within 1e-3)",
                    f"weights {same['relative_difference']:.2e} (eager twice: {floor:.2e}), losses "
                    f"{same['train_loss_eager']:.5f} / {same['train_loss_graphs']:.5f}",
                    same["relative_difference"] <= max(2 * floor, 1e-3) and same["weights_finite"]
                    and abs(same["train_loss_eager"] - same["train_loss_graphs"]) <= 1e-3))
    return [{"target": t, "measured": m, "met": bool(ok)} for t, m, ok in out]


def report(rows, extra, args, peak, runtime, epoch_reviews, all_reviews, cfg, config):
    """The results so far, written to --out."""
    device = peft_qlora.device_name(runtime)
    result = {"device": device, "precision": runtime.precision, "bf16_matmul_tflops": peak,
              "max_length": args.max_length, "batch_size": args.batch_size, "batching": cfg.batching,
              "pad_multiple": runtime.pad_multiple,
              "model": args.model or ("tiny random BERT" if args.tiny else "random bert-base shape"),
              "epoch_reviews": epoch_reviews, "tiny": args.tiny, "versions": peft_qlora.versions(), "modes": rows,
              "fast_path": args.fast_path, **extra, "command": " ".join(sys.argv)}
    for mode, row in rows.items():  # an epoch over every review of --data, from the rate on epoch_reviews;
        # not for compiled modes on a part of the data: their time includes the one-off compilation
        partial_compiled = mode.endswith("-compile") and epoch_reviews < all_reviews
        row["full_epoch_s"] = None if partial_compiled else all_reviews / row["epoch_reviews_per_s"]
    result["ratios"] = {f"{q}_vs_{m}": {"epoch_speed": r["epoch_s"] / rows[q]["epoch_s"],
                                        "fixed_shape_speed": rows[q]["reviews_per_s"] / r["reviews_per_s"],
                                        "peak_memory": rows[q]["peak_memory_gib"] / r["peak_memory_gib"]}
                        for q in rows if q.startswith("qlora") for m, r in rows.items() if not m.startswith("qlora")}
    result["targets"] = targets(rows, extra, epoch_reviews, all_reviews, device, which_model(args, config), args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


def print_table(result):
    rows, peak, device = result["modes"], result["bf16_matmul_tflops"], result["device"]
    matmul = f", bf16 matmul {peak:.0f} TFLOP/s" if peak else ""
    print(f"\n{device}, {result['model']}, {result['precision']}, seq {result['max_length']}, batch "
          f"{result['batch_size']} ({result['batching']}), epoch rate measured on {result['epoch_reviews']} "
          f"reviews{matmul}")
    print("| mode | reviews/s (fixed shape) | tokens/s | % FLOP bound | peak GiB | epoch s (all reviews) | "
          "epoch reviews/s | epoch tokens/s | epoch % FLOP bound | epoch peak GiB | reviews a step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, r in rows.items():
        bound = f"{100 * r['flop_bound_fraction']:.1f}" if "flop_bound_fraction" in r else "n/a"
        epoch_bound = f"{100 * r['epoch_flop_bound_fraction']:.1f}" if "epoch_flop_bound_fraction" in r else "n/a"
        full_epoch = "n/a" if r["full_epoch_s"] is None else f"{r['full_epoch_s']:.1f}"
        print(f"| {mode} | {r['reviews_per_s']:.1f} | {r['tokens_per_s']:.0f} | {bound} | {r['peak_memory_gib']:.2f} | "
              f"{full_epoch} | {r['epoch_reviews_per_s']:.1f} | {r['epoch_tokens_per_s']:.0f} | {epoch_bound} | "
              f"{r['epoch_peak_memory_gib']:.2f} | {r['reviews_per_step']:.1f} |")
    for mode, r in rows.items():
        kernel = f", GPU kernels {r['step_kernel_ms']:.1f} ms" if r["step_kernel_ms"] else ""
        print(f"{mode}: fixed-shape step {r['step_wall_ms']:.1f} ms{kernel} ({'CUDA graphs' if r['fixed_shape_graphs'] else 'eager'}); "
              f"epoch padding {100 * r['epoch_padding_share']:.1f}%, peak reserved {r['epoch_peak_reserved_gib']:.2f} GiB, "
              f"steps {r['cuda_graphs'] or 'eager'}")
    if "qlora" in rows:
        q = rows["qlora"]
        print(f"\npredict(): {q['predict_reviews_per_s']:.1f} reviews/s (GPU kernels {q['predict_kernel_share']:.0%} of "
              f"its wall time); the Trainer's evaluation: {q['evaluation_reviews_per_s']:.1f} reviews/s (kernels "
              f"{q['evaluation_kernel_share']:.0%}); shell predict of two texts: {q['shell_predict_s']:.1f} s")
    for name, ratio in result["ratios"].items():
        print(f"{name}: epoch {ratio['epoch_speed']:.2f}x faster, fixed shape {ratio['fixed_shape_speed']:.2f}x, "
              f"peak memory {ratio['peak_memory']:.2f}x")
    print("\n| target | measured | met |\n| --- | --- | --- |")
    for t in result["targets"]:
        print(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")


if __name__ == "__main__":
    main()

"""Where a QLoRA training step's time goes, on a GPU, at bert-base shape (random weights).

Times a plain loop of steps with an all-ones, a padded and no attention mask, then with a new sequence
length every step, then the Trainer on constant-length data, and prints two torch.profiler tables (by GPU
time and by CPU time) for one Trainer epoch. The figures quoted in benchmarks/NOTES.md came from this script as
it was then; it has since moved to the runtime and make_trainer's parameters and has not run on a GPU again.

    python benchmarks/profile_step.py
"""
import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import bench  # noqa: E402
import peft_qlora  # noqa: E402


def timed(model, optimizer, batches):
    """Seconds per training step over the given (input_ids, attention_mask) batches."""
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    for ids, mask in batches:
        labels = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(batches)


def main():
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # no settings; --help says what it does
    import torch
    from datasets import Dataset
    from torch.profiler import ProfilerActivity, profile

    folder, _ = bench.make_model_folder(tiny=False)
    cfg = peft_qlora.parse_args(["--model", folder, "--max-length", "512", "--epochs", "1", "--micro-batch-size", "32",
                                 "--gradient-checkpointing", "off", "--output-dir", tempfile.mkdtemp()])  # batch 32
    runtime = peft_qlora.decide_runtime("bf16")
    tokenizer = peft_qlora.check_model(cfg)
    model, _ = peft_qlora.build_model(cfg, tokenizer, bench.IMDB, runtime)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

    ids = torch.randint(1000, 30000, (32, 512), device="cuda")
    padded = torch.ones_like(ids)
    padded[::2, 256:] = 0
    short = ids[:, :272].contiguous()
    for label, batch in (("all-ones mask 32x512", (ids, torch.ones_like(ids))), ("padded mask 32x512", (ids, padded)),
                         ("no mask 32x512", (ids, None)), ("all-ones mask 32x272", (short, torch.ones_like(short)))):
        timed(model, optimizer, [batch] * 3)  # warm-up
        seconds = timed(model, optimizer, [batch] * 10)
        print(f"{label}: {seconds * 1000:.1f} ms/step, {32 / seconds:.0f} reviews/s", flush=True)

    changing = []
    for length in range(200, 512, 8):
        mask = torch.ones_like(ids[:, :length])
        mask[::2, length // 2:] = 0
        changing.append((ids[:, :length].contiguous(), mask))
    print(f"new shape each step (200..512), padded mask: {timed(model, optimizer, changing) * 1000:.1f} ms/step",
          flush=True)

    data = Dataset.from_dict({"input_ids": [list(range(1000, 1512))] * 1600, "labels": [0, 1] * 800})
    trainer = bench.training_alone(peft_qlora.make_trainer(
        cfg, model, tokenizer, peft_qlora.Tokenized(data, None, data.select(range(8))), bench.IMDB, runtime))
    torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"Trainer, 1600 reviews of 512 tokens: {seconds:.1f} s, {1600 / seconds:.0f} reviews/s", flush=True)

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.train()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15), flush=True)


if __name__ == "__main__":
    main()

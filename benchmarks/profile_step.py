"""Where a QLoRA training step's time goes: fixed vs changing shapes, masks, the Trainer, and a torch.profiler table.

Diagnostic for benchmarks/NOTES.md (GPU only; bert-base shape, random weights):
    python benchmarks/profile_step.py
"""
import os, sys, time, tempfile, torch
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE)); sys.path.insert(0, HERE)
import peft_qlora, bench
folder, config = bench.make_model_folder(False)
cfg = peft_qlora.parse_args(["--model", folder, "--max-length", "512", "--output-dir", tempfile.mkdtemp()])
model, tok, _ = peft_qlora.build_model(cfg, ["neg", "pos"], "bf16")
dev = "cuda"
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
def run(ids, mask, n=10, label=""):
    labels = torch.zeros(ids.shape[0], dtype=torch.long, device=dev)
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    for _ in range(3): step()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): step()
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / n
    print(f"{label}: {dt*1000:.1f} ms/step, {ids.shape[0]/dt:.0f} reviews/s", flush=True)
model.train()
ids = torch.randint(1000, 30000, (32, 512), device=dev)
run(ids, torch.ones_like(ids), label="all-ones mask 32x512")
m = torch.ones_like(ids); m[::2, 256:] = 0
run(ids, m, label="padded mask 32x512")
run(ids, None, label="no mask 32x512")
ids2 = ids[:, :272].contiguous()
run(ids2, torch.ones_like(ids2), label="all-ones mask 32x272")
# varying lengths, new shape each step
torch.cuda.synchronize(); t = time.perf_counter()
for L in range(200, 512, 8):
    x = ids[:, :L].contiguous(); mm = torch.ones_like(x); mm[::2, L//2:] = 0
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=x, attention_mask=mm, labels=torch.zeros(32, dtype=torch.long, device=dev)).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
torch.cuda.synchronize(); n = len(range(200, 512, 8)); dt = (time.perf_counter() - t) / n
print(f"new shape each step (200..512), padded mask: {dt*1000:.1f} ms/step", flush=True)
# Trainer on constant-length data
from datasets import Dataset
data = Dataset.from_dict({"input_ids": [list(range(1000, 1512))] * 1600, "labels": [0, 1] * 800})
trainer = peft_qlora.make_trainer(model, tok, data, data.select(range(8)), cfg, "bf16", tempfile.mkdtemp())
trainer.args.eval_strategy = trainer.args.save_strategy = "no"; trainer.args.disable_tqdm = True
torch.cuda.synchronize(); t = time.perf_counter(); trainer.train(); torch.cuda.synchronize()
dt = time.perf_counter() - t
print(f"Trainer, 1600 reviews of 512 tokens: {dt:.1f} s, {1600/dt:.0f} reviews/s", flush=True)
from torch.profiler import profile, ProfilerActivity
trainer.args.num_train_epochs = 1
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    trainer.train()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15), flush=True)

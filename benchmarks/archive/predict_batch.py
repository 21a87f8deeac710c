"""One-off lever measurement at bert-base shape (random weights), run once on an H100 from the repository root
with the GPU kit staged in .gpu/ (../shared/gpu/README.md):

    python benchmarks/experiments/predict_batch.py

predict()'s rate over 5,000 reviews with the 4-bit layers (batch 128) and dequantized once (batch 128, 256, 512),
and the tokenizer's own rate. Result: benchmarks/results/predict_batch_h100.json.
"""
import json, os, sys, time
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import bench, peft_qlora
import pyarrow.parquet as pq
OUT = os.environ.get("OUT", "/tmp")
res = {"device": peft_qlora.device_name()}
folder, config = bench.make_model_folder(False)
cfg = peft_qlora.parse_args(["--model", folder, "--output-dir", "/tmp/x"])
texts = pq.read_table(".gpu/imdb/train.parquet", columns=["text"]).column("text").to_pylist()[:5000]
model, tok = bench.build("qlora", folder, cfg, "bf16")
def timed(name, c, bs):
    res[name], _ = bench.predict_rate(c, texts, bs)
    print(name, res[name], flush=True)
model.eval()
four = peft_qlora.Classifier(model, tok, ["neg", "pos"], 512, "head+tail", "bf16")
timed("4bit_b128", four, 128)
c = peft_qlora.make_classifier(model, tok, ["neg", "pos"], 512, "head+tail", "bf16")
for bs in (128, 256, 512):
    timed(f"dequant_b{bs}", c, bs)
t = time.perf_counter(); peft_qlora.encode(tok, texts, 512, "head+tail"); res["tokenize_rate"] = 5000 / (time.perf_counter() - t)
json.dump(res, open(os.path.join(OUT, "exp3.json"), "w"), indent=2); print(res)

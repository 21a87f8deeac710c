"""One-off lever measurement at bert-base shape (random weights), run once on an H200 from the repository root
with the GPU kit staged in .gpu/ (../shared/gpu/README.md):

    python benchmarks/experiments/compile_epoch_and_predict.py predict fixed epoch

predict: predict()'s rate without a per-batch wait for the GPU, batch 64/128/256, 4-bit and dequantized once;
fixed: torch.compile'd QLoRA without graph breaks, batch 32 and 128; epoch: two Trainer epochs over 8,000 reviews,
eager and with --compile, timing each epoch. Result: benchmarks/results/compile_and_predict_levers_h200.json.
"""
import json, os, sys, time, types
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import torch, bench, peft_qlora
import pyarrow.parquet as pq
OUT = os.environ.get("OUT", "/tmp")
res = {"device": peft_qlora.device_name()}
def dump(): json.dump(res, open(os.path.join(OUT, "exp2.json"), "w"), indent=2)
folder, config = bench.make_model_folder(False)
texts = pq.read_table(".gpu/imdb/test.parquet", columns=["text"]).column("text").to_pylist()
res["peak_tflops"] = bench.matmul_peak_tflops()
which = sys.argv[1:]
def cfg_for(*extra):
    return peft_qlora.parse_args(["--model", folder, "--output-dir", "/tmp/x", *extra])
if "predict" in which:
    cfg = cfg_for()
    model, tok = bench.build("qlora", folder, cfg, "bf16")
    clf = peft_qlora.Classifier(model, tok, ["neg", "pos"], 512, "head+tail", "bf16")
    sample = texts[:5000]
    def timed(name, c, bs=128):
        rate, p = bench.predict_rate(c, sample, bs)
        res[name] = {"rate": rate}
        print(name, res[name], flush=True); dump()
        return p
    p0 = timed("predict_nosync", clf)
    timed("predict_nosync_b256", clf, 256)
    timed("predict_nosync_b64", clf, 64)
    model.dequantize(dtype=torch.bfloat16)
    p1 = timed("predict_nosync_dequant", clf)
    timed("predict_nosync_dequant_b256", clf, 256)
    res["dequant_maxdiff"] = max(abs(a[1] - b[1]) for a, b in zip(p0, p1))
    dump()
if "fixed" in which:
    cfg = cfg_for()
    for bs in [32, 128]:
        bench.reset_memory()
        model, tok = bench.build("qlora", folder, cfg, "bf16")
        model = torch.compile(model)
        ns = types.SimpleNamespace(batch_size=bs, max_length=512, steps=20)
        t = time.perf_counter()
        rate, mem = bench.fixed_shape(model, ns, "bf16", config.vocab_size)
        r = {"rate": rate, "mem_gib": mem / 2**30, "wall_s": time.perf_counter() - t,
             "flop_frac": rate * bench.flops_per_review(config, 512, False) / (res["peak_tflops"] * 1e12)}
        res[f"qlora_compile_nobreak_b{bs}"] = r; print(bs, r, flush=True); dump()
        del model; torch._dynamo.reset()
if "epoch" in which:
    from datasets import Dataset
    sub = texts[:8000]
    for extra in [[], ["--compile"]]:
        bench.reset_memory()
        cfg = cfg_for(*extra)
        model, tok = bench.build("qlora", folder, cfg, "bf16")
        data = peft_qlora.tokenize(Dataset.from_dict({"text": sub, "labels": [i % 2 for i in range(len(sub))]}),
                                   tok, 512, "head+tail")
        trainer = peft_qlora.make_trainer(model, tok, data, data.select(range(8)), cfg, "bf16", "/tmp/ck")
        trainer.args.eval_strategy = trainer.args.save_strategy = "no"
        trainer.args.num_train_epochs = 2
        trainer.args.disable_tqdm = True
        from transformers import TrainerCallback
        marks = []
        class Mark(TrainerCallback):
            def on_epoch_end(self, *a, **k):
                bench.sync(); marks.append(time.perf_counter())
        trainer.add_callback(Mark())
        t = time.perf_counter()
        trainer.train(); bench.sync()
        r = {"two_epochs_s": time.perf_counter() - t, "epoch_s": [marks[0] - t, marks[1] - marks[0]],
             "log": [e for e in trainer.state.log_history]}
        name = "epoch8000x2" + "".join(extra)
        res[name] = r; print(name, r["two_epochs_s"], flush=True); dump()
        del model, trainer; torch._dynamo.reset()

"""One-off lever measurement at bert-base shape (random weights), run once on an H200 from the repository root
with the GPU kit staged in .gpu/ (../shared/gpu/README.md):

    python benchmarks/experiments/compile_and_dequantize.py train predict

train: fixed-shape steps of QLoRA and bf16 LoRA, eager and torch.compile'd, batch 32 and 128; predict: predict()'s
rate with the 4-bit layers and after dequantizing them once. Run before the 4-bit biases were cast up front, so
the compiled QLoRA rows have a graph break per 4-bit layer. Result: benchmarks/results/compile_graph_breaks_h200.json.
"""
import json, os, sys, time, types
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import torch, bench, peft_qlora
import pyarrow.parquet as pq

OUT = os.environ.get("OUT", "/tmp")
res = {"device": peft_qlora.device_name(), "versions": peft_qlora.versions()}
def dump():
    json.dump(res, open(os.path.join(OUT, "exp_speed.json"), "w"), indent=2)
folder, config = bench.make_model_folder(False)
cfg = peft_qlora.parse_args(["--model", folder, "--output-dir", "/tmp/x"])
texts = pq.read_table(".gpu/imdb/test.parquet", columns=["text"]).column("text").to_pylist()
res["peak_tflops"] = bench.matmul_peak_tflops()
which = sys.argv[1:]
if "train" in which:
    for mode in ["qlora", "lora"]:
        for compiled in [False, True]:
            for bs in [32, 128]:
                bench.reset_memory()
                model, tok = bench.build(mode, folder, cfg, "bf16")
                if compiled:
                    model = torch.compile(model)
                ns = types.SimpleNamespace(batch_size=bs, max_length=512, steps=20)
                t = time.perf_counter()
                try:
                    rate, mem = bench.fixed_shape(model, ns, "bf16", config.vocab_size)
                    r = {"rate": rate, "mem_gib": mem / 2**30, "wall_s": time.perf_counter() - t,
                         "flop_frac": rate * bench.flops_per_review(config, 512, False) / (res["peak_tflops"] * 1e12)}
                except Exception as e:
                    r = {"error": repr(e)[:2000]}
                res[f"{mode}_compile{int(compiled)}_b{bs}"] = r
                print(mode, compiled, bs, r, flush=True)
                del model
                torch._dynamo.reset()
                dump()
if "epoch" in which:
    for compiled in [False, True]:
        bench.reset_memory()
        model, tok = bench.build("qlora", folder, cfg, "bf16")
        from datasets import Dataset
        sub = texts[:8000]
        data = peft_qlora.tokenize(Dataset.from_dict({"text": sub, "labels": [i % 2 for i in range(len(sub))]}),
                                   tok, 512, "head+tail")
        trainer = peft_qlora.make_trainer(model, tok, data, data.select(range(8)), cfg, "bf16", "/tmp/ck")
        trainer.args.eval_strategy = trainer.args.save_strategy = "no"
        trainer.args.num_train_epochs = 1
        trainer.args.disable_tqdm = True
        if compiled:
            trainer.model_wrapped = trainer.model = model = torch.compile(model, dynamic=None)
        t = time.perf_counter()
        try:
            trainer.train(); bench.sync()
            r = {"epoch_s": time.perf_counter() - t, "rate": len(sub) / (time.perf_counter() - t)}
        except Exception as e:
            r = {"error": repr(e)[:2000]}
        res[f"epoch8000_compile{int(compiled)}"] = r
        print("epoch", compiled, r, flush=True)
        torch._dynamo.reset()
        dump()
if "predict" in which:
    model, tok = bench.build("qlora", folder, cfg, "bf16")
    clf = peft_qlora.Classifier(model, tok, ["neg", "pos"], 512, "head+tail", "bf16")
    sample = texts[:5000]
    def timed(name, c, bs=128):
        rate, p = bench.predict_rate(c, sample, bs)
        res[name] = {"rate": rate}
        print(name, res[name], flush=True); dump()
        return p
    t = time.perf_counter(); enc = peft_qlora.encode(tok, sample, 512, "head+tail")
    res["tokenize_rate"] = len(sample) / (time.perf_counter() - t)
    p0 = timed("predict_eager", clf)
    timed("predict_eager_b256", clf, 256)
    m2 = model.dequantize(dtype=torch.bfloat16)
    print(type(m2), flush=True)
    clf2 = clf._replace(model=model)
    p1 = timed("predict_dequant", clf2)
    res["dequant_maxdiff"] = max(abs(a[1] - b[1]) for a, b in zip(p0, p1))
    timed("predict_dequant_b256", clf2, 256)
    print("maxdiff", res["dequant_maxdiff"])
    dump()

"""Does an 8B decoder fit a T4? peft_qlora.py's defaults on a Llama-3-8B-shaped classifier, capped at 15 GiB.

The model has Llama-3-8B's shapes (hidden 4096, 32 layers, 32 heads, 8 key/value heads, intermediate 14336, its
128,256-token vocabulary) and random weights: it costs the memory and time of the real one, and learns nothing.
Each process's GPU memory is capped at a T4's 15 GiB (or --cap-gib) with torch.cuda.set_per_process_memory_fraction,
then peft_qlora.main runs with the flags given, choosing its batches as a T4 user's run would.

    python benchmarks/llama8b.py make /tmp/llama8b             # the random model, bf16 (15 GB on disk)
    python benchmarks/llama8b.py --shape smollm2-135m make /tmp/smollm2-shape   # SmolLM2-135M's shapes instead
    python benchmarks/llama8b.py train /tmp/llama8b -- --train-file train.parquet --eval-file test.parquet \\
        --train-size 256 --eval-size 64 --epochs 1 --output-dir /tmp/llama8b-run
    torchrun --nproc_per_node 2 benchmarks/llama8b.py train /tmp/llama8b -- ...    # each GPU capped the same
    python benchmarks/llama8b.py --cap-gib 3 train /tmp/llama8b -- ...  # another cap (before the command)

(Positional commands: torchrun's own parser takes a script flag such as --run for a prefix of its --run-path.)

The run's metrics.json holds the batches chosen, the peak memory since training began (the evaluation after
each epoch included, at the same batch as the one before training) and the training rate; this script adds
OUTPUT_DIR/llama8b.json with the cap, that peak, and the most the allocator reserved.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import peft_qlora  # noqa: E402

T4_BYTES = 15 * 2**30
LLAMA_3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
SHAPES = {"llama-3-8b": LLAMA_3_8B,
          "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                               intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
                               rope_theta=100000.0, tie_word_embeddings=True)}


def make(folder, shape=LLAMA_3_8B):
    """The random model in bf16, with the project's WordPiece tokenizer (any tokenizer serves: the ids it makes
    all lie inside the embedding, which is what costs memory)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

    with torch.device("cuda"):  # initialised on the GPU: seconds, not minutes
        model = AutoModelForSequenceClassification.from_config(LlamaConfig(**shape, num_labels=2),
                                                               dtype=torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(os.path.join(HERE, "vocab")).save_pretrained(folder)
    print(f"{folder}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")


def run(folder, flags, cap_bytes=T4_BYTES):
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    total = torch.cuda.get_device_properties(local_rank).total_memory
    torch.cuda.set_per_process_memory_fraction(cap_bytes / total, local_rank)
    status = peft_qlora.main(["--model", folder, *flags])
    cfg = peft_qlora.parse_args(["--model", folder, *flags])
    if status == 0 and local_rank == 0:
        report = {"cap_bytes": cap_bytes, "peak_allocated_bytes": torch.cuda.max_memory_allocated(local_rank),
                  "peak_reserved_bytes": torch.cuda.max_memory_reserved(local_rank),
                  "command": " ".join(sys.argv), "device": torch.cuda.get_device_name(local_rank)}
        with open(os.path.join(cfg.output_dir, "llama8b.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(json.dumps(report, indent=2))
    return status


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["make", "train"], help="make: write the random 8B-shaped model to "
                        "FOLDER; train: run peft_qlora.py on the model in FOLDER under the T4 cap")
    parser.add_argument("folder")
    parser.add_argument("--cap-gib", type=float, default=T4_BYTES / 2**30, help="each process's GPU memory cap "
                        "(default: a T4's 15 GiB)")
    parser.add_argument("--shape", choices=SHAPES, default="llama-3-8b", help="make: the shapes of this model")
    parser.add_argument("flags", nargs="*", help="peft_qlora.py flags, after --")
    args = parser.parse_args()
    if args.command == "make":
        make(args.folder, SHAPES[args.shape])
    else:
        sys.exit(run(args.folder, args.flags, int(args.cap_gib * 2**30)))


if __name__ == "__main__":
    main()

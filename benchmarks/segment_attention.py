"""Flash attention for padded batches, without a mask: does it give masked attention's results, and how much faster?

Why (benchmarks/NOTES.md, "The mask that follows the batch, measured"): a batch with padding runs PyTorch's attention
with a mask, which rules out its flash kernel; the memory-efficient kernel it gets cost 18.3 ms of a 32 x 512 QLoRA
step where flash took 5.6 ms, and 674 of an IMDb epoch's 782 batches have padding. The lever probed here: flash
attention's variable-length form with each row cut in two segments, its tokens and its padding, in the order they
stand (tokens first for right padding, padding first for left). Tokens then attend only to tokens, as with the mask;
padding attends only to padding and nothing reads it. No mask, and no shape that depends on the data, so a CUDA graph
can capture it. PyTorch's public `torch.nn.attention.varlen.varlen_attn` has no dropout (BERT's attention applies
0.1 in training), so this calls the op under it and under SDPA's own flash path, `aten::_flash_attention_forward`.

For B x H x S x D bf16 tensors with real lengths drawn below S (a quarter of the rows unpadded), each part's result
(or its error) written as it ends:
- equal: the outputs on real tokens and the gradients of q, k, v, against masked attention in float32,
  set beside masked bf16 attention's error, for an encoder (bidirectional, right padding) and a decoder (causal,
  left padding, 4 key/value heads for 12 query heads), dropout off;
- time: forward and backward of one layer's attention at S = 128 ... 512, masked (what padded batches run now),
  segments, and unmasked flash (the floor), CUDA events over 50 repetitions, dropout 0.1;
- a CUDA graph of forward and backward with dropout 0.1: captured, replayed twice, each replay drawing new dropout;
- torch.compile of the same function gives the eager outputs.

The segments are peft_qlora.py's own (segment_bounds, segment_attention): this checks the script's code.

    python benchmarks/segment_attention.py --out segment_attention.json     # a CUDA GPU of compute capability 8+
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import peft_qlora  # noqa: E402
from peft_qlora import segment_bounds  # noqa: E402

B, H, D, KV_HEADS = 32, 12, 64, 4


def segment_attention(q, k, v, bounds, dropout_p, causal):
    """peft_qlora.py's segment attention in bf16: B x H x S x D in, B x S x H x D out."""
    import torch

    return peft_qlora.segment_attention(q, k, v, bounds, dropout_p, None, causal, torch.bfloat16)


def allowed(mask, causal):
    """The boolean B x 1 x S x S mask that transformers would build once a forward (padding, and causal for a decoder).
    Padding queries also see themselves, so that no row is empty."""
    import torch

    length = mask.shape[1]
    keep = mask.bool()[:, None, None, :].expand(-1, 1, length, -1)
    if causal:
        keep = keep & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    return keep | torch.eye(length, dtype=torch.bool, device=mask.device)


def masked_attention(q, k, v, keep, dropout_p):
    """PyTorch's attention with a boolean mask: B x S x H x D."""
    import torch

    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p)
    return out.transpose(1, 2)


def batch(length, kv_heads, left, generator):
    """q, k, v (bf16, requiring gradients) and a padding mask with lengths drawn in (length / 2, length], a quarter of
    the rows full."""
    import torch

    def tensor(heads):
        return torch.randn(B, heads, length, D, generator=generator, device="cuda").bfloat16().requires_grad_()

    real = torch.randint(length // 2 + 1, length + 1, (B,), generator=generator, device="cuda")
    real[: B // 4] = length
    positions = torch.arange(length, device="cuda")
    mask = (positions >= length - real[:, None]) if left else (positions < real[:, None])
    return tensor(H), tensor(kv_heads), tensor(kv_heads), mask.long()


def outputs_and_grads(attention, q, k, v, mask, weights, dtype=None):
    """Outputs on real tokens and q, k, v's gradients of a fixed weighted sum of them."""
    inputs = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = attention(*inputs)
    real = mask.bool()[:, :, None, None]
    (out.float() * weights * real).sum().backward()
    return [(out.float() * real).detach()] + [t.grad.float() for t in inputs]


def compare(name, causal, left, kv_heads, generator):
    """Largest differences from masked attention in float32, masked bf16 and segments side by side."""
    import torch

    q, k, v, mask = batch(384, kv_heads, left, generator)
    weights = torch.randn(B, 384, H, D, generator=generator, device="cuda")
    bounds, keep = segment_bounds(mask), allowed(mask, causal)
    exact = outputs_and_grads(lambda *t: masked_attention(*t, keep, 0.0), q, k, v, mask, weights, torch.float32)
    masked = outputs_and_grads(lambda *t: masked_attention(*t, keep, 0.0), q, k, v, mask, weights)
    segments = outputs_and_grads(lambda *t: segment_attention(*t, bounds, 0.0, causal), q, k, v, mask, weights)
    names = ["output", "dq", "dk", "dv"]
    result = {"masked_bf16": {n: float((a - e).abs().max()) for n, a, e in zip(names, masked, exact)},
              "segments": {n: float((a - e).abs().max()) for n, a, e in zip(names, segments, exact)}}
    result["within_2x_masked"] = all(result["segments"][n] <= 2 * result["masked_bf16"][n] + 1e-3 for n in names)
    print(name, json.dumps(result))
    return result


def graph_replays(generator):
    """Forward and backward of segment attention with dropout 0.1 captured as a CUDA graph: do replays draw anew?"""
    import torch

    q, k, v, mask = batch(256, H, False, generator)
    bounds = segment_bounds(mask)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture, as make_graphed_callables does
        for _ in range(3):
            segment_attention(q, k, v, bounds, 0.1, False).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = segment_attention(q, k, v, bounds, 0.1, False)
        out.sum().backward()
    graph.replay()
    first = out.detach().clone()
    graph.replay()
    differ = bool((first != out).any())
    print("graph replays draw new dropout:", differ)
    return {"captured": True, "replays_differ": differ}


def compiled_matches(generator):
    """The same function under torch.compile gives the eager outputs (dropout off)."""
    import torch

    q, k, v, mask = batch(256, H, False, generator)
    bounds = segment_bounds(mask)
    eager = segment_attention(q, k, v, bounds, 0.0, False)
    compiled = torch.compile(segment_attention)(q, k, v, bounds, 0.0, False)
    difference = float((eager - compiled).abs().max())
    print("compiled vs eager, largest difference:", difference)
    return difference


def milliseconds(step, repeats=50):
    """Mean milliseconds of step() on the GPU, after warm-up."""
    import torch

    for _ in range(5):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def timings(generator):
    """One layer's attention, forward and backward, dropout 0.1: masked, segments, unmasked flash."""
    import torch

    rows = []
    for length in (128, 256, 384, 512):
        q, k, v, mask = batch(length, H, False, generator)
        bounds, keep = segment_bounds(mask), allowed(mask, False)
        unmasked = torch.nn.functional.scaled_dot_product_attention
        ways = {"masked": lambda: masked_attention(q, k, v, keep, 0.1).sum().backward(),
                "segments": lambda: segment_attention(q, k, v, bounds, 0.1, False).sum().backward(),
                "unmasked_flash": lambda: unmasked(q, k, v, dropout_p=0.1).sum().backward()}
        row = {"length": length, **{name: milliseconds(step) for name, step in ways.items()}}
        print(json.dumps(row))
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the results here as JSON")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        raise SystemExit("needs a CUDA GPU of compute capability 8.0 or more (PyTorch's flash attention)")
    generator = torch.Generator("cuda").manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    parts = {"encoder": lambda: compare("encoder (right padding)", False, False, H, generator),
             "decoder": lambda: compare("decoder (causal, left padding, 4 kv heads)", True, True, KV_HEADS, generator),
             "milliseconds_per_layer": lambda: timings(generator), "graph": lambda: graph_replays(generator),
             "compiled_difference": lambda: compiled_matches(generator)}
    for name, part in parts.items():  # each part on its own: one that fails leaves the others' results
        try:
            results[name] = part()
        except Exception as error:  # a probe: what failed is a result too
            results[name] = {"error": f"{type(error).__name__}: {error}"[:2000]}
            print(name, "failed:", results[name]["error"])
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

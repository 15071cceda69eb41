"""Benchmark posttrain.kernels sample / selective_log_softmax against torch paths; writes JSON.

Throughput is reported against the read-the-logits-once roofline: bytes = R * V * itemsize,
GB/s = bytes / time. The Triton sampler reads a row more than once (one pass + a few search
passes + the scan, mostly from L2), so its "achieved GB/s" can be compared with the device's
HBM bandwidth directly: above it means the extra passes hit cache.

    python benchmarks/bench_kernels.py            # GPU: full grid, Triton and torch
    python benchmarks/bench_kernels.py --quick    # CPU: small grid, torch paths only

On CPU the Triton kernels only run in the interpreter (not a timing), so only torch paths are
timed there and the JSON says GPU figures are pending. GPU timing uses CUDA events.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from posttrain.kernels import sample, selective_log_softmax, triton_available
from posttrain.kernels.sampling import sample_reference


def torch_sort_sample(logits, temperature, top_k, top_p, generator=None):
    """The usual HF-style path: sort, cumsum mask, softmax, multinomial (the baseline)."""
    x = logits.float() / temperature  # (R, V)
    if top_k is not None:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None:
        xs, order = torch.sort(x, dim=-1, descending=True)
        ps = torch.softmax(xs, -1)
        drop = (torch.cumsum(ps, -1) - ps) >= top_p
        x = x.scatter(-1, order, xs.masked_fill(drop, float("-inf")))
    probs = torch.softmax(x, -1)
    tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tok, torch.log(probs.gather(-1, tok[:, None])).squeeze(-1)


def torch_log_softmax_gather(logits, index, temperature=1.0):
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, index[:, None]).squeeze(-1)


def time_fn(fn, device, warmup=2, iters=5):
    """Median seconds per call; CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(name, fn, device, nbytes, iters):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sec = time_fn(fn, device, iters=iters)
    rec = {"impl": name, "ms": round(sec * 1e3, 4), "gbps_vs_read_once": round(nbytes / sec / 1e9, 3)}
    if device.type == "cuda":
        rec["peak_extra_mem_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)
    else:
        # torch's CPU allocator is invisible to tracemalloc; ru_maxrss is the process high-water mark.
        rec["process_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return rec


def bench_cell(R, V, dtype, device, cfg, use_triton, iters):
    """Time every implementation on one (R, V) cell; returns the JSON entry."""
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(R, V, device=device, generator=g).to(dtype)  # (R, V)
    u = torch.rand(R, device=device, generator=g)  # (R,)
    idx = torch.randint(0, V, (R,), device=device, generator=g)  # (R,)
    nbytes = R * V * logits.element_size()
    entry = {"R": R, "V": V, "dtype": str(dtype).removeprefix("torch."), "bytes_read_once": nbytes,
             "sample": [], "logprobs": []}
    sample_impls = [
        ("torch_reference_threshold", lambda: sample_reference(logits, u, **cfg)),
        ("torch_sort_top_p_multinomial", lambda: torch_sort_sample(logits, generator=g, **cfg)),
    ]
    logprob_impls = [
        ("torch_log_softmax_gather", lambda: torch_log_softmax_gather(logits, idx)),
        ("torch_gather_minus_logsumexp", lambda: selective_log_softmax(logits, idx, backend="torch")),
    ]
    if use_triton:
        sample_impls.insert(0, ("triton_sample", lambda: sample(logits, uniform=u, backend="triton", **cfg)))
        logprob_impls.insert(0, ("triton_selective_log_softmax",
                                 lambda: selective_log_softmax(logits, idx, backend="triton")))
    for key, impls in (("sample", sample_impls), ("logprobs", logprob_impls)):
        for name, fn in impls:
            try:
                entry[key].append(measure(name, fn, device, nbytes, iters))
            except torch.OutOfMemoryError:  # the torch paths' (R, V) fp32 temporaries: record, go on
                entry[key].append({"impl": name, "error": "out of memory"})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return entry


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_<device>.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rows = (256, 1024) if args.quick else (4096, 65536)
    vocabs = (1024, 8192) if args.quick else (1024, 8192, 65536)
    cfg = dict(temperature=0.8, top_k=50, top_p=0.9)
    use_triton = triton_available(torch.empty(0, device=device)) and device.type == "cuda"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    results = []
    for R in rows:
        for V in vocabs:
            entry = bench_cell(R, V, dtype, device, cfg, use_triton, args.iters)
            results.append(entry)
            print(json.dumps(entry), file=sys.stderr)
    out = {
        "device": device.type,
        "device_name": device_name,
        "torch": torch.__version__,
        "quick": args.quick,
        "sample_config": cfg,
        "triton_timed": use_triton,
        "note": (
            "GPU figures pending: this run had no GPU; Triton kernels are not timed on CPU (interpreter only)."
            if not use_triton else "Triton and torch paths timed with CUDA events (median of iters)."
        ),
        "results": results,
    }
    path = Path(args.out or f"benchmarks/results/kernels_{device.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

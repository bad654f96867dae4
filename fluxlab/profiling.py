"""Where one image's GPU time goes, per process: compute, communication not hidden behind compute, and idle time,
as unions of kernel intervals (overlapping kernels count once); and the bare bandwidth of Ulysses' all-to-all.

Sums of kernel times mislead on several GPUs: an NCCL kernel that waits for a late peer is "running" the whole
time. The union of intervals says what the GPU was doing at each moment. (PyTorch's HolisticTraceAnalysis computes
the same breakdown from trace files, but needs JupyterLab and plotly at run time on the GPU machine.)
"""
import statistics
import time

import torch
import torch.distributed as dist

from . import parallel
from .peer_exchange import exchanged_attention
from .pipeline import generate

# Kernel name patterns, tried in this order (inductor's fused kernels name the ops they fuse, e.g.
# "triton_..._scaled_mm_...", so they come first; cuBLAS's FP8 kernels are "nvjet_..._qqtst_...").
# The peer exchanges' barrier (torch symmetric memory's "barrier_kernel") counts as communication; their copies into
# the peers' memory are copy kernels like any other and count as compute. fluxlab's own Triton kernels
# (`fluxlab.mlp_fp8`, `fluxlab.qk_fp8`, `fluxlab.norm_fp8`) are a kind of their own, so that "other" means other.
KERNEL_KINDS = {"fluxlab's kernels (triton)": ("_gelu_join_fp8", "_norm_rope_fp8", "_layernorm_modulate_fp8"),
                "fused elementwise / quantization (triton)": ("triton",),
                "communication": ("nccl", "all_to_all", "barrier_kernel"),
                "attention": ("flash", "fmha", "sdpa", "attn", "attention"),
                "FP8 GEMM": ("qqtst", "f8", "e4m3", "scaled_mm"), "convolution": ("implicit_gemm", "conv", "fprop"),
                "GEMM (bf16)": ("gemm", "cutlass", "xmma", "nvjet", "sm90")}


def kind(name: str) -> str:
    name = name.lower()
    return next((k for k, keys in KERNEL_KINDS.items() if any(key in name for key in keys)), "other")


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals, overlaps counted once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def idle_gaps(kernels: list[tuple[str, float, float]], top: int = 6) -> dict:
    """Where the GPU idles: the span from the first kernel's start to the last one's end (the wall time outside it
    is host work before and after: prompt tokenization, image conversion), the gaps between kernels summed by size,
    and the `top` largest gaps with the kernels on either side."""
    ordered = sorted(kernels, key=lambda k: k[1])
    gaps, end, last = [], float("-inf"), None
    for name, a, b in ordered:
        if last is not None and a > end:
            gaps.append((a - end, last, name, end - ordered[0][1]))
        if b > end:
            end, last = b, name
    sizes = [g[0] for g in gaps]
    return dict(span_s=end - ordered[0][1] if ordered else 0.0,
                between_kernels_s={"under 10 us": sum(g for g in sizes if g < 1e-5),
                                   "10 us to 1 ms": sum(g for g in sizes if 1e-5 <= g < 1e-3),
                                   "1 ms and over": sum(g for g in sizes if g >= 1e-3)},
                largest=[dict(seconds=round(g, 6), at_s=round(at, 4), after=before[:80], before=after[:80])
                         for g, before, after, at in sorted(gaps, reverse=True)[:top]])


def breakdown(kernels: list[tuple[str, float, float]], wall_s: float) -> dict:
    """From (name, start_s, end_s) of every GPU kernel in one image: seconds of compute (union of non-NCCL kernels),
    of communication (union of NCCL kernels), of communication that overlaps no compute ("exposed"), and of idle
    (wall time with no kernel at all, with `idle_gaps`); plus kernel time by kind and of the 30 costliest kernel
    names (sums, for the ranking) with their number of calls (a kernel's time per call in the pipeline, to set
    beside `scripts/bench_kernels.py`'s)."""
    compute = [(a, b) for n, a, b in kernels if kind(n) != "communication"]
    comm = [(a, b) for n, a, b in kernels if kind(n) == "communication"]
    busy = union_length(compute + comm)
    compute_s = union_length(compute)
    by_kind, by_name, calls = {}, {}, {}
    for name, a, b in kernels:
        by_kind[kind(name)] = by_kind.get(kind(name), 0.0) + b - a
        by_name[name[:120]] = by_name.get(name[:120], 0.0) + b - a
        calls[name[:120]] = calls.get(name[:120], 0) + 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:30]
    return dict(wall_s=wall_s, compute_s=compute_s, communication_s=union_length(comm),
                exposed_communication_s=busy - compute_s, idle_s=max(0.0, wall_s - busy), kernels=len(kernels),
                kernel_s_by_kind={k: round(v, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
                top_kernels_s={k: round(v, 4) for k, v in top}, top_kernels_calls={k: calls[k] for k, _ in top},
                idle=idle_gaps(kernels))


def profile_call(fn, device: torch.device) -> dict:
    """Run `fn()` once under torch.profiler and return `breakdown` of its GPU kernels (this process's GPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    kernels = [(e.name, e.time_range.start / 1e6, e.time_range.end / 1e6) for e in prof.events()
               if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
               and not e.name.startswith("nccl:")]  # NCCL's GPU-side range annotation, not a kernel
    return breakdown(kernels, wall)


def _timed_ms(fn, device: torch.device, iters: int) -> list[float]:
    """Milliseconds of `fn()` on this GPU, `iters` times after 5 untimed calls, every process starting each call
    together (every process must call this)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier(device_ids=[device.index]) if device.type == "cuda" else dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def all_to_all_seconds(numel: int, dtype: torch.dtype, device: torch.device, iters: int = 50) -> dict:
    """Bare `all_to_all_single` of one tensor of `numel` elements per process (every process must call this):
    median and minimum milliseconds per call over `iters` calls, and the rate each process sends at."""
    world = dist.get_world_size()
    x = torch.randn(numel, device=device).to(dtype)
    y = torch.empty_like(x)
    times = _timed_ms(lambda: dist.all_to_all_single(y, x), device, iters)
    sent = numel * x.element_size() * (world - 1) / world
    median = statistics.median(times)
    return dict(bytes_per_process=numel * x.element_size(), ms_median=median, ms_min=min(times),
                sent_gb_s=sent / (median / 1e3) / 1e9)


def ulysses_traffic(settings, world_size: int, blocks: int, inner_dim: int, dtype: torch.dtype, device) -> dict:
    """The bare all-to-all of one Ulysses tensor (this image's tokens / processes x the attention width) and what
    Ulysses' traffic for one image would cost at that speed: 4 exchanges (query, key, value, output) per attention
    layer per step, if none of it overlapped compute. `sweep`: the same call from 1 MB to 256 MB per process, with
    one tensor and three (q, k and v in one exchange) among them: where latency ends and bandwidth begins."""
    tokens = settings.image_tokens + settings.max_sequence_length
    numel = tokens // world_size * inner_dim
    one = all_to_all_seconds(numel, dtype, device)
    one["per_image_s"] = 4 * blocks * settings.steps * one["ms_median"] / 1e3
    size = torch.finfo(dtype).bits // 8
    sizes = sorted({2 ** 20 // size, 4 * 2 ** 20 // size, numel, 3 * numel, 64 * 2 ** 20 // size, 256 * 2 ** 20 // size})
    one["sweep"] = [all_to_all_seconds(n, dtype, device, iters=20) for n in sizes]
    return one


def peer_round_trip_seconds(tokens: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                            iters: int = 50) -> dict:
    """One attention layer's exchanges with `fluxlab.peer_exchange` (q, k and v out, the output back, no attention
    between) on (1, tokens / processes, heads, head_dim) tensors (every process must call this): median and
    minimum milliseconds, to set beside four bare all-to-alls."""
    world = dist.get_world_size()
    q, k, v = (torch.randn(1, tokens // world, heads, head_dim, device=device).to(dtype) for _ in range(3))

    def trip():
        return exchanged_attention(q, k, v, dist.group.WORLD, lambda q_, k_, v_: q_)

    times = _timed_ms(trip, device, iters)
    return dict(ms_median=statistics.median(times), ms_min=min(times))


def every_rank(pipe, settings) -> list[dict] | None:
    """Profile one more image on each process that makes it (all of them call this, as `measure`'s extras do) and
    gather the breakdowns on process 0 (None on the others, and without CUDA: no kernel timeline to read)."""
    if settings.device.type != "cuda":
        return None
    mine = profile_call(lambda: generate(pipe, settings), settings.device)
    if getattr(pipe.transformer, "_parallel_config", None) is None or dist.get_world_size() == 1:
        return [mine]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0, group=parallel.cpu_group())
    return gathered

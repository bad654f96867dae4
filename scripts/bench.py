"""Benchmark FLUX.1-dev configurations in one run: s/image, ratio to the eager baseline, memory, cold start.

    python scripts/bench.py [--configs baseline,fp8,...] [--repeats 5]              # one GPU
    torchrun --nproc_per_node 2 scripts/bench.py --configs baseline,fp8-cudnn,cp-fp8-cudnn

Each configuration loads a fresh pipeline (default source flux-dev-random, the article's settings: 1024x1024,
28 steps, guidance 3.5, text encoding + denoising + VAE decode), applies its optimizations, makes `--warmup` calls
(the first is the cold start, compilation included), then times `--repeats` calls. One-process configurations run
on rank 0 while the other ranks wait. Writes `<out>/bench-<N>gpu.json` (rank 0) only when every configuration
succeeded; a failed run leaves the previous file as it was. Progress goes to `bench-<N>gpu.partial.json` after each
configuration (a run stopped by a time limit keeps what it measured).
"""
import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fluxlab  # noqa: E402
from fluxlab import parallel, records  # noqa: E402

ALL = "all"  # every process of the run (context parallel)
# name: (processes, optimize() arguments); CP configurations get parallel=(N, 1) added.
LADDER = {
    "baseline": (1, {}),
    "compile": (1, dict(compile="regional")),
    "cudnn-compile": (1, dict(attention="_native_cudnn", compile="regional")),
    "fp8": (1, dict(fp8="rowwise", compile="regional")),
    "fp8-cudnn": (1, dict(attention="_native_cudnn", fp8="rowwise", compile="regional")),
    "fp8-cudnn-fused": (1, dict(attention="_native_cudnn", fuse_qkv=True, fp8="rowwise", compile="regional")),
    "fp8-tensorwise-cudnn": (1, dict(attention="_native_cudnn", fp8="tensorwise", compile="regional")),
    "fp8-cudnn-fused-vae": (1, dict(attention="_native_cudnn", fuse_qkv=True, fp8="rowwise", compile="regional",
                                    channels_last_vae=True)),
    "fp8-cudnn-full": (1, dict(attention="_native_cudnn", fp8="rowwise", compile="full")),
    # max-autotune benchmarks ~100 kernel choices per GEMM shape: minutes of cold start per shape on one H100.
    "fp8-cudnn-autotune": (1, dict(attention="_native_cudnn", fuse_qkv=True, fp8="rowwise", compile="regional",
                                   compile_mode="max-autotune-no-cudagraphs", channels_last_vae=True)),
    "fbcache-fp8-cudnn": (1, dict(attention="_native_cudnn", cache=0.12, fp8="rowwise", compile="regional")),
    "cp": (ALL, {}),
    "cp-fp8": (ALL, dict(fp8="rowwise", compile="regional")),
    "cp-fp8-cudnn": (ALL, dict(attention="_native_cudnn", fp8="rowwise", compile="regional")),
    "cp-ring-fp8-cudnn": (ALL, dict(attention="_native_cudnn", fp8="rowwise", compile="regional", ring=True)),
    "cp-fbcache-fp8-cudnn": (ALL, dict(attention="_native_cudnn", cache=0.12, fp8="rowwise", compile="regional")),
}
# Kernel name patterns for the profile's breakdown of where one image's GPU time goes, tried in this order
# (inductor's fused kernels name the ops they fuse, e.g. "triton_..._scaled_mm_...", so they come first;
# cuBLAS's FP8 kernels are "nvjet_..._qqtst_...").
KERNELS = {"fused elementwise / quantization (triton)": ("triton",), "communication": ("nccl", "all_to_all"),
           "attention": ("flash", "fmha", "sdpa", "attn", "attention"), "FP8 GEMM": ("qqtst", "f8", "e4m3", "scaled_mm"),
           "convolution": ("implicit_gemm", "conv", "fprop", "dgrad"),
           "GEMM (bf16)": ("gemm", "cutlass", "xmma", "nvjet", "sm90")}


def run_config(name: str, settings, dist, args, reference) -> dict | None:
    processes, kwargs = LADDER[name]
    kwargs = dict(kwargs)
    if processes == ALL:
        ring = kwargs.pop("ring", False)
        kwargs["parallel"] = (1, dist.world_size) if ring else (dist.world_size, 1)
    mine = processes == ALL or dist.is_main
    result = None
    if mine:
        run_dist = dist if processes == ALL else parallel.Dist(0, 1, dist.device)
        pipe = fluxlab.load(settings)
        fluxlab.optimize(pipe, **kwargs)
        with tempfile.TemporaryDirectory() as tmp:
            rec = fluxlab.measure(pipe, settings, name=name, chapter="bench", output_dir=tmp, dist=run_dist,
                                  warmup=args.warmup, repeats=args.repeats)
        latents = fluxlab.generate(pipe, settings, output_type="latent").float().cpu()
        profiled = profile(pipe, settings) if args.profile and settings.device.type == "cuda" else None
        if dist.is_main:
            ref = latents if reference.get("latents") is None else reference["latents"]
            reference.setdefault("latents", latents)
            stats = rec.get("cache") or {}
            result = dict(name=name, label=rec["label"], processes=run_dist.world_size,
                          s_min=rec["timing"]["min_s"], s_median=rec["timing"]["median_s"],
                          times_s=rec["timing"]["times_s"], cold_start_s=rec["timing"]["cold_start_s"],
                          warmup_s=rec["timing"]["warmup_s"], peak_mem_gb=rec["peak_mem_gb"],
                          skipped_steps=stats.get("skipped"), optimizations=rec["optimizations"], profile=profiled,
                          latents_rel_error=((latents - ref).norm() / ref.norm()).item())
            print(f"{name}: {result['s_median']:.3f} s/image (min {result['s_min']:.3f}), cold start "
                  f"{result['cold_start_s']:.1f} s, peak {result['peak_mem_gb'] or 0:.1f} GB, latents rel. error "
                  f"{result['latents_rel_error']:.2e}", flush=True)
        if "compile" in kwargs:
            print(torch._dynamo.utils.compile_times(repr="str", aggregate=True), flush=True)
        del pipe
        torch._dynamo.reset()  # the next configuration compiles from scratch (the on-disk inductor cache aside)
        gc.collect()
        torch.cuda.empty_cache()
    parallel.barrier()
    return result


def profile(pipe, settings) -> dict:
    """Where one image's GPU time goes: kernel seconds per category (torch.profiler), and their sum (kernels on
    overlapping streams, e.g. communication, count in full)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fluxlab.generate(pipe, settings)
        torch.cuda.synchronize()
    totals, kernels = {}, {}
    for event in prof.events():
        if event.device_type != DeviceType.CUDA or event.name.startswith("nccl:"):  # NCCL's range, not a kernel
            continue
        seconds = event.time_range.elapsed_us() / 1e6
        name = event.name.lower()
        category = next((c for c, keys in KERNELS.items() if any(k in name for k in keys)), "other")
        totals[category] = totals.get(category, 0.0) + seconds
        kernels[event.name[:120]] = kernels.get(event.name[:120], 0.0) + seconds
    totals = {k: round(v, 4) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    return dict(kernel_s=round(sum(totals.values()), 4), by_category_s=totals,
                top_kernels_s={k: round(v, 4) for k, v in top})


def summary(results: list[dict], settings, dist, provenance: dict) -> dict:
    base = results[0]["s_median"]
    for r in results:
        r["ratio_vs_baseline"] = base / r["s_median"]
    return dict(device=provenance["device_name"], world_size=dist.world_size, height=settings.height,
                width=settings.width, steps=settings.steps, guidance=settings.guidance, prompt=settings.prompt,
                model_source=settings.source.label, scope="text encoding + denoising + VAE decode", configs=results,
                provenance=provenance)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="baseline,compile,fp8,fp8-cudnn-fused,fp8-cudnn-fused-vae",
                        help=f"comma-separated, from {list(LADDER)}; 'baseline' is always run first")
    parser.add_argument("--source", default="flux-dev-random")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "book" / "results"))
    parser.add_argument("--profile", action="store_true", help="also record each configuration's GPU time by kernel kind")
    args = parser.parse_args()
    names = ["baseline"] + [c for c in args.configs.split(",") if c and c != "baseline"]
    unknown = [c for c in names if c not in LADDER]
    if unknown:
        raise SystemExit(f"error: unknown configuration(s) {unknown}; allowed: {list(LADDER)}")
    try:
        settings = fluxlab.settings(args.source, steps=args.steps, height=args.height, width=args.width)
        dist = parallel.init(settings.device)
        if any(LADDER[c][0] == ALL for c in names):
            if dist.world_size < 2:
                raise ValueError("context-parallel configurations need torchrun with 2 or more processes")
            parallel.check_split(settings, dist.world_size, dist.world_size)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    settings = settings.on(dist.device)
    reference, results = {}, []
    provenance = records.provenance(settings.device, dist.world_size)
    final = Path(args.out) / f"bench-{dist.world_size}gpu.json"
    partial = final.with_name(final.stem + ".partial.json")
    for name in names:
        result = run_config(name, settings, dist, args, reference)
        if result:
            results.append(result)
            # progress after each configuration, apart from the last complete record
            records.replace_atomically(partial, json.dumps(summary(results, settings, dist, provenance), indent=1).encode())
    if not dist.is_main:
        return
    out = records.replace_atomically(final, json.dumps(summary(results, settings, dist, provenance), indent=1).encode())
    partial.unlink()
    print(f"\n{'config':<22}{'procs':>6}{'median s':>10}{'min s':>8}{'ratio':>7}{'cold s':>8}{'peak GB':>9}")
    for r in results:
        print(f"{r['name']:<22}{r['processes']:>6}{r['s_median']:>10.3f}{r['s_min']:>8.3f}{r['ratio_vs_baseline']:>7.2f}"
              f"{r['cold_start_s']:>8.1f}{r['peak_mem_gb'] or 0:>9.1f}")
        if r["profile"]:
            print(f"    kernels {r['profile']['kernel_s']:.3f} s: " +
                  ", ".join(f"{k} {v:.3f}" for k, v in r["profile"]["by_category_s"].items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

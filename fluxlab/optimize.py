"""Compose the article's techniques on a pipeline, in its order, and say what ran."""
import torch

from . import parallel as par
from .cache import enable_first_block_cache
from .quant import check_granularity, quantize_fp8
from .settings import check_threshold

COMPILE_MODES = ("regional", "full")


def applied(pipe) -> dict:
    """What `optimize` has done to this pipeline so far (empty for a plain pipeline)."""
    return pipe.__dict__.setdefault("_fluxlab_applied", {})


def cache_stats(pipe):
    return applied(pipe).get("_cache_stats")


def clear_cache(pipe) -> None:
    """Turn First Block Cache off again (to try another threshold on the same, uncompiled pipeline)."""
    done = applied(pipe)
    if "compile" in done:
        raise ValueError("the transformer is compiled with the cache in its graph: load a fresh pipeline instead.")
    if done.pop("cache", None) is not None:
        done.pop("_cache_stats")
        pipe.transformer.disable_cache()


def check(cache=None, fp8=None, compile=None) -> None:
    """Validate optimize's arguments without touching a model."""
    if cache is not None:
        check_threshold(cache)
    if fp8 is not None:
        check_granularity(fp8)
    if compile is not None and compile not in COMPILE_MODES:
        raise ValueError(f"compile={compile!r}: allowed values are {COMPILE_MODES} (or None).")


def optimize(pipe, *, attention: str | None = None, fuse_qkv: bool = False, parallel: tuple[int, int] | None = None,
             cache: float | None = None, fp8: str | None = None, compile: str | None = None,
             compile_mode: str | None = None, channels_last_vae: bool = False) -> dict:
    """Apply, in this order: an attention backend (diffusers' names, e.g. '_native_cudnn'), fused QKV projections,
    context parallelism (ulysses, ring), First Block Cache (threshold), FP8 ('rowwise'/'tensorwise'), then
    torch.compile ('regional': the repeated blocks, 'full': the whole transformer); `channels_last_vae` stores the
    VAE's convolution weights channels-last (the layout cuDNN's convolutions prefer). Each at most once."""
    check(cache, fp8, compile)
    done = applied(pipe)
    steps = (("attention", attention), ("fuse_qkv", fuse_qkv or None), ("parallel", parallel), ("cache", cache),
             ("fp8", fp8), ("compile", compile), ("channels_last_vae", channels_last_vae or None))
    for name, value in steps:
        if value is not None and name in done:
            raise ValueError(f"{name} was already applied to this pipeline ({done[name]}); load a fresh one.")
    if "compile" in done and any(v is not None for v in (parallel, cache, fp8)):
        raise ValueError("the transformer is already compiled: apply parallel, cache and fp8 before compile.")
    transformer = pipe.transformer
    if attention is not None:
        transformer.set_attention_backend(attention)
        done["attention"] = attention
    if fuse_qkv:
        if "fp8" in done:
            raise ValueError("fuse QKV projections before FP8 quantization.")
        transformer.fuse_qkv_projections()
        done["fuse_qkv"] = True
    if parallel is not None:
        ulysses, ring = parallel
        backend = par.enable_context_parallel(transformer, ulysses, ring, done.get("attention"))
        done["parallel"] = dict(ulysses=ulysses, ring=ring, attention_backend=backend)
    if cache is not None:
        done["_cache_stats"] = enable_first_block_cache(transformer, cache)
        done["cache"] = dict(kind="first_block_cache", threshold=float(cache))
    if fp8 is not None:
        done["fp8"] = dict(granularity=fp8, ran=quantize_fp8(pipe, fp8))
        print(done["fp8"]["ran"])
    if compile is not None:
        if "parallel" in done and transformer.device.type == "cuda":
            torch._inductor.config.reorder_for_compute_comm_overlap = True
        # The cache's decision is a Python branch (a graph break), so full graphs only without it.
        fullgraph = "cache" not in done
        if compile == "regional":
            transformer.compile_repeated_blocks(fullgraph=fullgraph, mode=compile_mode)
        else:
            transformer.compile(fullgraph=fullgraph, mode=compile_mode)
        done["compile"] = dict(scope=compile, mode=compile_mode or "default", fullgraph=fullgraph)
    if channels_last_vae:
        pipe.vae.to(memory_format=torch.channels_last)
        done["channels_last_vae"] = True
    return {k: v for k, v in done.items() if not k.startswith("_")}


def describe(done: dict, world_size: int = 1) -> str:
    """A short configuration name for tables, e.g. 'FBCache 0.12 + FP8 rowwise + compile + CP x2'."""
    parts = []
    if "cache" in done:
        parts.append(f"FBCache {done['cache']['threshold']:g}")
    if "fp8" in done:
        dynamic = done["fp8"]["ran"].startswith("FP8 dynamic")
        parts.append(f"FP8 {'DQ' if dynamic else 'weight-only'} {done['fp8']['granularity'] if dynamic else ''}".strip())
    if "compile" in done:
        parts.append(f"compile ({done['compile']['scope']})")
    if "attention" in done:
        parts.append(f"attention {done['attention'].strip('_')}")
    if "fuse_qkv" in done:
        parts.append("fused QKV")
    if "channels_last_vae" in done:
        parts.append("channels-last VAE")
    if "parallel" in done:
        p = done["parallel"]
        parts.append(f"CP x{world_size} (ulysses {p['ulysses']}, ring {p['ring']})")
    return " + ".join(parts) or "baseline"

"""What has been done to a pipeline, read off the pipeline itself: records describe what ran, whichever code (a
chapter's own library calls or `fluxlab.optimize`) applied it."""
import torch
from diffusers.hooks.group_offloading import _is_group_offload_enabled

from . import cache, fp8_attention, gelu, mlp_fp8, modulation, norm_fp8, peer_exchange, qk_fp8, quant


def _compile_scope(pipe) -> str | None:
    transformer = pipe.transformer
    if isinstance(transformer, torch._dynamo.eval_frame.OptimizedModule) or transformer._compiled_call_impl:
        return "full"
    capture = getattr(transformer, "_fluxlab_capture", None)
    if capture is not None and capture.compiled:
        return "regional"
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in transformer.modules()):
        return "regional"
    return None


def applied(pipe) -> dict:
    """The optimizations present on `pipe`, by name: attention backend, fused QKV, context parallel, CUDA graphs,
    First Block Cache, FP8, torch.compile, a channels-last, compiled or tiled VAE, offload. Absent ones are left
    out."""
    transformer = getattr(pipe.transformer, "_orig_mod", pipe.transformer)
    done = {}
    processors = transformer.attn_processors.values()
    backends = {getattr(p, "_attention_backend", None) for p in processors} - {None}
    if any(isinstance(p, fp8_attention.FP8AttnProcessor) or getattr(p, "fp8", False) for p in processors):
        backends.add(fp8_attention.NAME)
    if backends:
        done["attention"] = ", ".join(sorted(str(b).removeprefix("AttentionBackendName.") for b in backends))
    if qk_fp8.used(transformer):
        done["qk_fp8"] = True
    if gelu.used(transformer):
        done["sigmoid_gelu"] = True
    if mlp_fp8.used(transformer):
        done["gelu_fp8"] = True
    if norm_fp8.used(transformer):
        done["norm_fp8"] = True
    if modulation.used(transformer):
        done["precompute_modulation"] = True
    if any(getattr(m, "fused_projections", False) for m in transformer.modules()):
        done["fuse_qkv"] = True
    config = getattr(transformer, "_parallel_config", None)
    if config is not None and config.context_parallel_config is not None:
        cp = config.context_parallel_config
        done["parallel"] = dict(ulysses=cp.ulysses_degree, ring=cp.ring_degree)
        if exchange := peer_exchange.exchanges(transformer):
            done["parallel"]["exchange"] = exchange
    capture = getattr(transformer, "_fluxlab_capture", None)
    if capture is not None:
        done["graphs"] = dict(cuda_graphs=capture.enabled, blocks_compiled=capture.compiled)
    hook = cache.leader_hook(transformer)
    if hook is not None:
        done["cache"] = dict(kind="first_block_cache", threshold=float(hook.threshold),
                             decision="all ranks" if cache.stats(transformer) else "per rank (diffusers)")
    for name, model in (("fp8", transformer), ("fp8_text_encoder", pipe.text_encoder_2)):
        state = quant.fp8_state(model)
        if state:
            done[name] = state
    scope = _compile_scope(pipe)
    if scope:
        done["compile"] = dict(scope=scope)
        options = getattr(transformer, "_fluxlab_compile_options", None)
        if options:
            done["compile"]["options"] = options
    if getattr(pipe.vae.decoder, "_compiled_call_impl", None) is not None:
        done["compile_vae"] = True
    if getattr(pipe.vae, "use_tiling", False):
        done["vae_tiling"] = True
    hooks = [getattr(m, "_hf_hook", None) for m in (pipe.transformer, pipe.vae)]
    if any(type(h).__name__ == "CpuOffload" for h in hooks):
        done["offload"] = "model"
    elif any(h is not None for h in hooks):
        done["offload"] = "sequential"
    elif _is_group_offload_enabled(pipe.transformer):
        done["offload"] = "group"
    elif _is_group_offload_enabled(pipe.text_encoder_2):
        done["offload"] = "encoders"
    conv = pipe.vae.decoder.conv_in.weight
    if conv.dim() == 4 and conv.shape[1] > 1 and conv.is_contiguous(memory_format=torch.channels_last) \
            and not conv.is_contiguous():
        done["channels_last_vae"] = True
    return done


OFFLOAD_NAMES = {"model": "model CPU offload", "sequential": "sequential CPU offload",
                 "encoders": "text encoders streamed from CPU", "group": "all layers streamed from CPU"}


def describe(done: dict, processes: int = 1) -> str:
    """A short name for tables, e.g. 'FBCache 0.12 + FP8 DQ rowwise + compile (regional) + CUDA graphs + CP x2'."""
    parts = []
    if "cache" in done:
        parts.append(f"FBCache {done['cache']['threshold']:g}")
    if "fp8" in done:
        fp8 = done["fp8"]
        parts.append(f"FP8 DQ {fp8['granularity']}" if fp8["dynamic_activation"] else "FP8 weight-only")
    if "compile" in done:
        options = done["compile"].get("options") or {}
        flags = [name for name, on in (("conv_1x1_as_mm", options.get("conv_1x1_as_mm")),
                                       ("no epilogue fusion", options.get("epilogue_fusion") is False),
                                       ("coordinate descent", options.get("coordinate_descent_tuning"))) if on]
        if len(flags) == 3:  # flux-fast's inductor settings, all of them
            flags = ["inductor flags"]
        flags += ["its CUDA graphs"] * bool(options.get("triton.cudagraphs"))  # mode="reduce-overhead"
        flags += ["comm. overlap"] * bool(options.get("reorder_for_compute_comm_overlap"))
        extra = "".join(f", {name}" for name in flags)
        parts.append(f"compile ({done['compile']['scope']}{extra})")
    if done.get("graphs", {}).get("cuda_graphs"):
        parts.append("CUDA graphs")
    elif "graphs" in done:  # asked for, but no CUDA here: the blocks ran compiled, without graphs
        parts.append("graph path without CUDA graphs")
    if "attention" in done:
        parts.append(f"attention {done['attention'].strip('_')}")
    if "qk_fp8" in done:
        parts.append("q/k norm + rotary + FP8 in one pass")
    if "sigmoid_gelu" in done:
        parts.append("sigmoid GELU")
    if "gelu_fp8" in done:
        parts.append("GELU + FP8 in one pass")
    if "norm_fp8" in done:
        parts.append("LayerNorm + modulation + FP8 in one pass")
    if "precompute_modulation" in done:
        parts.append("adaLN for all steps at once")
    if "fuse_qkv" in done:
        parts.append("fused QKV")
    if "channels_last_vae" in done:
        parts.append("channels-last VAE")
    if "compile_vae" in done:
        parts.append("compiled VAE")
    if "vae_tiling" in done:
        parts.append("tiled VAE")
    if "offload" in done:
        parts.append(OFFLOAD_NAMES[done["offload"]])
    if "parallel" in done:
        p = done["parallel"]
        exchange = ", peer exchange" if p.get("exchange") == "peer" else ""
        parts.append(f"CP x{processes} (ulysses {p['ulysses']}, ring {p['ring']}{exchange})")
    return " + ".join(parts) or "baseline"

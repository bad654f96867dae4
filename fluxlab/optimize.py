"""The article's techniques composed on one pipeline, in its order, with the same library calls the chapters make;
the benchmark and the server use this, so they time the code the book teaches."""
import torch
from diffusers.models.attention_dispatch import AttentionBackendName

from . import cache as first_block_cache
from . import fp8_attention
from . import gelu
from . import graphs as cuda_graphs
from . import mlp_fp8
from . import modulation
from . import norm_fp8 as one_pass_norms
from . import parallel as context_parallel
from . import peer_exchange
from . import qk_fp8 as one_pass_qk
from . import quant
from .applied import applied
from .settings import check_threshold

COMPILE_SCOPES = ("regional", "full")
OFFLOADS = ("model", "sequential", "encoders", "group")
EXCHANGES = ("peer",)
# flux-fast's inductor settings for FLUX (pytorch-labs/flux-fast), by name: 1x1 convolutions as matrix products, no
# epilogue fusion into matmul templates, coordinate-descent tuning of the generated kernels' block sizes.
INDUCTOR_FLAG_SETS = {"conv_1x1_as_mm": {"conv_1x1_as_mm": True}, "epilogue_fusion": {"epilogue_fusion": False},
                      "coordinate_descent_tuning": {"coordinate_descent_tuning": True,
                                                    "coordinate_descent_check_all_directions": True}}
INDUCTOR_FLAGS = {k: v for flags in INDUCTOR_FLAG_SETS.values() for k, v in flags.items()}  # all of them


def compile_options(mode: str | None = None, inductor_flags: bool | str = False, overlap: bool = False) -> dict | None:
    """torch.compile's `options` for a mode plus the flags asked for (torch.compile takes a mode or options, not
    both), or None for the defaults. `inductor_flags`: True for all of flux-fast's, or one name of
    `INDUCTOR_FLAG_SETS`. `overlap`: inductor moves compute between a collective's start and its wait."""
    options = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    if inductor_flags:
        options |= INDUCTOR_FLAGS if inductor_flags is True else INDUCTOR_FLAG_SETS[inductor_flags]
    if overlap:
        options["reorder_for_compute_comm_overlap"] = True
    return options or None


def _require(module, device) -> None:
    """Refuse, with the module's one-line reason, what `module.unavailable` says cannot run on `device` (None: not
    known yet, no check)."""
    reason = module.unavailable(device) if device is not None else None
    if reason:
        raise ValueError(reason)


def check(cache=None, fp8=None, compile=None, graphs=False, offload=None, device=None, compile_mode=None,
          inductor_flags=False, overlap=False, parallel=None, attention=None, exchange=None,
          sigmoid_gelu=False, gelu_fp8=False, compile_vae=False, precompute_modulation=False, qk_fp8=False,
          norm_fp8=False) -> None:
    """Validate optimize's arguments (and a torch.compile mode) without touching a model."""
    backends = [b.value for b in AttentionBackendName]
    if attention is not None and attention != fp8_attention.NAME and attention not in backends:
        raise ValueError(f"attention={attention!r}: use {fp8_attention.NAME!r} (FP8 on Hopper) or one of diffusers' "
                         f"backends: {', '.join(backends)}.")
    if attention == fp8_attention.NAME:
        _require(fp8_attention, device)
        if parallel is not None and parallel[1] > 1:
            raise ValueError(f"attention={attention!r} runs between Ulysses' all-to-alls, not in ring attention "
                             "(which needs each block's log-sum-exp): use parallel=(N, 1).")
    if exchange is not None:
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange={exchange!r}: allowed values are {EXCHANGES} (or None: diffusers' NCCL "
                             "all-to-alls).")
        if parallel is None or parallel[0] < 2 or parallel[1] != 1:
            raise ValueError(f"exchange={exchange!r} replaces Ulysses' all-to-alls: use it with parallel=(N, 1), "
                             "N >= 2.")
    if compile_mode is not None and compile_mode not in torch._inductor.list_mode_options():
        raise ValueError(f"compile_mode={compile_mode!r}: allowed values are "
                         f"{tuple(torch._inductor.list_mode_options())} (or None).")
    if cache is not None:
        check_threshold(cache)
    if fp8 is not None:
        quant.check_granularity(fp8)
    if compile is not None and compile not in COMPILE_SCOPES:
        raise ValueError(f"compile={compile!r}: allowed values are {COMPILE_SCOPES} (or None).")
    for name, flag in (("graphs", graphs), ("sigmoid_gelu", sigmoid_gelu), ("gelu_fp8", gelu_fp8),
                       ("compile_vae", compile_vae), ("precompute_modulation", precompute_modulation),
                       ("qk_fp8", qk_fp8), ("norm_fp8", norm_fp8)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name}={flag!r}: must be True or False.")
    if gelu_fp8:
        if fp8 != "rowwise":
            raise ValueError("gelu_fp8=True quantizes the MLP outputs for FP8 rowwise products: use it with "
                             "fp8='rowwise'.")
        _require(mlp_fp8, device)
    if qk_fp8:
        if attention != fp8_attention.NAME or parallel is not None:
            raise ValueError("qk_fp8=True writes FP8 attention's q and k: use it with "
                             f"attention={fp8_attention.NAME!r} on one GPU (parallel=None).")
        _require(one_pass_qk, device)
    if norm_fp8 and not (gelu_fp8 and attention == fp8_attention.NAME):
        raise ValueError("norm_fp8=True hands FP8 rows to FP8 attention's projections and to the one-pass MLPs: "
                         f"use it with attention={fp8_attention.NAME!r} and gelu_fp8=True.")
    if precompute_modulation and compile == "full":
        raise ValueError("precompute_modulation picks each step's row on the host, before the transformer runs: use "
                         "compile='regional' or None.")
    if graphs and compile == "full":
        raise ValueError("graphs=True captures each block (compiled regionally): use compile='regional' or None.")
    if not isinstance(inductor_flags, bool) and inductor_flags not in INDUCTOR_FLAG_SETS:
        raise ValueError(f"inductor_flags={inductor_flags!r}: True (all of flux-fast's), False, or one of "
                         f"{tuple(INDUCTOR_FLAG_SETS)}.")
    if (inductor_flags or overlap) and compile is None:
        raise ValueError("inductor_flags and overlap are torch.compile settings: use them with compile=...")
    if overlap and parallel is None:
        raise ValueError("overlap moves compute around context parallelism's collectives: use it with parallel=...")
    if offload is not None:
        if offload not in OFFLOADS:
            raise ValueError(f"offload={offload!r}: allowed values are {OFFLOADS} (or None).")
        if device is not None and device.type != "cuda":
            raise ValueError(f"offload={offload!r} moves weights between the CPU and a GPU; on {device.type} every "
                             "weight already lives in host memory (use offload=None).")
        if graphs and offload != "encoders":
            raise ValueError("offload moves the weights that CUDA graphs replay from fixed addresses: use one or "
                             "the other (offload='encoders' leaves the transformer in place).")
        if offload in ("sequential", "group") and (compile is not None or compile_vae):
            raise ValueError(f"offload={offload!r} streams each layer's weights in as it runs, from hooks that "
                             "torch.compile cannot trace: use compile=None and compile_vae=False.")


def optimize(pipe, *, attention: str | None = None, qk_fp8: bool = False, sigmoid_gelu: bool = False,
             gelu_fp8: bool = False, norm_fp8: bool = False, precompute_modulation: bool = False,
             fuse_qkv: bool = False, parallel: tuple[int, int] | None = None, exchange: str | None = None,
             graphs: bool = False, cache: float | None = None, fp8: str | None = None, compile: str | None = None,
             compile_mode: str | None = None, inductor_flags: bool | str = False, overlap: bool = False,
             channels_last_vae: bool = False, compile_vae: bool = False, vae_tiling: bool = False,
             offload: str | None = None) -> dict:
    """Apply, in this order: an attention backend (diffusers' names, e.g. '_native_cudnn', or 'cudnn_fp8': FP8
    attention on Hopper, `fluxlab.fp8_attention`; with `qk_fp8`, its q and k normalized, rotated and quantized in one
    kernel, `fluxlab.qk_fp8`), the tanh-GELU as x * sigmoid(2z) (`fluxlab.gelu`: a cheaper
    kernel once compiled), GELU and the FP8 quantization of the MLP outputs in one pass (`fluxlab.mlp_fp8`, with
    fp8='rowwise' on an FP8 GPU; with `norm_fp8`, each LayerNorm + modulation + FP8 quantization in one pass too,
    `fluxlab.norm_fp8`), every step's adaLN modulations computed at the first step
    (`fluxlab.modulation`), fused QKV projections, context parallelism (ulysses, ring; with exchange='peer',
    Ulysses' all-to-alls become copies into the other GPUs' memory, `fluxlab.peer_exchange`), CUDA graphs of the
    blocks (fluxlab.graphs), First Block Cache (threshold), FP8 ('rowwise'/'tensorwise'), torch.compile ('regional':
    the repeated blocks, 'full': the whole transformer; with `inductor_flags`, flux-fast's inductor settings, or one
    of them by name; with `overlap`, compute reordered around collectives), a channels-last VAE, a compiled VAE
    decoder (inductor fuses its group norms with their activations), a tiled VAE decode, and CPU offload ('model':
    each component moves to the GPU when it runs; 'sequential': each layer does, the smallest footprint and the
    slowest; 'encoders': the text encoders' layers stream in from pinned host memory as they run, the next one
    copied on a side stream, while the transformer and VAE stay on the GPU; 'group': every component's layers stream
    in so).
    Each at most once per pipeline.
    Returns `fluxlab.applied(pipe)`."""
    check(cache, fp8, compile, graphs, offload, pipe.transformer.device, compile_mode, inductor_flags, overlap,
          parallel, attention, exchange, sigmoid_gelu, gelu_fp8, compile_vae, precompute_modulation, qk_fp8,
          norm_fp8)
    done = applied(pipe)
    asked = dict(attention=attention, sigmoid_gelu=sigmoid_gelu or None, gelu_fp8=gelu_fp8 or None,
                 precompute_modulation=precompute_modulation or None, qk_fp8=qk_fp8 or None,
                 norm_fp8=norm_fp8 or None, fuse_qkv=fuse_qkv or None, parallel=parallel, graphs=graphs or None,
                 cache=cache, fp8=fp8, compile=compile, channels_last_vae=channels_last_vae or None,
                 compile_vae=compile_vae or None, vae_tiling=vae_tiling or None, offload=offload)
    for name, value in asked.items():
        if value is not None and name in done:
            raise ValueError(f"{name} was already applied to this pipeline ({done[name]}); load a fresh one.")
    if "compile" in done and any(v is not None
                                 for v in (parallel, cache, fp8, graphs or None, sigmoid_gelu or None,
                                           gelu_fp8 or None, precompute_modulation or None, qk_fp8 or None,
                                           norm_fp8 or None)):
        raise ValueError("the transformer is already compiled: apply parallel, graphs, cache, fp8, sigmoid_gelu, "
                         "gelu_fp8, precompute_modulation, qk_fp8 and norm_fp8 before compile.")
    if precompute_modulation and "fp8" in done:
        raise ValueError("precompute_modulation joins the adaLN layers' bf16 weights: apply it before fp8.")
    if graphs and "cache" in done:
        raise ValueError("apply CUDA graphs before First Block Cache (its hooks must run around the graphs).")
    transformer = pipe.transformer
    if attention == fp8_attention.NAME:
        (one_pass_qk.use if qk_fp8 else fp8_attention.use)(transformer)
    elif attention is not None:
        transformer.set_attention_backend(attention)
    if sigmoid_gelu:
        gelu.use(transformer)
    if gelu_fp8:
        mlp_fp8.use(transformer)
    if norm_fp8:
        one_pass_norms.use(transformer)
    if precompute_modulation:
        modulation.use(pipe)
    if fuse_qkv:
        if "fp8" in done:
            raise ValueError("fuse QKV projections before FP8 quantization.")
        transformer.fuse_qkv_projections()
    if parallel is not None:
        context_parallel.enable(transformer, *parallel)
    if exchange == "peer":
        peer_exchange.use(transformer)
    options = compile_options(compile_mode, inductor_flags, overlap and transformer.device.type == "cuda")
    if graphs:  # the blocks are compiled beneath the graphs (regionally) when compile is asked for
        cuda_graphs.capture_blocks(transformer, compile=compile == "regional", options=options)
    if cache is not None:
        first_block_cache.enable(transformer, cache)
    if fp8 is not None:
        quant.quantize_fp8(pipe, quant.check_granularity(fp8))
    if compile is not None:
        transformer._fluxlab_compile_options = options  # what `fluxlab.applied` reads
    fullgraph = cache is None and "cache" not in done  # the cache's decision is a Python branch (a graph break)
    if compile == "regional" and not graphs:
        transformer.compile_repeated_blocks(fullgraph=fullgraph, options=options)
    elif compile == "full":
        transformer.compile(fullgraph=fullgraph, options=options)
    if channels_last_vae:
        pipe.vae.to(memory_format=torch.channels_last)
    if compile_vae:
        pipe.vae.decoder.compile(fullgraph=True)
    if vae_tiling:
        pipe.vae.enable_tiling()
    if offload == "model":
        pipe.enable_model_cpu_offload(device=transformer.device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=transformer.device)
    elif offload in ("encoders", "group"):  # diffusers' group offloading, one layer per group
        pipe.enable_group_offload(transformer.device, offload_type="leaf_level", use_stream=True,
                                  exclude_modules=["transformer", "vae"] if offload == "encoders" else None)

    return applied(pipe)


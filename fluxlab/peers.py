"""Other tools' published recipes for FLUX.1-dev on one GPU, each composed from that tool's own public calls, so that
`scripts/bench.py` times them on the same freshly loaded pipeline, in the same run, as fluxlab's configurations.

Each recipe takes a loaded pipeline, applies the tool's calls and returns what a record's label and extras say of it:
the tool, its version and the recipe as run (with what it leaves out here and why).
"""
import importlib.metadata

import torch

from .optimize import INDUCTOR_FLAG_SETS


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def flux_fast(pipe) -> dict:
    """huggingface/flux-fast's recipe (a script, not a package: its calls are torchao's, diffusers' and torch's):
    fused QKV projections, torchao float8 dynamic quantization per row, its inductor flags, a channels-last VAE and
    the whole transformer compiled with CUDA graphs, the VAE decoder compiled. Left out: FlashAttention-3 (no wheel
    for this torch), coordinate-descent tuning (its compile ran past our time limit), torch.export + AOTInductor
    (torch.compile with mode reduce-overhead instead: the same graphs, compiled at the first call)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    pipe.transformer.fuse_qkv_projections()
    pipe.vae.fuse_qkv_projections()
    # set_inductor_config=False: torchao's default would switch on coordinate-descent tuning process-wide, which
    # this recipe leaves out
    quantize_(pipe.transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(),
                                                                         set_inductor_config=False))
    pipe.vae.to(memory_format=torch.channels_last)
    # torch.compile takes a mode or options: reduce-overhead's options plus the flags, scoped to these graphs
    # (flux-fast sets them in torch._inductor.config, which would leak into the run's later configurations).
    flags = INDUCTOR_FLAG_SETS["conv_1x1_as_mm"] | INDUCTOR_FLAG_SETS["epilogue_fusion"]
    options = dict(torch._inductor.list_mode_options("reduce-overhead")) | flags
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, options=options)
    pipe.vae.decode = torch.compile(pipe.vae.decode, fullgraph=True, options=flags)
    return dict(tool="flux-fast", version=f"recipe of huggingface/flux-fast; torchao {_version('torchao')}",
                recipe="fused QKV + torchao float8 per-row + conv_1x1_as_mm, epilogue_fusion=False + channels-last "
                       "VAE + torch.compile(transformer, fullgraph=True, reduce-overhead) + compiled VAE decode",
                without="FlashAttention-3 (no wheel for this torch), coordinate-descent tuning, torch.export + "
                        "AOTInductor (torch.compile instead)")


def cache_dit(pipe) -> dict:
    """cache-dit's own API: its torchao float8 per-row quantization through `enable_cache` (no cache config: random
    weights never reuse a step, so the cache would only add its checks), then the transformer compiled."""
    import cache_dit as cd

    cd.enable_cache(pipe, quantize_config=cd.QuantizeConfig(quant_type="float8_per_row"))
    pipe.transformer = torch.compile(pipe.transformer)
    return dict(tool="cache-dit", version=_version("cache-dit"),
                recipe="cache_dit.enable_cache(pipe, quantize_config=QuantizeConfig('float8_per_row')) + "
                       "torch.compile(transformer)",
                without="its cache (random weights never reuse a step)")


def para_attention(pipe) -> dict:
    """The source article's one-GPU recipe through ParaAttention's API: its First Block Cache (0.12), torchao float8
    (dynamic activations and weights in the transformer, weight-only in T5), the transformer compiled. para-attn
    0.3.38 fails with diffusers 0.42 (its cache calls FLUX's single blocks without `encoder_hidden_states`): kept so
    that a run records what a reader of the article would get."""
    from para_attn.first_block_cache.diffusers_adapters import apply_cache_on_pipe
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, quantize_

    apply_cache_on_pipe(pipe, residual_diff_threshold=0.12)
    quantize_(pipe.text_encoder_2, Float8WeightOnlyConfig())
    quantize_(pipe.transformer, Float8DynamicActivationFloat8WeightConfig())
    pipe.transformer = torch.compile(pipe.transformer)
    return dict(tool="ParaAttention", version=_version("para-attn"),
                recipe="apply_cache_on_pipe(pipe, residual_diff_threshold=0.12) + torchao float8 (T5 weight-only) + "
                       "torch.compile(transformer)",
                without="the article's max-autotune-no-cudagraphs mode (default mode: minutes less autotuning)")


RECIPES = {"flux-fast": flux_fast, "cache-dit": cache_dit, "para-attention": para_attention}


def label(peer: dict) -> str:
    """A record's label for a peer's recipe: the tool and its version first."""
    return f"{peer['tool']} ({peer['version']}): {peer['recipe']}; without {peer['without']}"

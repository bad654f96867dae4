"""FP8 attention for FLUX on Hopper: cuDNN's FP8 flash attention (the `nvidia-cudnn-frontend` wheel) in an
attention processor.

Each call scales q, k and v by one factor each into float8_e4m3. For v it is 448 over the tensor's absolute
maximum, computed on the GPU. For q and k it is 448 over a bound known before any call: they leave an RMSNorm and
the rotary embedding, and no element of RMSNorm(x) * w exceeds sqrt(head_dim) * max|w| (|x_i| / rms(x) <= sqrt(d)),
which a rotation of pairs keeps; so no pass over q and k looks for their maximum, and their quantization joins the
norm's kernel. FP8 is a floating-point format: values below the bound keep their relative precision.

cuDNN multiplies q·kᵀ in FP8 with float32 accumulation, scales the softmax probabilities by 256 into FP8 for the
product with v, and writes the output in FP8 (Hopper has no bf16 output for this kernel) on half of v's scale, since
no output exceeds v's maximum; the processor turns it back into bf16. Why cuDNN: torch's
scaled_dot_product_attention has no FP8 path without FlashAttention-3, which has no wheel for this torch.
"""
import functools
import importlib
import math

import torch
from diffusers.models.attention_dispatch import _templated_context_parallel_attention
from diffusers.models.transformers.transformer_flux import FluxAttention

from .flux_attention import SwappedAttnProcessor
from .quant import E4M3_MAX

NAME = "cudnn_fp8"  # fluxlab.optimize(pipe, attention=NAME)
P_SCALE = 256.0  # softmax probabilities are at most 1: scaled by this into FP8


def unavailable(device: torch.device) -> str | None:
    """Why FP8 attention cannot run on `device` (one line), or None if it can."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        return f"attention={NAME!r} runs cuDNN's FP8 attention kernels for Hopper (H100, H200); not on {name}."
    try:
        importlib.import_module("cudnn")
    except ImportError:
        return f"attention={NAME!r} needs the cuDNN frontend: pip install nvidia-cudnn-frontend"
    return None


def quantize(x: torch.Tensor, bound: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` scaled by 448 / max|x| (or 448 / `bound`, a float32 number no |x| exceeds) into float8_e4m3fn, and the
    factor that scales it back (a 1x1x1x1 tensor)."""
    scale = E4M3_MAX / (x.abs().amax().float().clamp_min(1e-12) if bound is None else bound)
    return (x.float() * scale).to(torch.float8_e4m3fn).contiguous(), scale.reciprocal().reshape(1, 1, 1, 1)


def norm_bound(*norms) -> float:
    """A number no element of these RMSNorms' outputs exceeds, rotary embedding applied or not: sqrt(dim) times
    the largest |weight| (1 without weights)."""
    return max(math.sqrt(n.weight.numel()) * n.weight.detach().abs().max().item() if n.weight is not None
               else math.sqrt(n.dim[-1]) for n in norms if n is not None)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
              bounds: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of (batch, sequence, heads, head_dim) tensors in FP8; returns that layout in bf16.
    `bounds`: numbers no |query| and no |key| exceed (`norm_bound`, two float32 values); None: their maxima,
    computed."""
    bound_q, bound_k = (None, None) if bounds is None else bounds
    (q, descale_q), (k, descale_k) = quantize(query, bound_q), quantize(key, bound_k)
    return attend_fp8(q, k, value, descale_q, descale_k, scale, query.dtype)


def attend_fp8(q: torch.Tensor, k: torch.Tensor, value: torch.Tensor, descale_q: torch.Tensor,
               descale_k: torch.Tensor, scale: float | None, dtype: torch.dtype) -> torch.Tensor:
    """cuDNN's FP8 attention of q and k already in FP8 (with the factors that scale them back) and `value`,
    quantized here by its maximum; returns (batch, sequence, heads, head_dim) in `dtype`."""
    v, descale_v = quantize(value)
    scale_o = 0.5 / descale_v
    out = torch.ops.fluxlab.cudnn_sdpa_fp8(q, k, v, descale_q, descale_k, descale_v, scale_o,
                                          scale or 1 / math.sqrt(q.shape[-1]))
    return (out.float() / scale_o).to(dtype)


@torch.library.custom_op("fluxlab::cudnn_sdpa_fp8", mutates_args=(), device_types="cuda")
def _sdpa_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor, descale_k: torch.Tensor,
              descale_v: torch.Tensor, scale_o: torch.Tensor, attn_scale: float) -> torch.Tensor:
    import cudnn
    graph, t, handle = _graph(tuple(q.shape), q.device, attn_scale)
    out = torch.empty_like(q)
    const = _constants(q.device)
    pack = {t["q"]: q, t["k"]: k, t["v"]: v, t["descale_q"]: descale_q, t["descale_k"]: descale_k,
            t["descale_v"]: descale_v, t["descale_s"]: const["descale_s"], t["scale_s"]: const["scale_s"],
            t["scale_o"]: scale_o, t["o"]: out, t["amax_s"]: const["amax_s"], t["amax_o"]: const["amax_o"]}
    workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=q.device)
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
    graph.execute(pack, workspace, handle=handle)
    return out


@_sdpa_fp8.register_fake
def _(q, k, v, descale_q, descale_k, descale_v, scale_o, attn_scale):
    return torch.empty_like(q)


_GRAPHS, _CONSTANTS, _HANDLES = {}, {}, {}


def _constants(device: torch.device) -> dict:
    """Per device: the softmax scale and its inverse, and buffers for the amaxes cuDNN reports (unused)."""
    if device not in _CONSTANTS:
        full = dict(dtype=torch.float32, device=device)
        _CONSTANTS[device] = dict(scale_s=torch.full((1, 1, 1, 1), P_SCALE, **full),
                                  descale_s=torch.full((1, 1, 1, 1), 1 / P_SCALE, **full),
                                  amax_s=torch.zeros((1, 1, 1, 1), **full), amax_o=torch.zeros((1, 1, 1, 1), **full))
    return _CONSTANTS[device]


def _graph(shape: tuple, device: torch.device, attn_scale: float):
    """cuDNN's FP8 attention graph for (batch, sequence, heads, head_dim) tensors in that memory layout, built once
    per shape, device and scale."""
    key = (shape, device, attn_scale)
    if key not in _GRAPHS:
        import cudnn
        if device not in _HANDLES:
            _HANDLES[device] = cudnn.create_handle()
        fp8, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=fp32, compute_data_type=fp32,
                              handle=_HANDLES[device])
        b, s, h, d = shape
        dims, strides = (b, h, s, d), (s * h * d, d, h * d, 1)  # cuDNN's (b, h, s, d) view of a (b, s, h, d) tensor
        t = {n: graph.tensor(name=n, dim=dims, stride=strides, data_type=fp8) for n in "qkv"}
        for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
            t[n] = graph.tensor(name=n, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=fp32)
        t["o"], _, t["amax_s"], t["amax_o"] = graph.sdpa_fp8(
            q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"], descale_k=t["descale_k"],
            descale_v=t["descale_v"], descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
            is_inference=True, attn_scale=attn_scale, use_causal_mask=False)
        t["o"].set_output(True).set_dim(dims).set_stride(strides).set_data_type(fp8)
        for n in ("amax_s", "amax_o"):
            t[n].set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(fp32)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        _GRAPHS[key] = graph, t, _HANDLES[device]
    return _GRAPHS[key]


def _ulysses_op(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                _save_ctx=True, _parallel_config=None, bounds=None):
    """The forward op diffusers' Ulysses template calls between its all-to-alls (inference only: no LSE)."""
    if return_lse:
        raise ValueError(f"attention={NAME!r} returns no log-sum-exp: use Ulysses (not ring) context parallelism.")
    return attention(query, key, value, scale, bounds)


class FP8AttnProcessor(SwappedAttnProcessor):
    """diffusers' FluxAttnProcessor with its attention call in FP8 (`attention`, on the layer's q and k bounds,
    `attn.fp8_bounds`), under context parallelism too."""

    def attend(self, attn, query, key, value):
        if self._parallel_config is None:
            return attention(query, key, value, bounds=attn.fp8_bounds)
        return _templated_context_parallel_attention(
            query, key, value, forward_op=functools.partial(_ulysses_op, bounds=attn.fp8_bounds), backward_op=None,
            _parallel_config=self._parallel_config)


def add_bounds(transformer) -> None:
    """Give every attention layer the bounds of its q and k norms (`norm_bound`) as a buffer, `fp8_bounds`: an
    input of the compiled blocks, where numbers on the processor would be constants, one compiled graph per layer
    (the real model's norms differ; dynamo stops after 8 recompilations of one block's forward)."""
    for attn in transformer.modules():
        if isinstance(attn, FluxAttention):
            bounds = [norm_bound(attn.norm_q, getattr(attn, "norm_added_q", None)),
                      norm_bound(attn.norm_k, getattr(attn, "norm_added_k", None))]
            attn.register_buffer("fp8_bounds", torch.tensor(bounds, dtype=torch.float32,
                                                            device=attn.norm_q.weight.device), persistent=False)


def use(transformer, processor: FP8AttnProcessor | None = None) -> None:
    """Give every attention layer of a FLUX transformer an FP8 processor (`FP8AttnProcessor`, or a subclass's
    `processor`) and the bounds of its q and k norms (before context parallelism is enabled, which hands each
    processor its configuration)."""
    add_bounds(transformer)
    transformer.set_attn_processor(processor or FP8AttnProcessor())
    if transformer.device.type == "cuda":  # now, not inside a CUDA graph's memory pool on the first call
        _constants(transformer.device)

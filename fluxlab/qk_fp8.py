"""q and k from their projections into FP8 in one kernel each: RMSNorm, rotary embedding and FP8 quantization.

With FP8 attention (`fluxlab.fp8_attention`), q and k leave their projections, go through an RMSNorm per head, the
rotary embedding, and a multiplication into float8_e4m3 (by a bound known before any call); in the double blocks
the text tokens' q and k (their own norms) are joined in front of the image tokens'. inductor writes this as several
kernels (norm, join, rotation and quantization), some with a layout it reads slowly. `norm_rope_fp8`
(`fluxlab.qk_fp8_triton`) reads each token's heads once, keeps them in registers, and writes the FP8 values at the
token's place in the joined sequence: no join, one pass. `NormRopeFP8Processor` is `FP8AttnProcessor` with that
step; v keeps its quantization by its maximum.
"""
import torch
from diffusers.models.embeddings import apply_rotary_emb

from . import fp8_attention
from .flux_attention import project_out, projections
from .quant import E4M3_MAX

if torch.cuda.is_available():  # torch's CUDA wheels bring Triton, its CPU wheels do not
    from . import qk_fp8_triton  # noqa: F401  (registers torch.ops.fluxlab.norm_rope_fp8)


def unavailable(device: torch.device) -> str | None:
    """Why the fused kernel cannot run on `device` (one line), or None if it can."""
    return fp8_attention.unavailable(device)


def reference(streams: list[tuple[torch.Tensor, torch.nn.RMSNorm]], cos: torch.Tensor, sin: torch.Tensor,
              heads: int, scale: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in torch as FLUX's processor does it: each (batch, tokens, heads * head_dim)
    projection through its RMSNorm per head, the streams joined in order, the rotary embedding, times `scale` (a
    float32 number) into float8_e4m3 (clamped to its range)."""
    joined = torch.cat([norm(x.unflatten(-1, (heads, -1))) for x, norm in streams], dim=1)
    rotated = apply_rotary_emb(joined, (cos, sin), sequence_dim=1)
    return (rotated.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def norm_rope_fp8(streams: list[tuple[torch.Tensor, torch.nn.RMSNorm]], cos: torch.Tensor, sin: torch.Tensor,
                  heads: int, scale: torch.Tensor) -> torch.Tensor:
    """`reference`: the Triton kernel on a GPU (bf16 projections, one or two streams), torch elsewhere (tests)."""
    (first, first_norm), *rest = streams
    if first.device.type != "cuda":
        return reference(streams, cos, sin, heads, scale)
    second, second_norm = rest[0] if rest else (None, None)
    eps = first_norm.eps if first_norm.eps is not None else torch.finfo(first.dtype).eps
    return torch.ops.fluxlab.norm_rope_fp8(first, first_norm.weight, second,
                                           None if second_norm is None else second_norm.weight,
                                           cos.float().contiguous(), sin.float().contiguous(), heads, eps, scale)


class NormRopeFP8Processor(fp8_attention.FP8AttnProcessor):
    """`FP8AttnProcessor` whose q and k go from their projections to FP8 through `norm_rope_fp8` (one GPU: under
    context parallelism the exchanges sit between the projections and attention)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None or image_rotary_emb is None or self._parallel_config is not None:
            raise ValueError("qk_fp8 takes FLUX's rotary embedding, no mask, and one GPU (no context parallelism).")
        query, key, value, encoder_query, encoder_key, encoder_value = projections(
            attn, hidden_states, encoder_hidden_states)
        q_streams, k_streams = [(query, attn.norm_q)], [(key, attn.norm_k)]
        if attn.added_kv_proj_dim is not None:
            q_streams.insert(0, (encoder_query, attn.norm_added_q))
            k_streams.insert(0, (encoder_key, attn.norm_added_k))
            value = torch.cat([encoder_value, value], dim=1)
        (cos, sin), scales = image_rotary_emb, E4M3_MAX / attn.fp8_bounds  # as `fp8_attention.quantize` scales
        q = norm_rope_fp8(q_streams, cos, sin, attn.heads, scales[0])
        k = norm_rope_fp8(k_streams, cos, sin, attn.heads, scales[1])
        descale_q, descale_k = (s.reciprocal().reshape(1, 1, 1, 1) for s in scales)
        out = fp8_attention.attend_fp8(q, k, value.unflatten(-1, (attn.heads, -1)), descale_q, descale_k, None,
                                       query.dtype)
        return project_out(attn, out.flatten(2, 3), encoder_hidden_states)


def use(transformer) -> None:
    """Give every attention layer its `NormRopeFP8Processor` and the bounds of its q and k norms, in place of FP8
    attention's processor or diffusers' (before CUDA graphs and torch.compile)."""
    fp8_attention.use(transformer, NormRopeFP8Processor())


def used(transformer) -> bool:
    """Whether `use` was applied."""
    return any(isinstance(p, NormRopeFP8Processor) for p in transformer.attn_processors.values())

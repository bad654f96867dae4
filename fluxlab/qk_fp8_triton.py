"""The Triton kernel of `fluxlab.qk_fp8` (imported where CUDA is: torch's CPU wheels come without Triton)."""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .quant import E4M3_MAX


@triton.jit
def _norm_rope_fp8(x_ptr, w_ptr, cos_ptr, sin_ptr, scale_ptr, out_ptr, tokens, x_row_stride, out_tokens, offset, eps,
                   H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, FP8_MAX: tl.constexpr):
    """One program per token: its H heads of D in registers; RMSNorm per head times the weight, rotary embedding of
    pairs, times `scale` into FP8 at token `offset` + its place in the joined sequence. All in float32: one rounding,
    into FP8."""
    row = tl.program_id(0)
    image, token = row // tokens, row % tokens
    place = offset + token
    h = tl.arange(0, HP)[:, None]
    d = tl.arange(0, D)[None, :]
    heads = h < H
    x = tl.load(x_ptr + row.to(tl.int64) * x_row_stride + h * D + d, mask=heads, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn((tl.sum(x * x, 1) / D + eps).to(tl.float32))  # eps: fp64 when inductor launches it
    y = x * rstd[:, None] * tl.load(w_ptr + d).to(tl.float32)
    cos = tl.load(cos_ptr + place * D + d)
    sin = tl.load(sin_ptr + place * D + d)
    even, odd = tl.split(tl.reshape(y, [HP, D // 2, 2]))
    rotated = tl.reshape(tl.join(-odd, even), [HP, D])  # diffusers' apply_rotary_emb: (-x_imag, x_real) pairs
    q = tl.clamp((y * cos + rotated * sin) * tl.load(scale_ptr), -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
    tl.store(out_ptr + ((image * out_tokens + place).to(tl.int64) * H + h) * D + d, q, mask=heads)


@triton_op("fluxlab::norm_rope_fp8", mutates_args=())
def norm_rope_fp8(first: torch.Tensor, first_weight: torch.Tensor, second: torch.Tensor | None,
                  second_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float,
                  scale: torch.Tensor, warps: int = 2) -> torch.Tensor:
    """`fluxlab.qk_fp8.reference` on the GPU, in float32 (it rounds once, into FP8; the reference rounds to bf16
    after the norm and the rotation, as diffusers' eager layers do): (batch, tokens, heads * head_dim) projections in
    bf16, `second`'s tokens after `first`'s in the (batch, all tokens, heads, head_dim) FP8 output; `cos`, `sin`:
    float32; `scale`: one float32 number. 2 warps: of 1, 2, 4 and 8 the fastest on an H100 at FLUX.1-dev's shapes
    (book/results/kernels-h100.json: 0.023 and 0.019 ms for the double and single blocks, 4 warps 0.033 and 0.029)."""
    streams = [(first, first_weight)] + ([(second, second_weight)] if second is not None else [])
    batch, dim = first.shape[0], first.shape[2]
    total = sum(x.shape[1] for x, _ in streams)
    out = torch.empty(batch, total, heads, dim // heads, device=first.device, dtype=torch.float8_e4m3fn)
    offset = 0
    for x, weight in streams:
        x = x if x.stride(2) == 1 and x.stride(0) == x.shape[1] * x.stride(1) else x.contiguous()
        wrap_triton(_norm_rope_fp8)[(batch * x.shape[1],)](
            x, weight, cos, sin, scale, out, x.shape[1], x.stride(1), total, offset, eps, heads,
            triton.next_power_of_2(heads), dim // heads, E4M3_MAX, num_warps=warps)
        offset += x.shape[1]
    return out

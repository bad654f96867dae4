"""The Triton kernel of `fluxlab.norm_fp8` (imported where CUDA is: torch's CPU wheels come without Triton)."""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .quant import E4M3_MAX


@triton.jit
def _layernorm_modulate_fp8(x_ptr, shift_ptr, scale_ptr, out_ptr, row_scale_ptr, tokens, eps, D: tl.constexpr,
                            BLOCK: tl.constexpr, FP8_MAX: tl.constexpr):
    """One program per token, the row in registers: LayerNorm, times 1 + scale plus shift, the row's maximum, the
    FP8 row and its scale (max / 448) as torchao writes a linear's input. All in float32: one rounding, into FP8."""
    row = tl.program_id(0)
    image = row // tokens
    d = tl.arange(0, BLOCK)
    inside = d < D
    x = tl.load(x_ptr + row.to(tl.int64) * D + d, mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / D
    centred = tl.where(inside, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt_rn((tl.sum(centred * centred, 0) / D + eps).to(tl.float32))  # eps: fp64 from inductor
    factor = 1.0 + tl.load(scale_ptr + image * D + d, mask=inside, other=0.0).to(tl.float32)
    z = centred * rstd * factor + tl.load(shift_ptr + image * D + d, mask=inside, other=0.0).to(tl.float32)
    row_scale = tl.maximum(tl.max(tl.abs(z), 0) / FP8_MAX, 1e-30)
    tl.store(out_ptr + row.to(tl.int64) * D + d, tl.clamp(z / row_scale, -FP8_MAX, FP8_MAX).to(tl.float8e4nv),
             mask=inside)
    tl.store(row_scale_ptr + row, row_scale)


@triton_op("fluxlab::layernorm_modulate_fp8", mutates_args=())
def layernorm_modulate_fp8(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                           warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """`fluxlab.norm_fp8.reference` on the GPU, in float32 (it rounds once, into FP8; the reference rounds to bf16
    after each step and the row scale too, as the blocks and torchao do), for (images, tokens, dim) bf16 `x` and
    (images, dim) `shift` and `scale`. 4 warps: of 4, 8 and 16 the fastest on an H100 at FLUX.1-dev's shapes
    (book/results/kernels-h100.json: 0.020 and 0.017 ms for 4608 and 4096 tokens, 8 warps 0.023 and 0.020)."""
    x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
    images, tokens, dim = x.shape
    out = torch.empty(images, tokens, dim, device=x.device, dtype=torch.float8_e4m3fn)
    row_scale = torch.empty(images, tokens, 1, device=x.device, dtype=torch.float32)
    wrap_triton(_layernorm_modulate_fp8)[(images * tokens,)](x, shift, scale, out, row_scale, tokens, eps, dim,
                                                             triton.next_power_of_2(dim), E4M3_MAX, num_warps=warps)
    return out, row_scale

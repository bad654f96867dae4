"""The Triton kernel of `fluxlab.mlp_fp8` (imported where CUDA is: torch's CPU wheels come without Triton)."""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .gelu import TWO_SQRT_2_OVER_PI
from .quant import E4M3_MAX


@triton.jit
def _gelu_join_fp8(attn_ptr, mlp_ptr, out_ptr, scale_ptr, A: tl.constexpr, H: tl.constexpr, BLOCK_A: tl.constexpr,
                   BLOCK_H: tl.constexpr, C: tl.constexpr, FP8_MAX: tl.constexpr):
    """One program per row, the whole row in registers: GELU, row maximum, FP8 cast; one read, one write."""
    row = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    x = tl.load(mlp_ptr + row * H + h, mask=h < H, other=0.0).to(tl.float32)
    g = (x / (1.0 + tl.exp(-C * (x + 0.044715 * x * x * x)))).to(tl.bfloat16).to(tl.float32)
    amax = tl.max(tl.abs(g), 0)
    if A > 0:
        a_idx = tl.arange(0, BLOCK_A)
        a = tl.load(attn_ptr + row * A + a_idx, mask=a_idx < A, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(a), 0))
    scale = tl.maximum((amax / FP8_MAX).to(tl.bfloat16).to(tl.float32), 1e-30)  # torchao's bf16 division
    if A > 0:
        tl.store(out_ptr + row * (A + H) + a_idx, tl.clamp(a / scale, -FP8_MAX, FP8_MAX).to(tl.float8e4nv),
                 mask=a_idx < A)
    tl.store(out_ptr + row * (A + H) + A + h, tl.clamp(g / scale, -FP8_MAX, FP8_MAX).to(tl.float8e4nv),
             mask=h < H)
    tl.store(scale_ptr + row, scale)


@triton_op("fluxlab::gelu_join_fp8", mutates_args=())
def gelu_join_fp8(attn: torch.Tensor, mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fluxlab.mlp_fp8.reference` on the GPU, for 2-D bf16 `attn` (rows x A, A may be 0) and `mlp`."""
    attn, mlp = attn.contiguous(), mlp.contiguous()
    (rows, a), h = attn.shape, mlp.shape[1]
    out = torch.empty(rows, a + h, device=mlp.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, 1, device=mlp.device, dtype=torch.float32)
    wrap_triton(_gelu_join_fp8)[(rows,)](attn, mlp, out, scale, a, h, max(triton.next_power_of_2(a), 16),
                                         triton.next_power_of_2(h), TWO_SQRT_2_OVER_PI, E4M3_MAX, num_warps=8)
    return out, scale

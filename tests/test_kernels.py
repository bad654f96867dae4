"""fluxlab's Triton kernels on a machine without a GPU: each compiles for Hopper ahead of time, what a GPU run meets
first. (What they compute is tested against their torch references on an FP8 GPU. Triton's interpreter does not
stand in on a CPU: it truncates bf16 where the GPU rounds, and its FP8 casts go wrong where a value rounds up to a
power of two: 127.0 becomes 64 in Triton 3.6.)"""
import pytest

triton = pytest.importorskip("triton")  # the test extra brings the GPU machines' Triton
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fluxlab import mlp_fp8_triton, norm_fp8_triton, qk_fp8_triton  # noqa: E402
from fluxlab.gelu import TWO_SQRT_2_OVER_PI  # noqa: E402

FP8 = 448.0
# Each kernel at FLUX.1-dev's shapes, with the warps its wrapper launches it with.
KERNELS = {
    "norm_rope_fp8": (qk_fp8_triton._norm_rope_fp8, 2, dict(
        x_ptr="*bf16", w_ptr="*bf16", cos_ptr="*fp32", sin_ptr="*fp32", scale_ptr="*fp32", out_ptr="*fp8e4nv",
        tokens="i32", x_row_stride="i32", out_tokens="i32", offset="i32", eps="fp32"),
        dict(H=24, HP=32, D=128, FP8_MAX=FP8)),
    "layernorm_modulate_fp8": (norm_fp8_triton._layernorm_modulate_fp8, 4, dict(
        x_ptr="*bf16", shift_ptr="*bf16", scale_ptr="*bf16", out_ptr="*fp8e4nv", row_scale_ptr="*fp32",
        tokens="i32", eps="fp32"), dict(D=3072, BLOCK=4096, FP8_MAX=FP8)),
    "gelu_join_fp8": (mlp_fp8_triton._gelu_join_fp8, 8, dict(
        attn_ptr="*bf16", mlp_ptr="*bf16", out_ptr="*fp8e4nv", scale_ptr="*fp32"),
        dict(A=3072, H=12288, BLOCK_A=4096, BLOCK_H=16384, C=TWO_SQRT_2_OVER_PI, FP8_MAX=FP8)),
}


@pytest.mark.parametrize("name", KERNELS)
def test_compiles_for_hopper(name):
    kernel, warps, pointers, constants = KERNELS[name]
    source = ASTSource(fn=kernel, signature=pointers | {k: "constexpr" for k in constants}, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]



@pytest.mark.parametrize("name", [name for name, (_, _, pointers, _) in KERNELS.items() if "eps" in pointers])
def test_compiles_with_the_float64_eps_inductor_passes(name):
    """Inside a compiled graph inductor launches the kernels itself and types a Python float argument as float64
    (eager launches type it float32): both must compile (the first H100 check of the compiled rungs failed here)."""
    kernel, warps, pointers, constants = KERNELS[name]
    source = ASTSource(fn=kernel, signature=pointers | {"eps": "fp64"} | {k: "constexpr" for k in constants},
                       constexprs=constants)
    assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["cubin"]

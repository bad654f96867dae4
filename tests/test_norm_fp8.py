"""fluxlab.norm_fp8: each LayerNorm + modulation + FP8 quantization in one pass, read by every linear after it."""
import pytest
import torch

import fluxlab
from fluxlab import fp8_attention, mlp_fp8, norm_fp8, qk_fp8
from fluxlab.quant import E4M3_MAX, rowwise_fp8

from conftest import emulated, emulated_fp8, fp8_steps, latents, steps_histogram

READERS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "proj_mlp", "net.0.proj")


def emulated_product(layer, data, scale):
    """`fluxlab.mlp_fp8.product` on a CPU: the layer on its input scaled back from FP8."""
    return torch.nn.functional.linear(data.float() * scale, layer.weight, layer.bias)


def quantize_input(module, args):
    """A linear's input rounded to FP8 row by row as torchao rounds it, and scaled back."""
    data, scale = rowwise_fp8(args[0])
    return (data.float() * scale,)


@pytest.mark.parametrize("qk", [False, True])
def test_the_one_pass_blocks_are_diffusers_blocks_with_fp8_inputs(tiny, tiny_pipe, monkeypatch, qk):
    """On a CPU (FP8 products and attention emulated alike): diffusers' blocks whose linears after a LayerNorm get
    their input rounded to FP8 give the same latents as the one-pass blocks, bit for bit; with q and k's one-pass
    processor (`fluxlab.qk_fp8`) too."""
    for name, fake in (("attention", emulated), ("attend_fp8", emulated_fp8)):
        monkeypatch.setattr(fp8_attention, name, fake)
    monkeypatch.setattr(mlp_fp8, "product", emulated_product)
    fp8_attention.use(tiny_pipe.transformer)
    mlp_fp8.use(tiny_pipe.transformer)
    hooked = [m.register_forward_pre_hook(quantize_input) for name, m in tiny_pipe.transformer.named_modules()
              if name.endswith(READERS)]
    assert len(hooked) == 8 * len(tiny_pipe.transformer.transformer_blocks) + 4 * len(
        tiny_pipe.transformer.single_transformer_blocks)
    reference = latents(tiny_pipe, tiny)
    one_pass = fluxlab.load_pipeline(tiny)
    (qk_fp8.use if qk else fp8_attention.use)(one_pass.transformer)
    mlp_fp8.use(one_pass.transformer)
    norm_fp8.use(one_pass.transformer)
    assert fluxlab.applied(one_pass) == {"attention": "cudnn_fp8", "gelu_fp8": True, "norm_fp8": True} | (
        {"qk_fp8": True} if qk else {})
    assert torch.equal(latents(one_pass, tiny), reference)


def test_refused_without_fp8_attention_and_the_one_pass_mlps(tiny_pipe):
    with pytest.raises(ValueError, match="norm_fp8=True hands FP8 rows to FP8 attention's projections"):
        fluxlab.optimize(tiny_pipe, norm_fp8=True, fp8="rowwise")
    with pytest.raises(ValueError, match="norm_fp8 hands the attention FP8 inputs: use it with attention='cudnn_fp8'"):
        norm_fp8.use(tiny_pipe.transformer)
    assert fluxlab.applied(tiny_pipe) == {}


def exact(x, shift, scale, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel computes, in float64 until the FP8 rounding: the FP8 rows and their scales (max / 448)."""
    x = x.double()
    y = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    z = y * (1 + scale.double()[:, None]) + shift.double()[:, None]
    row_scale = z.abs().amax(-1, keepdim=True) / E4M3_MAX
    return (z / row_scale).clamp(-E4M3_MAX, E4M3_MAX).float().to(torch.float8_e4m3fn), row_scale


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and fluxlab.quant.fp8_tensor_cores(torch.device("cuda"))),
                    reason="the Triton kernel runs on an FP8 GPU")
def test_the_triton_kernel_is_the_reference():
    """At FLUX.1-dev's width, against the math in float64: the same row scales to float32's precision and the same
    FP8 values but where float32's last bits move one across an FP8 rounding boundary (one step). torch's bf16
    reference (the blocks' eager steps, each rounded to bf16, and torchao's scale rounded to bf16) is printed beside
    it: measured on one H100 its row scales were the kernel's in 83% of rows only, which a test of the kernel
    against it took for the kernel's error."""
    generator = torch.Generator().manual_seed(0)
    for images, tokens in ((1, 4608), (2, 512)):
        x = (torch.randn(images, tokens, 3072, generator=generator) * 4).bfloat16().cuda()
        shift, scale = ((torch.randn(images, 3072, generator=generator)).bfloat16().cuda() for _ in range(2))
        ours = norm_fp8.layernorm_modulate_fp8(x, shift, scale, 1e-6)
        expected, expected_scale = exact(x, shift, scale, 1e-6)
        bf16 = norm_fp8.reference(x, shift, scale, 1e-6)
        print(f"LayerNorm {images}x{tokens}: FP8 steps from float64, kernel {steps_histogram(ours.data, expected)}, "
              f"torch bf16 {steps_histogram(bf16.data, expected)}; row scales off by more than 1e-6: kernel "
              f"{((ours.scale / expected_scale - 1).abs() > 1e-6).float().mean().item():.4f}, torch bf16 "
              f"{((bf16.scale / expected_scale - 1).abs() > 1e-6).float().mean().item():.4f}")
        assert ours.data.shape == expected.shape and ours.scale.shape == expected_scale.shape
        torch.testing.assert_close(ours.scale.double(), expected_scale, rtol=1e-6, atol=0)
        assert (ours.data.float() != expected.float()).float().mean().item() < 1e-3
        assert fp8_steps(ours.data, expected).max().item() <= 1

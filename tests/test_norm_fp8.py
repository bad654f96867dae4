"""fluxlab.norm_fp8: each LayerNorm + modulation + FP8 quantization in one pass, read by every linear after it."""
import pytest
import torch

import fluxlab
from fluxlab import fp8_attention, mlp_fp8, norm_fp8, qk_fp8
from fluxlab.quant import rowwise_fp8

from conftest import emulated, emulated_fp8, latents

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


@pytest.mark.skipif(not (torch.cuda.is_available() and fluxlab.quant.fp8_tensor_cores(torch.device("cuda"))),
                    reason="the Triton kernel runs on an FP8 GPU")
def test_the_triton_kernel_is_the_reference():
    """At FLUX.1-dev's width: the same FP8 rows and scales but for rounding ties (within one FP8 step)."""
    generator = torch.Generator().manual_seed(0)
    for images, tokens in ((1, 4608), (2, 512)):
        x = (torch.randn(images, tokens, 3072, generator=generator) * 4).bfloat16().cuda()
        shift, scale = ((torch.randn(images, 3072, generator=generator)).bfloat16().cuda() for _ in range(2))
        ours, expected = norm_fp8.layernorm_modulate_fp8(x, shift, scale, 1e-6), norm_fp8.reference(x, shift, scale,
                                                                                                    1e-6)
        assert ours.data.shape == expected.data.shape and ours.scale.shape == expected.scale.shape
        assert (ours.scale == expected.scale).float().mean().item() > 0.99
        differ = ours.data.float() != expected.data.float()
        assert differ.float().mean().item() < 1e-2
        step = 2.0 ** (torch.floor(torch.log2(expected.data.float().abs().clamp_min(2 ** -6))) - 3)
        assert ((ours.data.float() - expected.data.float()).abs() <= step)[differ].all()

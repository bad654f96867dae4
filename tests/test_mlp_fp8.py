"""fluxlab.mlp_fp8: the MLP outputs quantized in the GELU's pass compute what diffusers' blocks with torchao's FP8
rowwise linears compute. torchao refuses dynamic FP8 on a CPU, so the weights here are its FP8 tensors built by
hand, as `quantize_` builds them on an FP8 GPU; the kernel's torch form (`reference`) stands in for Triton."""
import pytest
import torch
from torchao.float8.inference import Float8MMConfig
from torchao.quantization import PerRow
from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor, QuantizeTensorToFloat8Kwargs

import fluxlab
from fluxlab import graphs, mlp_fp8, quant


def fp8_rowwise(model):
    """What quantize_(model, Float8DynamicActivationFloat8WeightConfig(PerRow())) does on an FP8 GPU."""
    for module in model.modules():
        if quant.fp8_friendly(module, ""):
            weight = Float8Tensor.from_hp(module.weight.detach(), granularity=PerRow(),
                                          mm_config=Float8MMConfig(use_fast_accum=True),
                                          act_quant_kwargs=QuantizeTensorToFloat8Kwargs(granularity=PerRow()))
            module.weight = torch.nn.Parameter(weight, requires_grad=False)


def test_the_kernel_quantizes_rows_as_torchao_does():
    generator = torch.Generator().manual_seed(0)
    attn = (torch.randn(64, 96, generator=generator) * 3).bfloat16()
    mlp = (torch.randn(64, 384, generator=generator) * 4).bfloat16()
    mlp[5] = 0  # a row whose GELU is all zeros still has the attention's maximum
    data, scale = mlp_fp8.reference(attn, mlp)
    joined = torch.cat([attn, torch.nn.functional.gelu(mlp, approximate="tanh")], dim=-1)
    torchao = Float8Tensor.from_hp(joined, granularity=PerRow())
    assert data.dtype == torch.float8_e4m3fn and data.shape == (64, 480) and scale.shape == (64, 1)
    assert torch.equal(scale, torchao.scale)
    # one bf16 step of GELU (sigmoid form against tanh form) may move an element to the next FP8 value
    assert (data.float() != torchao.qdata.float()).float().mean().item() < 1e-3
    torch.testing.assert_close(data.float() * scale, torchao.dequantize().float(), rtol=2 ** -3, atol=0)


@pytest.mark.gpu
def test_one_pass_blocks_compute_what_diffusers_blocks_compute(tiny):
    """On an FP8 GPU the blocks run there, the kernel and torchao's FP8 products included (a CPU's mkldnn FP8
    product in torch 2.11 takes per-tensor scales only); elsewhere on the CPU, the kernel's torch form standing in."""
    fp8_gpu = torch.cuda.is_available() and quant.fp8_tensor_cores(torch.device("cuda"))
    settings = tiny.on(torch.device("cuda")) if fp8_gpu else tiny
    pipe = fluxlab.load_pipeline(settings)
    transformer = pipe.transformer.to(torch.bfloat16)
    fp8_rowwise(transformer)
    single, double = transformer.single_transformer_blocks[0], transformer.transformer_blocks[0]
    generator = torch.Generator().manual_seed(0)
    dim, head_dim = single.proj_out.out_features, single.attn.head_dim
    image, text = (torch.randn(1, n, dim, generator=generator).bfloat16().to(settings.device) for n in (64, 16))
    temb = torch.randn(1, dim, generator=generator).bfloat16().to(settings.device)
    theta = torch.rand(80, head_dim, generator=generator).to(settings.device) * 6
    args = (image, text, temb, (theta.cos(), theta.sin()))
    with torch.no_grad():
        expected = single(*args) + double(*args)
        mlp_fp8.use(transformer)
        assert fluxlab.applied(pipe)["gelu_fp8"] is True and mlp_fp8.used(transformer)
        graphs.capture_blocks(transformer, compile=False)  # on a CPU: the blocks' own forwards, through the hook
        assert single._diffusers_hook.get_hook(graphs.HOOK).run is mlp_fp8.single_block_forward
        seen = single(*args) + double(*args)
    for ours, theirs in zip(seen, expected):
        torch.testing.assert_close(ours, theirs, rtol=2 ** -7, atol=1e-3)


def test_one_pass_needs_fp8_rowwise_products(tiny, tiny_pipe):
    with pytest.raises(ValueError, match="gelu_fp8=True quantizes the MLP outputs for FP8 rowwise products"):
        fluxlab.optimize(tiny_pipe, gelu_fp8=True)
    with pytest.raises(ValueError, match=r"^gelu_fp8=True writes FP8 tensor cores' inputs .* not on cpu\.$"):
        fluxlab.optimize(tiny_pipe, gelu_fp8=True, fp8="rowwise")
    with pytest.raises(ValueError, match="gelu_fp8=1: must be True or False"):
        fluxlab.optimize(tiny_pipe, gelu_fp8=1, fp8="rowwise")
    assert fluxlab.applied(tiny_pipe) == {}
    mlp_fp8.use(tiny_pipe.transformer)  # without FP8 weights the forward says what it needs
    with pytest.raises(ValueError, match="gelu_fp8 and norm_fp8 feed FP8 rowwise products"):
        fluxlab.generate(tiny_pipe, tiny)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and quant.fp8_tensor_cores(torch.device("cuda"))),
                    reason="the Triton kernel runs on an FP8 GPU")
def test_the_triton_kernel_is_the_reference():
    generator = torch.Generator().manual_seed(0)
    for a, h in ((3072, 12288), (0, 12288), (96, 384)):
        attn = (torch.randn(4608, a, generator=generator) * 3).bfloat16().cuda()
        mlp = (torch.randn(4608, h, generator=generator) * 4).bfloat16().cuda()
        data, scale = mlp_fp8.gelu_join_fp8(attn, mlp)
        expected_data, expected_scale = mlp_fp8.reference(attn, mlp)
        assert torch.equal(scale, expected_scale)
        assert (data.float() != expected_data.float()).float().mean().item() < 1e-3

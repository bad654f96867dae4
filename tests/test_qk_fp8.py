"""fluxlab.qk_fp8: q and k from their projections to FP8 in one kernel give FP8 attention's q and k."""
import pytest
import torch

import fluxlab
from fluxlab import fp8_attention, qk_fp8
from fluxlab.quant import E4M3_MAX

from conftest import emulated, emulated_fp8, fp8_steps, latents, steps_histogram


def test_the_processor_feeds_attention_the_q_and_k_of_fp8_attention(tiny, tiny_pipe, monkeypatch):
    """With the attention call emulated the same way, the one-pass processor (its torch reference on a CPU: per-head
    norms, text tokens first, rotary embedding, FP8 on the same bounds) gives FP8 attention's latents."""
    monkeypatch.setattr(fp8_attention, "attention", emulated)
    monkeypatch.setattr(fp8_attention, "attend_fp8", emulated_fp8)
    fp8_attention.use(tiny_pipe.transformer)
    reference = latents(tiny_pipe, tiny)
    fused = fluxlab.load_pipeline(tiny)
    qk_fp8.use(fused.transformer)
    assert fluxlab.applied(fused) == {"attention": "cudnn_fp8", "qk_fp8": True}
    assert fluxlab.describe(fluxlab.applied(fused)) == "attention cudnn_fp8 + q/k norm + rotary + FP8 in one pass"
    assert torch.equal(latents(fused, tiny), reference)


def test_refused_without_fp8_attention_on_one_gpu(tiny_pipe):
    with pytest.raises(ValueError, match="qk_fp8=True writes FP8 attention's q and k: use it with "
                                         "attention='cudnn_fp8' on one GPU"):
        fluxlab.optimize(tiny_pipe, qk_fp8=True)
    with pytest.raises(ValueError, match="runs cuDNN's FP8 attention kernels for Hopper .* not on cpu"):
        fluxlab.optimize(tiny_pipe, qk_fp8=True, attention="cudnn_fp8")
    assert fluxlab.applied(tiny_pipe) == {}


def exact(streams, cos, sin, heads, scale) -> torch.Tensor:
    """What the kernel computes, in float64 until the FP8 rounding: the float32 reference it is held to."""
    joined = []
    for x, norm in streams:
        x = x.double().unflatten(-1, (heads, -1))
        joined.append(x * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm.eps) * norm.weight.double())
    y = torch.cat(joined, dim=1)
    pairs = y.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    out = (y * cos.double()[None, :, None] + rotated * sin.double()[None, :, None]) * scale.double()
    return out.clamp(-E4M3_MAX, E4M3_MAX).float().to(torch.float8_e4m3fn)


@pytest.mark.gpu
@pytest.mark.skipif(fp8_attention.unavailable(torch.device("cuda")) is not None if torch.cuda.is_available() else True,
                    reason="the Triton kernel feeds cuDNN's FP8 attention (Hopper)")
def test_the_triton_kernel_is_the_reference():
    """At FLUX.1-dev's shapes (24 heads of 128; the double blocks' 512 text tokens before 4096 image tokens, the
    single blocks' 4608 in one stream), against the math in float64: the same FP8 values but where float32's last
    bits move a value across an FP8 rounding boundary (one step). torch's bf16 reference (diffusers' eager layers:
    bf16 after the norm and after the rotation) is printed beside it: measured on one H100 it moved 3.5% of the
    values a step, which a test of the kernel against it took for the kernel's error."""
    generator = torch.Generator().manual_seed(0)
    heads, dim = 24, 128
    angles = torch.rand(4608, dim // 2, generator=generator) * 100
    cos, sin = (f(angles).repeat_interleave(2, 1).cuda() for f in (torch.cos, torch.sin))
    for tokens in ((512, 4096), (4608,)):
        streams = []
        for n in tokens:
            norm = torch.nn.RMSNorm(dim, eps=1e-6).to("cuda", torch.bfloat16)
            with torch.no_grad():
                norm.weight.copy_(torch.rand(dim, generator=generator) + 0.5)
            streams.append(((torch.randn(1, n, heads * dim, generator=generator) * 3).bfloat16().cuda(), norm))
        scale = torch.tensor(E4M3_MAX / fp8_attention.norm_bound(*(norm for _, norm in streams)), device="cuda")
        ours = qk_fp8.norm_rope_fp8(streams, cos, sin, heads, scale)
        expected = exact(streams, cos[:sum(tokens)], sin[:sum(tokens)], heads, scale)
        bf16 = qk_fp8.reference(streams, cos[:sum(tokens)], sin[:sum(tokens)], heads, scale)
        print(f"q/k {tokens}: FP8 steps from float64, kernel {steps_histogram(ours, expected)}, torch bf16 "
              f"{steps_histogram(bf16, expected)}")
        assert ours.shape == expected.shape == (1, sum(tokens), heads, dim) and ours.dtype == torch.float8_e4m3fn
        assert (ours.float() != expected.float()).float().mean().item() < 1e-3
        assert fp8_steps(ours, expected).max().item() <= 1

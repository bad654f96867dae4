"""fluxlab.modulation: every step's adaLN modulations computed at the first step give the pipeline's own latents."""
import dataclasses

import pytest
import torch
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle
from torch._dynamo.utils import counters

import fluxlab
from fluxlab import modulation

from conftest import latents


def test_precomputed_modulations_are_the_layers_own(tiny, tiny_pipe):
    reference = latents(tiny_pipe, tiny)
    precomputed = fluxlab.load_pipeline(tiny)
    done = fluxlab.optimize(precomputed, precompute_modulation=True)
    assert done == {"precompute_modulation": True} and fluxlab.describe(done) == "adaLN for all steps at once"
    transformer = precomputed.transformer
    norms = [m for m in transformer.modules() if isinstance(m, (AdaLayerNormZero, AdaLayerNormZeroSingle,
                                                                AdaLayerNormContinuous))]
    assert len(norms) == 2 * len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks) + 1
    assert all(isinstance(n.linear, modulation.Precomputed) for n in norms)
    torch.testing.assert_close(latents(precomputed, tiny), reference, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="precompute_modulation was already applied"):
        fluxlab.optimize(precomputed, precompute_modulation=True)


def test_each_image_gets_its_own_steps_prompt_and_guidance(tiny, tiny_pipe):
    """A second call with another prompt, step count and guidance computes new modulations; true classifier-free
    guidance (two pooled prompts per step) keeps one table per prompt."""
    precomputed = fluxlab.load_pipeline(tiny)
    modulation.use(precomputed)
    latents(precomputed, tiny)
    other = dataclasses.replace(tiny, prompt="a red square", steps=5, guidance=5.0)
    torch.testing.assert_close(latents(precomputed, other), latents(tiny_pipe, other), rtol=0, atol=1e-5)
    cfg = dict(other.pipe_kwargs(), negative_prompt="blurry", true_cfg_scale=2.0, output_type="latent")

    def true_cfg(pipe):
        return pipe(**cfg, generator=torch.Generator("cpu").manual_seed(tiny.seed)).images[0]

    torch.testing.assert_close(true_cfg(precomputed), true_cfg(tiny_pipe), rtol=0, atol=1e-5)


def test_a_pipeline_called_under_inference_mode(tiny, tiny_pipe):
    """Tensors made under torch.inference_mode keep no version counter: the table knows them by identity alone."""
    precomputed = fluxlab.load_pipeline(tiny)
    modulation.use(precomputed)
    with torch.inference_mode():
        ours = latents(precomputed, tiny)
        reference = latents(tiny_pipe, tiny)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_block_graphs_read_each_step_s_row(tiny, tiny_pipe, emulated_cuda_graphs):
    """Under CUDA graphs (emulated) the blocks read the row buffer at its fixed address, which each step refills:
    two images of different step counts and guidance get the pipeline's own latents."""
    precomputed = fluxlab.load_pipeline(tiny)
    modulation.use(precomputed)
    fluxlab.graphs.capture_blocks(precomputed.transformer, compile=False)
    for request in (tiny, dataclasses.replace(tiny, steps=5, guidance=5.0)):
        torch.testing.assert_close(latents(precomputed, request), latents(tiny_pipe, request), rtol=0, atol=1e-5)
    assert emulated_cuda_graphs and all(g.replays for g in emulated_cuda_graphs)


def test_under_fp8_compiled_blocks_graphs_and_the_cache(tiny):
    """The fastest stack's order: the layers swapped first, FP8 (weight-only on a CPU) quantizes the layers they
    hold, the blocks compiled (and captured, on a GPU) read the step's row; the cache decides as before. Each
    layer's row is a buffer of its module, not a slice by numbers: torch.compile makes no graph per block (FLUX has 57
    blocks; dynamo gives up after 8 recompilations of one function)."""
    stack = dict(fp8="rowwise", compile="regional", graphs=True, cache=0.3)
    plain, precomputed = fluxlab.load_pipeline(tiny), fluxlab.load_pipeline(tiny)
    fluxlab.optimize(plain, **stack)
    done = fluxlab.optimize(precomputed, precompute_modulation=True, **stack)
    assert done["precompute_modulation"] and done["fp8"] and done["compile"]["scope"] == "regional"
    joined = precomputed.transformer.fluxlab_modulation  # every adaLN layer's weights, quantized with the rest
    assert "Float8" in type(joined.weight).__name__ and not any(
        isinstance(m, torch.nn.Linear) for n in precomputed.transformer.modules()
        if isinstance(n, modulation.NORMS) for m in n.modules())
    graphs = []
    for pipe in (plain, precomputed):
        torch._dynamo.reset()
        counters.clear()
        graphs.append((latents(pipe, tiny), counters["stats"]["unique_graphs"]))
    (theirs, plain_graphs), (ours, our_graphs) = graphs
    assert our_graphs == plain_graphs > 0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    ours, theirs = (fluxlab.cache.stats(p.transformer).summary() for p in (precomputed, plain))
    assert ours["skipped_steps"] == theirs["skipped_steps"] and ours["skipped"] > 0
    assert ours["diffs"][1:] == pytest.approx(theirs["diffs"][1:], abs=1e-5)


def test_the_layers_weights_move_into_one_joined_layer(tiny):
    pipe = fluxlab.load_pipeline(tiny)
    norms = [m for m in pipe.transformer.modules() if isinstance(m, modulation.NORMS)]
    weights = torch.cat([n.linear.weight.detach().clone() for n in norms])
    held = sum(p.numel() for p in pipe.transformer.parameters())
    modulation.use(pipe)
    assert torch.equal(pipe.transformer.fluxlab_modulation.weight, weights)
    assert sum(p.numel() for p in pipe.transformer.parameters()) == held  # each weight held once


def test_refused_after_fp8_before_anything_changes(tiny):
    pipe = fluxlab.load_pipeline(tiny)
    fluxlab.optimize(pipe, fp8="rowwise")  # weight-only on a CPU
    with pytest.raises(ValueError, match="apply it before fp8"):
        fluxlab.optimize(pipe, precompute_modulation=True, sigmoid_gelu=True)
    assert "sigmoid_gelu" not in fluxlab.applied(pipe)
    with pytest.raises(ValueError, match="apply it before FP8 quantization"):
        modulation.use(pipe)
    assert not modulation.used(pipe.transformer)


def test_refused_where_the_row_cannot_be_picked_before_the_transformer(tiny_pipe):
    with pytest.raises(ValueError, match="precompute_modulation picks each step's row on the host"):
        fluxlab.optimize(tiny_pipe, precompute_modulation=True, compile="full")
    with pytest.raises(ValueError, match="precompute_modulation='yes': must be True or False"):
        fluxlab.optimize(tiny_pipe, precompute_modulation="yes")
    assert fluxlab.applied(tiny_pipe) == {}
    modulation.use(tiny_pipe)
    t = tiny_pipe.transformer
    with pytest.raises(ValueError, match="reads the transformer's keyword arguments"):
        t(torch.zeros(1, 4, t.config.in_channels))


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and fluxlab.quant.fp8_tensor_cores(torch.device("cuda"))),
                    reason="CUDA graphs of FP8 blocks need an FP8 GPU")
def test_block_graphs_replay_with_each_step_s_row():
    """The blocks' CUDA graphs read the row buffer at its fixed address: over two images of different step counts
    and guidance, the same FP8 stack gives the same latents with and without graphs. (Against the stack without
    the precomputation, FP8 products of 28 rows instead of 1 round differently, and dynamic FP8 quantization
    amplifies that: 3.6% of the latents' norm on the tiny pipeline, one H100; bf16 on a CPU gives the same bits.)"""
    settings = fluxlab.check_settings("tiny", device="cuda", steps=8)
    stack = dict(fp8="rowwise", compile="regional", precompute_modulation=True)
    eager, graphed = fluxlab.load_pipeline(settings), fluxlab.load_pipeline(settings)
    fluxlab.optimize(eager, **stack)
    fluxlab.optimize(graphed, graphs=True, **stack)
    for request in (settings, settings, dataclasses.replace(settings, steps=5, guidance=5.0)):
        ours, theirs = latents(graphed, request).float(), latents(eager, request).float()
        assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-3
    assert any(hook.entries for hook in (b._diffusers_hook.get_hook(fluxlab.graphs.HOOK)
                                         for b in fluxlab.graphs.repeated_blocks(graphed.transformer)))


def test_bf16_gives_the_same_bits(tiny):
    """In bf16 (the GPU's dtype) the pipeline's own conversions of timestep and guidance are the table's."""
    plain, precomputed = (fluxlab.load_pipeline(tiny).to(torch.bfloat16) for _ in range(2))
    modulation.use(precomputed)
    for request in (tiny, dataclasses.replace(tiny, steps=5, guidance=5.0)):
        assert torch.equal(latents(precomputed, request), latents(plain, request))

"""fluxlab.optimize composes the chapters' library calls; fluxlab.applied reads the result off the pipeline."""
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FirstBlockCacheConfig
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from torch._dynamo.utils import counters

import fluxlab
from fluxlab import fp8_attention, quant, shapes
from fluxlab.applied import OFFLOAD_NAMES
from fluxlab.optimize import INDUCTOR_FLAGS, compile_options

from conftest import emulated, exact_attention, latents


def test_optimize_and_the_chapters_calls_give_the_same_pipeline(tiny):
    """What chapter 3 does by hand (cache, FP8, regional compile) and what optimize does are one state."""
    by_hand, composed = fluxlab.load_pipeline(tiny), fluxlab.load_pipeline(tiny)
    by_hand.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.12))
    fluxlab.cache.share_decision(by_hand.transformer)
    quant.quantize_fp8(by_hand, "rowwise")
    by_hand.transformer.compile_repeated_blocks(fullgraph=False)
    done = fluxlab.optimize(composed, cache=0.12, fp8="rowwise", compile="regional")
    assert done == fluxlab.applied(by_hand) == {
        "cache": dict(kind="first_block_cache", threshold=0.12, decision="all ranks"),
        "fp8": dict(dynamic_activation=False, granularity="rowwise"),
        "fp8_text_encoder": dict(dynamic_activation=False, granularity="rowwise"),
        "compile": dict(scope="regional")}
    assert fluxlab.describe(done) == "FBCache 0.12 + FP8 weight-only + compile (regional)"
    assert fluxlab.applied(fluxlab.load_pipeline(tiny)) == {}


def test_options_apply_once_and_in_order(tiny_pipe):
    fluxlab.optimize(tiny_pipe, cache=0.1)
    with pytest.raises(ValueError, match="cache was already applied"):
        fluxlab.optimize(tiny_pipe, cache=0.2)
    with pytest.raises(ValueError, match="apply CUDA graphs before First Block Cache"):
        fluxlab.optimize(tiny_pipe, graphs=True)


def test_channels_last_vae_decodes_the_same_image(tiny, tiny_pipe):
    reference = np.asarray(fluxlab.generate(tiny_pipe, tiny), dtype=np.int16)
    done = fluxlab.optimize(tiny_pipe, channels_last_vae=True)
    assert done == {"channels_last_vae": True}
    assert tiny_pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(np.asarray(fluxlab.generate(tiny_pipe, tiny), dtype=np.int16) - reference).max() <= 1


def test_compiled_vae_decodes_the_same_image(tiny, tiny_pipe):
    reference = np.asarray(fluxlab.generate(tiny_pipe, tiny), dtype=np.int16)
    done = fluxlab.optimize(tiny_pipe, compile_vae=True)
    assert done == {"compile_vae": True} and fluxlab.describe(done) == "compiled VAE"
    assert np.abs(np.asarray(fluxlab.generate(tiny_pipe, tiny), dtype=np.int16) - reference).max() <= 1
    with pytest.raises(ValueError, match="compile_vae was already applied"):
        fluxlab.optimize(tiny_pipe, compile_vae=True)
    with pytest.raises(ValueError, match="hooks that torch.compile cannot trace"):  # as a GPU would be asked
        fluxlab.check_options(compile_vae=True, offload="group")


def test_tiled_vae_decodes_the_same_picture(tiny, tiny_pipe):
    reference = fluxlab.generate(tiny_pipe, tiny)
    done = fluxlab.optimize(tiny_pipe, vae_tiling=True)
    assert done == {"vae_tiling": True} and fluxlab.describe(done) == "tiled VAE"
    image = fluxlab.generate(tiny_pipe, tiny)
    # The tiny VAE decodes in 32-pixel tiles (its sample size) and blends their seams: the same picture, not the
    # same pixels (mean difference 13 of 255 measured).
    diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    assert 0 < diff.mean() < 20
    assert shapes.read(image) == shapes.read(reference) == dict(background="blue", colour="yellow", shape="circle")


@pytest.mark.parametrize("offload", ["model", "sequential", "encoders", "group"])
def test_cpu_offload_refuses_a_cpu_clearly(tiny_pipe, offload):
    with pytest.raises(ValueError, match=f"offload='{offload}' moves weights between the CPU and a GPU"):
        fluxlab.optimize(tiny_pipe, offload=offload)
    assert fluxlab.applied(tiny_pipe) == {}


def test_graphs_on_cpu_fall_back_with_a_notice_and_compute_the_same(tiny, tiny_pipe, capsys):
    reference = latents(tiny_pipe, tiny)
    plain = fluxlab.load_pipeline(tiny)
    done = fluxlab.optimize(plain, graphs=True, cache=0.0)
    assert "CUDA graphs need a CUDA device: on cpu the blocks run without graphs." in capsys.readouterr().out
    assert done["graphs"] == dict(cuda_graphs=False, blocks_compiled=False)
    assert torch.equal(latents(plain, tiny), reference)


def test_graphs_go_beneath_the_cache(tiny, tiny_pipe):
    reference_pipe = fluxlab.load_pipeline(tiny)
    fluxlab.cache.enable(reference_pipe.transformer, 0.3)
    reference = latents(reference_pipe, tiny)
    fluxlab.graphs.capture_blocks(tiny_pipe.transformer, compile=False)
    fluxlab.cache.enable(tiny_pipe.transformer, 0.3)
    out = latents(tiny_pipe, tiny)
    assert fluxlab.cache.stats(tiny_pipe.transformer).summary()["skipped"] > 0
    assert torch.equal(out, reference)  # the cache's hooks run around the (plain) block calls, as without
    other = fluxlab.load_pipeline(tiny)
    fluxlab.cache.enable(other.transformer, 0.3)
    with pytest.raises(ValueError, match="apply CUDA graphs before First Block Cache"):
        fluxlab.graphs.capture_blocks(other.transformer)


def test_fused_qkv_and_inductor_flags_compute_the_same(tiny, tiny_pipe):
    """flux-fast's two cheap steps: q, k and v from one projection, and inductor's flags on the compiled blocks."""
    reference = latents(tiny_pipe, tiny)
    tuned = fluxlab.load_pipeline(tiny)
    done = fluxlab.optimize(tuned, fuse_qkv=True, compile="regional", inductor_flags=True)
    assert done["fuse_qkv"] is True
    assert done["compile"]["options"] == INDUCTOR_FLAGS
    assert fluxlab.describe(done) == "compile (regional, inductor flags) + fused QKV"
    assert (latents(tuned, tiny) - reference).abs().max().item() <= 1e-3


def test_inductor_flags_one_at_a_time():
    """The bench measures flux-fast's flags one by one: each by name, its own label; True is all of them."""
    assert compile_options(inductor_flags=True) == INDUCTOR_FLAGS
    assert compile_options(inductor_flags="epilogue_fusion") == {"epilogue_fusion": False}
    assert compile_options("max-autotune-no-cudagraphs", "conv_1x1_as_mm")["conv_1x1_as_mm"] is True
    for name, label in (("conv_1x1_as_mm", "conv_1x1_as_mm"), ("epilogue_fusion", "no epilogue fusion"),
                        ("coordinate_descent_tuning", "coordinate descent")):
        done = {"compile": dict(scope="regional", options=compile_options(inductor_flags=name))}
        assert fluxlab.describe(done) == f"compile (regional, {label})"
    whole = {"compile": dict(scope="full", options=compile_options("reduce-overhead", inductor_flags=True))}
    assert fluxlab.describe(whole) == "compile (full, inductor flags, its CUDA graphs)"


def test_gelu_through_a_sigmoid_is_diffusers_tanh_gelu():
    x = torch.linspace(-12, 12, 200_001)
    reference = torch.nn.functional.gelu(x, approximate="tanh")
    assert (fluxlab.gelu.gelu_tanh(x) - reference).abs().max().item() <= 1e-6
    # bf16: both compute in float32 and round once, so they differ by at most one bf16 step (2**-7 relative)
    torch.testing.assert_close(fluxlab.gelu.gelu_tanh(x.bfloat16()),
                               torch.nn.functional.gelu(x.bfloat16(), approximate="tanh"), rtol=2**-7, atol=1e-5)


def test_sigmoid_gelu_reaches_every_mlp_and_computes_the_same(tiny, tiny_pipe):
    reference = latents(tiny_pipe, tiny)
    swapped = fluxlab.load_pipeline(tiny)
    done = fluxlab.optimize(swapped, sigmoid_gelu=True)
    assert done == {"sigmoid_gelu": True} and fluxlab.describe(done) == "sigmoid GELU"
    transformer = swapped.transformer
    assert all(isinstance(b.act_mlp, fluxlab.gelu.SigmoidGELU) for b in transformer.single_transformer_blocks)
    assert all(ff.net[0].gelu is fluxlab.gelu.gelu_tanh
               for b in transformer.transformer_blocks for ff in (b.ff, b.ff_context))
    assert (latents(swapped, tiny) - reference).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="sigmoid_gelu was already applied"):
        fluxlab.optimize(swapped, sigmoid_gelu=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sigmoid_gelu="yes"), "sigmoid_gelu='yes': must be True or False"),
    (dict(inductor_flags=True), "inductor_flags and overlap are torch.compile settings"),
    (dict(compile="regional", inductor_flags="fast"), r"inductor_flags='fast': True \(all of flux-fast's\)"),
    (dict(compile="regional", overlap=True), "overlap moves compute around context parallelism"),
    (dict(compile="regional", graphs=True, offload="model"), "moves weights between the CPU and a GPU")])
def test_bad_combinations_are_refused_before_anything_changes(tiny_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fluxlab.optimize(tiny_pipe, **kwargs)
    assert fluxlab.applied(tiny_pipe) == {}


@pytest.mark.parametrize("exclude, offload", [(["transformer", "vae"], "encoders"), (None, "group")])
def test_group_offloading_is_read_off_the_pipeline_and_computes_the_same(tiny, tiny_pipe, exclude, offload):
    """What offload='encoders'/'group' call on a GPU (diffusers' group offloading, layer by layer), with the CPU as
    both ends here: the hooks change where weights live, not the latents."""
    reference = latents(tiny_pipe, tiny)
    tiny_pipe.enable_group_offload(torch.device("cpu"), offload_type="leaf_level", exclude_modules=exclude)
    done = fluxlab.applied(tiny_pipe)
    assert done == {"offload": offload}
    assert fluxlab.describe(done) == OFFLOAD_NAMES[offload]
    assert torch.equal(latents(tiny_pipe, tiny), reference)


def fp8_emulated(query, key, value, scale=None, bounds=None):
    """FP8 attention's rounding of q and k (on the layer's bounds, which no |q| or |k| may exceed) and of v
    (fp8_attention.quantize), then exact attention: what runs on CPU."""
    bound_q, bound_k = bounds
    assert 0 < query.abs().max().item() <= bound_q and 0 < key.abs().max().item() <= bound_k
    (q, dq), (k, dk) = fp8_attention.quantize(query, bound_q), fp8_attention.quantize(key, bound_k)
    v, dv = fp8_attention.quantize(value)
    return exact_attention(*((x.float() * d).to(query.dtype) for x, d in ((q, dq), (k, dk), (v, dv))), scale)


def test_fp8_attention_processor_is_diffusers_processor_with_another_attention_call(tiny, tiny_pipe, monkeypatch):
    """FP8AttnProcessor repeats FluxAttnProcessor around its attention call: with exact attention in that call the
    latents are diffusers' own; with q, k and v rounded to FP8 (q and k on bounds no value exceeds) they move, by
    FP8's rounding and no more."""
    reference = latents(tiny_pipe, tiny)
    fp8_attention.use(tiny_pipe.transformer)
    assert fluxlab.applied(tiny_pipe) == {"attention": "cudnn_fp8"}
    monkeypatch.setattr(fp8_attention, "attention", exact_attention)
    torch.testing.assert_close(latents(tiny_pipe, tiny), reference, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(fp8_attention, "attention", fp8_emulated)
    error = ((latents(tiny_pipe, tiny) - reference).norm() / reference.norm()).item()
    assert 1e-4 < error < 5e-2


def test_fp8_attention_is_refused_off_hopper_in_one_line(tiny_pipe):
    with pytest.raises(ValueError, match="^attention='cudnn_fp8' runs cuDNN's FP8 attention kernels for Hopper "
                                         "\\(H100, H200\\); not on cpu.$"):
        fluxlab.optimize(tiny_pipe, attention="cudnn_fp8")
    assert fluxlab.applied(tiny_pipe) == {}


def test_fp8_attention_bounds_are_inputs_of_the_compiled_blocks(tiny, monkeypatch):
    """The q and k bounds differ from layer to layer in a trained model (the tiny one, or FLUX.1-dev): as buffers of
    the attention layers they are inputs of the compiled block, so one graph serves every block, as without FP8
    attention (as numbers, dynamo compiled one graph per block and stops after 8 of one forward: fullgraph fails)."""
    monkeypatch.setattr(fp8_attention, "attention", emulated)
    graphs = []
    for fp8_attn in (False, True):
        torch._dynamo.reset()
        counters.clear()
        pipe = fluxlab.load_pipeline(tiny)
        if fp8_attn:
            fp8_attention.use(pipe.transformer)
            bounds = {tuple(m.fp8_bounds.tolist()) for m in pipe.transformer.modules() if hasattr(m, "fp8_bounds")}
            assert len(bounds) > 1  # trained norms: each layer its own bounds
        fluxlab.graphs.capture_blocks(pipe.transformer)
        latents(pipe, tiny)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0] > 0


def _bench():
    """scripts/bench.py as a module: its ladder of configurations."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench", Path(__file__).resolve().parents[1] / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


BENCH = _bench()
# Every one-process configuration composed by optimize (peers apply other tools' calls; offload moves weights to a
# GPU, which a CPU cannot stand in for).
ON_ONE_GPU = [name for name, (processes, kwargs) in BENCH.LADDER.items()
              if processes == 1 and "peer" not in kwargs and "offload" not in kwargs]


@pytest.mark.parametrize("name", ON_ONE_GPU)
def test_every_one_gpu_configuration_checks_and_applies_as_on_a_hopper_gpu(name, tiny_pipe, monkeypatch):
    """What the bench does on an H100, on a CPU: its option check for a CUDA device, then optimize through to the
    processors and block forwards being installed, with the GPU-only modules reporting themselves available (the
    kernels' torch references stand in on a CPU). Keyword arguments that shadow a module of the same name fail here
    (optimize's qk_fp8 and norm_fp8 once did, on every GPU)."""
    for module in (fp8_attention, fluxlab.mlp_fp8):
        monkeypatch.setattr(module, "unavailable", lambda device: None)
    # diffusers' set_attention_backend also sets a process-wide default for every later model: restored afterwards
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    kwargs = BENCH.optimize_kwargs(name, 1)[1]
    fluxlab.check_options(**{k: v for k, v in kwargs.items() if k in BENCH.CHECKED}, device=torch.device("cuda"))
    done = fluxlab.optimize(tiny_pipe, **kwargs)
    for option, value in kwargs.items():
        assert option in done or option in ("compile_mode", "inductor_flags"), (option, done)
    if kwargs.get("qk_fp8"):
        assert all(type(p).__name__ == "NormRopeFP8Processor" for p in tiny_pipe.transformer.attn_processors.values())
    if kwargs.get("norm_fp8"):
        transformer = tiny_pipe.transformer
        assert {block_forward(b) for b in transformer.transformer_blocks} == {fluxlab.norm_fp8.double_block_forward}
        assert {block_forward(b) for b in transformer.single_transformer_blocks} == {
            fluxlab.norm_fp8.single_block_forward}


def block_forward(block):
    """The function a block runs: its forward, or beneath CUDA graphs the one the graph hook captures (compiled or
    not)."""
    registry = getattr(block, "_diffusers_hook", None)
    graph = registry.get_hook(fluxlab.graphs.HOOK) if registry else None
    run = graph.run if graph else block.forward
    run = getattr(run, "_torchdynamo_orig_callable", run)
    return getattr(run, "__func__", run)


def test_flux_fasts_recipe_leaves_inductors_settings_as_its_label_says(tiny_pipe):
    # torchao's FP8 config switches coordinate-descent tuning on for the whole process unless told not to; the
    # recipe's label leaves it out. On a CPU torchao then refuses FP8 itself, after that switch would have happened.
    from fluxlab import peers

    with torch._inductor.config.patch(coordinate_descent_tuning=False, coordinate_descent_check_all_directions=False):
        with pytest.raises(Exception, match="Float8 dynamic quantization requires CUDA"):
            peers.flux_fast(tiny_pipe)
        assert not torch._inductor.config.coordinate_descent_tuning
        assert not torch._inductor.config.coordinate_descent_check_all_directions

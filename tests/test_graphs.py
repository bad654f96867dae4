"""fluxlab.graphs on a CPU, with CUDA graphs emulated (`conftest.EmulatedGraph`): the blocks captured on their second
call and replayed from then on compute what the blocks compute, under First Block Cache too."""
import dataclasses

import torch

import fluxlab
from fluxlab import graphs

from conftest import latents


def hooks(transformer) -> list[graphs.BlockGraph]:
    return [b._diffusers_hook.get_hook(graphs.HOOK) for b in graphs.repeated_blocks(transformer)]


def test_replayed_blocks_compute_what_the_blocks_compute(tiny, tiny_pipe, emulated_cuda_graphs):
    reference = latents(tiny_pipe, tiny)
    graphed = fluxlab.load_pipeline(tiny)
    graphs.capture_blocks(graphed.transformer, compile=False)
    assert torch.equal(latents(graphed, tiny), reference)
    blocks = len(hooks(graphed.transformer))
    assert len(emulated_cuda_graphs) == blocks  # one graph per block
    assert all(g.replays == tiny.steps - 1 for g in emulated_cuda_graphs)  # plain first, then captured and replayed
    other = dataclasses.replace(tiny, prompt="a red square", guidance=5.0, seed=1)
    assert torch.equal(latents(graphed, other), latents(tiny_pipe, other))  # new inputs, the same graphs
    assert len(emulated_cuda_graphs) == blocks


def test_the_cache_decides_between_replays(tiny, tiny_pipe, emulated_cuda_graphs):
    fluxlab.cache.enable(tiny_pipe.transformer, 0.3)
    reference = latents(tiny_pipe, tiny)
    graphed = fluxlab.load_pipeline(tiny)
    graphs.capture_blocks(graphed.transformer, compile=False)
    fluxlab.cache.enable(graphed.transformer, 0.3)
    assert torch.equal(latents(graphed, tiny), reference)
    skipped = fluxlab.cache.stats(graphed.transformer).summary()["skipped"]
    assert skipped > 0 and emulated_cuda_graphs[0].replays > emulated_cuda_graphs[-1].replays


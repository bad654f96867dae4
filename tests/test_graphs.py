"""fluxlab.graphs, with CUDA graphs emulated on a CPU (`conftest.EmulatedGraph`) and real ones on a GPU: the blocks
captured on their second call and replayed from then on compute what the blocks compute, under First Block Cache too."""
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class CopiesInto(TorchDispatchMode):
    """Counts the copies into the graphs' input buffers."""

    def __init__(self, capture: graphs.Capture):
        super().__init__()
        self.capture, self.count = capture, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default:
            self.count += any(args[0].data_ptr() == b.data_ptr() for b in self.capture.inputs)
        return func(*args, **(kwargs or {}))


def test_a_step_copies_the_blocks_common_inputs_once(tiny, tiny_pipe, emulated_cuda_graphs):
    """Each step's temb and rotary embedding (cos, sin) are the same tensors for every block: one copy each into
    the buffers all graphs read, plus the first block's image and text tokens; the other blocks read the block
    before's outputs in place. Without sharing, a step copied 2 + 3 per block."""
    reference = latents(tiny_pipe, tiny)
    capture = graphs.capture_blocks(tiny_pipe.transformer, compile=False)
    with CopiesInto(capture) as copies:
        assert torch.equal(latents(tiny_pipe, tiny), reference)
    assert len(capture.inputs) == 5
    assert copies.count == 5 * (tiny.steps - 2)  # none at the first step (plain) nor at the capture (cloned)


def test_an_input_changed_in_place_is_copied_again():
    capture = graphs.Capture(torch.device("cpu"), compiled=False)
    x = torch.ones(3)
    buffer = capture.input(x)
    assert capture.input(x) is buffer and len(capture.inputs) == 1  # a second graph reading x shares the buffer
    x.add_(1)
    capture.fill(buffer, x)
    assert torch.equal(buffer, x)
    y = torch.zeros(3)
    capture.fill(buffer, y)
    assert torch.equal(buffer, y)
    with torch.inference_mode():  # no version counter: a new tensor each time, as the pipeline makes them
        z = torch.full((3,), 7.0)
        capture.fill(buffer, z)
    assert torch.equal(buffer, z)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_compute_what_the_blocks_compute():
    """The emulation's claims on a GPU: two images with other prompts and guidance, the blocks replayed from real
    graphs that share their common inputs, against the same blocks run plainly."""
    settings = fluxlab.check_settings("tiny", device="cuda", steps=8)
    plain, graphed = fluxlab.load_pipeline(settings), fluxlab.load_pipeline(settings)
    capture = graphs.capture_blocks(graphed.transformer, compile=False)
    for request in (settings, dataclasses.replace(settings, prompt="a red square", guidance=5.0, seed=1)):
        ours, theirs = latents(graphed, request).float(), latents(plain, request).float()
        assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-3
    assert capture.enabled and len(capture.inputs) == 5
    assert all(hook.entries for hook in hooks(graphed.transformer))

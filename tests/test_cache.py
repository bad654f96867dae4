import statistics

import torch

import fluxlab

from conftest import latents


def test_threshold_zero_is_identical_to_no_cache(tiny, tiny_pipe):
    reference = latents(tiny_pipe, tiny)
    fluxlab.optimize(tiny_pipe, cache=0.0)
    cached = latents(tiny_pipe, tiny)
    assert torch.equal(cached, reference)
    summary = fluxlab.cache_stats(tiny_pipe).summary()
    assert (summary["steps"], summary["computed"], summary["skipped"]) == (8, 8, 0)


def test_skips_exactly_the_steps_below_threshold(tiny, tiny_pipe):
    reference = latents(tiny_pipe, tiny)
    fluxlab.optimize(tiny_pipe, cache=0.0)
    latents(tiny_pipe, tiny)
    diffs = [d for _, d, _ in fluxlab.cache_stats(tiny_pipe).runs[-1]]  # unrounded
    fluxlab.clear_cache(tiny_pipe)
    threshold = statistics.median(d for d in diffs if d is not None)
    fluxlab.optimize(tiny_pipe, cache=threshold)
    cached = latents(tiny_pipe, tiny)
    summary = fluxlab.cache_stats(tiny_pipe).summary()
    assert summary["skipped"] > 0
    # The first skip happens where the uncached run's difference first falls below the threshold.
    first = next(i for i, d in enumerate(diffs) if d is not None and d <= threshold)
    assert summary["skipped_steps"][0] == first
    assert not torch.equal(cached, reference)
    fluxlab.clear_cache(tiny_pipe)
    assert torch.equal(latents(tiny_pipe, tiny), reference)
    assert "cache" not in fluxlab.applied(tiny_pipe)


def test_each_call_starts_fresh(tiny, tiny_pipe):
    fluxlab.optimize(tiny_pipe, cache=0.3)
    first, second = latents(tiny_pipe, tiny), latents(tiny_pipe, tiny)
    stats = fluxlab.cache_stats(tiny_pipe)
    assert torch.equal(first, second) and len(stats.runs) == 2 and stats.runs[0] == stats.runs[1]

"""First Block Cache: diffusers' hooks with the shared, recorded decision."""
import statistics

import pytest
import torch
from diffusers import FirstBlockCacheConfig

import fluxlab

from conftest import latents


def test_threshold_zero_is_identical_to_no_cache(tiny, tiny_pipe):
    reference = latents(tiny_pipe, tiny)
    fluxlab.cache.enable(tiny_pipe.transformer, 0.0)
    assert torch.equal(latents(tiny_pipe, tiny), reference)
    summary = fluxlab.cache.stats(tiny_pipe.transformer).summary()
    assert (summary["steps"], summary["computed"], summary["skipped"]) == (8, 8, 0)


def test_skips_exactly_the_steps_below_threshold(tiny, tiny_pipe):
    reference = latents(tiny_pipe, tiny)
    fluxlab.cache.enable(tiny_pipe.transformer, 0.0)
    latents(tiny_pipe, tiny)
    diffs = [d for _, d, _ in fluxlab.cache.stats(tiny_pipe.transformer).runs[-1]]  # unrounded
    tiny_pipe.transformer.disable_cache()
    threshold = statistics.median(d for d in diffs if d is not None)
    # The chapter's two calls: diffusers' cache, then fluxlab's shared decision.
    tiny_pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    stats = fluxlab.cache.share_decision(tiny_pipe.transformer)
    cached = latents(tiny_pipe, tiny)
    summary = stats.summary()
    assert summary["skipped"] > 0
    first = next(i for i, d in enumerate(diffs) if d is not None and d <= threshold)
    assert summary["skipped_steps"][0] == first
    assert not torch.equal(cached, reference)
    tiny_pipe.transformer.disable_cache()
    assert torch.equal(latents(tiny_pipe, tiny), reference)
    assert "cache" not in fluxlab.applied(tiny_pipe) and fluxlab.cache.stats(tiny_pipe.transformer) is None


def test_each_call_starts_fresh(tiny, tiny_pipe):
    stats = fluxlab.cache.enable(tiny_pipe.transformer, 0.3)
    first, second = latents(tiny_pipe, tiny), latents(tiny_pipe, tiny)
    assert torch.equal(first, second) and len(stats.runs) == 2 and stats.runs[0] == stats.runs[1]


def test_share_decision_needs_the_cache(tiny_pipe):
    with pytest.raises(ValueError, match="First Block Cache is not enabled"):
        fluxlab.cache.share_decision(tiny_pipe.transformer)


def test_nan_threshold_is_refused_before_anything_runs(tiny_pipe):
    with pytest.raises(ValueError, match="cache threshold=nan"):
        fluxlab.cache.enable(tiny_pipe.transformer, float("nan"))
    assert fluxlab.cache.leader_hook(tiny_pipe.transformer) is None

"""First Block Cache, the way diffusers ships it, with one decision for every rank and a record of each step.

diffusers decides from each process's own tensors: under context parallelism each rank holds a slice of the
sequence, the ranks' decisions differ, one rank runs the remaining blocks (and their collectives) while another
skips them, and the job hangs. `share_decision` keeps diffusers' statistic (the relative mean absolute difference
of the first block's residual from the previous step's) but sums its two parts over every rank first, so every
rank takes the same decision; it also records each step's value and decision (diffusers exposes no hit counter).
"""
import dataclasses

import torch
import torch.distributed as dist
from diffusers import FirstBlockCacheConfig

from .settings import check_threshold

LEADER_HOOK = "fbc_leader_block_hook"


@dataclasses.dataclass
class CacheStats:
    """Decisions of the runs so far: one list of (step, relative difference, computed) per pipeline call."""

    threshold: float
    runs: list = dataclasses.field(default_factory=list)

    def skipped_counts(self, first: int = 0) -> list[int]:
        """Steps skipped in each pipeline call from call `first` on."""
        return [sum(not computed for _, _, computed in run) for run in self.runs[first:]]

    def summary(self, run: int = -1) -> dict:
        steps = self.runs[run] if self.runs else []
        computed = [s for s, _, c in steps if c]
        return dict(threshold=self.threshold, steps=len(steps), computed=len(computed),
                    skipped=len(steps) - len(computed), skipped_steps=[s for s, _, c in steps if not c],
                    diffs=[None if d is None else round(d, 6) for _, d, _ in steps])


def leader_hook(transformer):
    """diffusers' hook on the first block, which decides whether the remaining blocks run (None if no cache)."""
    registry = getattr(transformer.transformer_blocks[0], "_diffusers_hook", None)
    return registry.get_hook(LEADER_HOOK) if registry else None


def global_relative_difference(residual, previous) -> float:
    """sum|residual - previous| / sum|previous| over the whole sequence: each rank's
    two sums, added over every rank first."""
    sums = torch.stack([(residual - previous).abs().sum(), previous.abs().sum()]).float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


def share_decision(transformer) -> CacheStats:
    """Make First Block Cache's decision from the whole sequence (the same on every
    rank) and record each step's relative change and decision."""
    hook = leader_hook(transformer)
    if hook is None:
        raise ValueError("First Block Cache is not enabled: call transformer."
                         "enable_cache(FirstBlockCacheConfig(...)) first.")
    stats = CacheStats(hook.threshold)

    @torch.compiler.disable
    def should_compute(residual: torch.Tensor) -> bool:
        previous = hook.state_manager.get_state().head_block_residual
        if previous is None:  # first step of a pipeline call: always computed
            stats.runs.append([])
            diff, compute = None, True
        else:
            diff = global_relative_difference(residual, previous)
            compute = diff > hook.threshold
        stats.runs[-1].append((len(stats.runs[-1]), diff, compute))
        return compute

    hook._should_compute_remaining_blocks = should_compute
    hook._fluxlab_stats = stats
    return stats


def enable(transformer, threshold: float) -> CacheStats:
    """diffusers' First Block Cache at `threshold`, with the shared, recorded decision."""
    transformer.enable_cache(FirstBlockCacheConfig(threshold=check_threshold(threshold)))
    return share_decision(transformer)


def stats(transformer) -> CacheStats | None:
    """The recorded decisions, where the cache is on and `share_decision` was applied."""
    hook = leader_hook(transformer)
    return getattr(hook, "_fluxlab_stats", None)

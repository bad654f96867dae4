"""First Block Cache on diffusers' hooks, with per-step statistics and one decision shared by all ranks.

diffusers decides from each process's own tensors and exposes no hit counter. We replace the leader hook's
decision with the same statistic (relative mean absolute difference of the first block's residual) summed
over every rank, so context-parallel ranks skip the same steps (as shipped they disagree and deadlock), and
we record each step's value and decision.
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


def _global_relative_difference(residual: torch.Tensor, previous: torch.Tensor) -> float:
    sums = torch.stack([(residual - previous).abs().sum(), previous.abs().sum()]).float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


def enable_first_block_cache(transformer, threshold: float) -> CacheStats:
    """Turn on First Block Cache at `threshold`; returns the statistics object it fills."""
    threshold = check_threshold(threshold)
    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    hook = transformer.transformer_blocks[0]._diffusers_hook.get_hook(LEADER_HOOK)
    stats = CacheStats(threshold)

    @torch.compiler.disable
    def should_compute(residual: torch.Tensor) -> bool:
        previous = hook.state_manager.get_state().head_block_residual
        if previous is None:  # first step of a pipeline call: always computed
            stats.runs.append([])
            diff, compute = None, True
        else:
            diff = _global_relative_difference(residual, previous)
            compute = diff > threshold
        stats.runs[-1].append((len(stats.runs[-1]), diff, compute))
        return compute

    hook._should_compute_remaining_blocks = should_compute
    return stats

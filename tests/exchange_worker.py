"""Run under torchrun: Ulysses' peer exchanges (`fluxlab.peer_exchange.exchanged_attention`) on random tensors, on
CPU processes (gloo), against attention over the whole sequence; every rank saves its largest difference.

Usage: torchrun --nproc_per_node N tests/exchange_worker.py OUT
"""
import sys

import torch
import torch.distributed as dist

from fluxlab import parallel
from fluxlab.peer_exchange import exchanged_attention

from conftest import exact_attention


def main():
    world = parallel.init(torch.device("cpu"))
    n, r = world.world_size, world.rank
    torch.manual_seed(0)  # the same whole sequence on every process
    tokens, heads, dim = 6 * n, 2 * n, 8
    query, key, value = (torch.randn(2, tokens, heads, dim) for _ in range(3))
    rows = slice(r * tokens // n, (r + 1) * tokens // n)
    mine = exchanged_attention(query[:, rows], key[:, rows], value[:, rows], dist.group.WORLD, exact_attention)
    error = (mine - exact_attention(query, key, value)[:, rows]).abs().max().item()
    torch.save(dict(error=error, shape=tuple(mine.shape)), f"{sys.argv[1]}.rank{r}")


if __name__ == "__main__":
    main()

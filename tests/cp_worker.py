"""Run under torchrun: generate latents with context parallelism (and optionally the cache); rank 0 saves them.

Usage: torchrun --nproc_per_node N tests/cp_worker.py OUT.pt ULYSSES RING [THRESHOLD]
"""
import sys

import torch

import fluxlab
from fluxlab import parallel


def main():
    out, ulysses, ring = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    threshold = float(sys.argv[4]) if len(sys.argv) > 4 else None
    settings = fluxlab.settings("tiny", device="cpu", steps=8)
    dist = parallel.init(settings.device)
    pipe = fluxlab.load(settings)
    fluxlab.optimize(pipe, parallel=(ulysses, ring), cache=threshold)
    latents = fluxlab.generate(pipe, settings, output_type="latent")
    stats = fluxlab.cache_stats(pipe)
    decisions = [c for _, _, c in stats.runs[-1]] if stats else None
    torch.save(dict(latents=latents, decisions=decisions), f"{out}.rank{dist.rank}")


if __name__ == "__main__":
    main()

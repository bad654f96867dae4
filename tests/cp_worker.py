"""Run under torchrun: generate latents with context parallelism (optionally the cache, optionally CUDA graphs,
which fall back to plain calls on CPU, optionally the FP8 attention processor with exact attention in its call,
since cuDNN's FP8 kernel needs a Hopper GPU, optionally the peer exchanges, which travel as gloo sends on CPU);
every rank saves them.

Usage: torchrun --nproc_per_node N tests/cp_worker.py OUT.pt ULYSSES RING [THRESHOLD|none] [graphs] [fp8attn] [peer]
"""
import sys

import torch

import fluxlab
from fluxlab import fp8_attention, parallel

from conftest import exact_attention


def main():
    out, ulysses, ring = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    threshold = float(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "none" else None
    flags = set(sys.argv[5:])
    graphs = "graphs" in flags
    settings = fluxlab.check_settings("tiny", device="cpu", steps=8)
    world = parallel.init(settings.device)
    pipe = fluxlab.load_pipeline(settings)
    if "fp8attn" in flags:  # the processor and its Ulysses path, around exact attention
        fp8_attention.attention = exact_attention
        fp8_attention.use(pipe.transformer)
    fluxlab.optimize(pipe, parallel=(ulysses, ring), cache=threshold, graphs=graphs,
                     exchange="peer" if "peer" in flags else None)
    latents = fluxlab.generate(pipe, settings, output_type="latent")
    stats = fluxlab.cache.stats(pipe.transformer)
    decisions = [c for _, _, c in stats.runs[-1]] if stats else None
    torch.save(dict(latents=latents, decisions=decisions, applied=fluxlab.applied(pipe)), f"{out}.rank{world.rank}")


if __name__ == "__main__":
    main()

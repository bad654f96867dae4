"""Context parallelism (diffusers' ContextParallelConfig) for processes started by torchrun."""
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig

from .settings import transformer_config

# A collective that waits longer than this ends the run with an error instead of hanging.
TIMEOUT_S = int(os.environ.get("FLUXLAB_DIST_TIMEOUT_S", "900"))


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: torch.device) -> Dist:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, ...); a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(0, 1, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type ==
                                "cuda" else None, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    return Dist(rank, world_size, device)


def degrees(world_size: int, ulysses: int | None = None, ring: int | None = None) -> tuple[int, int]:
    """Fill the missing degree so that ulysses * ring == world_size (all Ulysses by default)."""
    if ulysses is None and ring is None:
        ulysses = world_size
    if ulysses is None:
        ulysses = world_size // ring
    if ring is None:
        ring = world_size // ulysses
    if ulysses < 1 or ring < 1 or ulysses * ring != world_size:
        raise ValueError(f"ulysses_degree={ulysses} x ring_degree={ring} must equal the number of processes "
                         f"({world_size}).")
    return ulysses, ring


def check_split(settings, world_size: int, ulysses: int) -> None:
    """Each process gets an equal share of image and text tokens; Ulysses splits the attention heads too."""
    problems = []
    if settings.image_tokens % world_size:
        problems.append(f"{settings.image_tokens} image tokens ({settings.height}x{settings.width}) do not split "
                        f"evenly over {world_size} processes")
    if settings.max_sequence_length % world_size:
        problems.append(f"{settings.max_sequence_length} text tokens do not split evenly over {world_size} "
                        "processes")
    heads = transformer_config(settings.source)["num_attention_heads"]
    if heads % ulysses:
        problems.append(f"{heads} attention heads do not split over ulysses_degree={ulysses}")
    if problems:
        raise ValueError("cannot split the sequence: " + "; ".join(problems) + ". Use fewer processes, another "
                         "resolution (a multiple of 16 * processes works) or ring attention for what Ulysses "
                         "cannot split.")


def enable_context_parallel(transformer, ulysses: int, ring: int, backend: str | None = None) -> str:
    """Shard the transformer's sequence over the process group; returns the attention backend used."""
    if transformer.device.type == "cpu":
        from . import cpu_shims

        cpu_shims.install()
    if backend is None:
        # Ring attention merges partial results with the log-sum-exp, which only flash/cuDNN kernels return.
        on_gpu = transformer.device.type == "cuda"
        backend = "native" if ring == 1 else ("_native_cudnn" if on_gpu else "_native_flash")
    transformer.set_attention_backend(backend)
    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring))
    return backend


_cpu_group = None


def barrier() -> None:
    """Wait for every process, on the CPU (gloo): an NCCL barrier would leave a kernel spinning on a waiting
    process's GPU, sharing it by time slices with any other process there (e.g. a serving pool)."""
    global _cpu_group
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    if _cpu_group is None:  # every process reaches its first barrier at the same point, so all create it
        _cpu_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    dist.barrier(group=_cpu_group)

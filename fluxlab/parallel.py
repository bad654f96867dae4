"""Processes that make one image together (started by torchrun), and context parallelism across them."""
import atexit
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig

from . import cpu_shims
from .settings import transformer_config

# A collective that waits longer than this ends the run with an error instead of hanging.
TIMEOUT_S = int(os.environ.get("FLUXLAB_DIST_TIMEOUT_S", "900"))


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the processes that make one image together."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: torch.device) -> World:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, ...); a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World(0, 1, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cpu":
        cpu_shims.install()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type ==
                                "cuda" else None, timeout=datetime.timedelta(seconds=TIMEOUT_S))
        atexit.register(finish)  # a chapter's kernel, the benchmark or a pool worker ends its group as it exits
    cpu_group()
    return World(rank, world_size, device)


def finish() -> None:
    """Leave the process group, if this process is in one (NCCL warns at exit about a group never destroyed)."""
    global _cpu_group
    if dist.is_initialized():
        dist.destroy_process_group()  # every group, the gloo one too
    _cpu_group = None


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
    """Each process gets an equal share of image and text tokens; Ulysses splits the attention heads too. A refusal
    suggests only changes that make the split work."""
    heads = transformer_config(settings.source)["num_attention_heads"]
    problems, fixes = [], []
    if settings.image_tokens % world_size:
        side = -(-settings.height // (16 * world_size)) * 16 * world_size
        problems.append(f"{settings.image_tokens} image tokens ({settings.height}x{settings.width} pixels) do not "
                        f"split evenly over {world_size} processes")
        fixes.append(f"height={side} (any height and width whose (height/16) x (width/16) is a multiple of "
                     f"{world_size})")
    if settings.max_sequence_length % world_size:
        problems.append(f"{settings.max_sequence_length} text tokens (max_sequence_length) do not split evenly over "
                        f"{world_size} processes")
        fixes.append(f"max_sequence_length={settings.max_sequence_length // world_size * world_size}")
    if heads % ulysses:
        problems.append(f"{heads} attention heads do not split over ulysses_degree={ulysses}")
        fits = [d for d in range(1, world_size + 1) if world_size % d == 0 and heads % d == 0]
        fixes.append("ulysses_degree x ring_degree = " + " or ".join(f"{d} x {world_size // d}" for d in fits))
    if problems:
        raise ValueError(f"cannot split the sequence over {world_size} processes: " + "; ".join(problems)
                         + ". This works instead: " + "; ".join(fixes) + ".")


def check_gpus(device: torch.device, processes: int) -> None:
    """One GPU per process: refuse more processes than this machine has GPUs."""
    if device.type == "cuda" and torch.cuda.device_count() < processes:
        raise ValueError(f"{processes} processes: only {torch.cuda.device_count()} GPU(s) here (one per process)")


def ring_backend(device: torch.device) -> str:
    """Ring attention merges partial results with their log-sum-exp, which only flash/cuDNN kernels return."""
    return "_native_cudnn" if device.type == "cuda" else "_native_flash"


def enable(transformer, ulysses: int, ring: int) -> None:
    """Shard the transformer's sequence over the process group (chapter 4 makes the same two calls)."""
    if ring > 1:
        transformer.set_attention_backend(ring_backend(transformer.device))
    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring))


_cpu_group = None


def cpu_group():
    """A gloo group over every process, for waiting and for small Python objects: an NCCL barrier would leave a
    kernel spinning on a waiting process's GPU, sharing it by time slices with any other process there (e.g. a
    serving pool). `init` creates it, at the same point on every process."""
    global _cpu_group
    if _cpu_group is None:
        _cpu_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    return _cpu_group


def barrier() -> None:
    """Wait for every process, on the CPU."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=cpu_group())

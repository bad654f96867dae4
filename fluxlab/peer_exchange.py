"""Ulysses' exchanges as copies straight into the other GPUs' memory, in place of NCCL all-to-alls.

diffusers' Ulysses attention copies q, k and v into send buffers ordered by head group, exchanges each with an NCCL
all-to-all and copies the result into attention's layout; the output goes back the same way: 4 all-to-alls and 8
copies per attention layer. Inside CUDA graphs on 2 H200s each all-to-all took about 47 us whatever its size, and
nearly none of it overlapped compute. With torch's symmetric memory every process maps the others' receive
buffers, so one copy kernel per destination writes a head group straight into its place there (the copy is the
permute), and one barrier per direction says that every write has landed. NCCL has no call that writes into a
strided place in a peer's buffer; torch's own micro-pipelined all-to-all (`_pipelined_produce_and_all2all`) uses
the same barrier-and-copy pattern. Without CUDA (gloo: the tests) the same copies travel as point-to-point sends.
Measured on 2 H200s (book/results/bench-2gpu-peer.json): FP8 + graphs went from 2.106 to 1.908 s per image;
communication not overlapped fell from about 0.3 s per process to under 0.03 s, and the copies moved into compute.

Ordering: every layer runs [write q, k, v; barrier; attention; write the output; barrier] on one stream. A process
writes into a peer's q/k/v buffers only after the previous output barrier, which the peer reached after its
attention had read them, and into a peer's output buffer only after the q/k/v barrier, which the peer reached after
its previous layer had read it. So two barriers per layer suffice, and every layer can share the same buffers.
"""
import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

from . import fp8_attention
from .flux_attention import SwappedAttnProcessor
from .parallel import TIMEOUT_S

_BUFFERS = {}  # (group name, buffer name, shape, dtype, device) -> one view per rank of a symmetric buffer


def _buffers(group: dist.ProcessGroup, name: str, shape: tuple, dtype: torch.dtype, device: torch.device):
    """Every rank's receive buffer `name` (the same shape on all), and the handle whose barrier spans them;
    allocated and exchanged on first use (a collective: every process asks for the same buffers in one order)."""
    key = (group.group_name, name, shape, dtype, device)
    if key not in _BUFFERS:
        local = symm_mem.empty(shape, dtype=dtype, device=device)
        handle = symm_mem.rendezvous(local, group)
        views = [local if r == handle.rank else handle.get_buffer(r, shape, dtype) for r in range(handle.world_size)]
        handle.barrier(channel=0, timeout_ms=TIMEOUT_S * 1000)
        _BUFFERS[key] = views, handle
    return _BUFFERS[key]


def _words(x: torch.Tensor) -> torch.Tensor:
    """The same bytes as 8-byte elements when the rows allow it: the copy kernel then writes 8 bytes per element
    across NVLink instead of 2."""
    if x.dtype.itemsize < 8 and x.stride(-1) == 1 and (x.shape[-1] * x.dtype.itemsize) % 8 == 0 \
            and (x.storage_offset() * x.dtype.itemsize) % 8 == 0:
        return x.view(torch.int64)
    return x


def _exchange(group: dist.ProcessGroup, pieces: dict[str, list[torch.Tensor]], shape: tuple, place) -> list:
    """For each buffer name: write `pieces[name][j]` into process j's buffer `name` of `shape`, at
    `place(buffer, this rank)`; then wait until every process's writes have landed. Returns this process's buffers,
    in `pieces`' order (each valid until the next exchange into it)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    first = next(iter(pieces.values()))[0]
    mine = []
    if first.device.type == "cuda":
        for name, parts in pieces.items():
            views, handle = _buffers(group, name, shape, first.dtype, first.device)
            for j, part in enumerate(parts):
                _words(place(views[j], rank)).copy_(_words(part))
            mine.append(views[rank])
        handle.barrier(channel=0, timeout_ms=TIMEOUT_S * 1000)
        return mine
    peers = [j for j in range(world) if j != rank]
    for parts in pieces.values():
        received = {j: torch.empty_like(parts[j], memory_format=torch.contiguous_format) for j in peers}
        ops = [dist.P2POp(dist.isend, parts[j].contiguous(), group=group, group_peer=j) for j in peers]
        ops += [dist.P2POp(dist.irecv, received[j], group=group, group_peer=j) for j in peers]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        out = torch.empty(shape, dtype=first.dtype, device=first.device)
        for j in range(world):
            place(out, j).copy_(received.get(j, parts[j]))
        mine.append(out)
    return mine


def exchanged_attention(query, key, value, group: dist.ProcessGroup, attend):
    """Attention over the whole sequence from this process's share of it: (batch, tokens / world, heads, dim) each
    in, the same shape out. Each process gets every token of one head group (process j's tokens at rows
    j * tokens / world, as in diffusers' Ulysses), `attend` runs on them, and the output rows go back to the
    processes whose tokens they are. On CUDA the result is a view of a shared buffer (see `attention`)."""
    world = dist.get_world_size(group)
    b, s, h, d = query.shape
    hw = h // world

    def rows(buffer, j):  # process j's tokens
        return buffer[:, j * s:(j + 1) * s]

    def heads(buffer, j):  # process j's head group
        return buffer[:, :, j * hw:(j + 1) * hw]

    outgoing = {name: [heads(x, j) for j in range(world)] for name, x in zip("qkv", (query, key, value))}
    q, k, v = _exchange(group, outgoing, (b, world * s, hw, d), rows)
    out = attend(q, k, v)
    return _exchange(group, {"o": [rows(out, j) for j in range(world)]}, (b, s, h, d), heads)[0]


# A custom op: torch.compile (fullgraph, inside each block) cannot trace symmetric memory. Its output is a copy:
# a compiled graph may reuse the memory of a tensor it no longer needs for a later one, and a receive buffer that
# held, say, the block's output would be overwritten by the peers' next exchange.
@torch.library.custom_op("fluxlab::peer_attention", mutates_args=())
def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group_name: str,
              fp8_bounds: torch.Tensor | None, backend: str | None) -> torch.Tensor:
    """`exchanged_attention` with FP8 attention (`fluxlab.fp8_attention`, with the layer's q and k bounds) when
    `fp8_bounds` is given, else a diffusers backend, between the exchanges; returns a new tensor."""
    def attend(q, k, v):
        if fp8_bounds is not None:
            return fp8_attention.attention(q, k, v, bounds=fp8_bounds)
        return dispatch_attention_fn(q, k, v, backend=backend and AttentionBackendName(backend))

    return exchanged_attention(query, key, value, dist.distributed_c10d._resolve_process_group(group_name),
                               attend).clone()


@attention.register_fake
def _(query, key, value, group_name, fp8_bounds, backend):
    return torch.empty_like(query)


class PeerExchangeProcessor(SwappedAttnProcessor):
    """FLUX's attention under Ulysses context parallelism with peer exchanges (`attention`); the attention between
    them is FP8 (`fluxlab.fp8_attention`, on the layer's q and k bounds) when `fp8` is True, else the layer's
    diffusers backend."""

    def __init__(self, group_name: str, fp8: bool, backend=None):
        super().__init__()
        self.group_name, self.fp8, self._attention_backend = group_name, fp8, backend

    def attend(self, attn, query, key, value):
        backend = self._attention_backend and AttentionBackendName(self._attention_backend).value
        return attention(query, key, value, self.group_name, attn.fp8_bounds if self.fp8 else None, backend)


def use(transformer) -> None:
    """Replace Ulysses' NCCL all-to-alls with peer copies in every attention layer of a FLUX transformer whose
    Ulysses context parallelism is enabled (ring degree 1), keeping each layer's attention (FP8 or a backend)."""
    config = getattr(transformer, "_parallel_config", None)
    cp = config and config.context_parallel_config
    if cp is None or cp.ulysses_degree < 2 or cp.ring_degree != 1:
        raise ValueError("exchange='peer' replaces Ulysses' all-to-alls: use it with parallel=(N, 1), N >= 2.")
    if transformer.device.type != "cuda":
        print(f"exchange='peer': no CUDA on {transformer.device.type}; the copies travel as point-to-point sends.")
    group_name = cp._ulysses_mesh.get_group().group_name
    processors = {}
    for name, processor in transformer.attn_processors.items():
        fp8 = isinstance(processor, fp8_attention.FP8AttnProcessor)
        processors[name] = PeerExchangeProcessor(group_name, fp8,
                                                 getattr(processor, "_attention_backend", None))
    transformer.set_attn_processor(processors)


def exchanges(transformer) -> str | None:
    """'peer' when `use` was applied to this transformer (what `fluxlab.applied` reports)."""
    if any(isinstance(p, PeerExchangeProcessor) for p in transformer.attn_processors.values()):
        return "peer"
    return None

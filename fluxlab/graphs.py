"""CUDA graphs of the transformer's blocks, beneath diffusers' hooks: one launch per block instead of ~40 kernel
launches, guard checks and tensor-subclass dispatches.

Measured on 2 H100s: context parallelism with FP8 + regional compilation was host-bound (each rank spent as long
idle or waiting in NCCL for its late peer as computing). Replaying each block from a CUDA graph takes the host out
of the loop. The graph sits under diffusers' hooks (it is registered before `enable_cache`), so First Block Cache
still decides on the host between replays: block 0 replays, the host makes one decision for every rank, then the
other blocks replay or are skipped. torch.compile's own graphs do not fit that: `mode="reduce-overhead"` on the
repeated blocks fails when a block reads the previous block's overwritten output, and on the whole transformer
the cache's Python decision sits inside the graph.
"""
import collections

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils._pytree import tree_flatten, tree_unflatten

from fluxlab.tensors import mark, unchanged

HOOK = "fluxlab_cuda_graph"


class Capture:
    """What the block graphs of one transformer share: one memory pool (blocks replay one after another, so they
    can reuse each other's scratch memory), one capture stream, the addresses of their outputs, so a block whose
    input is the previous block's output reads it in place instead of copying it, and their other inputs: each
    step's conditioning `temb` and rotary embedding are the same tensors for every block, so all 57 graphs read one
    buffer of each, copied into once per step instead of once per block (blocks read these without writing them)."""

    def __init__(self, device: torch.device, compiled: bool):
        self.enabled = device.type == "cuda"
        self.compiled = compiled
        self.pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self.stream = torch.cuda.Stream(device) if self.enabled else None
        self.outputs: set[int] = set()
        self.inputs: list[torch.Tensor] = []  # the graphs' input buffers
        self.held: dict[int, tuple] = {}  # an input buffer's address -> the mark of the tensor last copied in

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """The buffer a graph being captured reads `x` from: another graph's, if that one holds `x` already."""
        if x.data_ptr() in self.outputs:
            return x
        buffer = next((b for b in self.inputs if unchanged(self.held[b.data_ptr()], x)), None)
        if buffer is None:
            buffer = x.clone()
            self.inputs.append(buffer)
            self.held[buffer.data_ptr()] = mark(x)
        return buffer

    def fill(self, buffer: torch.Tensor, x: torch.Tensor):
        """Before a replay: `x` into the buffer the graph reads it from, unless it is there already."""
        if x.data_ptr() != buffer.data_ptr() and not unchanged(self.held.get(buffer.data_ptr()), x):
            buffer.copy_(x)
            self.held[buffer.data_ptr()] = mark(x)


class BlockGraph(ModelHook):
    """A block's forward (compiled or not): run plainly on the first call with a given
    input layout, captured into a CUDA graph on the second, replayed from then on."""

    def __init__(self, forward, capture: Capture):
        super().__init__()
        self.run = forward
        self.capture = capture
        self.entries = {}
        self.calls = collections.Counter()

    def new_forward(self, module, *args, **kwargs):
        if not self.capture.enabled:
            return self.run(module, *args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        key = (spec, tuple(_layout(x) for x in leaves))
        entry = self.entries.get(key)
        if entry is None:
            self.calls[key] += 1
            if self.calls[key] == 1:  # compile and warm up outside any capture
                return self.run(module, *args, **kwargs)
            entry = self.entries[key] = self._record(module, leaves, spec)
        graph, static, out = entry
        for arg, buffer in zip(leaves, static):
            if isinstance(arg, torch.Tensor):
                self.capture.fill(buffer, arg)
        graph.replay()
        return out

    def _record(self, module, leaves, spec):
        cap = self.capture
        static = [cap.input(x) if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = tree_unflatten(static, spec)
        cap.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(cap.stream):  # lazy initialisation on the capture stream
            self.run(module, *args, **kwargs)
        torch.cuda.current_stream().wait_stream(cap.stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: NCCL's watchdog thread may query events during the capture
        with torch.cuda.graph(graph, pool=cap.pool, stream=cap.stream,
                              capture_error_mode="thread_local"):
            out = self.run(module, *args, **kwargs)
        cap.outputs.update(t.data_ptr() for t in tree_flatten(out)[0]
                           if isinstance(t, torch.Tensor))
        return graph, static, out


def _layout(x):
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.stride(), x.dtype, x.device)
    return (type(x), x)


def repeated_blocks(transformer) -> list[torch.nn.Module]:
    """The blocks diffusers compiles regionally (`_repeated_blocks`: FLUX's 19 double and 38 single blocks)."""
    names = set(transformer._repeated_blocks)
    return [m for m in transformer.modules() if type(m).__name__ in names]


def capture_blocks(transformer, compile: bool = True, options: dict | None = None) -> Capture:
    """Compile each repeated block (one compiled function per block forward, like `compile_repeated_blocks`, with
    torch.compile's `options`) and replay it from a CUDA graph. Apply before `enable_cache` so that the cache's
    hooks wrap the graphs. On a device without CUDA the blocks run compiled, without graphs, and this says so."""
    blocks = repeated_blocks(transformer)
    if any(hasattr(b, "_diffusers_hook") and b._diffusers_hook._hook_order for b in blocks):
        raise ValueError("apply CUDA graphs before First Block Cache (its hooks must run around the graphs).")
    capture = Capture(transformer.device, compile)
    if not capture.enabled:
        print(f"CUDA graphs need a CUDA device: on {transformer.device} the blocks run "
              f"{'compiled ' if compile else ''}without graphs.")
    forwards = {}
    for block in blocks:
        run = block.forward.__func__  # the class's forward, or the one `fluxlab.mlp_fp8.use` gave the block
        if run not in forwards:
            forwards[run] = torch.compile(run, fullgraph=True, options=options) if compile else run
        HookRegistry.check_if_exists_or_initialize(block).register_hook(BlockGraph(forwards[run], capture), HOOK)
    transformer._fluxlab_capture = capture  # what `fluxlab.applied` reads
    return capture

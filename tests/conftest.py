import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network
import fluxlab  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny():
    """Settings for a short tiny-source run on CPU."""
    return fluxlab.check_settings("tiny", device="cpu", steps=8)


@pytest.fixture
def tiny_pipe(tiny):
    return fluxlab.load_pipeline(tiny)


def latents(pipe, settings) -> torch.Tensor:
    return fluxlab.generate(pipe, settings, output_type="latent")


def exact_attention(query, key, value, scale=None, bounds=None):
    """What `fluxlab.fp8_attention.attention` computes, in full precision ((batch, sequence, heads, dim) layout): the
    stand-in where cuDNN's FP8 kernel cannot run."""
    out = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (query, key, value)),
                                                           scale=scale)
    return out.transpose(1, 2)


def emulated(query, key, value, scale=None, bounds=None):
    """`fluxlab.fp8_attention.attention` on a CPU: q and k rounded to FP8 on their bounds, v on its maximum, exact
    attention."""
    quantize = fluxlab.fp8_attention.quantize
    (q, dq), (k, dk) = quantize(query, bounds[0]), quantize(key, bounds[1])
    return emulated_fp8(q, k, value, dq, dk, scale, query.dtype)


def emulated_fp8(q, k, value, descale_q, descale_k, scale, dtype):
    """`fluxlab.fp8_attention.attend_fp8` on a CPU: q and k scaled back from FP8, v rounded to FP8, exact
    attention."""
    v, dv = fluxlab.fp8_attention.quantize(value)
    return exact_attention(*((x.float() * d).to(dtype) for x, d in ((q, descale_q), (k, descale_k), (v, dv))), scale)


def fp8_steps(ours: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """How many FP8 (e4m3) values apart each of `ours` is from `expected` (steps at the smaller magnitude of the two:
    one value apart is one step across a power of two too)."""
    smaller = torch.minimum(ours.float().abs(), expected.float().abs())
    step = 2.0 ** (torch.floor(torch.log2(smaller.clamp_min(2 ** -6))) - 3)
    return ((ours.float() - expected.float()).abs() / step).round()


def steps_histogram(ours: torch.Tensor, expected: torch.Tensor) -> dict:
    """Share of values 0, 1, 2 and more FP8 steps away."""
    steps = fp8_steps(ours, expected).clamp_max(3)
    return {("3+" if k == 3 else int(k)): round((steps == k).float().mean().item(), 6) for k in range(4)}


def torchrun(nproc: int, *args, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def _output_text(output) -> str:
    if output.output_type == "stream":
        return output.text
    data = output.get("data", {})
    return data.get("text/markdown") or data.get("text/plain") or ""


def summary_disagreements(nb) -> list[str]:
    """The ratios and percentages (e.g. '1.68x', '3.9%') that an executed chapter's summary states but none of its
    other outputs (tables, figures' captions, lines) shows: a summary says what its tables say."""
    import re

    cells = nb.cells
    at = next((i for i, c in enumerate(cells) if c.cell_type == "markdown" and c.source.startswith("## Summary")), None)
    if at is None:
        return []
    summary = "".join(_output_text(o) for c in cells[at:] if c.cell_type == "code" for o in c.outputs)
    others = "".join(_output_text(o) for c in cells[:at] if c.cell_type == "code" for o in c.outputs)
    return [n for n in re.findall(r"\d+\.\d+(?:x|%)", summary) if n not in others]


class EmulatedGraph:
    """A CUDA graph's memory on a CPU: capture records each operation with the tensors it read and wrote, replay
    runs them again and writes each result into the tensor the capture wrote. As on a GPU, a replay reads its inputs
    from the tensors the capture read (the graph's static inputs) and leaves its outputs in the same tensors."""

    def __init__(self):
        self.ops = []
        self.replays = 0

    def replay(self):
        for func, args, kwargs, out in self.ops:
            result = func(*args, **kwargs)
            for recorded, new in zip(tree_leaves(out), tree_leaves(result)):
                if isinstance(recorded, torch.Tensor) and recorded.data_ptr() != new.data_ptr():
                    recorded.copy_(new)
        self.replays += 1


class _Capture(TorchDispatchMode):
    def __init__(self, graph: EmulatedGraph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.graph.ops.append((func, args, kwargs, out))
        return out


class _Stream:
    def wait_stream(self, other):
        pass


@pytest.fixture
def emulated_cuda_graphs(monkeypatch):
    """`torch.cuda`'s graph capture and streams as `fluxlab.graphs` calls them, on a CPU (`EmulatedGraph`). Returns
    the list of graphs captured; a `graphs.Capture` made while it is in place is enabled. Blocks must run eagerly
    (`capture_blocks(compile=False)`): compiled code runs its fused kernels past the dispatcher, unseen by capture."""
    from fluxlab import graphs

    captured = []

    def new_graph():
        captured.append(EmulatedGraph())
        return captured[-1]

    @contextlib.contextmanager
    def capture(graph, pool=None, stream=None, capture_error_mode=None):
        with _Capture(graph):
            yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", new_graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    init = graphs.Capture.__init__

    def enabled(self, device, compiled):
        init(self, torch.device("cpu"), compiled)
        self.enabled, self.stream = True, _Stream()

    monkeypatch.setattr(graphs.Capture, "__init__", enabled)
    return captured

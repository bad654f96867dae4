import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def torchrun(nproc: int, *args, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})

"""Context parallelism on CPU processes (gloo), against a single process."""
import json
import subprocess
import time

import nbformat
import pytest
import torch

import fluxlab

from conftest import ROOT, latents, torchrun

WORKER = ROOT / "tests" / "cp_worker.py"


def _outputs(prefix, nproc):
    return [torch.load(f"{prefix}.rank{r}") for r in range(nproc)]


@pytest.mark.parametrize("nproc, ulysses, ring", [(2, 2, 1), (2, 1, 2), (4, 1, 4), (4, 2, 2)])
def test_context_parallel_matches_one_process(tmp_path, tiny, tiny_pipe, nproc, ulysses, ring):
    result = torchrun(nproc, WORKER, tmp_path / "out", ulysses, ring)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = latents(tiny_pipe, tiny)
    for out in _outputs(tmp_path / "out", nproc):
        assert (out["latents"] - reference).abs().max().item() <= 1e-4


def test_cache_decisions_are_identical_on_every_rank(tmp_path, tiny, tiny_pipe):
    # A threshold at the median step difference of this model, so that some steps are skipped.
    fluxlab.optimize(tiny_pipe, cache=0.0)
    latents(tiny_pipe, tiny)
    diffs = sorted(d for _, d, _ in fluxlab.cache_stats(tiny_pipe).runs[-1] if d is not None)
    threshold = diffs[len(diffs) // 2]
    result = torchrun(2, WORKER, tmp_path / "out", 2, 1, threshold, timeout=120,
                      env={"FLUXLAB_DIST_TIMEOUT_S": "60"})
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = _outputs(tmp_path / "out", 2)
    assert rank0["decisions"] == rank1["decisions"]
    assert False in rank0["decisions"] and True in rank0["decisions"]


def _kernels() -> set[str]:
    ps = subprocess.run(["pgrep", "-f", "ipykernel_launcher"], capture_output=True, text=True)
    return set(ps.stdout.split())


def test_a_failing_rank_ends_every_rank(tmp_path):
    """Through the runner's rank path: rank 1's notebook fails while rank 0 waits in a collective."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("x = 0", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "import datetime, os, torch, torch.distributed as dist\n"
            "dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=600))\n"
            "if dist.get_rank() == 1:\n"
            "    raise RuntimeError('rank 1 failed on purpose')\n"
            "dist.barrier()  # rank 0 would wait here forever"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook = tmp_path / "failing.ipynb"
    nbformat.write(nb, notebook)
    before = _kernels()
    start = time.monotonic()
    result = torchrun(2, ROOT / "scripts" / "run_book.py", "--execute-rank", notebook, tmp_path, json.dumps({}),
                      600, timeout=180)
    assert result.returncode != 0
    assert time.monotonic() - start < 120
    assert "rank 1 failed on purpose" in result.stdout + result.stderr
    time.sleep(2)
    assert _kernels() - before == set(), "a kernel outlived its rank"

"""Context parallelism on CPU processes (gloo), against a single process."""
import json
import subprocess
import sys
import time

import nbformat
import pytest
import torch

import fluxlab

from conftest import ROOT, latents, torchrun

WORKER = ROOT / "tests" / "cp_worker.py"


def _outputs(prefix, nproc):
    return [torch.load(f"{prefix}.rank{r}") for r in range(nproc)]


@pytest.mark.parametrize("nproc, ulysses, ring", [(2, 2, 1), (2, 1, 2), (4, 1, 4), (4, 2, 2), (8, 1, 8), (8, 2, 4)])
def test_context_parallel_matches_one_process(tmp_path, tiny, tiny_pipe, nproc, ulysses, ring):
    result = torchrun(nproc, WORKER, tmp_path / "out", ulysses, ring, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = latents(tiny_pipe, tiny)
    for out in _outputs(tmp_path / "out", nproc):
        assert (out["latents"] - reference).abs().max().item() <= 1e-4
        assert out["applied"]["parallel"] == dict(ulysses=ulysses, ring=ring)


def test_fp8_attention_processor_under_ulysses_matches_one_process(tmp_path, tiny, tiny_pipe):
    """FP8AttnProcessor's context-parallel path (diffusers' Ulysses template around the processor's attention
    call), with exact attention in that call: the latents of one process, attention reported on every rank."""
    result = torchrun(2, WORKER, tmp_path / "out", 2, 1, "none", "fp8attn", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = latents(tiny_pipe, tiny)
    for out in _outputs(tmp_path / "out", 2):
        assert (out["latents"] - reference).abs().max().item() <= 1e-4
        assert out["applied"]["attention"] == "cudnn_fp8" and out["applied"]["parallel"] == dict(ulysses=2, ring=1)


@pytest.mark.parametrize("flags", [["peer"], ["fp8attn", "peer", "graphs"]])
def test_peer_exchange_matches_one_process(tmp_path, tiny, tiny_pipe, flags):
    """Ulysses with fluxlab's peer exchanges (on CPU the same copies travel as gloo sends; on GPUs they are writes
    into the peers' memory): which head group and which rows go where, with diffusers' attention, and inside the
    FP8 processor (exact attention in its call) on the graph path. (The tiny model's sequence splits over 2
    processes, not 3; its 6 heads not over 4.)"""
    nproc = 2
    result = torchrun(nproc, WORKER, tmp_path / "out", nproc, 1, "none", *flags, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "copies travel as point-to-point sends" in result.stdout
    reference = latents(tiny_pipe, tiny)
    for out in _outputs(tmp_path / "out", nproc):
        assert (out["latents"] - reference).abs().max().item() <= 1e-4
        assert out["applied"]["parallel"] == dict(ulysses=nproc, ring=1, exchange="peer")
        assert ("attention" in out["applied"]) == ("fp8attn" in flags)


@pytest.mark.parametrize("nproc", [3, 4])
def test_peer_exchange_places_every_head_group_and_row(tmp_path, nproc):
    """The peer exchanges alone, with more processes than the tiny model splits over: each process's rows of
    attention over the whole sequence, whichever process computed each head group."""
    result = torchrun(nproc, ROOT / "tests" / "exchange_worker.py", tmp_path / "out", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for out in _outputs(tmp_path / "out", nproc):
        assert out["shape"] == (2, 6, 2 * nproc, 8) and out["error"] <= 1e-5


def test_eight_processes_refuse_what_does_not_split(tmp_path):
    """The tiny pipeline has 6 attention heads: Ulysses over 8 processes cannot split them; the runner refuses
    before anything runs, naming splits that work (ring 8 and ulysses 2 x ring 4 pass the test above)."""
    out = ROOT / "book" / f"test-{tmp_path.name}"
    result = subprocess.run([sys.executable, "scripts/run_book.py", "--out", out, "--chapters", "04_context_parallel",
                             "--nproc", "8"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode != 0 and not out.exists()
    assert "6 attention heads do not split over ulysses_degree=8" in result.stderr
    assert "ulysses_degree x ring_degree = 1 x 8 or 2 x 4" in result.stderr


def test_graphs_and_the_shared_cache_under_context_parallelism(tmp_path, tiny):
    """The fast path's plumbing on CPU: graphs fall back to plain block calls beneath the cache's hooks; with a
    threshold that skips, every rank takes the same decisions and the latents match one process's."""
    one = fluxlab.load_pipeline(tiny)
    stats = fluxlab.cache.enable(one.transformer, 0.0)
    latents(one, tiny)
    diffs = sorted(d for _, d, _ in stats.runs[-1] if d is not None)
    threshold = diffs[len(diffs) // 2]
    one.transformer.disable_cache()
    fluxlab.cache.enable(one.transformer, threshold)
    reference = latents(one, tiny)
    expected = [c for _, _, c in fluxlab.cache.stats(one.transformer).runs[-1]]
    result = torchrun(2, WORKER, tmp_path / "out", 2, 1, threshold, "graphs", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CUDA graphs need a CUDA device" in result.stdout
    for out in _outputs(tmp_path / "out", 2):
        assert out["decisions"] == expected and False in expected
        assert (out["latents"] - reference).abs().max().item() <= 1e-4
        assert out["applied"]["graphs"] == dict(cuda_graphs=False, blocks_compiled=False)


def test_cache_decisions_are_identical_on_every_rank(tmp_path, tiny, tiny_pipe):
    # A threshold at the median step difference of this model, so that some steps are skipped.
    fluxlab.optimize(tiny_pipe, cache=0.0)
    latents(tiny_pipe, tiny)
    diffs = sorted(d for _, d, _ in fluxlab.cache.stats(tiny_pipe.transformer).runs[-1] if d is not None)
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
                      600, "null", timeout=180)
    assert result.returncode != 0
    assert time.monotonic() - start < 120
    assert "rank 1 failed on purpose" in result.stdout + result.stderr
    time.sleep(2)
    assert _kernels() - before == set(), "a kernel outlived its rank"


def test_processes_leave_their_group_when_done(tmp_path):
    """`parallel.finish` (registered at exit by `parallel.init`) destroys the group: NCCL warns about one left."""
    script = tmp_path / "finish.py"
    script.write_text("import torch, torch.distributed as dist, fluxlab\n"
                      "fluxlab.parallel.init(torch.device('cpu'))\n"
                      "fluxlab.parallel.barrier()\n"
                      "fluxlab.parallel.finish()\n"
                      "import sys\n"
                      "sys.stdout.write(f'in a group: {dist.is_initialized()}\\n')  # one write: ranks share stdout\n")
    result = torchrun(2, script, env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("in a group: False") == 2

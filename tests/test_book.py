"""The runner: bad input refused up front; the whole book executed on the tiny source and rendered."""
import re
import shutil
import subprocess
import sys
import uuid

import nbformat
import pytest

from conftest import ROOT

RUNNER = ROOT / "scripts" / "run_book.py"


def run(*args, timeout=1500):
    return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture
def out():
    path = ROOT / "book" / f"test-{uuid.uuid4().hex[:8]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("args, message", [
    (["-p", "height=100"], "height=100: must be a positive multiple of 16"),
    (["-p", "thresholds=[0.1, -1]"], "cache threshold -1"),
    (["-p", "bogus=1"], "unknown parameter"),
    (["--nproc", "3"], "do not split evenly over 3 processes"),
    (["-p", "model_source=/nowhere"], "no such folder"),
    (["--chapters", "06_extra"], "unknown chapter"),
])
def test_runner_refuses_bad_input_before_running(out, args, message):
    result = run("--out", out, *args, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_whole_book_on_tiny(out, tmp_path):
    result = run("--out", out, "--path-output", tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("01_baseline", "02_first_block_cache", "03_fp8_compile", "04_context_parallel", "05_conclusion",
                 "06_performance"):
        nb = nbformat.read(out / f"{name}.ipynb", 4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert outputs and not any(o.output_type == "error" for o in outputs), name
        assert (tmp_path / "_build" / "html" / "book" / out.name / f"{name}.html").is_file()
    html = (tmp_path / "_build" / "html" / "book" / out.name / "05_conclusion.html").read_text()
    table = html[html.index("<table"):html.index("</table>")]
    baseline_row = re.search(r"<tr[^>]*>\s*<td[^>]*><p>Baseline</p></td>.*?</tr>", table, re.S)
    assert baseline_row and re.search(r"<td[^>]*><p>\d+\.\d{3}</p></td>", baseline_row.group(0))
    assert "context parallel, 2 processes" in table and "tiny" in table
    assert table.count("not run") == 1  # only the 4-process row
    performance = (tmp_path / "_build" / "html" / "book" / out.name / "06_performance.html").read_text()
    assert "benchmark record(s)" in performance  # the committed GPU ladder (book/results), or says there is none
    status = (tmp_path / "_build" / "html" / "book" / out.name / "status.html").read_text()
    assert "04_context_parallel" in status and "diffusers" in status

    # A failing chapter stops the run with its error and keeps what the last good run wrote.
    kept = {p: p.read_bytes() for p in [out / "01_baseline.ipynb", *sorted((out / "results").glob("01_*"))]}
    failed = run("--out", out, "--chapters", "01_baseline", "-p", "repeats=0", "--no-build", timeout=300)
    assert failed.returncode != 0
    assert "repeats=0" in failed.stderr
    assert all(p.read_bytes() == data for p, data in kept.items())

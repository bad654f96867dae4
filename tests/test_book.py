"""The runner: bad input refused up front; the whole book executed on the tiny source, with progress, and rendered."""
import importlib.util
import re
import shutil
import subprocess
import sys
import time
import uuid

import nbformat
import pytest

import browser
from fluxlab import records
from fluxlab.settings import TINY_DIR

from conftest import ROOT, summary_disagreements

RUNNER = ROOT / "scripts" / "run_book.py"
CHAPTERS = ("01_baseline", "02_first_block_cache", "03_fp8_compile", "04_context_parallel", "05_conclusion",
            "06_performance")


def run(*args, timeout=1500):
    return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture
def out():
    path = ROOT / "book" / f"test-{uuid.uuid4().hex[:8]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("args, message", [
    (["-p", "height=100"], "height=100: must be a multiple of 16"),
    (["-p", "thresholds=[0.1, -1]"], "cache threshold=-1"),
    (["-p", "thresholds=0.1"], "thresholds=0.1: must be a non-empty list of thresholds"),
    (["-p", "guidance=-1"], "guidance=-1: must be a finite number from 0 to 100"),
    (["-p", "seed=-1"], "seed=-1: must be an integer"),
    (["-p", "repeats=0"], "repeats=0: must be an integer from 1 to 1000"),
    (["-p", "cache_threshold=nan"], "cache threshold='nan'"),
    (["-p", "bogus=1"], "unknown parameter"),
    (["-p", "compile_mode=bogus"], "compile_mode='bogus': allowed values are"),
    (["--nproc", "3"], "do not split evenly over 3 processes"),
    (["--nproc", "0"], "--nproc=0: must be an integer from 1 to 64"),
    (["-p", "model_source=/nowhere"], "no such folder"),
    (["-p", "model_source=flux-dev-random"], "needs a CUDA GPU with 40 GB"),
    (["--chapters", "07_extra"], "unknown chapter"),
])
def test_runner_refuses_bad_input_before_running(out, args, message):
    result = run("--out", out, *args, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-1000:]
    assert not out.exists()


def test_a_page_of_records_refuses_another_source_than_the_chapters_before_it(out):
    """The conclusion run with the notebooks' default source (tiny) into a folder whose chapter 3 ran on
    flux-dev-random would show tiny records beside it: refused before anything runs, the chapter kept."""
    out.mkdir()
    shutil.copy(ROOT / "book" / "published" / "03_fp8_compile.ipynb", out)
    before = (out / "03_fp8_compile.ipynb").read_bytes()
    result = run("--out", out, "--chapters", "05_conclusion", "--no-build", timeout=120)
    assert result.returncode != 0
    assert "ran with model_source='flux-dev-random'" in result.stderr, result.stderr[-1000:]
    assert "pass -p model_source=flux-dev-random" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["03_fp8_compile.ipynb"]
    assert (out / "03_fp8_compile.ipynb").read_bytes() == before


def test_runner_names_a_missing_tool_before_running(monkeypatch):
    spec = importlib.util.spec_from_file_location("run_book", RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    monkeypatch.setattr(runner, "jupyter_book", lambda: None)
    with pytest.raises(SystemExit, match=r"missing package\(s\) jupyter-book: .* pass --no-build"):
        runner.check_tools(build=True, execute=True)
    runner.check_tools(build=False, execute=True)  # --no-build needs no jupyter-book
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "papermill" else real(name))
    with pytest.raises(SystemExit, match=r"missing package\(s\) papermill: pip install -e '.\[book\]'$"):
        runner.check_tools(build=False, execute=True)


def test_small_runs_that_used_to_crash_now_run(out):
    """2 steps, and a threshold that skips every step after the first (the adherence reader meets blurry images)."""
    result = run("--out", out, "--chapters", "01_baseline,02_first_block_cache", "-p", "steps=2", "-p",
                 "thresholds=[1.0]", "-p", "repeats=1", "--no-build", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (cached,) = records.read(out / "results" / "02_first_block_cache--fbcache-1.json")
    assert cached["cache"]["skipped"] == 1 and cached["extras"]["adherence"]["prompts"] == 11


def test_a_second_run_into_the_same_folder_stops_at_once(out):
    """... and a run that completes replaces the chapter's records: one an earlier run wrote and this one did not
    goes."""
    (out / "results").mkdir(parents=True)
    stale, other = out / "results" / "01_baseline--gone.json", out / "results" / "02_first_block_cache--kept.json"
    published = ROOT / "book" / "published" / "results"
    stale.write_text((published / "01_baseline--baseline.json").read_text())
    other.write_text((published / "02_first_block_cache--baseline.json").read_text())
    first = subprocess.Popen([sys.executable, str(RUNNER), "--out", str(out), "--chapters", "01_baseline",
                              "--no-build"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):  # wait until the first run holds the folder
            if (out / ".lock").exists():
                break
            time.sleep(0.2)
        start = time.monotonic()
        second = run("--out", out, "--chapters", "01_baseline", "--no-build", timeout=120)
        assert second.returncode != 0 and "another run is writing into" in second.stderr
        assert time.monotonic() - start < 60
    finally:
        stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    assert records.read(out / "results" / "01_baseline--baseline.json")[0]["provenance"]["run_id"]
    assert not stale.exists() and other.exists()


@pytest.mark.slow
def test_whole_book_on_tiny(out, tmp_path):
    result = run("--out", out, "--path-output", tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # What a newcomer sees: progress per cell with an estimate, one summary at the end, no transport warning.
    assert re.search(r"01_baseline: cell \d+/\d+, 0:\d\d elapsed", result.stdout)
    assert re.search(r"01_baseline: cell \d+/\d+, .* left \(expected 0:20\)", result.stdout)  # a fresh folder
    assert "Kernel is running over TCP" not in result.stderr + result.stdout
    summary = result.stdout[result.stdout.index("== summary"):]
    assert all(name in summary for name in CHAPTERS) and "record file(s)" in summary
    assert "python -m http.server -b 127.0.0.1" in summary
    html = tmp_path / "_build" / "html" / "book" / out.name
    for name in CHAPTERS:
        nb = nbformat.read(out / f"{name}.ipynb", 4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert outputs and not any(o.output_type == "error" for o in outputs), name
        assert not any("it/s]" in o.get("text", "") for o in outputs), f"{name}: a progress bar in the page"
        assert not summary_disagreements(nb), f"{name}: the summary states {summary_disagreements(nb)}, no table does"
        page = (html / f"{name}.html").read_text()
        assert ".staging" not in page and "injected-parameters" not in page and "live_widgets =" not in page
    conclusion = (html / "05_conclusion.html").read_text()
    table = conclusion[conclusion.index("<table"):conclusion.index("</table>")]
    baseline_row = re.search(r"<tr[^>]*>\s*<td[^>]*><p>Baseline</p></td>.*?</tr>", table, re.S)
    assert baseline_row and re.search(r"<td[^>]*><p>\d+\.\d{3} \(\d+\.\d{3}\)</p></td>", baseline_row.group(0))
    assert "context parallel" in table and "CP x2" in table and table.count("not run") == 1  # the 4-process row
    performance = (html / "06_performance.html").read_text()
    assert "bench-1gpu.json" in performance
    status = (html / "status.html").read_text()
    assert "04_context_parallel" in status and "diffusers" in status
    if browser.available():
        seen = browser.check_pages(tmp_path / "_build" / "html", [f"book/{out.name}/{n}.html" for n in CHAPTERS],
                                   tmp_path / "profile")
        for page, what in seen.items():
            assert not (what["scrolling"] or what["broken"] or what["staging"]), (page, what)
        assert all(seen[f"book/{out.name}/{n}.html"]["figures"] >= 1 for n in CHAPTERS[:4])

    # A chapter failing while it runs (weights missing from a pipeline folder) stops the run with its error and
    # keeps what the last good run wrote.
    broken = tmp_path / "broken-pipeline"
    shutil.copytree(TINY_DIR, broken)
    for f in broken.glob("transformer/*.safetensors"):
        f.unlink()
    kept = {p: p.read_bytes() for p in [out / "01_baseline.ipynb", *sorted((out / "results").glob("01_*"))]}
    failed = run("--out", out, "--chapters", "01_baseline", "-p", f"model_source={broken}", "--no-build",
                 timeout=300)
    assert failed.returncode != 0 and "ModelUnavailable" in failed.stderr and "error: chapter 01_baseline" in failed.stderr
    assert all(p.read_bytes() == data for p, data in kept.items())


def test_papermill_by_hand_as_the_readme_says(tmp_path):
    """The README's command for one chapter; records go to the folder it names."""
    done = subprocess.run([sys.executable, "-m", "papermill", "notebooks/01_baseline.ipynb", str(tmp_path / "out.ipynb"), "--cwd", "notebooks",
                           "-p", "steps", "2", "-p", "output_dir", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert records.read(tmp_path / "results" / "01_baseline--baseline.json")[0]["settings"]["steps"] == 2

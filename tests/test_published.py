"""The committed GPU book (book/published): fresh code, every page run, full provenance, and rendered pages that
read well in a browser."""
import json
import re
import subprocess
import sys

import nbformat
import pytest

import browser
from fluxlab import book, ladder, records

from conftest import ROOT, summary_disagreements

PUBLISHED = ROOT / "book" / "published"
CHAPTERS = sorted(PUBLISHED.glob("*.ipynb"))
TECHNIQUES = ("01_baseline", "02_first_block_cache", "03_fp8_compile", "04_context_parallel")


def code_cells(nb) -> list[str]:
    """Code cells as written in the notebook (papermill's injected-parameters cell left out)."""
    return [c.source for c in nb.cells if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]


def test_there_is_a_published_book():
    assert {"01_baseline", "02_first_block_cache", "03_fp8_compile", "05_conclusion", "06_performance"} <= \
        {p.stem for p in CHAPTERS}


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_published_chapter_runs_todays_code_and_every_cell_ran(path):
    published = nbformat.read(path, 4)
    source = nbformat.read(ROOT / "notebooks" / path.name, 4)
    assert code_cells(published) == code_cells(source), f"{path.name} is stale: re-run it on GPUs"
    code = [c for c in published.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), f"{path.name}: a cell never ran"
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
    assert not summary_disagreements(published), f"{path.name}: the summary states {summary_disagreements(published)}"


def test_every_chapter_is_published_or_the_status_says_why():
    runs = book.runs(PUBLISHED)
    for ch in book.chapters():
        if (PUBLISHED / f"{ch['name']}.ipynb").exists():
            assert runs[ch["name"]]["status"] == "ok" and runs[ch["name"]]["duration_s"] > 0
        else:
            assert ch["name"] not in runs or runs[ch["name"]]["status"] != "ok"


def test_published_records_carry_provenance():
    recs = records.read_folder(PUBLISHED / "results")  # checks every field of the schema
    assert recs
    for rec in recs:
        assert rec["provenance"]["device_name"].startswith("NVIDIA H") and rec["provenance"]["driver"]
        assert re.fullmatch(r"[0-9a-f]{40}", rec["provenance"]["git_commit"]), rec["_path"]
        if rec["name"].startswith("tiny-"):  # chapter 2's trained reference, run beside flux-dev-random
            assert rec["model_source"] == "tiny" and rec["model_weights"] == records.tiny_weights()
            assert rec["extras"]["adherence"]["prompts"] == 11
            continue
        assert rec["model_source"] == "flux-dev-random" and rec["random_weights"]
        assert (rec["settings"]["height"], rec["settings"]["width"], rec["settings"]["steps"]) == (1024, 1024, 28)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("published")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_book.py"), "--out", str(PUBLISHED),
                             "--build-only", "--path-output", str(out), "--title", "Status of the published GPU book"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out / "_build" / "html"


def test_rendered_conclusion_shows_the_numbers(built):
    html = (built / "book" / "published" / "05_conclusion.html").read_text()
    table = html[html.index("<table"):html.index("</table>")]
    assert re.search(r"<td><p>Baseline</p></td>(.|\n)*?<td><p>\d+\.\d{3} \(\d+\.\d{3}\)</p></td>", table)
    devices = {r["provenance"]["device_name"] for r in records.read_folder(PUBLISHED / "results")}
    assert devices and all(d in html for d in devices) and "flux-dev-random" in html
    assert "random weights" in html


def test_rendered_performance_page_shows_its_records(built):
    """Every benchmark file in the appendix, the headline runs' and chapter 3's ladder's times, one verdict per
    process count that has a complete run, and the figures."""
    html = (built / "book" / "published" / "06_performance.html").read_text()
    runs = ladder.runs(ROOT / "book" / "results")
    for run in runs:
        assert f"<code class=\"docutils literal notranslate\"><span class=\"pre\">{run['path']}</span></code>" in html
    shown = [r for run in ladder.headline_runs(runs) for r in run["records"]]
    shown += [r for r in records.read_folder(PUBLISHED / "results", "03_fp8_compile--*.json") if not r["cache"]
              and "offload" not in r["optimizations"] and r["model_source"] == "flux-dev-random"]
    for rec in shown:
        assert f"{rec['timing']['median_s']:.3f}" in html, rec["name"]
    for processes in {run["world_size"] for run in runs if run["complete"]}:
        assert html.count(f"<strong>{processes} GPU(s)</strong>, target") == 1
    assert "<img" in html


def test_status_page_lists_every_chapter(built):
    html = (built / "book" / "published" / "status.html").read_text()
    for ch in book.chapters():
        assert ch["name"] in html
    assert json.loads((PUBLISHED / "chapters.json").read_text())["01_baseline"]["device"] in html


@pytest.mark.skipif(not browser.available(), reason="needs Debian's chromium (.ci/run installs it)")
def test_every_page_reads_well_in_a_browser(built, tmp_path):
    pages = [f"book/published/{p.stem}.html" for p in CHAPTERS] + ["book/published/status.html"]
    seen = browser.check_pages(built, pages, tmp_path / "profile")
    for page, result in seen.items():
        assert not result["scrolling"], f"{page}: code scrolls sideways at 1280 px: {result['scrolling']}"
        assert not result["broken"], f"{page}: images that do not load: {result['broken']}"
        assert not result["staging"], f"{page} shows a staging path"
    for name in TECHNIQUES:
        page = f"book/published/{name}.html"
        if page in seen:
            assert seen[page]["figures"] >= 1, f"{name} has no figure"

"""The committed GPU book (book/published): fresh code, full provenance, and a rendered conclusion with numbers."""
import re
import shutil
import subprocess
import sys

import nbformat
import pytest
from PIL import Image

from fluxlab import records, report

from conftest import ROOT

PUBLISHED = ROOT / "book" / "published"
CHAPTERS = sorted(PUBLISHED.glob("*.ipynb"))


def code_cells(nb) -> list[str]:
    """Code cells as written in the notebook (papermill's injected-parameters cell left out)."""
    return [c.source for c in nb.cells if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]


def test_there_is_a_published_book():
    assert [p.stem for p in CHAPTERS][:2] == ["01_baseline", "02_first_block_cache"]
    assert (PUBLISHED / "05_conclusion.ipynb").exists() and (PUBLISHED / "06_performance.ipynb").exists()


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_published_chapter_runs_todays_code(path):
    published = nbformat.read(path, 4)
    source = nbformat.read(ROOT / "notebooks" / path.name, 4)
    assert code_cells(published) == code_cells(source), f"{path.name} is stale: re-run it on GPUs"
    outputs = [o for c in published.cells if c.cell_type == "code" for o in c.outputs]
    assert outputs and not any(o.output_type == "error" for o in outputs)


def test_published_records_carry_provenance():
    recs = records.load(PUBLISHED / "results")
    assert recs
    for rec in recs:
        assert records.missing_provenance(rec) == [], rec["_path"]
        assert rec["provenance"]["device_name"].startswith("NVIDIA H") and rec["provenance"]["driver"]
        if rec["name"].startswith("tiny-"):  # chapter 2's trained reference, run beside flux-dev-random
            assert rec["model_source"] == "tiny" and not rec["random_weights"] and rec["adherence"]["prompts"] == 66
            continue
        assert rec["model_source"] == "flux-dev-random" and rec["random_weights"]
        assert (rec["settings"]["height"], rec["settings"]["width"], rec["settings"]["steps"]) == (1024, 1024, 28)
    assert {r["provenance"]["world_size"] for r in recs} == {1, 2}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("published")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_book.py"), "--out", str(PUBLISHED),
                             "--build-only", "--path-output", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out / "_build" / "html"


def test_rendered_conclusion_shows_the_numbers(built):
    html = (built / "book" / "published" / "05_conclusion.html").read_text()
    table = html[html.index("<table"):html.index("</table>")]
    assert re.search(r"<td><p>Baseline</p></td>(.|\n)*?<td><p>\d+\.\d{3}</p></td>", table)
    assert "NVIDIA H" in table and "flux-dev-random" in table and "not run" in table
    assert "random weights" in html


def test_status_page_flags_tiny_records_of_an_earlier_training(built):
    """Chapter 2's tiny sweep ran on H100 with the tiny pipeline of its day; the page says so, from the records."""
    stale = [r for r in records.load(PUBLISHED / "results") if report.source(r) == report.EARLIER_TINY]
    html = (built / "book" / "published" / "status.html").read_text()
    for chapter in {r["chapter"] for r in stale}:
        assert re.search(chapter + r": \d+ <code[^>]*><span[^>]*>tiny</span></code> record\(s\) were made", html)


def test_rendered_performance_page_shows_the_h100_ladder(built):
    html = (built / "book" / "published" / "06_performance.html").read_text()
    assert "1x NVIDIA H100 80GB HBM3" in html and "bench-1gpu.json" in html
    table = html[html.index("<table"):html.index("</table>")]
    assert re.search(r"<td><p>baseline \(<code[^>]*><span[^>]*>baseline</span></code>\)</p></td>\s*<td><p>1</p></td>"
                     r"\s*<td><p>\d+\.\d{3}</p></td>", table)
    assert "Target:" in html and "<img" in html


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (apt-get install chromium)")
def test_conclusion_in_a_real_browser(built):
    page = built / "book" / "published" / "05_conclusion.html"
    shots = ROOT / "_build" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={built.parent / 'chromium-profile'}"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert "<table" in dom and "Baseline" in dom
    images = re.findall(r'<img[^>]+src="([^"]+)"', dom)
    assert len(images) >= 2
    for src in images:
        if src.startswith("data:") or "logo" in src:
            continue
        with Image.open((page.parent / src).resolve()) as img:
            assert img.width > 100
    shot = shots / "published-conclusion.png"
    subprocess.run(["chromium", *flags, "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120)
    with Image.open(shot) as img:
        assert img.size == (1280, 2400) and len(img.getcolors(1 << 20) or []) > 50  # not a blank page

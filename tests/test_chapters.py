"""The chapters as a reader meets them: what they teach is in their cells, plumbing stays off the page."""
import re

import nbformat
import pytest

from fluxlab import book

from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TEACHES = {  # the library calls each technique chapter makes in its own visible cells
    "02_first_block_cache": ["FirstBlockCacheConfig(threshold=", "pipe.transformer.enable_cache(",
                             "pipe.transformer.disable_cache()"],
    "03_fp8_compile": ["quantize_(pipe.transformer, dynamic", "Float8DynamicActivationFloat8WeightConfig(",
                       "Float8WeightOnlyConfig(", "compile_repeated_blocks(fullgraph=",
                       "fluxlab.graphs.capture_blocks(pipe.transformer", "pipe.vae.decoder.compile(fullgraph=True)"],
    "04_context_parallel": ["ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring)",
                            "pipe.transformer.enable_parallelism(", "torchrun --nproc_per_node="],
}


def cells(path):
    return nbformat.read(path, 4).cells


def visible_code(path):
    return [c.source for c in cells(path) if c.cell_type == "code"
            and not {"remove-cell", "remove-input"} & set(c.metadata.get("tags", []))]


def test_every_chapter_is_declared_and_opens_with_what_it_needs():
    assert [p.stem for p in NOTEBOOKS] == [c["name"] for c in book.chapters()]
    for path in NOTEBOOKS:
        first = cells(path)[0]
        assert first.cell_type == "markdown" and first.source.startswith("# "), path.name
        assert any("fluxlab.book.needs(" in c.source for c in cells(path) if c.cell_type == "code"), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_parameters_stay_in_the_notebook_and_off_the_page(path):
    tagged = [c for c in cells(path) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "remove-cell" in tagged[0].metadata["tags"]
    for source in [c.source for c in cells(path) if c.cell_type == "code"]:
        assert max(map(len, source.splitlines() or [""])) <= 88, f"{path.name}: a code line over 88 columns"


@pytest.mark.parametrize("name", TEACHES)
def test_technique_chapters_make_the_library_calls_themselves(name):
    path = ROOT / "notebooks" / f"{name}.ipynb"
    text = "\n".join(visible_code(path)) + "\n".join(c.source for c in cells(path) if c.cell_type == "markdown")
    for call in TEACHES[name]:
        assert call in text, f"{name} does not show {call}"
    assert "fluxlab.optimize(" not in "\n".join(visible_code(path)), f"{name} hides its technique in optimize"


@pytest.mark.parametrize("name", ["01_baseline", "02_first_block_cache", "03_fp8_compile", "04_context_parallel"])
def test_technique_chapters_end_with_a_measured_summary(name):
    path = ROOT / "notebooks" / f"{name}.ipynb"
    sources = [c.source for c in cells(path)]
    at = next(i for i, s in enumerate(sources) if s.startswith("## Summary"))
    after = cells(path)[at + 1]
    assert after.cell_type == "code" and "Markdown(" in after.source  # numbers come from the records
    assert re.search(r"\*\*Try:\*\*", "\n".join(sources[at:]))


def test_chapter_4_shows_the_books_own_pieces():
    code = "\n".join(c.source for c in cells(ROOT / "notebooks" / "04_context_parallel.ipynb") if c.cell_type == "code")
    assert "source_code(fluxlab.cache.global_relative_difference" in code
    assert "source_code(fluxlab.graphs.BlockGraph)" in code
    assert "source_code(fluxlab.peer_exchange._exchange" in code and "fluxlab.peer_exchange.use(" in code


# A measured number on a page comes from a record, so prose states none: a number with a unit of time, speed or
# ratio in a markdown cell fails, unless it is one of the article's own (quoted in the conclusion's table).
MEASURED = re.compile(r"(?<![\w.])~?\d+(?:[.,]\d+)?\s?(?:s|ms|seconds|minutes|GB/s|TFLOP/s|x|%)(?![\w/])")
ARTICLE = {"26.36", "17.01", "13.40", "7.56", "4.92", "3.90", "21.83", "16.00", "13.78"}


def measured_numbers(text: str) -> list[str]:
    return [m for m in MEASURED.findall(text) if re.sub(r"[^\d.]", "", m.split()[0].rstrip("sx%")) not in ARTICLE]


def test_the_measured_number_check_catches_numbers():
    assert measured_numbers("slower (7.2 s against 5.3 s per image), 1.20x faster, 3.9% of a step, ~100 ms") == \
        ["7.2 s", "5.3 s", "1.20x", "3.9%", "~100 ms"]
    assert not measured_numbers("1024x1024 pixels, 28 steps, threshold 0.12, 12 B parameters, 4,096 tokens")


@pytest.mark.parametrize("path", NOTEBOOKS + [ROOT / "book" / "intro.md"], ids=lambda p: p.stem)
def test_prose_states_no_measured_number(path):
    texts = [c.source for c in cells(path) if c.cell_type == "markdown"] if path.suffix == ".ipynb" \
        else [path.read_text()]
    for text in texts:
        assert not measured_numbers(text), f"{path.name}: a measured number in prose: {measured_numbers(text)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_cross_references_are_links_to_chapters(path):
    """'chapter N' is a link to that chapter's notebook, so jupyter-book (-W -n) fails a book that lacks it."""
    names = {p.name for p in NOTEBOOKS}
    for text in [c.source for c in cells(path) if c.cell_type == "markdown"]:
        for target in re.findall(r"\]\(([^)#]+\.ipynb)\)", text):
            assert target in names, f"{path.name} links to {target}, not a chapter"
        for m in re.finditer(r"(?i)chapter \d", text):
            assert text[m.start() - 1] == "[" and text[m.end()] == "]", \
                f"{path.name}: '{m.group()}' is not a link to the chapter"


def test_the_performance_page_is_short_and_judges_once_per_process_count():
    """A reader's page: at most 700 words of prose, and one call that states the target verdicts."""
    path = ROOT / "notebooks" / "06_performance.ipynb"
    prose = " ".join(c.source for c in cells(path) if c.cell_type == "markdown")
    assert len(re.sub(r"```.*?```", " ", prose, flags=re.S).split()) <= 700
    code = " ".join(c.source for c in cells(path) if c.cell_type == "code")
    assert code.count("fluxlab.ladder.verdicts(") == 1 and "for run in runs" not in code

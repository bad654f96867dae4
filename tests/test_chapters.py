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
                       "Float8WeightOnlyConfig(", "compile_repeated_blocks(fullgraph="],
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

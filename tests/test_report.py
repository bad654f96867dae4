"""Tables, grids and the conclusion from records; which records compare."""
import copy

import pytest
from PIL import Image

import fluxlab
from fluxlab import compare, report


def _two(tmp_path, tiny, tiny_pipe, chapter="t"):
    base = fluxlab.measure(tiny_pipe, tiny, name="baseline", chapter=chapter, output_dir=tmp_path, repeats=1)
    fluxlab.cache.enable(tiny_pipe.transformer, 0.3)
    cached = fluxlab.measure(tiny_pipe, tiny, name="fbcache-0.3", chapter=chapter, output_dir=tmp_path, repeats=1,
                             extras={"step_costs": fluxlab.step_costs})
    return base, cached


def test_speedup_and_quality_only_within_one_run(tmp_path, tiny, tiny_pipe):
    base, cached = _two(tmp_path, tiny, tiny_pipe)
    rows = [report.row(r, tmp_path, base) for r in (base, cached)]
    assert rows[0]["speedup"] == 1.0 and rows[0]["psnr_db"] == float("inf") and rows[0]["ssim"] == pytest.approx(1.0)
    assert rows[1]["speedup"] == base["timing"]["median_s"] / cached["timing"]["median_s"]
    assert 10 < rows[1]["psnr_db"] < float("inf") and rows[1]["skipped"] == f"{cached['cache']['skipped']}/8"
    other = copy.deepcopy(cached)
    other["provenance"]["run_id"] = "another-run"
    assert report.row(other, tmp_path, base)["speedup"] is None
    md = report.table([base, cached], tmp_path, base).data
    assert "model source tiny" in md and "| FBCache 0.3 | 1 |" in md and "1.00x" in md and "<details>" in md


def test_conclusion_rows_are_matched_by_what_was_applied(tmp_path, tiny, tiny_pipe):
    base, cached = _two(tmp_path, tiny, tiny_pipe, chapter="02_first_block_cache")
    recs = fluxlab.records.read_folder(tmp_path)
    rows = [dict(row="Baseline", needs={}, processes=1), dict(row="FBCache", needs={"cache": 0.3}, processes=1),
            dict(row="FBCache 0.12", needs={"cache": 0.12}, processes=1),
            dict(row="FP8", needs={"fp8": True, "compile": True}, processes=1),
            dict(row="CP", needs={"cache": 0.3}, processes=2)]
    assert compare.find(recs, {"cache": 0.3})["name"] == "fbcache-0.3"
    assert compare.find(recs, {"cache": 0.12}) is None and compare.find(recs, {"cache": 0.3}, processes=2) is None
    assert compare.baseline_for(cached, recs)["name"] == "baseline"
    md = report.conclusion_table(rows, recs, tmp_path).data
    assert md.count("not run") == 3
    assert f"| FBCache | 1 | FBCache 0.3 | {cached['timing']['median_s']:.3f}" in md


def test_grid_status_and_scaling(tmp_path, tiny, tiny_pipe):
    base, cached = _two(tmp_path, tiny, tiny_pipe)
    sheet = report.record_grid([base, cached], tmp_path, columns=2, size=64)
    assert isinstance(sheet, Image.Image) and sheet.width == 128
    page = report.status_page([base], [dict(name="t", status="ok", duration_s=3.0, note="ran beside others")],
                              "Status")
    assert base["provenance"]["git_commit"][:12] in page and "| diffusers | 0.42.1 |" in page
    assert "*t: ran beside others.*" in page
    table = report.scaling_table([base, cached]).data
    assert f"| 1 | FBCache 0.3 | {cached['timing']['median_s']:.3f}" in table


def test_step_cost_table_and_skip_plot(tmp_path, tiny, tiny_pipe):
    base, cached = _two(tmp_path, tiny, tiny_pipe)
    costs = cached["extras"]["step_costs"]
    table = report.step_cost_table([cached]).data
    assert f"| {cached['cache']['skipped']}/8 |" in table
    share = report.skip_cost([cached])
    skip = [s for s, c in zip(costs["seconds"], costs["computed"]) if not c]
    assert skip and 0 < share < 1
    fig = report.plot_skips([base, cached])
    assert "per skip" in fig.axes[0].get_legend().get_texts()[1].get_text()

import copy

import numpy as np
import pytest
from PIL import Image

import fluxlab
from fluxlab import report


def _two_runs(tmp_path, tiny, tiny_pipe):
    base = fluxlab.measure(tiny_pipe, tiny, name="baseline", chapter="t", output_dir=tmp_path, repeats=1)
    fluxlab.optimize(tiny_pipe, fp8="rowwise")
    fp8 = fluxlab.measure(tiny_pipe, tiny, name="fp8", chapter="t", output_dir=tmp_path, repeats=1)
    return base, fp8


def test_speedup_and_quality_only_within_one_run(tmp_path, tiny, tiny_pipe):
    base, fp8 = _two_runs(tmp_path, tiny, tiny_pipe)
    rows = report.rows([base, fp8], tmp_path, [base])
    assert rows[0]["speedup"] == 1.0 and rows[0]["psnr_db"] == float("inf") and rows[0]["ssim"] == pytest.approx(1.0)
    assert rows[1]["speedup"] == base["timing"]["median_s"] / fp8["timing"]["median_s"]
    assert 10 < rows[1]["psnr_db"] < float("inf")  # FP8 changes pixels (18.9 dB measured at 8 steps)
    other = copy.deepcopy(fp8)
    other["provenance"]["run_id"] = "another-run"
    assert report.rows([other], tmp_path, [base])[0]["speedup"] is None
    md = report.table([base, fp8], tmp_path, base).data
    assert "| tiny |" in md and "FP8 weight-only" in md and "1.00x" in md


def test_conclusion_marks_rows_not_run(tmp_path, tiny, tiny_pipe):
    base = fluxlab.measure(tiny_pipe, tiny, name="baseline", chapter="01_baseline", output_dir=tmp_path, repeats=1)
    entries = report.conclusion(fluxlab.records.load(tmp_path))
    assert entries[0]["record"]["timing"] == base["timing"]
    assert all(e["record"] is None for e in entries[1:])
    md = report.conclusion_table(entries, tmp_path).data
    assert md.count("not run") == len(entries) - 1


def test_grid_and_status(tmp_path, tiny, tiny_pipe):
    base = fluxlab.measure(tiny_pipe, tiny, name="baseline", chapter="01_baseline", output_dir=tmp_path, repeats=1)
    sheet = report.record_grid([base, base], tmp_path, columns=2, size=64)
    assert isinstance(sheet, Image.Image) and sheet.width == 128
    page = report.status_page([base], [dict(name="01_baseline", status="ok", duration_s=3.0)], "Status")
    assert base["provenance"]["git_commit"][:12] in page and "| diffusers | 0.42.1 |" in page


def test_step_cost_table_and_skip_plot(tmp_path, tiny, tiny_pipe):
    base = fluxlab.measure(tiny_pipe, tiny, name="baseline", chapter="t", output_dir=tmp_path, repeats=1)
    fluxlab.optimize(tiny_pipe, cache=0.3)
    cached = fluxlab.measure(tiny_pipe, tiny, name="c", chapter="t", output_dir=tmp_path, repeats=1, step_costs=True)
    costs = cached["step_costs"]
    skip_ms = 1e3 * float(np.median([s for s, c in zip(costs["seconds"], costs["computed"]) if not c]))
    table = report.step_cost_table([cached]).data
    assert f"| {cached['cache']['skipped']}/{tiny.steps} |" in table and f"{skip_ms:.1f}" in table
    fig = report.plot_skips([base, cached])
    assert "per skip" in fig.axes[0].get_legend().get_texts()[1].get_text()

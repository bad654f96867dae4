"""Tables, grids and the conclusion from records; which records compare."""
import copy

import pytest
from PIL import Image

import fluxlab
from fluxlab import compare, records, report

from conftest import ROOT


def _two(tmp_path, tiny, tiny_pipe, chapter="t"):
    base = fluxlab.measure(tiny_pipe, tiny, name="baseline", chapter=chapter, output_dir=tmp_path, repeats=1)
    fluxlab.cache.enable(tiny_pipe.transformer, 0.3)
    cached = fluxlab.measure(tiny_pipe, tiny, name="fbcache-0.3", chapter=chapter, output_dir=tmp_path, repeats=1,
                             extras={"step_costs": fluxlab.step_costs})
    return base, cached


def test_speedup_and_quality_only_within_one_run(tmp_path, tiny, tiny_pipe):
    base, cached = _two(tmp_path, tiny, tiny_pipe)
    rows = [report.row(r, tmp_path, base) for r in (base, cached)]
    assert rows[0]["speedup"]["ratio"] == 1.0 and rows[0]["speedup"]["noise"] and rows[0]["psnr_db"] == float("inf") and rows[0]["ssim"] == pytest.approx(1.0)
    assert rows[1]["speedup"]["ratio"] == base["timing"]["median_s"] / cached["timing"]["median_s"]
    assert 10 < rows[1]["psnr_db"] < float("inf") and rows[1]["skipped"] == f"{cached['cache']['skipped']}/8"
    other = copy.deepcopy(cached)
    other["provenance"]["run_id"] = "another-run"
    assert report.row(other, tmp_path, base)["speedup"] is None
    md = report.table([base, cached], tmp_path, base).data
    assert "model source tiny" in md and "| FBCache 0.3 | 1 |" in md and "1.00x" in md and "<details>" in md


def test_conclusion_rows_are_matched_by_what_was_applied(tmp_path, tiny, tiny_pipe):
    base, cached = _two(tmp_path, tiny, tiny_pipe, chapter="02_first_block_cache")
    recs = fluxlab.records.read_folder(tmp_path)
    rows = [dict(row="Baseline", needs={}, processes=1),
            dict(row="FBCache", needs={"cache": 0.3}, processes=1, article=(17.01, 1.55)),
            dict(row="FBCache 0.12", needs={"cache": 0.12}, processes=1),
            dict(row="FP8", needs={"fp8": True, "compile": True}, processes=1),
            dict(row="CP", needs={"cache": 0.3}, processes=2)]
    assert compare.find(recs, {"cache": 0.3})["name"] == "fbcache-0.3"
    assert compare.find(recs, {"cache": 0.12}) is None and compare.find(recs, {"cache": 0.3}, processes=2) is None
    assert compare.baseline_for(cached, recs)["name"] == "baseline"
    md = report.conclusion_table(rows, recs, tmp_path).data
    assert md.startswith(f"*{report.CPU_NOTE}*")  # timed on a CPU: the page says what such timings are for
    assert md.count("not run") == 3 and "| CP | 2 | — | not run: no 2-process run of it in this book |" in md
    cached_row = f"| FBCache | 1 | 17.01 (1.55x) | FBCache 0.3 | {report.device(cached)} | "
    assert cached_row + f"{cached['timing']['median_s']:.3f}" in md
    assert f"x of {base['timing']['median_s']:.3f} s |" in md  # the row's own baseline
    assert report.device(cached).startswith("CPU") and report.device(dict(
        processes=2, provenance=dict(device_name="NVIDIA H200"))) == "2x NVIDIA H200"
    elsewhere = dict(cached, processes=2, provenance=dict(cached["provenance"], device_name="NVIDIA H200"))
    bars = [t.get_text() for t in report.plot_times([base, elsewhere]).axes[0].get_yticklabels()]
    assert bars[1].endswith("(2x NVIDIA H200)") and report.device(base) in bars[0].replace("\n", " ")
    # ratios only within one chapter's run: a baseline of another chapter in the same runner invocation is not it
    other = dict(base, chapter="04_context_parallel", provenance=dict(base["provenance"], date_utc="9999"))
    assert compare.baseline_for(cached, recs + [other])["chapter"] == "02_first_block_cache"


def test_a_conclusion_row_slower_than_the_row_it_adds_to_says_why(tmp_path, tiny, tiny_pipe):
    """The cache row ran on a stack without the FP8 row's attention kernel and skipped no step: the page says so,
    with the same stack without the cache from the cache row's own run; a row that is not slower gets no note."""
    base, cached = _two(tmp_path, tiny, tiny_pipe)

    def timed(rec, name, optimizations, seconds, cache=None):
        return dict(copy.deepcopy(rec), name=name, label=name, optimizations=optimizations, cache=cache,
                    timing=dict(rec["timing"], median_s=seconds, min_s=seconds, times_s=[seconds] * 3))

    fp8 = dict(fp8=dict(granularity="rowwise", dynamic_activation=True), compile=dict(scope="regional"))
    fastest = timed(base, "fastest", dict(fp8, attention="_cudnn_fp8"), 2.5)
    alone = timed(base, "fp8", fp8, 3.0)
    both = timed(base, "fbcache", dict(fp8, cache=dict(threshold=0.12)), 3.1, cache=dict(skipped=0, steps=28))
    rows = [dict(row="FP8", needs={"fp8": True, "compile": True}, processes=1),
            dict(row="Both", needs={"cache": 0.12, "fp8": True, "compile": True}, processes=1)]
    md = report.conclusion_table(rows, [base, fastest, alone, both], tmp_path).data
    assert ("**Both** (3.100 s) is slower than **FP8** (2.500 s) on the same card: its configuration leaves out "
            "attention cudnn_fp8, which that row's has; its cache skipped none of the 28 steps, so it added its check "
            "and saved nothing; the same configuration without First Block Cache, timed in its run, took 3.000 s "
            "(fp8): adding it gives a speedup of 0.97x.") in md
    faster = timed(both, "fbcache", both["optimizations"], 2.4, cache=dict(skipped=9, steps=28))
    assert "is slower than" not in report.conclusion_table(rows, [base, fastest, alone, faster], tmp_path).data
    elsewhere = dict(both, provenance=dict(both["provenance"], device_name="NVIDIA H200"))
    assert "is slower than" not in report.conclusion_table(rows, [base, fastest, alone, elsewhere], tmp_path).data


def test_grid_status_and_scaling(tmp_path, tiny, tiny_pipe):
    base, cached = _two(tmp_path, tiny, tiny_pipe)
    sheet = report.record_grid([base, cached], tmp_path, columns=2, size=64)
    assert isinstance(sheet, Image.Image) and sheet.width == 128
    bench = [dict(base, chapter="bench", _path=str(tmp_path / "bench-1gpu.json"))]
    page = report.status_page([base], [dict(name="t", status="ok", duration_s=3.0, note="ran beside others"),
                                       dict(name="u", status="ok", duration_s=1.0, git_commit="f" * 40)],
                              "Status", bench)
    assert "`bench-1gpu.json` | 1 | 1 |" in page and "| `ffffffffffff` |" in page
    assert base["provenance"]["git_commit"][:12] in page and "| diffusers | 0.42.1 |" in page
    assert "*t: ran beside others.*" in page
    table = report.scaling_table([base, cached]).data
    assert f"| 1 | FBCache 0.3 | {cached['timing']['median_s']:.3f}" in table


def test_speedup_within_noise_when_the_calls_overlap():
    def rec(*times):
        return dict(timing=dict(times_s=list(times), median_s=sorted(times)[len(times) // 2]))

    clear = compare.speedup(rec(2.0, 2.1, 2.2), rec(1.0, 1.1, 1.2))
    assert not clear["noise"] and report.speedup_text(clear) == "1.91x"
    noisy = compare.speedup(rec(1.0, 1.5, 2.0), rec(1.1, 1.3, 1.4))
    assert noisy["noise"] and report.speedup_text(noisy) == "1.15x (within noise)"
    assert noisy["low"] == pytest.approx(1.0 / 1.4) and noisy["high"] == pytest.approx(2.0 / 1.1)


def test_the_memory_table_says_slower_for_what_takes_longer():
    def rec(label, *times, peak=10.0):
        return dict(label=label, peak_mem_gb=peak, provenance=dict(device_name="NVIDIA H100 80GB HBM3"),
                    model_source="flux-dev-random", settings=dict(height=1024, width=1024, steps=28),
                    timing=dict(times_s=list(times), median_s=sorted(times)[1]))

    table = report.memory_cost([rec("on the GPU", 2.5, 2.6, 2.7, peak=30.0), rec("streamed", 20.4, 20.5, 20.6),
                                rec("capped", 2.5, 2.6, 2.8)]).data
    assert "| on the GPU | 2.600 | — | 30.0 |" in table
    assert "| streamed | 20.500 | 7.88x slower | 10.0 |" in table
    assert "| capped | 2.600 | 1.00x faster (within noise) | 10.0 |" in table


def test_step_cost_table_and_skip_plot(tmp_path, tiny, tiny_pipe):
    base, cached = _two(tmp_path, tiny, tiny_pipe)
    costs = cached["extras"]["step_costs"]
    table = report.step_cost_table([cached]).data
    assert f"| {cached['cache']['skipped']}/8 |" in table
    share = report.step_cost(cached)["ratio"]
    skip = [s for s, c in zip(costs["seconds"], costs["computed"]) if not c]
    assert skip and 0 < share < 1
    assert report.skip_cost([cached]) == f"{share:.1%}" and f"| {share:.1%} |" in table
    fig = report.plot_skips([base, cached])
    assert "per skip" in fig.axes[0].get_legend().get_texts()[1].get_text()


def test_source_code_shows_objects_and_whole_files(tmp_path):
    kernel = tmp_path / "kernel.py"
    kernel.write_text("@triton.jit\ndef k(x):\n    pass\n")  # a file that cannot be imported without CUDA
    shown = report.source_code(report.speedup_text, kernel).data
    assert shown.count("```python\n") == 2
    assert "def speedup_text(" in shown and "@triton.jit\ndef k(x):\n    pass\n```" in shown


def test_the_cache_note_says_why_random_weights_skip_nothing():
    rec = next(r for r in records.read_folder(ROOT / "book" / "published" / "results")
               if r["cache"] and r["random_weights"] and not r["cache"]["skipped"])
    diffs = [d for d in rec["cache"]["diffs"] if d is not None]
    note = report.cache_note([rec])
    assert f"computed every step in `{rec['name']}`" in note
    assert f"moved by {min(diffs):.2f} to {max(diffs):.2f} of its size, above the threshold" in note
    tiny = dict(rec, random_weights=False)
    assert report.cache_note([tiny]) == ""  # trained weights: the chapters' tables show what it skipped

"""The performance page's ladder, read from a real run of scripts/bench.py."""
import copy

from fluxlab import ladder

from conftest import torchrun


def test_ladder_reads_a_real_two_process_bench_run(tmp_path):
    result = torchrun(2, "scripts/bench.py", "--source", "tiny", "--steps", "2", "--configs", "baseline,cp",
                      "--warmup", "1", "--repeats", "2", "--out", tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert not (tmp_path / "bench-2gpu.partial.json").exists()
    (run,) = ladder.runs(tmp_path)
    assert run["complete"] and run["world_size"] == 2 and run["model_source"] == "tiny"
    base, cp = run["configs"]
    assert (base["processes"], cp["processes"]) == (1, 2)
    assert ladder.previous(run["configs"], base) is None and ladder.previous(run["configs"], cp) is base
    text = ladder.table(run).data
    assert f"| {cp['s_median']:.3f} | {cp['s_min']:.3f} | {base['s_median'] / cp['s_median']:.2f}x |" in text
    assert "incomplete" not in text and "GPU links" not in text  # a CPU run
    verdict = ladder.verdict(run).data
    assert f"{cp['s_median']:.3f} s per image" in verdict and "arithmetic, not a measurement" in verdict
    assert ("**met**" in verdict) == (cp["s_median"] <= 1.2 and base["s_median"] / cp["s_median"] >= 1.7)

    # A progress file counts NCCL's GPU range and its kernel both; the page counts the kernel once.
    profiled = copy.deepcopy(run)
    profiled["configs"][1]["profile"] = dict(kernel_s=3.0, by_category_s={"communication": 2.0, "attention": 1.0},
                                             top_kernels_s={"ncclDevKernel_SendRecv": 1.0, "nccl:all_to_all": 1.0})
    ladder._drop_annotations(profiled["configs"][1]["profile"])
    assert profiled["configs"][1]["profile"]["by_category_s"]["communication"] == 1.0
    fig = ladder.plot(profiled)
    legend = {t.get_text() for t in fig.axes[0].get_legend().get_texts()}
    assert legend == {"attention", "communication", "wall time (median)"}

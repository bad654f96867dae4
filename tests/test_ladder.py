"""The performance page's ladder, read from a real run of scripts/bench.py (2 CPU processes)."""
import json

from fluxlab import ladder, records

from conftest import torchrun


def test_ladder_reads_a_real_two_process_bench_run(tmp_path):
    result = torchrun(2, "scripts/bench.py", "--source", "tiny", "--steps", "2", "--configs", "baseline,cp",
                      "--warmup", "1", "--repeats", "2", "--out", tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert not (tmp_path / "bench-2gpu.partial.json").exists()
    (run,) = ladder.runs(tmp_path)
    assert run["complete"] and run["world_size"] == 2
    base, cp = run["records"]
    assert (base["processes"], cp["processes"]) == (1, 2) and base["chapter"] == cp["chapter"] == "bench"
    assert cp["optimizations"]["parallel"] == dict(ulysses=2, ring=1)
    assert cp["extras"]["latents_rel_error"] < 1e-4 and cp["extras"]["latents_reference"] == "baseline"
    assert ladder.previous(run["records"], base) is None and ladder.previous(run["records"], cp) is base
    text = ladder.table(run).data
    ratio = base["timing"]["median_s"] / cp["timing"]["median_s"]
    assert f"| {cp['timing']['median_s']:.3f} ({cp['timing']['min_s']:.3f}) | {ratio:.2f}x | {ratio:.2f}x |" in text
    assert "incomplete" not in text and "GPU links" not in text  # a CPU run
    met = ladder.verdict(run, {2: dict(seconds=1e9, speedup=0.0)}).data
    missed = ladder.verdict(run, {2: dict(seconds=1e-9, speedup=1e9)}).data
    assert "**met**" in met and "**not met**" in missed
    assert f"`cp`**, {cp['timing']['median_s']:.3f} s per image" in met
    assert ladder.findings([run]).startswith("*No profiled")  # no CUDA, no kernel timeline


def test_a_stopped_run_is_a_progress_file_and_the_page_says_so(tmp_path):
    result = torchrun(2, "scripts/bench.py", "--source", "tiny", "--steps", "2", "--configs", "baseline,cp",
                      "--warmup", "1", "--repeats", "1", "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    recs = records.read(tmp_path / "bench-2gpu.json")
    records.write(tmp_path / "bench-2gpu.partial.json", recs[:1])
    (tmp_path / "bench-2gpu.json").unlink()
    (run,) = ladder.runs(tmp_path)
    assert not run["complete"] and "**incomplete run**" in ladder.table(run).data


def test_bad_configurations_are_refused_before_anything_loads(tmp_path):
    result = torchrun(1, "scripts/bench.py", "--source", "tiny", "--configs", "baseline,warp-speed", "--out", tmp_path,
                      timeout=120)
    assert result.returncode != 0 and "unknown or no configuration(s) ['warp-speed']" in result.stderr
    result = torchrun(1, "scripts/bench.py", "--source", "tiny", "--configs", "cp", "--out", tmp_path, timeout=120)
    assert "context-parallel configurations need torchrun with 2 or more processes" in result.stderr
    assert not list(tmp_path.iterdir())


def test_memory_table_picks_the_fastest_configuration_that_fits(tmp_path):
    result = torchrun(1, "scripts/bench.py", "--source", "tiny", "--steps", "2", "--configs", "baseline",
                      "--warmup", "1", "--repeats", "1", "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (rec,) = records.read(tmp_path / "bench-1gpu.json")
    big = dict(rec, name="big", label="big", peak_mem_gb=30.0, timing=dict(rec["timing"], median_s=1.0),
               extras={"peak_reserved_gb": 31.0})
    small = dict(rec, name="small", label="small", peak_mem_gb=6.0, timing=dict(rec["timing"], median_s=9.0),
                 extras={"peak_reserved_gb": 6.5})
    records.write(tmp_path / "bench-1gpu.json", [big, small])
    text = ladder.memory_table(ladder.runs(tmp_path)).data
    assert "| 12 GB | `small`: small | 9.000 | 6.5 |" in text and "| 48 GB | `big`: big | 1.000 | 31.0 |" in text
    assert json.loads((tmp_path / "bench-1gpu.json").read_text())["records"][0]["name"] == "big"

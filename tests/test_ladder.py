"""The performance page's ladder, read from a real run of scripts/bench.py (2 CPU processes)."""
import json
import re
from pathlib import Path

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
    ratio = base["timing"]["median_s"] / cp["timing"]["median_s"]
    met = ladder.verdicts([run], {2: dict(seconds=1e9, speedup=0.0)}).data
    missed = ladder.verdicts([run], {2: dict(seconds=1e-9, speedup=1e9)}).data
    assert "**met**" in met and "**not met**" in missed and f"{ratio:.2f}x `baseline` of the same run" in met
    assert f"`cp` on {cp['provenance']['device_name']}, {cp['timing']['median_s']:.3f} s" in met
    assert ladder.fastest_run([run], 2) is run and ladder.gap(run) == ""  # no CUDA, no kernel timeline
    assert ladder.command(run) == ("torchrun --nproc_per_node 2 scripts/bench.py --repeats 2 --configs "
                                   "baseline,cp")


def test_a_stopped_run_is_a_progress_file_and_the_page_says_so(tmp_path):
    result = torchrun(2, "scripts/bench.py", "--source", "tiny", "--steps", "2", "--configs", "baseline,cp",
                      "--warmup", "1", "--repeats", "1", "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    recs = records.read(tmp_path / "bench-2gpu.json")
    records.write(tmp_path / "bench-2gpu.partial.json", recs[:1])
    (tmp_path / "bench-2gpu.json").unlink()
    (run,) = ladder.runs(tmp_path)
    assert not run["complete"] and "| no: stopped early |" in ladder.appendix([run]).data
    assert "no complete record yet" in ladder.verdicts([run], {1: dict(seconds=1, speedup=1)}).data


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
    here = rec["provenance"]["device_name"]
    assert f"| 12 GB | {here} | `small`: small | 9.000 | 6.5 |" in text
    assert f"| 48 GB | {here} | `big`: big | 1.000 | 31.0 |" in text
    # another GPU's records get rows of their own: a time of one card is never set against another's
    other = dict(small, name="other", label="other", provenance=dict(small["provenance"], device_name="NVIDIA H200"),
                 timing=dict(small["timing"], median_s=0.5))
    records.write(tmp_path / "bench-1gpu.json", [big, small, other])
    text = ladder.memory_table(ladder.runs(tmp_path)).data
    assert f"| 48 GB | {here} | `big`: big | 1.000 | 31.0 |" in text and "| 48 GB | NVIDIA H200 | `other`" in text
    assert json.loads((tmp_path / "bench-1gpu.json").read_text())["records"][0]["name"] == "big"


def test_tagged_runs_variants_caps_and_the_gap_are_read_from_records(tmp_path):
    """A tagged run sorts after its untagged one; a context-parallel variant compares with the configuration it
    changes; a capped run is judged against the memory targets; the gap to N processes is computed from profiles."""
    result = torchrun(1, "scripts/bench.py", "--source", "tiny", "--steps", "2", "--configs", "baseline",
                      "--warmup", "1", "--repeats", "1", "--out", tmp_path, "--tag", "memory")
    assert result.returncode == 0, result.stderr[-2000:]
    (rec,) = records.read(tmp_path / "bench-1gpu-memory.json")

    def variant(name, seconds, processes=1, optimizations=None, extras=None):
        return dict(rec, name=name, label=name, processes=processes, optimizations=optimizations or {}, peak_mem_gb=5.0,
                    timing=dict(rec["timing"], median_s=seconds, times_s=[seconds]), extras=extras or {})

    profile = dict(compute_s=2.0, exposed_communication_s=0.0, idle_s=0.1, kernel_s_by_kind={"FP8 GEMM": 1.0})
    cp = {"parallel": dict(ulysses=2, ring=1)}
    one = variant("one", 3.0, extras={"profile": [profile]})
    two = variant("two", 2.0, 2, cp, {"profile": [dict(profile, compute_s=1.2, exposed_communication_s=0.3,
                                                       idle=dict(between_kernels_s={"under 10 us": 0.05}))] * 2})
    other = variant("two-other", 2.5, 2, {"parallel": dict(ulysses=2, ring=1, exchange="one")})
    records.write(tmp_path / "bench-2gpu.json", [one, two, other])
    records.write(tmp_path / "bench-2gpu-exchange.json", [one, other])
    fast = variant("fast", 1.0, optimizations={"graphs": dict(cuda_graphs=True, blocks_compiled=True)},
                   extras={"peak_reserved_gb": 30.0})
    capped = variant("capped", 1.2, extras={"memory_cap_gb": 16, "peak_reserved_gb": 15.8})
    slow = variant("slow", 9.0, extras={"memory_cap_gb": 8})
    records.write(tmp_path / "bench-1gpu-memory.json", [fast, capped, slow])
    trip = {"ms_median": 0.09, "peer_round_trip": {"ms_median": 0.3}}
    peer = variant("two-peer", 1.8, 2, {"parallel": dict(ulysses=2, ring=1, exchange="peer")},
                   {"profile": [dict(profile, compute_s=1.3, exposed_communication_s=0.02)] * 2, "all_to_all": trip})
    records.write(tmp_path / "bench-2gpu-peer.json", [one, two, peer])
    runs = ladder.runs(tmp_path)
    assert [r["path"] for r in runs] == ["bench-1gpu-memory.json", "bench-2gpu.json", "bench-2gpu-exchange.json",
                                         "bench-2gpu-peer.json"]
    recs = runs[1]["records"]
    assert ladder.previous(recs, recs[1])["name"] == "one" and ladder.previous(recs, recs[2])["name"] == "two"
    verdict = ladder.memory_verdict(runs, {16: 1.3, 8: None, 4: None}).data
    assert "`capped` (capped) completed under a cap of 16 GB: 1.200 s per image" in verdict
    assert "1.20x `fast` (1.000 s) of the same run: **met**" in verdict
    assert "`slow` (slow) completed under a cap of 8 GB" in verdict and "nothing was run under a cap of 4 GB" in verdict
    table = ladder.memory_table(runs).data
    here = rec["provenance"]["device_name"]
    assert f"| `capped`: capped | {here} | 1.200 |" in table
    # 15.8 GB reserved + the context allowance is over 16 GB, but `capped` ran under a 16 GB cap: it fits that card
    assert f"| 16 GB | {here} | `capped`: capped | 1.200 | 15.8 | 16 GB: completed |" in table
    assert f"| 48 GB | {here} | `fast`: fast | 1.000 | 30.0 | — |" in table
    gap = ladder.gap(runs[1])
    assert "`two` takes 2.000 s where `one` (3.000 s) split evenly would take 1.500 s" in gap
    assert "is 1.000 s" in gap and "compute 1.200 s (+0.200 s)" in gap and "under 10 us 0.050 s" in gap
    # what did not help: slower than the configuration it changes in one optimization, memory trades left out
    text = ladder.not_helped(runs).data
    assert "| `two-other` against `two` | -20.0% (2.000 → 2.500 s) | 2x" in text and "`capped`" not in text
    assert ladder.fastest_run(runs, 2)["path"] == "bench-2gpu-peer.json"


def test_latents_errors_against_the_same_precision_and_bf16():
    """Each configuration against the first one of its precision; FP8 ones also against the run's bf16 one."""
    import torch
    references = {}
    bf16, other, fp8, fp8b = torch.ones(4), torch.tensor([1.0, 1.0, 1.0, 3.0]), torch.full((4,), 2.0), torch.zeros(4)
    assert ladder.latents_errors("baseline", "None", bf16, references) == dict(
        latents_rel_error=0.0, latents_reference="baseline")
    assert ladder.latents_errors("compile", "None", other, references)["latents_rel_error"] == 1.0  # |(0,0,0,2)|/2
    first = ladder.latents_errors("fp8", "rowwise", fp8, references)
    assert first == dict(latents_rel_error=0.0, latents_reference="fp8", latents_rel_error_bf16=1.0,
                         latents_bf16_reference="baseline")
    second = ladder.latents_errors("fp8-b", "rowwise", fp8b, references)
    assert (second["latents_rel_error"], second["latents_rel_error_bf16"]) == (1.0, 1.0)
    assert set(references) == {"None", "rowwise"} and references["rowwise"][0] == "fp8"
    alone = ladder.latents_errors("fp8", "rowwise", fp8, {})  # a run without a bf16 configuration
    assert "latents_rel_error_bf16" not in alone


def test_a_missed_one_gpu_target_says_what_matmuls_and_attention_leave_to_the_rest():
    """Read off a profiled one-GPU record of book/results: kernel time of GEMMs and attention against the target."""
    runs = ladder.runs(Path(__file__).parents[1] / "book" / "results")
    run = min((run for run in runs if run["complete"] and run["world_size"] == 1
               and not run["records"][0]["optimizations"]), key=lambda run: ladder.best(run["records"], 1)["timing"][
        "median_s"])
    top = ladder.best(run["records"], 1)
    kinds = top["extras"]["profile"][0]["kernel_s_by_kind"]
    floor = sum(v for k, v in kinds.items() if k in ("FP8 GEMM", "GEMM (bf16)", "attention"))
    median = top["timing"]["median_s"]
    text = ladder.verdicts(runs, {1: dict(seconds=median / 2, speedup=1.0)}).data
    assert f"`{top['name']}` on {top['provenance']['device_name']}, {median:.3f} s" in text
    assert f"matrix multiplies and attention take {floor:.3f} s" in text
    assert f"leaves {median / 2 - floor:.3f} s for everything else" in text
    assert f"now takes {median - floor:.3f} s" in text
    assert "matrix multiplies and attention" not in ladder.verdicts(runs, {1: dict(seconds=1e9, speedup=0.0)}).data


def test_the_headline_puts_each_gpu_s_baseline_fastest_and_other_tools_side_by_side(tmp_path):
    result = torchrun(1, "scripts/bench.py", "--source", "tiny", "--steps", "2", "--configs",
                      "baseline,compile,peer-flux-fast", "--warmup", "1", "--repeats", "1", "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    base, fast = records.read(tmp_path / "bench-1gpu.json")
    # Two steps of the tiny model on a CPU: compile need not beat eager, so the table's layout is tested on set times.
    fast["timing"] = dict(fast["timing"], median_s=base["timing"]["median_s"] / 2)
    peer = dict(fast, name="peer-cache-dit", label="cache-dit", optimizations={"fp8": {"granularity": "rowwise"}},
                timing=dict(fast["timing"], median_s=fast["timing"]["median_s"] * 2),
                extras=dict(peer=dict(tool="cache-dit", version="1.5.3", recipe="its API", without="its cache")))
    records.write(tmp_path / "bench-1gpu.json", [base, fast, peer], records.failures(tmp_path / "bench-1gpu.json"))
    runs = ladder.runs(tmp_path)
    assert ladder.headline_runs(runs) == runs
    text = ladder.headline(runs).data
    ratio = base["timing"]["median_s"] / fast["timing"]["median_s"]
    assert f"| **fluxlab fastest**: `compile` | {fast['timing']['median_s']:.3f}" in text and f"{ratio:.2f}x" in text
    assert f"| **cache-dit 1.5.3**: `peer-cache-dit` | {2 * fast['timing']['median_s']:.3f}" in text
    assert "| **failed**: `peer-flux-fast` |" in text and "Float8 dynamic quantization requires CUDA" in text
    assert ladder.best(runs[0]["records"], 1)["name"] == "compile"  # other tools are not fluxlab's fastest
    assert "| `peer-cache-dit` | 1.5.3 | its API | its cache |" in ladder.appendix(runs).data
    assert ladder.plot(runs).axes  # one panel per run
    fast["timing"] = dict(fast["timing"], median_s=base["timing"]["median_s"] * 2)  # nothing beats the baseline
    records.write(tmp_path / "bench-1gpu.json", [base, fast, peer], records.failures(tmp_path / "bench-1gpu.json"))
    text = ladder.headline(ladder.runs(tmp_path)).data
    assert text.count("**diffusers bf16**") == 1 and "fluxlab fastest" not in text


def test_a_failing_configuration_is_recorded_and_the_run_goes_on(tmp_path):
    # On a CPU, torchao refuses FP8 dynamic quantization: flux-fast's recipe fails in its own calls, on process 0
    # while process 1 waits; both go on together with the next configuration.
    result = torchrun(2, "scripts/bench.py", "--source", "tiny", "--steps", "2", "--configs",
                      "baseline,peer-flux-fast,cp", "--warmup", "1", "--repeats", "1", "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    path = tmp_path / "bench-2gpu.json"
    assert [r["name"] for r in records.read(path)] == ["baseline", "cp"]
    (failed,) = records.failures(path)
    assert failed["name"] == "peer-flux-fast" and failed["stage"] == "apply"
    assert failed["error"].startswith("AssertionError: Float8 dynamic quantization requires CUDA")
    assert failed["provenance"]["git_commit"] and "peer-flux-fast             FAILED" in result.stdout
    (run,) = ladder.runs(tmp_path)
    assert run["failed"] == [failed]
    assert ladder.command(run).endswith("--configs baseline,peer-flux-fast,cp")  # in the order they ran
    assert "`peer-flux-fast` failed" in ladder.appendix([run]).data


def test_an_error_in_a_table_cell_loses_its_addresses_and_is_cut_at_a_word():
    error = ("InternalTorchDynamoError: RuntimeError: Polyfill handler <method-wrapper '__eq__' of "
             "builtin_function_or_method object at 0x7fd50de4b4c0> does not have a traceable function")
    assert ladder.short(error) == "`" + error.replace(" at 0x7fd50de4b4c0", "") + "`"
    cut = ladder.short("words " * 40)
    assert cut == "`" + "words " * 26 + "…`"
    assert ladder.short("a | b `c`") == "`a \\| b 'c'`"  # a table cell stays one cell


def test_a_failing_reference_ends_the_run_without_a_results_file(tmp_path):
    result = torchrun(1, "scripts/bench.py", "--source", "tiny", "--steps", "2", "--configs",
                      "peer-flux-fast,baseline", "--warmup", "1", "--repeats", "1", "--out", tmp_path)
    assert result.returncode != 0 and "Float8 dynamic quantization requires CUDA" in result.stderr
    assert not (tmp_path / "bench-1gpu.json").exists()


def test_start_within_stops_a_run_between_configurations_and_resume_goes_on(tmp_path):
    """No configuration starts after --start-within seconds (the first always does): exit code 3, progress kept."""
    import subprocess
    import sys

    from conftest import ROOT
    command = [sys.executable, "scripts/bench.py", "--source", "tiny", "--steps", "2", "--warmup", "1",
               "--repeats", "1", "--configs", "baseline,fp8", "--out", str(tmp_path)]
    first = subprocess.run(command + ["--start-within", "0.5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 3, first.stderr[-2000:]
    assert "not started: fp8 (the 0.5 s of --start-within had passed)" in first.stdout
    assert [r["name"] for r in records.read(tmp_path / "bench-1gpu.partial.json")] == ["baseline"]
    assert not (tmp_path / "bench-1gpu.json").exists()
    again = subprocess.run(command + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    base, fp8 = records.read(tmp_path / "bench-1gpu.json")
    assert fp8["name"] == "fp8" and base["provenance"]["run_id"] == fp8["provenance"]["run_id"]
    wrong = subprocess.run(command + ["--start-within", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "--start-within 0.0: seconds > 0" in wrong.stderr


def test_an_interrupted_run_resumes_with_its_run_id_and_latents_references(tmp_path):
    """Killed after its first configuration (as a call's time limit does), the run goes on where it stopped, also past
    a configuration timed after a failed one (the progress file keeps records and failures apart)."""
    import subprocess
    import sys
    import time

    from conftest import ROOT
    command = [sys.executable, "scripts/bench.py", "--source", "tiny", "--steps", "2", "--warmup", "1", "--repeats", "1",
               "--configs", "baseline,peer-flux-fast,compile,fp8", "--out", str(tmp_path)]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "bench-1gpu.partial.json"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (partial.exists() and records.failures(partial)):
            time.sleep(0.2)
    finally:
        first.kill()
        first.wait()
    assert [r["name"] for r in records.read(partial)] == ["baseline"], "the first run ended before it was stopped"
    result = subprocess.run(command + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    base, compiled, fp8 = records.read(tmp_path / "bench-1gpu.json")
    assert fp8["name"] == "fp8" and fp8["provenance"]["run_id"] == base["provenance"]["run_id"]
    assert compiled["name"] == "compile" and base["provenance"]["run_id"] == compiled["provenance"]["run_id"]
    assert compiled["extras"]["latents_reference"] == "baseline" and compiled["extras"]["latents_rel_error"] > 0
    assert [f["name"] for f in records.failures(tmp_path / "bench-1gpu.json")] == ["peer-flux-fast"]
    assert not partial.exists() and not list(tmp_path.glob("*.safetensors"))
    wrong = subprocess.run(command[:-2] + ["--configs", "compile,baseline", "--out", str(tmp_path), "--resume"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "--resume: no progress file" in wrong.stderr


def test_a_configuration_past_its_limit_is_stopped_with_its_stacks(tmp_path):
    """One-process runs give each configuration a process of its own and a time limit: past it, its threads' stacks
    go to the output and it is ended; the run's reference past it ends the run without a results file."""
    result = torchrun(1, "scripts/bench.py", "--source", "tiny", "--steps", "1000", "--configs", "baseline,compile",
                      "--warmup", "1", "--repeats", "1", "--out", tmp_path, "--config-limit", "8", timeout=120)
    assert result.returncode != 0
    assert re.search(r"error: the run's reference baseline failed in [a-z -]+: timed out after 8 s", result.stderr)
    assert "most recent call first" in result.stderr and "[0.0 s] load" in result.stdout
    assert not (tmp_path / "bench-1gpu.json").exists()


def test_a_step_measured_before_its_base_compares_with_its_base():
    """A run that times a configuration before the one it adds an optimization to (baseline, then the q/k kernel's
    rung, then the rung without it): the rung with the kernel builds on the one without, which builds on nothing."""
    run = next(r for r in ladder.runs(Path(__file__).resolve().parents[1] / "book" / "results")
               if r["path"] == "bench-1gpu-levers-h100.json")
    base, qk, plain = run["records"]
    assert ladder.previous(run["records"], qk) is plain and ladder.previous(run["records"], plain) is None
    assert "bench-1gpu-levers-h100.json" not in ladder.not_helped([run]).data  # qk_fp8 helped: +1.7%


def test_a_capped_configuration_runs_with_expandable_segments_and_its_record_says_so(tmp_path):
    """A configuration under a memory cap gets its own process with PyTorch's expandable segments (as a user of a
    card that small would set), and its record says so."""
    result = torchrun(1, "scripts/bench.py", "--source", "tiny", "--steps", "2", "--configs", "baseline,fp8-graphs-24gb",
                      "--warmup", "1", "--repeats", "1", "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    base, capped = records.read(tmp_path / "bench-1gpu.json")
    assert base["extras"].get("alloc_conf") is None
    assert capped["extras"]["memory_cap_gb"] == 24 and capped["extras"]["alloc_conf"] == "expandable_segments:True"

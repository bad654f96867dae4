"""scripts/gpu_check.py on a CPU with the tiny source: each configuration in its own process, its result as a line as
it finishes, failures with their stage, a time limit that leaves a stack dump."""
import argparse
import json
import re
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import bench  # noqa: E402
import gpu_check  # noqa: E402


def check(tmp_path, *args, timeout=600):
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path), "--source", "tiny",
                           "--device", "cpu", "--skip-tests", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    lines = (tmp_path / gpu_check.RESULTS).read_text().splitlines() if (tmp_path / gpu_check.RESULTS).exists() else []
    return done, {r["name"]: r for r in map(json.loads, lines)}


def test_it_covers_every_one_process_configuration_of_the_bench():
    multi = {name for name, (processes, _) in bench.LADDER.items() if processes != 1}
    assert set(gpu_check.one_process_configurations()) | multi == set(bench.LADDER)
    assert {"peer-flux-fast", "peer-cache-dit", "peer-para-attention", "fp8-attnfp8qk-gelufp8-vae-graphs",
            "fp8-attnfp8-gelufp8-norm-vae-graphs"} <= set(gpu_check.one_process_configurations())
    assert "tests/test_qk_fp8.py" in gpu_check.gpu_test_files()


def test_each_configuration_passes_or_fails_with_its_stage(tmp_path):
    done, results = check(tmp_path, "--configs", "baseline,fp8-attnfp8-graphs,compile", "--steps", "2", "--jobs", "2")
    assert done.returncode == 1, done.stdout + done.stderr  # one did not pass
    assert list(results) and set(results) == {"baseline", "fp8-attnfp8-graphs", "compile"}
    for name in ("baseline", "compile"):
        assert results[name]["status"] == "passed" and results[name]["latents_finite"], results[name]
        assert results[name]["cold_start_s"] > 0 and "warm-up and timed calls" in results[name]["stages_s"]
    failed = results["fp8-attnfp8-graphs"]
    assert failed["status"] == "failed" and failed["stage"] == "check"
    assert "runs cuDNN's FP8 attention kernels for Hopper" in failed["error"] and "Traceback" in failed["log_tail"]
    assert "2 of 3 passed; not passed: fp8-attnfp8-graphs" in done.stdout
    again, _ = check(tmp_path, "--configs", "baseline,fp8-attnfp8-graphs,compile", "--resume")
    assert "2 of 3 passed" in again.stdout and (tmp_path / gpu_check.RESULTS).read_text().count("\n") == 3


def test_a_configuration_past_its_limit_is_stopped_with_stack_dumps_as_it_goes(tmp_path):
    # 1,000 steps at 512x512 (1,024 tokens, 16 times the tiny source's own): ~200 s a call on 2 cores, far past
    # the limit
    done, results = check(tmp_path, "--configs", "baseline", "--steps", "1000", "--height", "512", "--width", "512",
                          "--limit", "24")
    assert done.returncode == 1
    stopped = results["baseline"]
    assert stopped["status"] == "timed out" and stopped["limit_s"] == 24 and stopped["stage"], stopped
    assert "most recent call first" in stopped["log_tail"] and 'File "' in stopped["log_tail"]
    # the worker's own dumps every third of the limit, before the kill, with the main thread inside the pipeline
    log = (tmp_path / "baseline.log").read_text()
    dumps = re.findall(r"Stacks after (\d+) s \(every 8 s\)", log)
    assert dumps and int(dumps[0]) >= 8 and "Thread MainThread:" in log and "pipeline_flux.py" in log, log[-3000:]


def test_bad_configurations_are_refused_before_anything_runs(tmp_path):
    done, results = check(tmp_path, "--configs", "baseline,warp-speed")
    assert done.returncode != 0 and "warp-speed" in done.stderr and not results


def test_a_capped_configuration_gets_expandable_segments_unless_the_user_set_the_allocator(tmp_path, monkeypatch):
    envs = {}
    monkeypatch.setattr(bench.Child, "__init__", lambda self, command, out, env=None: envs.update({command[3]: env}))
    args = argparse.Namespace(out=tmp_path, source="tiny", device="cpu", steps=2, limit=60, height=None,
                              width=None)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    for name in ("fp8-encoders-offload-graphs-16gb", "fp8-graphs"):
        gpu_check.Running(name, args)
    assert envs["fp8-encoders-offload-graphs-16gb"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in envs["fp8-graphs"]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")  # the user's own: inherited as it is
    assert bench.child_env("fp8-encoders-offload-graphs-16gb") == {}

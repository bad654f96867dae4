"""Check every GPU path in one device call: the GPU tests, then each one-process configuration of `bench.py` (ours and
the other tools' recipes) at a few steps, each in a process of its own with its own time limit, cold start included.

    python scripts/gpu_check.py --out /tmp/check                      # everything, in bench.py's order
    python scripts/gpu_check.py --out /tmp/check --skip-tests --configs peer-flux-fast,peer-cache-dit --limit 480

Each configuration runs `bench.run_config` (the benchmark's own load, optimize or peer recipe, warm-up and timed
call) in a fresh process: nothing an earlier configuration compiled, set or leaked is there. Its result is one line
of `<out>/gpu-check.jsonl`, written as it finishes: passed (cold start, seconds per image, latents finite), failed
(the stage it was in and its error) or timed out (dumps of every thread's Python stack every third of the limit
and at it, and what `TORCH_LOGS=recompiles,graph_breaks` printed). `<out>/<name>.log` holds each process's whole
output. With `--resume`, what `<out>/gpu-check.jsonl` already holds is not run again (a machine kept between
calls). `--jobs N` runs N configurations at once on the one GPU (their timings are then not comparable: this
checks, bench.py times); a configuration that runs out of memory beside others is tried again alone.
"""
import argparse
import faulthandler
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import bench  # this folder's: the benchmark's configurations, run_config, Stage and Child
import fluxlab
from fluxlab import parallel

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "gpu-check.jsonl"
TAIL_LINES = 60  # of a log, in a result: the stack dump or the error with what led to it


def one_process_configurations() -> list[str]:
    """Every configuration of bench.py that runs on one process, in its order."""
    return [name for name, (processes, _) in bench.LADDER.items() if processes == 1]


def gpu_test_files() -> list[str]:
    """The test files that hold tests marked `gpu` (they run only where an FP8 GPU is)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "@pytest.mark.gpu" in p.read_text())


def worker(name: str, args) -> None:
    """Run one configuration as the benchmark does and print its result as the last line (`RESULT {...}`)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent's stack dump at the time limit
    bench.dump_stacks_every(args.limit / 3)  # and our own as it goes: moving on, or stuck
    stage = bench.Stage()
    result = dict(name=name)
    try:
        stage["now"] = "check"
        settings = fluxlab.check_settings(args.source, device=args.device, steps=args.steps, height=args.height,
                                          width=args.width)
        kwargs = bench.optimize_kwargs(name, 1)[1]
        fluxlab.check_options(**{k: v for k, v in kwargs.items() if k in bench.CHECKED}, device=settings.device)
        world = parallel.init(settings.device)
        rec = bench.run_config(name, settings.on(world.device), world,
                               argparse.Namespace(profile=False, warmup=1, repeats=1), {}, None, stage)
        finite = math.isfinite(rec["extras"]["latents_rel_error"])
        result |= dict(status="passed" if finite else "failed", cold_start_s=round(rec["timing"]["cold_start_s"], 1),
                       s_per_image=round(rec["timing"]["median_s"], 3), latents_finite=finite,
                       peak_mem_gb=rec["peak_mem_gb"] and round(rec["peak_mem_gb"], 1))
        if not finite:
            result |= dict(stage="latents", error="the latents are not finite")
    except Exception as err:  # an error or torch.OutOfMemoryError: what the check is for
        import traceback
        traceback.print_exc()
        first = (str(err).strip().splitlines() or [""])[0][:500]
        result |= dict(status="failed", stage=stage.get("now"), error=f"{type(err).__name__}: {first}".rstrip(": "),
                       out_of_memory=isinstance(err, torch.OutOfMemoryError))
    result["stages_s"] = stage.began
    print("RESULT " + json.dumps(result), flush=True)


class Running(bench.Child):
    """One configuration's process (`--worker`), its log and its clock."""

    def __init__(self, name: str, args):
        self.name, self.log = name, args.out / f"{name}.log"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--out", str(args.out), "--source",
                   args.source, "--device", args.device, "--steps", str(args.steps), "--limit", str(args.limit)]
        command += [f"--{side}={getattr(args, side)}" for side in ("height", "width") if getattr(args, side)]
        with open(self.log, "w") as out:
            super().__init__(command, out, dict(TORCH_LOGS="recompiles,graph_breaks", FLUXLAB_PROGRESS="0")
                             | bench.child_env(name))

    def result(self, timed_out: bool, limit: float) -> dict:
        lines = self.log.read_text(errors="replace").splitlines()
        found = next((json.loads(line[7:]) for line in reversed(lines) if line.startswith("RESULT ")), None)
        tail = "\n".join(lines[-TAIL_LINES:])
        if timed_out and found is None:  # a result printed just before the limit stands
            return dict(name=self.name, status="timed out", stage=bench.Stage.last(lines), limit_s=limit, log_tail=tail)
        if found is None:
            return dict(name=self.name, status="failed", stage="process", error=f"exit code {self.process.returncode} "
                        "without a result (killed? out of host memory?)", log_tail=tail)
        if found["status"] != "passed":
            found["log_tail"] = tail
        return found | dict(wall_s=round(self.elapsed(), 1))


def run_tests(out: Path) -> dict:
    """The GPU tests (pytest -m gpu), their summary line and output."""
    files = gpu_test_files()
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "gpu", *files],
                          cwd=ROOT, capture_output=True, text=True)
    (out / "gpu-tests.log").write_text(done.stdout + done.stderr)
    lines = done.stdout.strip().splitlines()
    return dict(name="gpu tests", status="passed" if done.returncode == 0 else "failed", files=files,
                summary=lines[-1] if lines else "", wall_s=round(time.monotonic() - start, 1),
                output="\n".join(lines[-40:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", help="comma-separated, in this order (default: every one-process configuration)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--resume", action="store_true", help="skip what <out>/gpu-check.jsonl already holds")
    parser.add_argument("--limit", type=float, default=300, help="seconds per configuration, cold start included")
    parser.add_argument("--jobs", type=int, default=1, help="configurations at once on the GPU")
    parser.add_argument("--source", default="flux-dev-random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args)
    known = one_process_configurations()
    names = args.configs.split(",") if args.configs else known
    unknown = [n for n in names if n not in known]
    if unknown or len(set(names)) != len(names) or args.jobs < 1 or args.limit <= 0:
        sys.exit(f"error: --configs takes bench.py's one-process configurations, once each ({unknown or names} "
                 f"given; allowed: {known}); --jobs >= 1, --limit > 0")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / RESULTS
    done = set()
    if args.resume and results.exists():
        done = {json.loads(line)["name"] for line in results.read_text().splitlines() if line.strip()}
    elif results.exists():
        results.unlink()

    def report(result: dict) -> None:
        with open(results, "a") as f:
            f.write(json.dumps(result) + "\n")
        passed = f"cold start {result.get('cold_start_s')} s, {result.get('s_per_image')} s/image"
        extra = result.get("error") or result.get("summary") or (
            passed if result["status"] == "passed" else f"in {result.get('stage')}")
        print(f"{result['name']}: {result['status']} ({extra})", flush=True)

    if not args.skip_tests and "gpu tests" not in done:
        report(run_tests(args.out))
    queue, retry, retried, running = [n for n in names if n not in done], [], set(), []
    while queue or retry or running:
        while queue and len(running) < args.jobs:
            running.append(Running(queue.pop(0), args))
        if not queue and retry and not running:  # out-of-memory retries run with nothing beside them
            running.append(Running(retry.pop(0), args))
        time.sleep(1)
        for job in list(running):
            timed_out = job.process.poll() is None and job.elapsed() > args.limit
            if timed_out:
                job.stop()
            if job.process.poll() is None:
                continue
            running.remove(job)
            result = job.result(timed_out, args.limit)
            if result.get("out_of_memory") and args.jobs > 1 and job.name not in retried:
                print(f"{job.name}: out of memory beside other configurations; tried again alone", flush=True)
                retry.append(job.name)
                retried.add(job.name)
                continue
            report(result)
    lines = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    bad = [r["name"] for r in lines if r["status"] != "passed"]
    print(f"{len(lines) - len(bad)} of {len(lines)} passed" + (f"; not passed: {', '.join(bad)}" if bad else ""))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

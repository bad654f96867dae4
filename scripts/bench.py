"""Benchmark FLUX.1-dev configurations in one run: seconds per image, ratios, memory, cold start, where time goes.

    python scripts/bench.py --configs baseline,compile,fp8,fp8-graphs --profile                   # one GPU
    torchrun --nproc_per_node 4 scripts/bench.py --configs fp8-graphs,cp-fp8,cp-fp8-graphs --profile

Each configuration loads a fresh pipeline (default source flux-dev-random at the article's settings: 1024x1024,
28 steps, guidance 3.5; text encoding + denoising + VAE decode), applies its optimizations with
`fluxlab.optimize`, makes `--warmup` calls (the first is the cold start, compilation included) and times
`--repeats` calls with `fluxlab.measure`. One-process configurations run on process 0 while the others wait;
context-parallel ones (`cp-...`) on every process. The first configuration is the run's reference.
With `--profile`, every process profiles one more image (compute, exposed communication and idle time as unions
of kernel intervals) and, on two or more processes, the run times a bare all-to-all of one Ulysses tensor.
Peers (`peer-flux-fast`, `peer-cache-dit`, `peer-para-attention`) apply another tool's published recipe
(`fluxlab.peers`) to the same freshly loaded pipeline instead of `fluxlab.optimize`, timed by the same code.
A one-process run gives each configuration a fresh process of its own (`--config-limit` seconds, cold start
included; at the limit its threads' stacks are dumped): nothing one configuration leaves in a process reaches the
next. A one-process configuration that fails (an error, out of memory, a crash, its limit) is recorded as failed with
its error and the run goes on; a failing context-parallel configuration, or a failing first configuration (the
reference), ends the run.
Writes `<out>/bench-<N>gpu.json` (`bench-<N>gpu-<tag>.json` with `--tag`; records and failures, `fluxlab.records`)
when the run ends; progress goes to the same name ending in `.partial.json` after each configuration (with the
latents references beside it). On one process, `--resume` goes on with an interrupted run's progress file on the
same GPU (a machine kept between calls whose time is limited): its records keep the run's id. `--start-within S`
starts no configuration once S seconds of the run have passed, so that a call with a time limit stops between
configurations (exit code 3) rather than inside one; `--resume` in the next call goes on.
"""
import argparse
import collections
import faulthandler
import gc
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLUXLAB_PROGRESS", "0")  # no denoising progress bars in the benchmark's log
import fluxlab  # noqa: E402
from fluxlab import ladder, parallel, peers, profiling, records  # noqa: E402
from fluxlab import settings as settings_module  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ALL = "all"  # every process of the run (context parallel)
CHECKED = ("cache", "fp8", "compile", "graphs", "offload", "inductor_flags", "overlap", "parallel", "attention",
           "exchange", "sigmoid_gelu", "gelu_fp8", "compile_vae", "compile_mode", "precompute_modulation",
           "qk_fp8", "norm_fp8")
FP8 = dict(fp8="rowwise", compile="regional")
ONE_PASS = dict(FP8, attention="cudnn_fp8", sigmoid_gelu=True, gelu_fp8=True)  # the fastest blocks so far
# name: (processes, optimize() arguments); context-parallel ones get parallel=(N, 1), or (1, N) with ring=True.
LADDER = {
    "baseline": (1, {}),
    "compile": (1, dict(compile="regional")),
    "graphs": (1, dict(compile="regional", graphs=True)),
    "fp8": (1, FP8),
    "fp8-graphs": (1, dict(FP8, graphs=True)),
    "fp8-cudnn-graphs": (1, dict(FP8, attention="_native_cudnn", graphs=True)),
    "fp8-cudnn-fused-graphs": (1, dict(FP8, attention="_native_cudnn", fuse_qkv=True, graphs=True)),
    "fp8-fused-graphs": (1, dict(FP8, fuse_qkv=True, graphs=True)),
    "fp8-attnfp8-graphs": (1, dict(FP8, attention="cudnn_fp8", graphs=True)),
    "fp8-attnfp8-gelu-graphs": (1, dict(FP8, attention="cudnn_fp8", sigmoid_gelu=True, graphs=True)),
    "fp8-attnfp8-gelufp8-graphs": (1, dict(ONE_PASS, graphs=True)),
    "fp8-attnfp8-gelufp8-vae-graphs": (1, dict(ONE_PASS, compile_vae=True, graphs=True)),
    # one-GPU levers on the fastest rung (issue 42): every step's adaLN modulations at the first step
    "fp8-attnfp8-gelufp8-mod-vae-graphs": (1, dict(ONE_PASS, precompute_modulation=True, compile_vae=True,
                                                  graphs=True)),
    # q and k normalized, rotated and quantized in one kernel; both levers together
    "fp8-attnfp8qk-gelufp8-vae-graphs": (1, dict(ONE_PASS, qk_fp8=True, compile_vae=True, graphs=True)),
    "fp8-attnfp8qk-gelufp8-mod-vae-graphs": (1, dict(ONE_PASS, qk_fp8=True, precompute_modulation=True,
                                                    compile_vae=True, graphs=True)),
    # each LayerNorm + modulation + FP8 in one pass, read by every linear after it; with the q/k kernel; all three
    "fp8-attnfp8-gelufp8-norm-vae-graphs": (1, dict(ONE_PASS, norm_fp8=True, compile_vae=True, graphs=True)),
    "fp8-attnfp8qk-gelufp8-norm-vae-graphs": (1, dict(ONE_PASS, qk_fp8=True, norm_fp8=True, compile_vae=True,
                                                     graphs=True)),
    "fp8-attnfp8qk-gelufp8-norm-mod-vae-graphs": (1, dict(ONE_PASS, qk_fp8=True, norm_fp8=True,
                                                         precompute_modulation=True, compile_vae=True, graphs=True)),
    "fp8-attnfp8-gelufp8-flags-vae-graphs": (1, dict(ONE_PASS, inductor_flags=True, compile_vae=True, graphs=True)),
    # flux-fast's inductor flags one at a time, on the same rung
    "fp8-attnfp8-gelufp8-conv1x1-vae-graphs": (1, dict(ONE_PASS, inductor_flags="conv_1x1_as_mm", compile_vae=True,
                                                      graphs=True)),
    "fp8-attnfp8-gelufp8-noepilogue-vae-graphs": (1, dict(ONE_PASS, inductor_flags="epilogue_fusion",
                                                         compile_vae=True, graphs=True)),
    "fp8-attnfp8-gelufp8-cdt-vae-graphs": (1, dict(ONE_PASS, inductor_flags="coordinate_descent_tuning",
                                                  compile_vae=True, graphs=True)),
    # the whole transformer in one graph per step (torch.compile's CUDA graphs), inductor fusing across blocks
    "fp8-attnfp8-gelufp8-vae-full": (1, dict(ONE_PASS, compile="full", compile_mode="reduce-overhead",
                                             compile_vae=True)),
    "fp8-attnfp8-flags-graphs": (1, dict(FP8, attention="cudnn_fp8", inductor_flags=True, graphs=True)),
    "fp8-flags-graphs": (1, dict(FP8, inductor_flags=True, graphs=True)),
    "fp8-fused-flags-graphs": (1, dict(FP8, fuse_qkv=True, inductor_flags=True, graphs=True)),
    "fbcache-fp8-graphs": (1, dict(FP8, cache=0.12, graphs=True)),
    # Other tools' recipes on the same pipeline (fluxlab.peers)
    "peer-flux-fast": (1, dict(peer="flux-fast")),
    "peer-cache-dit": (1, dict(peer="cache-dit")),
    "peer-para-attention": (1, dict(peer="para-attention")),
    # Memory: each component moves to the GPU when it runs (model), or each layer does (sequential: one timed
    # call, it streams all weights over PCIe at every step). `cap_gb`: from the first call on, PyTorch may hold no
    # more than this on the GPU (a smaller card).
    "fp8-graphs-24gb": (1, dict(FP8, graphs=True, cap_gb=24)),
    "offload": (1, dict(offload="model")),
    "fp8-offload": (1, dict(FP8, offload="model")),
    "fp8-offload-16gb": (1, dict(FP8, offload="model", cap_gb=16)),
    # The transformer stays on the GPU (FP8, graphs); the text encoders' layers stream in from pinned host memory.
    "fp8-encoders-offload-16gb": (1, dict(FP8, offload="encoders", vae_tiling=True, cap_gb=16)),
    "fp8-encoders-offload-graphs-16gb": (1, dict(FP8, graphs=True, offload="encoders", vae_tiling=True, cap_gb=16)),
    # Every layer streams in from pinned host memory, the next one on a side stream (no compile: hooks).
    "fp8-group-offload-8gb": (1, dict(fp8="rowwise", offload="group", vae_tiling=True, cap_gb=8)),
    "sequential-offload": (1, dict(offload="sequential", vae_tiling=True, repeats=1)),
    "sequential-offload-8gb": (1, dict(offload="sequential", vae_tiling=True, repeats=1, cap_gb=8)),
    "cp": (ALL, {}),
    "cp-fp8": (ALL, dict(FP8, overlap=True)),
    "cp-fp8-graphs": (ALL, dict(FP8, graphs=True)),
    "cp-fp8-cudnn-graphs": (ALL, dict(FP8, attention="_native_cudnn", graphs=True)),
    "cp-fp8-attnfp8-graphs": (ALL, dict(FP8, attention="cudnn_fp8", graphs=True)),
    "cp-fp8-peer-graphs": (ALL, dict(FP8, exchange="peer", graphs=True)),
    "cp-fp8-gelu-peer-graphs": (ALL, dict(FP8, sigmoid_gelu=True, exchange="peer", graphs=True)),
    "cp-fp8-gelufp8-peer-graphs": (ALL, dict(FP8, sigmoid_gelu=True, gelu_fp8=True, exchange="peer", graphs=True)),
    "cp-fp8-gelufp8-vae-peer-graphs": (ALL, dict(FP8, sigmoid_gelu=True, gelu_fp8=True, compile_vae=True,
                                                 exchange="peer", graphs=True)),
    "cp-fp8-attnfp8-peer-graphs": (ALL, dict(FP8, attention="cudnn_fp8", exchange="peer", graphs=True)),
    "cp-fp8-overlap-graphs": (ALL, dict(FP8, overlap=True, graphs=True)),
    "cp-ring-fp8-graphs": (ALL, dict(FP8, graphs=True, ring=True)),
    "cp-fbcache-fp8": (ALL, dict(FP8, cache=0.12)),
    "cp-fbcache-fp8-graphs": (ALL, dict(FP8, cache=0.12, graphs=True)),
    # Random weights change 0.4-0.6 from step to step, so 0.6 skips every step after the first: the cost of the
    # skip path (first block, decision, cached residual) under context parallelism and graphs.
    "cp-forced-fbcache-fp8-graphs": (ALL, dict(FP8, cache=0.6, graphs=True)),
}


def optimize_kwargs(name: str, world_size: int) -> tuple[int, dict, int | None, float | None]:
    """Processes, `fluxlab.optimize` arguments, a cap on the timed calls (None: --repeats) and on GPU memory."""
    processes, kwargs = LADDER[name]
    kwargs = dict(kwargs)
    repeats, cap_gb = kwargs.pop("repeats", None), kwargs.pop("cap_gb", None)
    if processes == ALL:
        ring = kwargs.pop("ring", False)
        kwargs["parallel"] = (1, world_size) if ring else (world_size, 1)
        processes = world_size
    return processes, kwargs, repeats, cap_gb


def child_env(name: str) -> dict:
    """What a configuration's own process adds to its environment: a capped one gets PyTorch's expandable segments,
    as a user of a card that small would set (without them, freed blocks that fit no new request stay reserved: on
    an H100, `fp8-encoders-offload-graphs-16gb` ran out of its 16 GB with 0.75 GB so held), unless already set."""
    if LADDER[name][1].get("cap_gb") and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        return {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    return {}


def cap_memory(device: torch.device, cap_gb: float | None) -> None:
    """Let PyTorch hold at most `cap_gb` on this GPU from now on (None: all of it); over it, an allocation fails
    with an out-of-memory error, as on a card of that size."""
    if device.type == "cuda":
        device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 1e9 / total) if cap_gb else 1.0, device)


class Stage(dict):
    """`run_config`'s stage (`stage["now"]`), printed with the seconds since this process began it as it changes: a
    log, or a stack dump at a time limit, then says where a configuration was."""

    def __init__(self):
        super().__init__()
        self.start, self.began = time.perf_counter(), {}

    def __setitem__(self, key, value):
        self.began[value] = round(time.perf_counter() - self.start, 1)
        print(f"[{self.began[value]:.1f} s] {value}", flush=True)
        super().__setitem__(key, value)

    @staticmethod
    def last(lines, default: str | None = None) -> str | None:
        """The stage a process's output (its lines) last printed."""
        return next((line.split("] ", 1)[1].strip() for line in reversed(lines) if line.startswith("[")), default)


def dump_stacks_every(seconds: float) -> None:
    """In a child with a time limit: every other thread's Python stack into stderr (its log) every `seconds` (a third
    of the limit), so that its log shows whether a slow stage moves on or hangs. Our own thread reads the frames
    holding the GIL: faulthandler's timer (`dump_traceback_later`) reads them without it and crashed a run (SIGSEGV)."""
    every, start = max(1.0, seconds), time.monotonic()

    def dump() -> None:
        while True:
            time.sleep(every)
            names = {t.ident: t.name for t in threading.enumerate()}
            lines = [f"Stacks after {int(time.monotonic() - start)} s (every {every:.0f} s), most recent call last:"]
            for ident, frame in sys._current_frames().items():
                if ident != threading.get_ident():
                    lines.append(f"Thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame)))
            print("\n".join(lines), file=sys.stderr, flush=True)

    threading.Thread(target=dump, name="stack dumps", daemon=True).start()


def _die_with_parent() -> None:
    """In a child, before it runs: the kernel ends it when its parent dies (a parent killed at a call's time limit
    leaves no configuration running on the GPU)."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Child:
    """A command in a process session of its own (with its children: inductor's compile workers) and its output in
    `out` (a file: with its errors; PIPE: each on its own pipe). `stop` dumps every thread's Python stack into that
    output (the child registers faulthandler on SIGUSR1, as this script does), then ends them all."""

    def __init__(self, command: list[str], out, env: dict | None = None):
        self.start = time.monotonic()
        self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.PIPE if out == subprocess.PIPE
                                        else subprocess.STDOUT, cwd=ROOT, text=True,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
                                        start_new_session=True, preexec_fn=_die_with_parent)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def stop(self) -> None:
        os.kill(self.process.pid, signal.SIGUSR1)
        time.sleep(3)
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def run_config(name: str, settings, world, args, references: dict, traffic, stage: dict) -> dict | None:
    """Load, optimize, time (and profile) one configuration on the processes it runs on; process 0 returns its
    record. `stage["now"]` says which step it is in (a failure's record names it)."""
    processes, kwargs, repeats, cap_gb = optimize_kwargs(name, world.world_size)
    mine = processes > 1 or world.is_main
    rec = None
    if mine:
        run_world = world if processes > 1 else parallel.World(0, 1, world.device)
        stage["now"] = "load"
        pipe = fluxlab.load_pipeline(settings)
        stage["now"] = "apply"
        label, extras = None, {"vae_decode_s": fluxlab.vae_decode_seconds} if args.profile else None
        if "peer" in kwargs:
            peer = peers.RECIPES[kwargs["peer"]](pipe)
            label = peers.label(peer)
        else:
            fluxlab.optimize(pipe, **kwargs)
        gc.collect()
        torch.cuda.empty_cache()  # what loading and quantizing left in the allocator's cache is not the cap's
        cap_memory(settings.device, cap_gb)  # loading and quantizing ran uncapped (full-size weights first)
        stage["now"] = "warm-up and timed calls"
        rec = fluxlab.measure(pipe, settings, name=name, chapter="bench", output_dir=None, world=run_world,
                              warmup=args.warmup, repeats=min(repeats or args.repeats, args.repeats), label=label,
                              extras=extras)
        stage["now"] = "latents and profile"
        latents = fluxlab.generate(pipe, settings, output_type="latent").float().cpu()
        per_rank = profiling.every_rank(pipe, settings) if args.profile else None
        cap_memory(settings.device, None)
        if cap_gb:
            rec["extras"].update(memory_cap_gb=cap_gb, alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        if "peer" in kwargs:
            rec["extras"]["peer"] = peer
        if world.is_main:
            precision = str(rec["optimizations"].get("fp8"))
            rec["extras"].update(ladder.latents_errors(name, precision, latents, references), profile=per_rank)
            if processes > 1 and traffic:
                rec["extras"]["all_to_all"] = traffic
            print(f"{name}: {rec['timing']['median_s']:.3f} s/image (min {rec['timing']['min_s']:.3f}), cold start "
                  f"{rec['timing']['cold_start_s']:.1f} s, peak {rec['peak_mem_gb'] or 0:.1f} GB, latents rel. error "
                  f"{rec['extras']['latents_rel_error']:.2e} vs {rec['extras']['latents_reference']}", flush=True)
            for rank, b in enumerate(per_rank or []):
                print(f"    rank {rank}: wall {b['wall_s']:.3f} s, compute {b['compute_s']:.3f}, communication "
                      f"{b['communication_s']:.3f} (exposed {b['exposed_communication_s']:.3f}), idle "
                      f"{b['idle_s']:.3f} ({', '.join(f'{k} {v:.3f}' for k, v in b['idle']['between_kernels_s'].items())}"
                      f" between kernels), {b['kernels']} kernels; largest gaps: " + "; ".join(
                          f"{g['seconds'] * 1e3:.2f} ms after {g['after'][:40]}" for g in b["idle"]["largest"][:3]),
                      flush=True)
        compile_times = torch._dynamo.utils.compile_times(repr="str", aggregate=True)
        if world.is_main and compile_times:
            print(compile_times, flush=True)
        del pipe
    parallel.barrier()
    return rec if world.is_main else None


def release(device: torch.device) -> None:
    """Free what a configuration left: the next one compiles from scratch (the on-disk inductor cache aside) and
    starts with the whole GPU."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        cap_memory(device, None)
        torch.cuda.empty_cache()


def failure(name: str, stage: str, err: BaseException, device: torch.device) -> dict:
    """A failed configuration as its run records it: its label, the error's first line, provenance."""
    kwargs = LADDER[name][1]
    label = f"{kwargs['peer']} recipe (fluxlab.peers)" if "peer" in kwargs else \
        "fluxlab.optimize(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    first_line = (str(err).strip().splitlines() or [""])[0][:500]
    return dict(name=name, label=label, stage=stage, error=f"{type(err).__name__}: "
                f"{first_line}".rstrip(": "), provenance=records.provenance(device, 1))


RESUME_WITHIN_S = 1800  # a GPU machine is lent for at most 30 minutes at a time


def save_references(path: Path, references: dict) -> None:
    """The run's latents references ({precision: (name, latents)}) beside its progress file, for --resume."""
    save_file({precision: latents for precision, (_, latents) in references.items()}, str(path),
              metadata={precision: name for precision, (name, _) in references.items()})


def resume(partial: Path, names: list[str], device: torch.device) -> tuple[list, list, dict]:
    """An interrupted run's records, failures and latents references, checked against this run's configurations and
    GPU; the records made from here on keep its run id."""
    if not partial.exists():
        raise ValueError(f"--resume: no progress file {partial}")
    done, failed = progress(partial)
    ran = finished(done, failed)  # a set: the file keeps records and failures apart, each in the order they ran
    if ran != set(names[:len(ran)]):
        raise ValueError(f"--resume: the progress file ran {sorted(ran)}, not the first of --configs {names}")
    here = records.provenance(device, 1)["device_name"]
    if done and done[0]["provenance"]["device_name"] != here:
        raise ValueError(f"--resume: the progress file ran on {done[0]['provenance']['device_name']}, this is {here}")
    age = time.time() - partial.stat().st_mtime
    if age > RESUME_WITHIN_S:  # then it ran on another machine, or the same one in another sitting
        raise ValueError(f"--resume: the progress file is {age / 60:.0f} minutes old; a run goes on within "
                         f"{RESUME_WITHIN_S // 60} minutes, on the machine that began it")
    references = {}
    latents = partial.with_suffix(".latents.safetensors")
    if latents.exists():
        with safe_open(str(latents), "pt") as f:  # one read: the tensors and their names (metadata)
            references = {p: (f.metadata()[p], f.get_tensor(p)) for p in f.keys()}
    if done:
        records.RUN_ID = done[0]["provenance"]["run_id"]
    return done, failed, references


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="baseline,compile,fp8,fp8-graphs",
                        help=f"comma-separated, from {list(LADDER)}; the first is the reference")
    parser.add_argument("--source", default="flux-dev-random")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "book" / "results"))
    parser.add_argument("--tag", default="", help="a second run of the same process count: bench-<N>gpu-<tag>.json")
    parser.add_argument("--resume", action="store_true",
                        help="go on with the progress file of an interrupted one-process run on the same GPU")
    parser.add_argument("--profile", action="store_true",
                        help="per process: compute / exposed communication / idle of one image; bare all-to-all")
    parser.add_argument("--config-limit", type=float, default=1200,
                        help="seconds a configuration of a one-process run may take, cold start included")
    parser.add_argument("--start-within", type=float,
                        help="one-process runs: start no configuration after this many seconds (exit code 3; then "
                             "--resume)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child of a one-process run: this configuration only
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: where every thread is, then go on
    if args.one:
        dump_stacks_every(args.config_limit / 3)
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in LADDER]
    try:
        if not all(c.isalnum() or c in "-_" for c in args.tag):
            raise ValueError(f"--tag {args.tag!r}: letters, digits, '-' and '_' only")
        if not names or unknown:
            raise ValueError(f"unknown or no configuration(s) {unknown}; allowed: {list(LADDER)}")
        if len(set(names)) != len(names):
            raise ValueError(f"a configuration is listed twice: {names}")
        if args.one and args.one not in names:
            raise ValueError(f"--one {args.one!r} is not one of --configs")
        records.git_commit()  # the records' provenance, checked before anything loads
        settings = fluxlab.check_settings(args.source, steps=args.steps, height=args.height, width=args.width)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        for name in names:
            kwargs = optimize_kwargs(name, max(world_size, 2))[1]
            fluxlab.check_options(**{k: v for k, v in kwargs.items() if k in CHECKED}, device=settings.device)
        if (args.resume or args.start_within is not None) and world_size > 1:
            raise ValueError("--resume and --start-within go with a one-process run")
        if args.start_within is not None and args.start_within <= 0:
            raise ValueError(f"--start-within {args.start_within}: seconds > 0")
        if any(LADDER[c][0] == ALL for c in names):
            if world_size < 2:
                raise ValueError("context-parallel configurations need torchrun with 2 or more processes")
            parallel.check_split(settings, world_size, world_size)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    world = parallel.init(settings.device)
    settings = settings.on(world.device)
    traffic = None
    if args.profile and world.world_size > 1 and settings.device.type == "cuda":
        config = settings_module.transformer_config(settings.source)
        inner = config["num_attention_heads"] * config["attention_head_dim"]
        blocks = config["num_layers"] + config["num_single_layers"]
        traffic = profiling.ulysses_traffic(settings, world.world_size, blocks, inner, torch.bfloat16, world.device)
        if world.is_main:
            print(f"bare all-to-all of one Ulysses tensor ({traffic['bytes_per_process'] / 1e6:.1f} MB per process): "
                  f"{traffic['ms_median']:.3f} ms median, {traffic['sent_gb_s']:.0f} GB/s sent per process; "
                  f"one image's Ulysses traffic at that speed: {traffic['per_image_s']:.3f} s", flush=True)
            print("all-to-all sweep: " + ", ".join(f"{t['bytes_per_process'] / 1e6:.1f} MB {t['ms_median'] * 1e3:.1f} us"
                                                   for t in traffic["sweep"]), flush=True)
        if any(optimize_kwargs(c, world.world_size)[1].get("exchange") == "peer" for c in names):
            trip = profiling.peer_round_trip_seconds(settings.image_tokens + settings.max_sequence_length,
                                                     config["num_attention_heads"], config["attention_head_dim"],
                                                     torch.bfloat16, world.device)
            traffic["peer_round_trip"] = trip
            if world.is_main:
                print(f"one layer's peer exchanges (q, k, v out, output back): {trip['ms_median'] * 1e3:.1f} us "
                      f"median; four bare all-to-alls: {4 * traffic['ms_median'] * 1e3:.1f} us", flush=True)
    final = Path(args.out) / ladder.bench_file(world.world_size, args.tag)
    partial = final.with_name(final.stem + ".partial.json")
    done, failed, references = [], [], {}
    if args.resume or (args.one and partial.exists()):
        try:
            done, failed, references = resume(partial, names, settings.device)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    if world.world_size == 1 and not args.one:
        if not args.resume:  # a new run: an earlier run's progress file is not this one's
            partial.unlink(missing_ok=True)
            partial.with_suffix(".latents.safetensors").unlink(missing_ok=True)
        done, failed = each_in_its_own_process(names, args, partial, settings.device)
        ran = finished(done, failed)
        left = [n for n in names if n not in ran]
        if left:
            print(f"not started: {', '.join(left)} (the {args.start_within:g} s of --start-within had passed); the "
                  f"progress file {partial} keeps the rest: go on with --resume", flush=True)
            sys.exit(3)
    else:
        run_here([args.one] if args.one else names, names, done, failed, references, settings, world, args, traffic,
                 partial)
    if world.is_main and not args.one:
        finish(names, done, failed, partial, final)


def run_here(todo: list[str], names: list[str], done: list, failed: list, references: dict, settings, world, args,
             traffic, partial: Path) -> None:
    """Run each of `todo` not yet run in this process (every process of a context-parallel run), adding its record
    or failure to `done` or `failed` and to the progress file."""
    ran = finished(done, failed)
    for name in todo:
        if name in ran:
            continue
        stage = Stage()
        try:
            rec = run_config(name, settings, world, args, references, traffic, stage)
        except Exception as err:  # an error or torch.OutOfMemoryError; one process's configurations only
            if name == names[0] or optimize_kwargs(name, world.world_size)[0] > 1:
                raise
            traceback.print_exc()
            failed.append(failure(name, stage.get("now", "load"), err, settings.device))
            print(f"{name}: FAILED, recorded and skipped: {failed[-1]['error']}", flush=True)
            rec = None
            parallel.barrier()  # the one the failed configuration did not reach, where the other processes wait
        release(settings.device)
        if rec:
            done.append(rec)
        if world.is_main and (rec or failed):
            records.write(partial, done, failed)  # progress, apart from the last complete file
            save_references(partial.with_suffix(".latents.safetensors"), references)


def each_in_its_own_process(names: list[str], args, partial: Path, device: torch.device) -> tuple[list, list]:
    """Run each configuration of a one-process run in a fresh process (this script with `--one`), one after another,
    so that nothing one leaves (compiled graphs, inductor settings a tool switches on for the whole process, memory
    pools, a crash) reaches the next; each has `--config-limit` seconds, cold start included. The children add
    their records, failures and latents references to the progress file; one that crashes or runs past its limit
    is recorded here as failed (at the limit with a dump of its threads' stacks in the output), and the run goes
    on, unless it is the first configuration (the run's reference). None starts after `--start-within` seconds.
    Returns the records and failures."""
    env = {"FLUXLAB_RUN_ID": records.RUN_ID}  # one run id for every child's records
    start = time.monotonic()
    for name in names:
        done, failed = progress(partial)
        if name in finished(done, failed):
            continue
        if args.start_within is not None and time.monotonic() - start > args.start_within:
            break
        command = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--configs", ",".join(names),
                   "--source", args.source, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--repeats", str(args.repeats), "--out", args.out, "--tag", args.tag,
                   "--config-limit", str(args.config_limit)]
        command += [f"--{side}={getattr(args, side)}" for side in ("height", "width") if getattr(args, side)]
        command += ["--profile"] if args.profile else []
        child, tail = Child(command, subprocess.PIPE, env | child_env(name)), collections.deque(maxlen=40)
        readers = [threading.Thread(target=_echo, args=(stream, to, tail), daemon=True)
                   for stream, to in ((child.process.stdout, sys.stdout), (child.process.stderr, sys.stderr))]
        for reader in readers:
            reader.start()
        try:
            child.process.wait(timeout=args.config_limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            child.stop()
            timed_out = True
        for reader in readers:
            reader.join(timeout=10)
        done, failed = progress(partial)
        if name in finished(done, failed):
            continue
        stage = Stage.last(tail, "load")
        last = next((line.strip() for line in reversed(tail) if line.strip()), "")  # a crash's error, usually
        why = (f"timed out after {args.config_limit:.0f} s (a process of its own; its threads' stacks are in the "
               f"run's output)" if timed_out else
               f"its process ended with exit code {child.process.returncode}" + (f": {last[:300]}" if last else ""))
        if name == names[0]:
            raise SystemExit(f"error: the run's reference {name} failed in {stage}: {why}")
        failed.append(failure(name, stage, RuntimeError(why), device))
        print(f"{name}: FAILED, recorded and skipped: {failed[-1]['error']}", flush=True)
        records.write(partial, done, failed)
    return progress(partial)


def _echo(stream, to, tail: collections.deque) -> None:
    """A child's output line by line into ours, the last lines kept."""
    for line in stream:
        to.write(line)
        to.flush()
        tail.append(line)


def progress(partial: Path) -> tuple[list, list]:
    """The records and failures a progress file holds so far (none if there is none)."""
    if not partial.exists():
        return [], []
    recs, failed = records.read_run(partial)
    return [{k: v for k, v in r.items() if k != "_path"} for r in recs], failed


def finished(done: list, failed: list) -> set[str]:
    """The names of the configurations a run has recorded, as timed or as failed."""
    return {r["name"] for r in done} | {f["name"] for f in failed}


def finish(names: list[str], done: list, failed: list, partial: Path, final: Path) -> None:
    """The run's file from its records and failures, its progress file gone, a table of it."""
    records.write(final, done, failed)
    partial.unlink(missing_ok=True)
    partial.with_suffix(".latents.safetensors").unlink(missing_ok=True)
    reference = done[0]["timing"]["median_s"]
    print(f"\n{'config':<26}{'procs':>6}{'median s':>10}{'min s':>8}{'vs ' + names[0]:>16}{'cold s':>8}{'peak GB':>9}")
    for r in done:
        t = r["timing"]
        print(f"{r['name']:<26}{r['processes']:>6}{t['median_s']:>10.3f}{t['min_s']:>8.3f}"
              f"{reference / t['median_s']:>15.2f}x{t['cold_start_s']:>8.1f}{r['peak_mem_gb'] or 0:>9.1f}")
    for f in failed:
        print(f"{f['name']:<26} FAILED: {f['error']}")
    print(f"wrote {final}")


if __name__ == "__main__":
    main()

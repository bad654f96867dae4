"""A persistent inference pool: load, optimize and warm up once per process, then serve many requests.

One process per device (or per CPU rank with gloo) joins a process group, loads the pipeline and applies the
requested optimizations with `fluxlab.optimize` (context parallel across all processes when there are several),
warms up, then waits for requests. Every request goes to all processes together, in order; process 0 returns
the PNG. Its HTTP front is `fluxlab.app` (`python -m fluxlab serve`).

The pool survives what clients send: requests are checked before they reach a worker (400); a request that fails
inside the pipeline on every process returns 500 with a short message (the traceback goes to the server's log) and
the pool serves the next one; a request that outlives its time limit, or a process that dies, ends every worker
and starts the pool afresh.
"""
import dataclasses
import io
import itertools
import os
import queue
import socket
import statistics
import sys
import threading
import time
import traceback
from http import HTTPStatus

import torch
import torch.multiprocessing as mp
from PIL import Image

from . import parallel
from .applied import applied, describe
from .measuring import record, save, timing
from .optimize import optimize
from .pipeline import default_dtype, generate, load_pipeline
from .png import encode as encode_png
from .optimize import check as check_options
from .settings import SERVER_LIMITS, Limits, check_int, check_number
from .settings import check as check_settings

REQUEST_FIELDS = ("prompt", "seed", "height", "width", "steps", "guidance")


class PoolError(RuntimeError):
    """The request could not be served; `status` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = HTTPStatus.SERVICE_UNAVAILABLE):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """What every worker loads and applies; checked before any process starts."""

    model_source: str = "tiny"
    device: str = "auto"
    nproc: int = 1
    cache: float | None = None
    fp8: str | None = None
    compile: str | None = None
    graphs: bool = False
    attention: str | None = None
    offload: str | None = None
    exchange: str | None = None
    sigmoid_gelu: bool = False
    gelu_fp8: bool = False
    compile_vae: bool = False

    def check(self):
        """The pool's base request (the source's defaults), after checking every field."""
        check_int("nproc", self.nproc, 1, 64)
        base = check_settings(self.model_source, self.device)
        if self.nproc > 1:
            parallel.check_split(base, self.nproc, self.nproc)
            parallel.check_gpus(base.device, self.nproc)
        check_options(**self.optimizations(), device=base.device)  # on the device: FP8 attention, offload need one
        return base

    def optimizations(self) -> dict:
        kwargs = dict(cache=self.cache, fp8=self.fp8, compile=self.compile, graphs=self.graphs,
                      attention=self.attention, offload=self.offload, exchange=self.exchange,
                      sigmoid_gelu=self.sigmoid_gelu, gelu_fp8=self.gelu_fp8, compile_vae=self.compile_vae)
        if self.nproc > 1:
            kwargs["parallel"] = parallel.degrees(self.nproc)
        return kwargs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, config: PoolConfig, requests, results) -> None:
    # A pool started from inside a torchrun job must not join torchrun's rendezvous store.
    for name in [n for n in os.environ if n.startswith("TORCHELASTIC_")]:
        del os.environ[name]
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(config.nproc), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), FLUXLAB_PROGRESS="0")
    try:
        settings = check_settings(config.model_source, config.device)
        if settings.device.type == "cpu":  # share the cores, as torchrun's OMP_NUM_THREADS does
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.nproc))
        world = parallel.init(settings.device)
        settings = settings.on(world.device)
        pipe = load_pipeline(settings)
        optimize(pipe, **config.optimizations())
        start = time.perf_counter()
        generate(pipe, settings)
        results.put((None, rank, "ready", (time.perf_counter() - start, applied(pipe))))
    except Exception:
        traceback.print_exc()
        results.put((None, rank, "error", _cause()))
        return
    while (item := requests.get()) is not None:
        number, fields = item
        try:
            start = time.perf_counter()
            image = generate(pipe, dataclasses.replace(settings, **fields))
            made = time.perf_counter()
            png = encode_png(image) if rank == 0 else None
            results.put((number, rank, "ok", (png, made - start, time.perf_counter() - made)))
        except Exception:  # the server's log keeps the traceback; the client gets its cause in one line
            print(f"request {number} failed on rank {rank}:", file=sys.stderr)
            traceback.print_exc()
            results.put((number, rank, "failed", _cause()))
    parallel.finish()


def _cause() -> str:
    """The exception being handled, in one line: its type and its message's first line (the cause; advice that a
    message may add below stays in the log's traceback)."""
    err = sys.exc_info()[1]
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"[:300]


class Pool:
    """`config.nproc` worker processes serving one request at a time, in arrival order."""

    def __init__(self, config: PoolConfig, limits: Limits = SERVER_LIMITS, start_timeout_s: float = 900,
                 request_timeout_s: float = 600, grace_s: float = 30, worker=None):
        """`worker`: the function each process runs (default `_worker`; the tests pass one that fails on cue)."""
        started = time.perf_counter()
        self.worker = worker or _worker
        self.base = config.check()
        self.config, self.limits = config, limits
        self.world_size = config.nproc
        self.request_timeout_s = check_number("request_timeout_s", request_timeout_s, 1, 86_400)
        self.start_timeout_s, self.grace_s = start_timeout_s, grace_s
        self.lock = threading.Lock()
        self.numbers = itertools.count()
        self.served = self.failed = self.restarts = 0
        self.healthy, self.error, self.procs = False, None, []
        self.shapes = {(self.base.height, self.base.width)}
        self.last_image_s = self.last_png_s = None  # the last request's image and PNG seconds, on process 0
        self._start()
        # start_s: everything a one-shot job does before its first image; warmup_s: that first image alone.
        self.start_s = time.perf_counter() - started

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.requests = [ctx.Queue() for _ in range(self.world_size)]
        port = _free_port()
        self.procs = [ctx.Process(target=self.worker, args=(r, port, self.config, self.requests[r], self.results),
                                  daemon=True) for r in range(self.world_size)]
        for p in self.procs:
            p.start()
        answers = self._collect(None, self.start_timeout_s)
        bad = [a for a in answers.values() if a[0] != "ready"]
        if len(answers) < self.world_size or bad:
            self._stop()
            reason = bad[0][1] if bad else self._dead() or f"no answer within {self.start_timeout_s:.0f} s"
            raise PoolError(f"the pool of {self.config.model_source} ({self.config.nproc} process(es) on "
                            f"{self.config.device}) did not start: {reason}")
        (self.warmup_s, self.applied), self.healthy, self.error = answers[0][1], True, None

    def _dead(self) -> str | None:
        dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
        return f"worker process(es) {dead} died (exit codes {[self.procs[r].exitcode for r in dead]})" if dead else None

    def _collect(self, number, timeout_s: float) -> dict:
        """Answers to request `number` (None: the start) by rank, until every rank answered, one failed and the
        others stayed silent for `grace_s`, a process died, or `timeout_s` passed."""
        answers, deadline = {}, time.monotonic() + timeout_s
        while len(answers) < self.world_size and time.monotonic() < deadline:
            try:
                got, rank, kind, value = self.results.get(timeout=0.5)
            except queue.Empty:
                if self._dead():
                    break
                continue
            if got == number:
                answers[rank] = (kind, value)
                if kind in ("failed", "error"):
                    deadline = min(deadline, time.monotonic() + self.grace_s)
        return answers

    def check(self, request) -> dict:
        """The request's fields, validated like any fluxlab run against the server's limits; raises ValueError
        naming the field, the value and what is allowed."""
        if not isinstance(request, dict):
            raise ValueError("the body must be a JSON object, e.g. {\"prompt\": \"...\", \"seed\": 1}")
        unknown = set(request) - set(REQUEST_FIELDS)
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}; allowed: {list(REQUEST_FIELDS)}")
        settings = self.base.with_request(self.limits, **request)
        if self.world_size > 1:
            parallel.check_split(settings, self.world_size, self.world_size)
        return {k: getattr(settings, k) for k in REQUEST_FIELDS}

    def generate(self, fields: dict) -> tuple[bytes, bool]:
        """PNG bytes for checked fields, and whether its shape ran for the first time (compiled, captured)."""
        with self.lock:
            if not self.healthy:
                raise PoolError(f"the pool is unhealthy: {self.error}")
            number = next(self.numbers)
            shape = (fields["height"], fields["width"])
            for q in self.requests:
                q.put((number, fields))
            answers = self._collect(number, self.request_timeout_s)
            kinds = {kind for kind, _ in answers.values()}
            if len(answers) == self.world_size and kinds == {"ok"}:
                self.served += 1
                first_use = shape not in self.shapes
                self.shapes.add(shape)
                png, self.last_image_s, self.last_png_s = answers[0][1]
                return png, first_use
            failed = [value for kind, value in answers.values() if kind == "failed"]
            if len(answers) == self.world_size:  # every rank answered: the pool is consistent, keep serving
                self.failed += 1
                raise PoolError(f"the request failed: {failed[0]}", HTTPStatus.INTERNAL_SERVER_ERROR)
            dead = self._dead()
            if dead:
                reason = dead + (f" ({failed[0]})" if failed else "")
            elif failed:
                reason = f"the request failed on some processes ({failed[0]}) while others waited"
            else:
                reason = f"the request did not finish within {self.request_timeout_s:.0f} s and was cancelled"
            self._restart(reason)
            status = HTTPStatus.GATEWAY_TIMEOUT if not failed and not dead else HTTPStatus.SERVICE_UNAVAILABLE
            raise PoolError(f"{reason}; the pool was restarted ({'healthy' if self.healthy else self.error})",
                            status)

    def _restart(self, reason: str) -> None:
        print(f"restarting the pool: {reason}", file=sys.stderr, flush=True)
        self._stop()
        self.restarts += 1
        try:
            self._start()
        except PoolError as err:
            self.healthy, self.error = False, str(err)

    def health(self) -> dict:
        dead = self._dead()
        if self.healthy and dead:
            with self.lock:  # a worker died between requests: start afresh
                self._restart(dead)
        alive = sum(p.is_alive() for p in self.procs)
        return dict(healthy=self.healthy, processes=self.world_size, alive=alive, served=self.served,
                    failed=self.failed, restarts=self.restarts, error=self.error)

    def _stop(self) -> None:
        """End every worker: ask politely, then terminate, then kill."""
        for q, p in zip(self.requests, self.procs):
            if p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        self.healthy = False

    def close(self) -> None:
        self._stop()
        self.error = "closed"


def measure_pool(pool: Pool, settings, *, name: str, chapter: str, output_dir, repeats: int = 3) -> dict:
    """Per-request latency of a started pool, after one untimed request, as a record (`fluxlab.records`).

    The pool's start (spawn the processes, load, optimize and compile, first image) is what a one-shot job pays
    before its first image; it is recorded as the cold start."""
    fields = pool.check({k: getattr(settings, k) for k in REQUEST_FIELDS})
    pool.generate(fields)
    times, image_s, png_s = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        png, _ = pool.generate(fields)
        times.append(time.perf_counter() - start)
        image_s.append(pool.last_image_s)
        png_s.append(pool.last_png_s)
    parts = dict(image_in_worker_s=statistics.median(image_s), png_encode_s=statistics.median(png_s))
    parts["hand_over_s"] = statistics.median(times) - parts["image_in_worker_s"] - parts["png_encode_s"]
    rec = record(name=name, chapter=chapter, settings=settings, optimizations=pool.applied, processes=pool.world_size,
                 timing=timing([pool.start_s], times), dtype=str(default_dtype(settings.device)).removeprefix("torch."),
                 label="serving pool: " + describe(pool.applied, pool.world_size), image=f"{chapter}--{name}.png",
                 extras=dict(pool=dict(first_image_in_worker_s=pool.warmup_s, per_request_median=parts)))
    save(rec, Image.open(io.BytesIO(png)), output_dir)
    return rec

"""A persistent inference pool: load, optimize and warm up once per process, then serve many requests.

One process per device (or per CPU rank with gloo) joins a process group, loads the pipeline with the chosen
optimizations (context parallel across all processes when there are several), warms up, then waits for
requests. Every request goes to all processes together, in order; process 0 returns the PNG. A small HTTP front
(standard library) exposes `POST /generate` and `GET /health`.
"""
import argparse
import dataclasses
import io
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch.multiprocessing as mp

REQUEST_FIELDS = ("prompt", "seed", "height", "width", "steps", "guidance")


class PoolError(RuntimeError):
    """A worker failed or died; the pool is unhealthy until restarted."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, config: dict, requests, results) -> None:
    # A pool started from inside a torchrun job must not join torchrun's rendezvous store.
    for name in [n for n in os.environ if n.startswith("TORCHELASTIC_")]:
        del os.environ[name]
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    import fluxlab
    from fluxlab import parallel

    try:
        settings = fluxlab.settings(config["model_source"], config["device"])
        if settings.device.type == "cpu":  # share the cores, as torchrun's OMP_NUM_THREADS does
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        dist = parallel.init(settings.device)
        settings = settings.on(dist.device)
        pipe = fluxlab.load(settings)
        kwargs = dict(cache=config.get("cache"), fp8=config.get("fp8"), compile=config.get("compile"))
        if world_size > 1:
            kwargs["parallel"] = parallel.degrees(world_size)
        fluxlab.optimize(pipe, **kwargs)
        start = time.perf_counter()
        fluxlab.generate(pipe, settings)
        if rank == 0:
            results.put(("ready", time.perf_counter() - start))
        while (request := requests.get()) is not None:
            image = fluxlab.generate(pipe, dataclasses.replace(settings, **request))
            if rank == 0:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                results.put(("ok", buffer.getvalue()))
    except Exception:  # the pool turns this into an error response and marks itself unhealthy
        results.put(("error", f"rank {rank}: {traceback.format_exc()}"))


class Pool:
    """`world_size` worker processes serving one request at a time, in arrival order."""

    def __init__(self, world_size: int = 1, model_source: str = "tiny", device: str = "auto", cache=None, fp8=None,
                 compile=None, start_timeout_s: float = 900, request_timeout_s: float = 600):
        import fluxlab
        from fluxlab import parallel

        started = time.perf_counter()
        self.base = fluxlab.settings(model_source, device)  # checks the source before starting anything
        if world_size > 1:
            parallel.check_split(self.base, world_size, world_size)
        fluxlab.check_options(cache=cache, fp8=fp8, compile=compile)
        self.world_size, self.request_timeout_s = world_size, request_timeout_s
        self.lock = threading.Lock()
        self.healthy, self.served, self.error = False, 0, None
        self.shapes = {(self.base.height, self.base.width)}
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.requests = [ctx.Queue() for _ in range(world_size)]
        config = dict(model_source=model_source, device=device, cache=cache, fp8=fp8, compile=compile)
        self.config = config
        port = _free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, port, config, self.requests[r], self.results),
                                  daemon=True) for r in range(world_size)]
        for p in self.procs:
            p.start()
        kind, value = self._wait(start_timeout_s)
        if kind != "ready":
            self.close()
            raise PoolError(f"the pool did not start: {value}")
        # start_s: everything a one-shot job does before its first image; warmup_s: that first image alone.
        self.warmup_s, self.start_s, self.healthy = value, time.perf_counter() - started, True

    def check(self, request: dict) -> dict:
        """The request's fields, validated like any fluxlab run; raises ValueError saying what is allowed."""
        import fluxlab
        from fluxlab import parallel

        unknown = set(request) - set(REQUEST_FIELDS)
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}; allowed: {list(REQUEST_FIELDS)}")
        base = self.base
        source = base.source.location if base.source.kind == "real" else base.source.kind
        defaults = dict(prompt=base.prompt, seed=base.seed, steps=base.steps, guidance=base.guidance)
        settings = fluxlab.settings(source, str(base.device), **{**defaults, **request})
        if self.world_size > 1:
            parallel.check_split(settings, self.world_size, self.world_size)
        return {k: getattr(settings, k) for k in REQUEST_FIELDS}

    def _dead(self) -> str | None:
        dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
        return f"worker process(es) {dead} died (exit codes {[self.procs[r].exitcode for r in dead]})" if dead else None

    def _wait(self, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                kind, value = self.results.get(timeout=0.5)
            except queue.Empty:
                if dead := self._dead():
                    return "error", dead
                continue
            if kind == "error":  # a rank that lost its peer reports a broken collective: name the dead one
                time.sleep(0.5)
                if dead := self._dead():
                    value = f"{dead}; {value}"
            return kind, value
        return "error", f"no answer within {timeout_s:.0f} s"

    def generate(self, request: dict) -> tuple[bytes, bool]:
        """PNG bytes for a validated request, and whether its shape was compiled/run for the first time."""
        with self.lock:
            if not self.healthy:
                raise PoolError(f"the pool is unhealthy: {self.error}")
            shape = (request["height"], request["width"])
            first_use = shape not in self.shapes
            for q in self.requests:
                q.put(request)
            kind, value = self._wait(self.request_timeout_s)
            if kind != "ok":
                self.healthy, self.error = False, value
                raise PoolError(value)
            self.shapes.add(shape)
            self.served += 1
            return value, first_use

    def health(self) -> dict:
        dead = self._dead()
        if self.healthy and dead:
            self.healthy, self.error = False, dead
        alive = sum(p.is_alive() for p in self.procs)
        return dict(healthy=self.healthy, processes=self.world_size, alive=alive, served=self.served,
                    error=self.error)

    def close(self) -> None:
        """End every worker: ask politely, then terminate, then kill."""
        for q, p in zip(self.requests, self.procs):
            if p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        self.healthy = False


def make_handler(pool: Pool):
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, content_type: str = "application/json", headers=None):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: dict):
            self._send(status, json.dumps(payload).encode())

        def do_GET(self):
            if self.path != "/health":
                return self._json(HTTPStatus.NOT_FOUND, dict(error="GET /health or POST /generate"))
            health = pool.health()
            self._json(HTTPStatus.OK if health["healthy"] else HTTPStatus.SERVICE_UNAVAILABLE, health)

        def do_POST(self):
            if self.path != "/generate":
                return self._json(HTTPStatus.NOT_FOUND, dict(error="GET /health or POST /generate"))
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
                request = pool.check(body)
            except ValueError as err:  # json.JSONDecodeError is a ValueError too
                return self._json(HTTPStatus.BAD_REQUEST, dict(error=str(err)))
            try:
                png, first_use = pool.generate(request)
            except PoolError as err:
                return self._json(HTTPStatus.SERVICE_UNAVAILABLE, dict(error=str(err)))
            self._send(HTTPStatus.OK, png, "image/png", {"X-Fluxlab-First-Use-Of-Shape": str(first_use).lower()})

        def log_message(self, format, *args):  # quiet: one line per request on stderr is noise in tests
            pass

    return Handler


def serve(pool: Pool, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), make_handler(pool))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fluxlab serve", description="Serve FLUX images over HTTP.")
    parser.add_argument("--model-source", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs, or CPU ranks with gloo)")
    parser.add_argument("--cache", type=float)
    parser.add_argument("--fp8", choices=("rowwise", "tensorwise"))
    parser.add_argument("--compile", choices=("regional", "full"))
    parser.add_argument("--host", default="127.0.0.1", help="loopback by default")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    try:
        pool = Pool(args.nproc, args.model_source, args.device, args.cache, args.fp8, args.compile)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    server = serve(pool, args.host, args.port)
    print(f"fluxlab serving {args.model_source} on {args.nproc} process(es), warm-up {pool.warmup_s:.1f} s: "
          f"listening on http://{args.host}:{server.server_port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # shut the workers down on `kill` too
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        pool.close()

"""The serving pool's HTTP front: FastAPI on uvicorn, `python -m fluxlab serve`.

`POST /generate` takes a JSON request (`GenerateRequest`, checked by `fluxlab.check_settings` against the server's
limits: one set of rules) and answers with a PNG; `GET /health` reports the pool; `/docs` describes both. Everything
is checked before any process starts or any weight loads: options, the socket (bound first, then handed to
uvicorn), the model source against the device, the GPUs' free memory.

Status codes: 200 the image; 400 a request that breaks a rule (the message names the field, the value and what is
allowed) or a body that is not a JSON object (not UTF-8, not JSON, nested too deeply: it says which, and where);
404/405 another path or method; 408 a body that did not arrive within `--body-timeout-s` of its headers; 413 a body
over `MAX_BODY_BYTES`; 415 a body sent without `Content-Type: application/json`; 500 the pipeline failed on every
process (the pool serves on); 503 the pool is unhealthy or a process failed or died (it restarts); 504 a request
outlived `--request-timeout-s` (the pool restarts). Every response carries `X-Request-Id` and `X-Process-Time-s`
(seconds to its first byte), and the server logs one line per request with both. Every error's body is
`{"error": "..."}`.
"""
import argparse
import asyncio
import signal
import socket
import sys
import time
import uuid
from typing import Annotated, Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model, model_validator

from .optimize import EXCHANGES, OFFLOADS
from .serve import REQUEST_FIELDS, Pool, PoolConfig, PoolError
from .settings import SERVER_LIMITS, Limits, check_full_size, check_int, full_size

MAX_BODY_BYTES = 64 * 1024
# A body over the limit is read on, up to this many bytes or seconds, and discarded before the 413: a client still
# sending when the server answers and closes gets a connection reset instead of the answer.
DRAIN_BYTES, DRAIN_S = 16 * 1024 * 1024, 2.0


def request_model(pool: Pool) -> type[BaseModel]:
    """The request as a pydantic model: its schema is generated from the pool's limits and defaults, its validation
    is the pool's own check (`Pool.check`, i.e. `fluxlab.check_settings`), so the rules live in one place."""
    limits, base = pool.limits, pool.base
    side = {"type": "integer", "multipleOf": 16, "maximum": limits.max_side}
    schemas = dict(prompt={"type": "string", "maxLength": limits.max_prompt_chars},
                   seed={"type": "integer", "minimum": 0, "maximum": 2**63 - 1}, height=side, width=side,
                   steps={"type": "integer", "minimum": 1, "maximum": limits.max_steps},
                   guidance={"type": "number", "minimum": 0, "maximum": 100})
    fields = {name: (Annotated[Any, WithJsonSchema(schemas[name])],
                     Field(None, description=f"default: {getattr(base, name)!r}")) for name in REQUEST_FIELDS}

    def checked(request):
        request.__dict__.update(pool.check(request.model_dump(exclude_none=True)))
        return request

    return create_model("GenerateRequest", __config__=ConfigDict(extra="forbid"),
                        __validators__=dict(checked=model_validator(mode="after")(checked)), **fields)


MAX_NAMED = 10  # unknown fields an error names; the rest are counted
MAX_PART_CHARS = 300  # of each part of an error: a value the client sent is quoted shortened


def _short(text: str, limit: int = MAX_PART_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def explain(errors: list[dict], document: str = "") -> str:
    """pydantic's errors as one line a client can act on, whatever the input's size (under 2 KB): the field, the
    value and what is allowed; unknown fields each once (at most `MAX_NAMED`), the allowed ones once. `document`:
    the body as the JSON parser read it, for where a syntax error is."""
    unknown = list(dict.fromkeys(str(e["loc"][-1]) for e in errors if e["type"] == "extra_forbidden"))
    parts = []
    for e in errors:
        where = [str(x) for x in e["loc"] if x != "body"]
        if e["type"] == "extra_forbidden":
            continue
        if e["type"] == "value_error":
            parts.append(e["msg"].removeprefix("Value error, "))
        elif e["type"] == "json_invalid":
            parts.append(f"the body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])} "
                         f"{_line_column(document, e['loc'][-1])}")
        elif e["type"] in ("model_attributes_type", "dict_type", "model_type"):
            parts.append('the body must be a JSON object, e.g. {"prompt": "...", "seed": 1}')
        else:
            parts.append(f"{'.'.join(where) or 'body'}={_short(repr(e.get('input')), 80)}: {e['msg']}")
    parts = [_short(p) for p in dict.fromkeys(parts)][:3]
    if unknown:  # at most MAX_NAMED names of at most 40 characters: short by construction
        named = ", ".join(repr(_short(name, 40)) for name in unknown[:MAX_NAMED])
        more = f" and {len(unknown) - MAX_NAMED} more" if len(unknown) > MAX_NAMED else ""
        parts.append(f"unknown field{'s' if len(unknown) > 1 else ''} {named}{more}; allowed: {list(REQUEST_FIELDS)}")
    return "; ".join(parts)


def _line_column(document, position) -> str:
    """'at line L, column C' of a character position in the parsed text (as Python's json counts them)."""
    if not isinstance(position, int) or not isinstance(document, str):
        return ""
    line = document.count("\n", 0, position) + 1
    return f"at line {line}, column {position - document.rfind(chr(10), 0, position)}"


def parse_failure(cause: BaseException | None) -> str:
    """Why FastAPI could not read a JSON body (what its parser raised other than a JSON syntax error)."""
    if isinstance(cause, UnicodeDecodeError):  # JSON is UTF-8 (RFC 8259); Python's parser also reads UTF-16/32
        return (f"the body is not valid UTF-8: byte {cause.start} ({cause.object[cause.start:cause.start + 1]!r}) "
                f"{cause.reason}" + ("" if cause.encoding == "utf-8" else f" (read as {cause.encoding})"))
    if isinstance(cause, RecursionError):
        return "the body is nested too deeply to be parsed as JSON"
    return f"the body could not be parsed as JSON ({_short(str(cause), 200)})"


def is_json(content_type: str | None) -> bool:
    """Whether FastAPI reads a body of this Content-Type as JSON: application/json or application/*+json (a body
    without one it leaves unread: FastAPI's strict content type, which keeps browsers' cross-site simple requests
    out)."""
    if not content_type:
        return False
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class BodyLimit:
    """Refuse request bodies over `limit` bytes, declared or streamed (chunked), and bodies that have not all arrived
    `timeout_s` seconds after the request's headers (408, connection closed: a client that sends slowly or stops
    mid-body holds no socket for longer), before the app reads them: neither Starlette nor uvicorn sets either
    limit."""

    def __init__(self, app, limit: int, timeout_s: float):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")  # uvicorn's parser refuses a malformed one
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        deadline = time.monotonic() + self.timeout_s
        body, more = b"", True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                error = f"the body did not arrive within {self.timeout_s:g} s ({len(body)} bytes came)"
                return await JSONResponse(dict(error=error), 408, headers={"Connection": "close"})(scope, receive,
                                                                                                   send)
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(scope, receive, send, len(body), more)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: disconnects
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, read: int = 0, more: bool = True):
        deadline = time.monotonic() + DRAIN_S
        try:
            while more and read < DRAIN_BYTES:  # let the client finish sending, so that it reads the answer
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                if message["type"] == "http.disconnect":
                    return
                read += len(message.get("body", b""))
                more = message.get("more_body", False)
        except TimeoutError:  # a client that declared more than it sends
            pass
        error = f"the body is larger than {self.limit} bytes; at most {self.limit} are read"
        await JSONResponse(dict(error=error), 413, headers={"Connection": "close"})(scope, receive, send)


class RequestLog:
    """Outermost layer: every request gets an id, and its response the id and the seconds to its first byte
    (`X-Request-Id`, `X-Process-Time-s`), refusals by `BodyLimit` included; one log line per request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid, start, status = uuid.uuid4().hex[:12], time.perf_counter(), None

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-Id"] = rid
                headers["X-Process-Time-s"] = f"{time.perf_counter() - start:.3f}"
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            print(f"request {rid} {scope['method']} {scope['path']} {status} {time.perf_counter() - start:.3f} s",
                  file=sys.stderr, flush=True)


BODY_TIMEOUT_S = 30.0  # a request's whole body must arrive within this many seconds of its headers


def make_app(pool: Pool, body_timeout_s: float = BODY_TIMEOUT_S):
    GenerateRequest = request_model(pool)
    app = FastAPI(title="fluxlab", summary="FLUX images from a persistent pool of processes",
                  description=__doc__.split("\n\n", 1)[1])

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, err: RequestValidationError):
        content_type = request.headers.get("content-type")
        if await request.body() and not is_json(content_type):
            sent = f"as {_short(content_type, 80)!r}" if content_type else "without a Content-Type"
            return JSONResponse(dict(error=f"the body is sent {sent}; send it as JSON, with the header "
                                           "'Content-Type: application/json'"), 415)
        return JSONResponse(dict(error=explain(err.errors(), err.body)), 400)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):  # FastAPI's own refusals, in the same shape as ours
        error = parse_failure(err.__cause__) if err.detail == "There was an error parsing the body" \
            else str(err.detail)
        return JSONResponse(dict(error=error), err.status_code, headers=err.headers)

    @app.post("/generate", response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "the image"},
                         400: {"description": "a request that breaks a rule"}, 413: {"description": "body too large"},
                         500: {"description": "the pipeline failed"}, 503: {"description": "the pool restarts"},
                         504: {"description": "the request outlived its time limit"}})
    def generate(request: GenerateRequest | None = None):
        """One image for the request (fields left out take the pool's defaults); requests are served in order."""
        fields = {k: getattr(request or GenerateRequest(), k) for k in REQUEST_FIELDS}
        try:
            png, first_use = pool.generate(fields)
        except PoolError as err:
            return JSONResponse(dict(error=str(err)), err.status)
        return Response(png, media_type="image/png", headers={"X-Fluxlab-First-Use-Of-Shape": str(first_use).lower()})

    @app.get("/health")
    @app.head("/health", include_in_schema=False)  # one operation in the schema
    def health():
        """The pool's state: healthy, processes alive, requests served and failed, restarts (HEAD: the status and
        headers alone, as load balancers and `curl -I` ask)."""
        state = pool.health()
        return JSONResponse(state, 200 if state["healthy"] else 503)

    return RequestLog(BodyLimit(app, MAX_BODY_BYTES, body_timeout_s))


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any process starts: a bad host or a taken port fails at once."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, UnicodeError) as err:
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror if isinstance(err, OSError) else err}") \
            from None
    sock.listen(128)
    return sock


# GPU memory the full-size model needs per process when it streams weights from host memory: what the memory runs
# under caps completed in (book/results/bench-1gpu-memory*.json): sequential offload in bf16, the others in FP8.
STREAMED_GB = {"sequential": 8}
STREAMED_FP8_GB = {"model": 16, "encoders": 16, "group": 8}
# ... and with every weight on the GPU: what the book's GPU chapters declare (book/chapters.toml; a test compares).
FULL_SIZE_GB = 40


def gpu_need_gb(config: PoolConfig) -> int:
    """GB of GPU memory per process the pool's configuration needs with the full-size model."""
    if config.offload in STREAMED_GB:
        return STREAMED_GB[config.offload]
    if config.offload in STREAMED_FP8_GB and config.fp8:
        return STREAMED_FP8_GB[config.offload]
    return FULL_SIZE_GB


def check_device(config: PoolConfig, base) -> None:
    """The runner's check (the full-size model needs a CUDA GPU with the memory its configuration needs), and enough
    free memory on each GPU the pool will use, before any process starts."""
    need = gpu_need_gb(config)
    check_full_size(need, base.source, base.device, "the server")
    if base.device.type == "cuda" and full_size(base.source):
        import torch

        for index in range(config.nproc):
            free = torch.cuda.mem_get_info(index)[0] / 1e9
            if free < need:
                raise ValueError(f"GPU {index} has {free:.0f} GB free; the full-size model needs {need} GB per "
                                 "process (is another job using it?)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fluxlab serve", description="Serve FLUX images over HTTP.")
    parser.add_argument("--model-source", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs, or CPU ranks with gloo)")
    parser.add_argument("--cache", type=float)
    parser.add_argument("--fp8", choices=("rowwise", "tensorwise"))
    parser.add_argument("--compile", choices=("regional", "full"))
    parser.add_argument("--graphs", action="store_true", help="CUDA graphs of the blocks (fluxlab.graphs)")
    parser.add_argument("--attention", help="an attention backend: diffusers' names, or cudnn_fp8 (FP8 on Hopper)")
    parser.add_argument("--offload", choices=OFFLOADS, help="stream weights from host memory (fluxlab.optimize)")
    parser.add_argument("--exchange", choices=EXCHANGES,
                        help="peer: Ulysses' exchanges as copies into the other GPUs' memory (fluxlab.peer_exchange)")
    parser.add_argument("--sigmoid-gelu", action="store_true",
                        help="the tanh-GELU as x * sigmoid(2z), a cheaper compiled kernel (fluxlab.gelu)")
    parser.add_argument("--gelu-fp8", action="store_true",
                        help="with --fp8 rowwise: GELU and the MLP outputs' FP8 quantization in one pass "
                             "(fluxlab.mlp_fp8)")
    parser.add_argument("--compile-vae", action="store_true", help="torch.compile the VAE decoder")
    parser.add_argument("--host", default="127.0.0.1", help="loopback by default")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-steps", type=int, default=SERVER_LIMITS.max_steps)
    parser.add_argument("--max-side", type=int, default=SERVER_LIMITS.max_side, help="largest height or width")
    parser.add_argument("--max-prompt-chars", type=int, default=SERVER_LIMITS.max_prompt_chars)
    parser.add_argument("--request-timeout-s", type=float, default=600)
    parser.add_argument("--body-timeout-s", type=float, default=BODY_TIMEOUT_S,
                        help="seconds a request's body may take to arrive after its headers (408 after)")
    args = parser.parse_args(argv)
    try:
        check_int("port", args.port, 0, 65535)
        if not 0 < args.body_timeout_s <= 3600:
            raise ValueError(f"body_timeout_s={args.body_timeout_s!r}: must be a number of seconds from 0 to 3600 "
                             "(more than 0)")
        limits = Limits(max_steps=check_int("max_steps", args.max_steps, 1, 10_000),
                        max_side=check_int("max_side", args.max_side, 16, 16_384),
                        max_prompt_chars=check_int("max_prompt_chars", args.max_prompt_chars, 1, 1_000_000))
        config = PoolConfig(args.model_source, args.device, args.nproc, args.cache, args.fp8, args.compile,
                            args.graphs, args.attention, args.offload, args.exchange, args.sigmoid_gelu,
                            args.gelu_fp8, args.compile_vae)
        check_device(config, config.check())
        sock = bind(args.host, args.port)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    try:
        pool = Pool(config, limits, request_timeout_s=args.request_timeout_s)
    except PoolError as err:
        raise SystemExit(f"error: {err}") from None
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(make_app(pool, args.body_timeout_s), log_level="warning", access_log=False))
    host, port = sock.getsockname()[:2]
    print(f"fluxlab serving {args.model_source} on {args.nproc} process(es), warm-up {pool.warmup_s:.1f} s: "
          f"listening on http://{host}:{port} (API: /docs)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run(sockets=[sock])
    finally:
        pool.close()

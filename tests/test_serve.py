"""The persistent pool and its HTTP front (FastAPI on uvicorn), on the tiny source with 2 gloo ranks (context
parallel): it serves in order, and survives anything a client sends."""
import concurrent.futures
import io
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

import fluxlab
import fluxlab.png
from fluxlab.app import MAX_BODY_BYTES, bind, make_app
from fluxlab.serve import Pool, PoolConfig, measure_pool
from fluxlab.settings import TINY_DIR

from conftest import ROOT
from pool_worker import failing_worker

PROMPTS = ["a large red circle on a blue background", "a small green square on a white background",
           "a large yellow triangle on a black background"]


def post(url, body, timeout=180, raw=None, headers=None):
    content = raw if raw is not None else json.dumps(body).encode()
    r = httpx.post(url + "/generate", content=content, timeout=timeout,
                   headers={"Content-Type": "application/json", **(headers or {})})
    return r.status_code, r.content


def health(url):
    r = httpx.get(url + "/health", timeout=120)
    return r.status_code, r.json()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


class Server:
    """The pool behind the real app, served by uvicorn on a socket bound to 127.0.0.1 by the test."""

    def __init__(self, **kwargs):
        self.pool = Pool(PoolConfig("tiny", "cpu", 2), worker=failing_worker, **kwargs)
        sock = bind("127.0.0.1", 0)
        self.http = uvicorn.Server(uvicorn.Config(make_app(self.pool), log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.http.run, kwargs=dict(sockets=[sock]), daemon=True)
        self.thread.start()
        self.url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        while not self.http.started:
            time.sleep(0.05)

    def close(self):
        self.http.should_exit = True
        self.thread.join(timeout=30)
        self.pool.close()
        assert not any(p.is_alive() for p in self.pool.procs), "a worker outlived the pool"


@pytest.fixture(scope="module")
def server():
    s = Server(grace_s=10)
    yield s
    s.close()


def one_shot(prompt, seed, steps=8):
    settings = fluxlab.check_settings("tiny", device="cpu", steps=steps, prompt=prompt, seed=seed)
    return np.asarray(fluxlab.generate(fluxlab.load_pipeline(settings), settings), dtype=np.int16)


def test_concurrent_requests_match_one_shot_generation(server):
    requests = [dict(prompt=PROMPTS[i % 3], seed=i % 2, steps=8) for i in range(24)]
    reference = {(r["prompt"], r["seed"]): one_shot(r["prompt"], r["seed"]) for r in requests}
    with concurrent.futures.ThreadPoolExecutor(4) as clients:
        answers = list(clients.map(lambda r: post(server.url, r), requests))
    for request, (status, png) in zip(requests, answers):
        assert status == 200
        # Context parallel differs from one process by float rounding only (~5e-7 on the latents).
        assert np.abs(pixels(png) - reference[(request["prompt"], request["seed"])]).max() <= 1
    code, state = health(server.url)
    assert code == 200 and state["healthy"] and state["alive"] == 2 and state["served"] >= 24


@pytest.mark.parametrize("mode, level", [("RGB", 0), ("RGB", 1), ("L", 0)])
def test_png_encoding_keeps_every_pixel(mode, level):
    """The server's PNG writer (unfiltered rows): Pillow reads back the same pixels, at odd sizes too."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).convert(mode)
    decoded = Image.open(io.BytesIO(fluxlab.png.encode(image, level)))
    assert decoded.format == "PNG" and decoded.size == (53, 37)
    assert np.array_equal(np.asarray(decoded), np.asarray(image.convert("RGB")))


def test_pool_latency_record(server, tmp_path):
    settings = fluxlab.check_settings("tiny", "cpu", prompt=PROMPTS[1], seed=3)
    rec = measure_pool(server.pool, settings, name="pool", chapter="t", output_dir=tmp_path, repeats=2)
    assert len(rec["timing"]["times_s"]) == 2 and rec["timing"]["cold_start_s"] == server.pool.start_s
    assert server.pool.start_s > server.pool.warmup_s > 0  # the start includes loading, not just the first image
    assert rec["processes"] == 2 and rec["optimizations"]["parallel"] == dict(ulysses=2, ring=1)
    assert rec["extras"]["pool"]["first_image_in_worker_s"] == server.pool.warmup_s
    parts = rec["extras"]["pool"]["per_request_median"]  # the request's time, split where it was spent
    assert 0 < parts["image_in_worker_s"] < rec["timing"]["median_s"] and parts["png_encode_s"] > 0
    assert parts["image_in_worker_s"] + parts["png_encode_s"] + parts["hand_over_s"] == pytest.approx(
        rec["timing"]["median_s"])
    assert fluxlab.records.read(tmp_path / "t--pool.json")[0]["label"].startswith("serving pool: CP x2")
    one = one_shot(PROMPTS[1], 3, steps=28)
    assert np.abs(pixels((tmp_path / "t--pool.png").read_bytes()) - one).max() <= 1


@pytest.mark.parametrize("body, status, message", [
    (dict(height=100), 400, b"height=100: must be a multiple of 16"),
    (dict(colour="red"), 400, b"unknown field 'colour'; allowed: ['prompt', 'seed'"),
    ({"__proto__": {"x": 1}}, 400, b"unknown field '__proto__'"),
    (dict(prompt={"nested": [[[[1]]]]}), 400, b"prompt={'nested': [[[[1]]]]}: must be a non-empty string"),
    (dict(prompt=None, seed=None), 200, b"\x89PNG"),  # null: the pool's default
    (dict(height=48, width=48), 400, b"do not split evenly"),
    (dict(prompt=5), 400, b"prompt=5: must be a non-empty string"),
    (dict(seed="x"), 400, b"seed='x': must be an integer"),
    (dict(seed=True), 400, b"seed=True: must be an integer"),
    (dict(steps=10000), 400, b"steps=10000: must be an integer from 1 to 100"),
    (dict(prompt="a" * 5000), 400, b"prompt of 5000 characters: at most 2000"),
    ([1, 2], 400, b"the body must be a JSON object"),
    ("a string", 400, b"the body must be a JSON object"),
])
def test_bad_requests_get_a_400_naming_the_field(server, body, status, message):
    code, answer = post(server.url, body)
    assert code == status and message in answer
    assert b"Traceback" not in answer


def test_bodies_that_are_not_json_chunked_or_too_large(server):
    assert post(server.url, None, raw=b"{not json")[0] == 400
    assert post(server.url, None, raw=b"\xff\xfe{")[0] == 400
    code, answer = post(server.url, None, raw=b'{"guidance": NaN}')  # Python's json reads NaN as a float
    assert code == 400 and b"guidance=nan: must be a finite number" in answer
    code, answer = post(server.url, None, raw=json.dumps(dict(prompt="p" * 100_000)).encode())
    assert code == 413 and b"at most 65536 are read" in answer
    # A chunked body (no Content-Length) is read and checked like any other...
    chunks = iter([b'{"height": ', b'1000, "prompt": "a red circle"}'])
    r = httpx.post(server.url + "/generate", content=chunks, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.request.headers.get("transfer-encoding") == "chunked" and r.status_code == 400
    assert b"height=1000: must be a multiple of 16" in r.content
    # ... and refused once it grows past the limit, without reading the rest.
    big = iter([b'{"prompt": "'] + [b"p" * 8192] * (MAX_BODY_BYTES // 8192 + 2) + [b'"}'])
    r = httpx.post(server.url + "/generate", content=big, timeout=60)
    assert r.status_code == 413 and len(r.headers["x-request-id"]) == 12
    assert health(server.url)[1]["healthy"]


def test_text_media_and_bodies_the_parsers_refuse_get_clear_errors_and_the_pool_is_unchanged(server):
    before = post(server.url, dict(prompt=PROMPTS[0], seed=3, steps=4))
    assert before[0] == 200
    # A lone surrogate is valid JSON but not Unicode text: refused before the pool, naming the prompt.
    code, answer = post(server.url, None, raw=b'{"prompt": "a \\ud800 circle"}')
    assert code == 400 and json.loads(answer)["error"].startswith("prompt: not valid Unicode text")
    # A JSON object sent the way curl -d and urllib send it by default: the answer names the media type it needs.
    r = httpx.post(server.url + "/generate", content=b'{"seed": 1}', timeout=60,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]
    # What the JSON parser itself refuses answers in the same shape as every other error.
    code, answer = post(server.url, None, raw=b"[" * 30_000 + b"]" * 30_000)
    assert (code, json.loads(answer)) == (400, {"error": "the body is nested too deeply to be parsed as JSON"})
    assert httpx.get(server.url + "/generate", timeout=30).json() == {"error": "Method Not Allowed"}
    # A 3 MB body from Python's urllib: the 413 reaches the client (the server reads the rest before answering).
    import urllib.error
    import urllib.request
    for _ in range(3):
        request = urllib.request.Request(server.url + "/generate", data=b"x" * 3_000_000, method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 413 and b"at most 65536 are read" in refused.value.read()
    after = post(server.url, dict(prompt=PROMPTS[0], seed=3, steps=4))
    assert after == before and health(server.url)[1]["healthy"]


def test_hostile_http_gets_clear_answers_and_no_traceback(server):
    assert httpx.get(server.url + "/generate", timeout=30).status_code == 405
    assert httpx.post(server.url + "/nowhere", timeout=30).status_code == 404
    assert httpx.get(server.url + "/../../etc/passwd", timeout=30).status_code == 404
    # A Content-Length that is not a number, and one larger than the limit (body never sent), over a raw socket.
    host, port = server.url.removeprefix("http://").split(":")
    for header, expect in ((b"Content-Length: abc", b" 400 "), (b"Content-Length: 999999999", b" 413 ")):
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n")
            answer = s.recv(4096)
        assert expect in answer.split(b"\r\n")[0] and b"Traceback" not in answer, answer[:200]
    assert health(server.url) == (200, health(server.url)[1]) and health(server.url)[1]["healthy"]


def test_api_is_described_and_responses_carry_an_id_and_time(server):
    schema = httpx.get(server.url + "/openapi.json", timeout=30).json()
    request = schema["components"]["schemas"]["GenerateRequest"]
    assert request["properties"]["steps"]["maximum"] == 100 and request["properties"]["prompt"]["maxLength"] == 2000
    assert request["additionalProperties"] is False
    assert httpx.get(server.url + "/docs", timeout=30).status_code == 200
    r = httpx.post(server.url + "/generate", json=dict(height=100), timeout=60)
    assert len(r.headers["x-request-id"]) == 12 and float(r.headers["x-process-time-s"]) >= 0


def test_a_request_failing_inside_the_pipeline_gets_a_500_and_the_pool_serves_on(server):
    code, answer = post(server.url, dict(prompt="explode"))
    assert code == 500 and b"the pipeline failed on purpose" in answer
    assert b"Traceback" not in answer and b"/fluxlab/" not in answer  # no traceback or paths to the client
    code, state = health(server.url)
    assert code == 200 and state["healthy"] and state["failed"] >= 1
    assert post(server.url, dict(prompt=PROMPTS[0], steps=4))[0] == 200


def test_a_failure_on_one_rank_restarts_the_pool(server):
    restarts = health(server.url)[1]["restarts"]
    code, answer = post(server.url, dict(prompt="explode on rank 1"))
    assert code == 503 and b"while others waited" in answer and b"the pool was restarted (healthy)" in answer
    code, state = health(server.url)
    assert code == 200 and state["healthy"] and state["restarts"] == restarts + 1
    assert post(server.url, dict(prompt=PROMPTS[2], steps=4))[0] == 200


def test_a_request_over_its_time_limit_is_cancelled_and_the_pool_restarts():
    s = Server(request_timeout_s=3)
    try:
        start = time.monotonic()
        code, answer = post(s.url, dict(prompt=PROMPTS[0], steps=100, height=512, width=512))
        assert code == 504 and b"did not finish within 3 s and was cancelled" in answer
        assert time.monotonic() - start < 120
        code, state = health(s.url)
        assert code == 200 and state["healthy"] and state["restarts"] == 1 and state["alive"] == 2
        assert post(s.url, dict(prompt=PROMPTS[0], steps=4))[0] == 200
    finally:
        s.close()


def test_a_dead_worker_fails_the_request_and_the_pool_restarts():
    s = Server()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as client:
            pending = client.submit(post, s.url, dict(prompt=PROMPTS[1], steps=100, height=256, width=256))
            time.sleep(1.0)
            os.kill(s.pool.procs[1].pid, signal.SIGKILL)
            status, body = pending.result(timeout=180)
        assert status == 503 and b"died" in body
        code, state = health(s.url)
        assert code == 200 and state["healthy"] and state["restarts"] == 1
        assert post(s.url, dict(prompt=PROMPTS[0], steps=4))[0] == 200
    finally:
        s.close()


def test_soak_mixed_requests_leave_the_pool_healthy_and_unchanged(server):
    """A bounded mix of good, bad and failing requests from 4 clients: afterwards /health is healthy and a good
    request returns the same image as before."""
    probe = dict(prompt=PROMPTS[1], seed=5, steps=6)
    code, before = post(server.url, probe)
    assert code == 200
    rng = random.Random(0)
    kinds = [dict(prompt=PROMPTS[0], steps=4, seed=1), dict(height=100), dict(steps=-1), dict(prompt=""),
             dict(seed=1.5), dict(prompt="explode"), dict(bogus=1), dict(guidance=1e9), dict(prompt=PROMPTS[2], steps=3)]
    mix = [rng.choice(kinds) for _ in range(40)]
    with concurrent.futures.ThreadPoolExecutor(4) as clients:
        codes = list(clients.map(lambda body: post(server.url, body)[0], mix))
    assert set(codes) <= {200, 400, 500} and {200, 400, 500} <= set(codes)
    code, state = health(server.url)
    assert code == 200 and state["healthy"] and state["alive"] == 2
    code, after = post(server.url, probe)
    assert code == 200 and after == before  # the same image bytes


@pytest.mark.parametrize("args, message", [
    (["--nproc", "0"], "nproc=0: must be an integer from 1 to 64"),
    (["--nproc", "-2"], "nproc=-2: must be an integer from 1 to 64"),
    (["--nproc", "3"], "do not split evenly over 3 processes"),
    (["--max-steps", "0"], "max_steps=0"),
    (["--port", "70000"], "port=70000"),
    (["--body-timeout-s", "0"], "body_timeout_s=0.0: must be a number of seconds from 0 to 3600"),
    (["--cache", "nan"], "cache threshold=nan"),
    (["--model-source", "/nowhere"], "no such folder"),
    (["--host", "256.1.1.1"], "cannot listen on 256.1.1.1:8000"),
    (["--model-source", "flux-dev-random"], "the server with the full-size model needs a CUDA GPU with 40 GB"),
    (["--attention", "cudnn_fp8"], "attention='cudnn_fp8' runs cuDNN's FP8 attention kernels for Hopper"),
    (["--attention", "fastest"], "attention='fastest': use 'cudnn_fp8' (FP8 on Hopper) or one of diffusers'"),
    (["--offload", "encoders"], "offload='encoders' moves weights between the CPU and a GPU"),
    (["--exchange", "peer"], "exchange='peer' replaces Ulysses' all-to-alls: use it with parallel=(N, 1), N >= 2"),
])
def test_server_options_are_checked_before_any_process_starts(args, message):
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "fluxlab", "serve", "--device", "cpu", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode != 0 and message in done.stderr and time.monotonic() - start < 30
    assert "Traceback" not in done.stderr


def test_streaming_weights_lowers_the_gpu_memory_the_server_asks_for():
    from fluxlab.app import gpu_need_gb
    need = fluxlab.book.chapter("04_context_parallel")["gpu_memory_gb"]  # bf16: what the chapters declare
    assert gpu_need_gb(PoolConfig()) == gpu_need_gb(PoolConfig(offload="encoders")) == need
    assert gpu_need_gb(PoolConfig(fp8="rowwise", offload="encoders")) == 16
    assert gpu_need_gb(PoolConfig(fp8="rowwise", offload="group")) == gpu_need_gb(PoolConfig(offload="sequential")) == 8


def test_what_a_pool_config_asks_for_is_what_its_workers_apply():
    config = PoolConfig("tiny", "cpu", sigmoid_gelu=True, compile="regional", compile_vae=True)
    settings = config.check()
    pipe = fluxlab.load_pipeline(settings)
    fluxlab.optimize(pipe, **config.optimizations())  # what each worker does after loading
    done = fluxlab.applied(pipe)
    assert done["sigmoid_gelu"] is True and done["compile"] == dict(scope="regional") and done["compile_vae"] is True


def test_a_taken_port_is_refused_before_any_process_starts():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "fluxlab", "serve", "--device", "cpu", "--port", str(port)],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert time.monotonic() - start < 30 and "Traceback" not in done.stderr


def test_a_pool_that_cannot_start_says_why_in_its_last_line(tmp_path):
    broken = tmp_path / "broken-pipeline"
    shutil.copytree(TINY_DIR, broken)
    for f in broken.glob("transformer/*.safetensors"):
        f.unlink()
    done = subprocess.run([sys.executable, "-m", "fluxlab", "serve", "--device", "cpu", "--model-source", str(broken)],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and last.startswith(f"error: the pool of {broken}") and "did not start:" in last
    assert "ModelUnavailable" in last or "safetensors" in last, last


def test_the_server_serves_over_http_and_stops_on_sigterm():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fluxlab", "serve", "--device", "cpu", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert f"listening on http://127.0.0.1:{port}" in line, line + proc.stderr.read()
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json=dict(prompt=PROMPTS[0], steps=4), timeout=120)
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert f"request {r.headers['x-request-id']} POST /generate 200" in proc.stderr.read()


def served(app):
    """`app` on uvicorn on a loopback socket in a thread: its URL and its server (set should_exit to stop it)."""
    sock = bind("127.0.0.1", 0)
    http = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    threading.Thread(target=http.run, kwargs=dict(sockets=[sock]), daemon=True).start()
    while not http.started:
        time.sleep(0.05)
    return "http://127.0.0.1:%d" % sock.getsockname()[1], http


def test_a_body_without_content_type_gets_a_415_naming_the_header(server):
    """httpx's content=, Python's http.client and requests' data= send a JSON body without a Content-Type: every
    such client gets the same 415 (FastAPI leaves such a body unread: a browser's cross-site simple request)."""
    r = httpx.post(server.url + "/generate", content=b'{"prompt": "a red circle"}', timeout=60)
    assert "content-type" not in r.request.headers
    assert r.status_code == 415 and r.json() == {"error": "the body is sent without a Content-Type; send it as JSON, "
                                                          "with the header 'Content-Type: application/json'"}
    import http.client
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/generate", body=b'{"seed": 1}')
    answer = connection.getresponse()
    assert answer.status == 415 and b"Content-Type: application/json" in answer.read()
    connection.close()


@pytest.mark.parametrize("raw, message", [
    (b'{"prompt": "\xff red"}', "the body is not valid UTF-8: byte 12 (b'\\xff') invalid start byte"),
    (b'{"seed": 1,\n "prompt": }', "the body is not valid JSON: Expecting value at line 2, column 12"),
    (b'{"seed": 1', "the body is not valid JSON: Expecting ',' delimiter at line 1, column 11"),
    (b"[" * 30_000 + b"]" * 30_000, "the body is nested too deeply to be parsed as JSON"),
    (b"[1, 2]", 'the body must be a JSON object, e.g. {"prompt": "...", "seed": 1}'),
])
def test_a_body_that_is_not_a_json_object_says_why(server, raw, message):
    code, answer = post(server.url, None, raw=raw)
    assert (code, json.loads(answer)) == (400, {"error": message})


def test_errors_stay_small_whatever_the_input(server):
    """Thousands of unknown keys (just under the body limit) name ten of them once each and the allowed fields once;
    a huge value is quoted shortened."""
    keys = {f"k{i}": 1 for i in range(5000)}
    raw = json.dumps(keys).encode()
    assert len(raw) < MAX_BODY_BYTES
    code, answer = post(server.url, None, raw=raw)
    error = json.loads(answer)["error"]
    assert code == 400 and len(answer) < 2048, len(answer)
    assert error.startswith("unknown fields 'k0', 'k1', 'k2'") and "'k9' and 4990 more; allowed: ['prompt'" in error
    assert error.count("allowed") == 1
    for body in (dict(seed="9" * 60_000), dict(steps=["x" * 100] * 200, seed="y" * 15_000), {"z" * 30_000: 1}):
        code, answer = post(server.url, body)
        assert code == 400 and len(answer) < 2048 and b"\xe2\x80\xa6" in answer  # the value quoted, shortened (...)


def test_a_slow_body_gets_a_408_and_others_are_served_meanwhile(server):
    """With a 5 s body timeout: a client that sends part of its body and stops (Content-Length, or in the middle of
    a chunk) gets 408 and its connection closed, while /health answers another client before that."""
    url, http = served(make_app(server.pool, body_timeout_s=5))
    host, port = url.removeprefix("http://").split(":")
    try:
        for head, part in ((b"Content-Length: 40\r\nContent-Type: application/json", b'{"prompt": "a'),
                           (b"Transfer-Encoding: chunked\r\nContent-Type: application/json", b"20\r\n{\"prompt\": ")):
            with socket.create_connection((host, int(port)), timeout=15) as slow:
                slow.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n\r\n" + part)
                r = httpx.get(url + "/health", timeout=5)
                waiting = not select.select([slow], [], [], 0)[0]  # no answer for the slow client yet
                answer = b""
                while chunk := slow.recv(4096):  # until the server closes the connection (15 s at most)
                    answer += chunk
                assert r.status_code == 200 and r.json()["healthy"] and waiting
                assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 5 s" in answer
    finally:
        http.should_exit = True


def test_head_health_answers_as_get_without_a_body(server):
    got, head = httpx.get(server.url + "/health", timeout=30), httpx.head(server.url + "/health", timeout=30)
    assert head.status_code == got.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"] == "application/json"


def test_after_the_rough_edges_a_good_request_gives_the_same_png(server):
    good = dict(prompt=PROMPTS[2], seed=11, steps=4)
    code, before = post(server.url, good)
    assert code == 200
    httpx.post(server.url + "/generate", content=b'{"seed": 1}', timeout=60)  # no Content-Type
    post(server.url, None, raw=b'{"prompt": "\xff"}')
    post(server.url, None, raw=json.dumps({f"k{i}": 1 for i in range(5000)}).encode())
    httpx.head(server.url + "/health", timeout=30)
    code, after = post(server.url, good)
    assert code == 200 and after == before

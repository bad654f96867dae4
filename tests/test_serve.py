"""The persistent pool and its HTTP front, on the tiny source with 2 gloo ranks (context parallel)."""
import concurrent.futures
import dataclasses
import io
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

import fluxlab
from fluxlab.serve import Pool, serve

PROMPTS = ["a large red circle on a blue background", "a small green square on a white background",
           "a large yellow triangle on a black background"]


def post(url, body, timeout=120):
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def health(url):
    try:
        with urllib.request.urlopen(url + "/health", timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


class Server:
    def __init__(self):
        self.pool = Pool(2, "tiny", "cpu")
        self.http = serve(self.pool, port=0)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_port}"

    def close(self):
        self.http.shutdown()
        self.http.server_close()
        self.pool.close()
        assert not any(p.is_alive() for p in self.pool.procs), "a worker outlived the pool"


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


def test_concurrent_requests_match_one_shot_generation(server):
    requests = [dict(prompt=PROMPTS[i % 3], seed=i % 2, steps=8) for i in range(30)]
    settings = fluxlab.settings("tiny", device="cpu", steps=8)
    pipe = fluxlab.load(settings)
    reference = {(r["prompt"], r["seed"]): np.asarray(fluxlab.generate(pipe, dataclasses.replace(
        settings, prompt=r["prompt"], seed=r["seed"])), dtype=np.int16) for r in requests}
    with concurrent.futures.ThreadPoolExecutor(4) as clients:
        answers = list(clients.map(lambda r: post(server.url, r), requests))
    for request, (status, png) in zip(requests, answers):
        assert status == 200
        # Context parallel differs from one process by float rounding only (~5e-7 on the latents).
        assert np.abs(pixels(png) - reference[(request["prompt"], request["seed"])]).max() <= 1
    assert health(server.url) == (200, dict(healthy=True, processes=2, alive=2, served=30, error=None))


def test_pool_latency_record(server, tmp_path):
    settings = fluxlab.settings("tiny", "cpu", prompt=PROMPTS[1], seed=3)
    rec = fluxlab.measure_pool(server.pool, settings, name="pool", chapter="t", output_dir=tmp_path, repeats=2)
    assert len(rec["timing"]["times_s"]) == 2 and rec["timing"]["cold_start_s"] == server.pool.start_s
    assert server.pool.start_s > server.pool.warmup_s > 0  # the start includes loading, not just the first image
    assert rec["provenance"]["world_size"] == 2 and rec["settings"]["prompt"] == PROMPTS[1]
    one_shot = np.asarray(fluxlab.generate(fluxlab.load(settings), settings), dtype=np.int16)
    assert np.abs(pixels((tmp_path / "t--pool.png").read_bytes()) - one_shot).max() <= 1
    table = fluxlab.report.serving_table(rec | {"label": "x"}, rec).data
    assert f"{rec['timing']['median_s']:.3f}" in table and f"{rec['timing']['cold_start_s']:.1f}" in table


def test_bad_requests_get_4xx_and_the_pool_keeps_serving(server):
    status, body = post(server.url, dict(height=100))
    assert status == 400 and b"multiple of 16" in body
    status, body = post(server.url, dict(colour="red"))
    assert status == 400 and b"unknown field" in body
    status, body = post(server.url, dict(height=48, width=48))  # 9 image tokens do not split over 2 processes
    assert status == 400 and b"do not split evenly" in body
    status, png = post(server.url, dict(prompt=PROMPTS[0], steps=4))
    assert status == 200 and pixels(png).shape == (128, 128, 3)


def test_a_dead_worker_fails_the_request_and_health(tmp_path):
    s = Server()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as client:
            pending = client.submit(post, s.url, dict(prompt=PROMPTS[1], steps=400))
            time.sleep(1.0)
            os.kill(s.pool.procs[1].pid, signal.SIGKILL)
            start = time.monotonic()
            status, body = pending.result(timeout=90)
        assert status == 503 and b"died" in body
        assert time.monotonic() - start < 60
        code, state = health(s.url)
        assert code == 503 and state["healthy"] is False and state["alive"] < 2
        assert post(s.url, dict(prompt=PROMPTS[0]))[0] == 503
    finally:
        s.close()

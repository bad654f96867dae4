"""fluxlab as a library: installed with its core dependencies and the server's (`pip install -r requirements.txt
'.[serve]'`, `make` builds that venv in .venv-core), without the notebook stack, it imports, optimizes the tiny
pipeline and serves it."""
import json
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT

PYTHON = ROOT / ".venv-core" / "bin" / "python"


@pytest.fixture(autouse=True)
def core_venv():
    if not PYTHON.exists():
        pytest.fail("no .venv-core: `make test` builds it (or `make .venv-core/.installed`)")


def core(code: str, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYTHON), "-c", code], capture_output=True, text=True, timeout=timeout, cwd="/")


def test_the_core_install_has_no_notebook_stack_and_fluxlab_imports_from_it():
    result = core("import importlib.util as u, fluxlab; print(fluxlab.__file__); "
                  "print([m for m in ('IPython', 'ipykernel', 'papermill', 'jupyter_book') if u.find_spec(m)])")
    assert result.returncode == 0, result.stderr[-2000:]
    where, missing = result.stdout.split("\n")[:2]
    assert "site-packages" in where and missing == "[]"  # the installed package, not this checkout


def test_optimize_applies_to_the_tiny_pipeline_without_the_notebook_stack():
    result = core("import fluxlab\n"
                  "s = fluxlab.check_settings('tiny', 'cpu', steps=2)\n"
                  "pipe = fluxlab.load_pipeline(s)\n"
                  "done = fluxlab.optimize(pipe, cache=0.3, fp8='rowwise', sigmoid_gelu=True)\n"
                  "print(sorted(done)); print(fluxlab.generate(pipe, s).size)")
    assert result.returncode == 0, result.stderr[-2000:]
    applied, size = result.stdout.strip().split("\n")[-2:]
    assert applied == "['cache', 'fp8', 'fp8_text_encoder', 'sigmoid_gelu']" and size == "(128, 128)"


def test_the_server_serves_without_the_notebook_stack():
    server = subprocess.Popen([str(PYTHON), "-m", "fluxlab", "serve", "--model-source", "tiny", "--device", "cpu",
                               "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/")
    try:
        line = ""
        deadline = time.monotonic() + 300
        while "listening on" not in line and time.monotonic() < deadline and server.poll() is None:
            line = server.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line
        url = line.split("listening on ")[1].split()[0]
        request = urllib.request.Request(url + "/generate", data=json.dumps(dict(steps=2, seed=1)).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            assert answer.status == 200 and answer.read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert server.returncode is not None

"""`make lab`: JupyterLab in the project's environment on notebooks/, with ipywidgets; a kernel started through the
server runs the first cells of chapter 1."""
import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import nbformat
from tornado.websocket import websocket_connect

from conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base, token, path, method="GET", body=None):
    req = urllib.request.Request(f"{base}{path}", method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        data = r.read()
        return json.loads(data) if data else None


async def execute(url: str, codes: list[str]) -> list[dict]:
    """Run each code in the kernel; the execute_reply of each, with the text it printed before the kernel went idle."""
    ws = await websocket_connect(url)
    session, replies = uuid.uuid4().hex, []
    for code in codes:
        msg_id = uuid.uuid4().hex
        ws.write_message(json.dumps(dict(
            header=dict(msg_id=msg_id, username="test", session=session, msg_type="execute_request", version="5.3",
                        date=""),
            parent_header={}, metadata={}, channel="shell",
            content=dict(code=code, silent=False, store_history=True, user_expressions={}, allow_stdin=False))))
        printed, reply, idle = "", None, False
        while reply is None or not idle:  # the reply (shell) may come before the printed text (iopub)
            msg = json.loads(await asyncio.wait_for(ws.read_message(), timeout=300))
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                printed += msg["content"]["text"]
            elif msg["msg_type"] == "execute_reply":
                reply = msg["content"]
            elif msg["msg_type"] == "status":
                idle = msg["content"]["execution_state"] == "idle"
        replies.append(dict(reply, printed=printed))
    ws.close()
    return replies


def test_jupyterlab_serves_the_chapters_and_runs_chapter_1():
    port, token = free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    lab = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT / 'notebooks'}",
                            *(["--allow-root"] if os.geteuid() == 0 else [])],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                           env={**os.environ, "JUPYTER_RUNTIME_DIR": str(ROOT / ".pytest_cache" / "jupyter")})
    try:
        for _ in range(120):
            try:
                api(base, token, "/api/status")
                break
            except OSError:
                time.sleep(0.5)
        names = {c["name"] for c in api(base, token, "/api/contents")["content"]}
        assert {"01_baseline.ipynb", "04_context_parallel.ipynb"} <= names
        extensions = [e["name"] for e in api(base, token, "/lab/api/extensions")]
        assert "jupyter-widgets-jupyterlab-manager" in extensions  # ipywidgets' slider works in the lab
        session = api(base, token, "/api/sessions", "POST",
                      dict(path="01_baseline.ipynb", type="notebook", name="", kernel=dict(name="python3")))
        nb = nbformat.read(ROOT / "notebooks" / "01_baseline.ipynb", 4)
        code = [c.source for c in nb.cells if c.cell_type == "code"][:3]  # parameters, needs, load
        code[0] += "\nsteps = 2"
        url = f"ws://127.0.0.1:{port}/api/kernels/{session['kernel']['id']}/channels?token={token}"
        replies = asyncio.run(execute(url, code + ["print(settings.source.label, settings.steps, type(pipe).__name__)"]))
        assert [r["status"] for r in replies] == ["ok"] * 4, replies
        assert replies[-1]["printed"].strip() == "tiny 2 FluxPipeline"
        api(base, token, f"/api/sessions/{session['id']}", "DELETE")
    finally:
        lab.terminate()
        lab.wait(timeout=30)

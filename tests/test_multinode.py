"""Two torchrun invocations with --nnodes 2 on loopback form one MP = 2 server.

This is the multi-machine set-up of BB3-175B (2 nodes x 8 GPUs) shrunk to one process per
"node": each launcher is started separately, as it would be on its own machine, and only
node 0's rank 0 serves HTTP. Its greedy output must equal the single-process server's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from server_helpers import ASSETS, REPO, SERVER_ARGS

from opt_serving.distributed import free_port

PROMPTS = ["Hello, my name is", "The capital of France"]


def _launch(ready: Path, node_rank: int, master_port: int, folder,
            rdzv: str) -> subprocess.Popen:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    if rdzv == "static":
        launch = ["--node-rank", str(node_rank), "--master-addr", "127.0.0.1",
                  "--master-port", str(master_port)]
    else:
        launch = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{master_port}",
                  "--rdzv-id", "opt-serving-test"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
           "--nproc-per-node", "1", *launch,
           "-m", "opt_serving.server.cli", "--checkpoint-folder", str(folder),
           "--port", "0", "--assets", str(ASSETS), "--ready-file", str(ready), *SERVER_ARGS]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")


def _watch(procs, ready: Path, timeout: float = 120.0) -> tuple[str | None, list[str]]:
    """Wait for the serving node's ready file (its URL); both launchers' output is kept for
    the failure message."""
    lines: list[str] = []

    def read(proc):
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    for proc in procs:
        threading.Thread(target=read, args=(proc,), daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if time.monotonic() > deadline or all(p.poll() is not None for p in procs):
            return None, lines
        time.sleep(0.05)
    return json.loads(ready.read_text())["url"], lines


def _greedy(url: str) -> list[str]:
    body = {"prompt": PROMPTS, "max_tokens": 12, "temperature": 0.0}
    r = requests.post(url + "/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return [c["text"] for c in r.json()["choices"]]


@pytest.mark.parametrize("rdzv", ["static", "c10d"])
def test_two_torchrun_nodes_serve_like_one_process(serve_checkpoints, server, rdzv, tmp_path):
    port = free_port()
    ready = tmp_path / "ready.json"
    procs = [_launch(ready, node, port, serve_checkpoints[2], rdzv) for node in (0, 1)]
    try:
        url, lines = _watch(procs, ready)
        assert url, "no node started serving:\n" + "\n".join(lines[-60:])
        assert requests.get(url + "/readyz", timeout=10).status_code == 200
        assert _greedy(url) == _greedy(server.url)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

"""Real ``opt-serve`` and ``opt-search-server`` subprocesses on free loopback ports, for the
tests and benchmarks (started as commands: nothing of ``agents`` is imported here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from opt_serving.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
# fp32: the tests compare with HF transformers' fp32 OPT (tests/test_kernels.py checks bf16).
SERVER_ARGS = ("--kv-tokens", "16384", "--max-seq-len", "512", "--device", "cpu",
               "--dtype", "fp32")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child ``python -m`` of this checkout (plus ``extra``)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1",
            "PYTHONIOENCODING": "utf-8", **extra}


class ServerProcess:
    """``python -m opt_serving.server.cli ... --port 0``; ready when it has written its ready
    file (URL and pids, as JSON); its output is kept in ``lines`` for diagnostics."""

    def __init__(self, *args: str, assets: str | os.PathLike | None = None,
                 start_timeout: float = 90.0, launcher: tuple = ()):
        env = child_env()
        assets_args = ("--assets", str(assets)) if assets else ()
        self._dir = tempfile.TemporaryDirectory(prefix="opt-serve-")
        ready = Path(self._dir.name) / "ready.json"
        self.proc = subprocess.Popen(
            [sys.executable, *launcher, "-m", "opt_serving.server.cli", "--port", "0",
             "--ready-file", str(ready), *assets_args, *args], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + start_timeout
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("opt-serve did not start:\n" + self.log())
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.url: str = info["url"]
        self.worker_pids: dict[int, int] = {int(r): pid for r, pid in info["workers"].items()}

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        return "\n".join(self.lines[-80:])

    def post(self, path: str, body=None, *, data: bytes | None = None, headers=None,
             timeout: float = 60.0) -> requests.Response:
        return requests.post(self.url + path, json=body if data is None else None, data=data,
                             headers=headers, timeout=timeout)

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 10.0), **kw)

    def metric(self, name: str) -> float:
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def wait_for(self, predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(interval)
        return False

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._dir.cleanup()
        return self.proc.returncode


class SearchServerProcess:
    """`opt-search-server ARGS --port P` in a subprocess; waits for GET /healthz."""

    def __init__(self, *args: str, cwd: Path):
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.url = "http://" + self.address
        self.log = open(cwd / f"search-server-{port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "agents.search.cli", *args,
                                      "--port", str(port)], cwd=cwd, env=child_env(),
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"opt-search-server exited: {self.output()}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"opt-search-server did not start: {self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()

"""A thousand open streams in one running batch: HTTP worker threads are not the bound."""

import json
import socket

from opt_serving.testing.server_process import ServerProcess
from paths import ASSETS

N = 1000


def test_a_thousand_open_streams_run_in_one_batch(serve_checkpoints):
    proc = ServerProcess("--checkpoint-folder", str(serve_checkpoints[1]), "--device", "cpu",
                         "--dtype", "fp32", "--kv-tokens", "65536", "--max-seq-len", "512",
                         assets=ASSETS)
    socks = []
    try:
        host, port = proc.url.rsplit("/", 1)[1].split(":")
        body = json.dumps({"prompt": [133, 812], "max_tokens": 400, "min_tokens": 400,
                           "temperature": 0, "stream": True}).encode()
        request = (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: "
                   b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
        for _ in range(N):
            s = socket.create_connection((host, int(port)), timeout=60)
            s.sendall(request)
            socks.append(s)
        # Every stream is answered (its headers and first events) while all are open.
        assert proc.wait_for(lambda: proc.metric("opt_serve_running_batch_size") == N,
                             timeout=120), proc.log()
        for s in socks:
            assert s.recv(65536).startswith(b"HTTP/1.1 200 OK")
        assert proc.metric("opt_serve_queue_depth") == 0
        for s in socks:  # every client vanishes: the engine frees all of it
            s.close()
        socks = []
        assert proc.wait_for(lambda: proc.metric("opt_serve_running_batch_size") == 0,
                             timeout=120)
        assert proc.metric("opt_serve_kv_blocks_used") == 0
        r = proc.post("/completions", {"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        for s in socks:
            s.close()
        proc.stop()

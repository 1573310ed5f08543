"""The suite's opt-serve subprocess: ``opt_serving.testing.server_process`` with its tokenizer."""

from __future__ import annotations

from opt_serving.testing import server_process
from opt_serving.testing.server_process import REPO, SERVER_ARGS  # noqa: F401
from paths import ASSETS


class ServerProcess(server_process.ServerProcess):
    def __init__(self, *args: str, **kw):
        super().__init__(*args, assets=ASSETS, **kw)

"""Shared fixtures: one tiny random OPT checkpoint (tiny-8h, fp16) written once per session.

Fixture names carry a ``tiny_`` prefix so that a test module's own ``cfg`` / ``state``
fixtures keep working unchanged.
"""

from __future__ import annotations

import os

# Triton's interpreter for the GPU kernels' tests (tests/test_gpu_path.py): it must be set
# before triton is first imported, which torch or transformers may do while the suite is
# collected. CI has no GPU, so nothing else runs Triton kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from opt_serving.testing import synthetic  # noqa: E402
from opt_serving.config import get_preset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg():
    # 8 heads: valid degrees 1, 2, 4, 8 (vocabulary 50272 = 2^5 x 1571, ffn 256).
    return get_preset("tiny-8h")


@pytest.fixture(scope="session")
def tiny_state(tiny_cfg):
    """The full (degree 1, fused [K; V; Q]) state dict in fp16, non-zero biases."""
    return synthetic.random_state(tiny_cfg, seed=5, dtype=torch.float16)


@pytest.fixture(scope="session")
def tiny_consolidated(tmp_path_factory, tiny_cfg, tiny_state):
    """A BB3-30B-style consolidated.pt (separate q/k/v). Read-only: copy it to modify it."""
    path = tmp_path_factory.mktemp("source") / "consolidated.pt"
    synthetic.write_consolidated(path, tiny_cfg, tiny_state, separate=True)
    return path


# -- opt-serve: checkpoints, one shared MP=1 server ---------------------------------------------

@pytest.fixture(scope="session")
def serve_checkpoints(tmp_path_factory, tiny_cfg):
    """{1: folder of one part, 2: folder of two parts} of a tiny fp32 model whose final layer
    norm is scaled up so that its next-token distributions are peaked like a trained model's
    (about 6 nats of entropy). With std-0.02 weights they are nearly uniform over 50k tokens,
    and inverse-CDF sampling from them flips on the last bit of a logit, which the shape of a
    batch does change."""
    from reshard.core import reshard

    root = tmp_path_factory.mktemp("serve")
    state = synthetic.random_state(tiny_cfg, seed=5, dtype=torch.float32)
    state["decoder.layer_norm.weight"] *= 20.0
    synthetic.write_consolidated(root / "consolidated.pt", tiny_cfg, state)
    return {mp: reshard([str(root / "consolidated.pt")], mp, root / f"mp{mp}",
                        progress=False).output_dir for mp in (1, 2)}


@pytest.fixture(scope="session")
def server(serve_checkpoints):
    from server_helpers import SERVER_ARGS, ServerProcess

    proc = ServerProcess("--checkpoint-folder", str(serve_checkpoints[1]), *SERVER_ARGS)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def reference(serve_checkpoints):
    """The served weights loaded in this process (fp32) and the tokenizer."""
    from server_helpers import ASSETS

    from opt_serving.checkpoint.loading import load_model
    from opt_serving.tokenizer import Tokenizer

    model, _ = load_model(str(serve_checkpoints[1]), dtype=torch.float32)
    return model, Tokenizer.from_folder(assets_dir=ASSETS)


@pytest.fixture(scope="session")
def opt_serve(server):
    """The shared MP=1 opt-serve, under the name the agent's tests use."""
    return server


# -- the agent's tests: small real HTTP servers on loopback -----------------------------------

@pytest.fixture
def scripted():
    """start(answer) -> a running `loopback.ScriptedServer`; all are closed after the test."""
    from loopback import ScriptedServer

    servers = []

    def start(answer):
        servers.append(ScriptedServer(answer))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def proxy(scripted):
    """start(target_url) -> a recording proxy in front of that server (`requests` and `answers`
    hold what went through it)."""
    from loopback import forward

    return lambda target: scripted(forward(target))

"""TP = 1, 2, 4 in real processes over gloo, each rank loading only its own part."""

import pytest
import torch

from opt_serving.testing import synthetic
from opt_serving.config import get_preset
from opt_serving.testing.selfcheck import tp_logits
from reshard.core import reshard


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    cfg = get_preset("tiny-8h")
    state = synthetic.random_state(cfg, seed=11, dtype=torch.float32)
    synthetic.write_consolidated(root / "consolidated.pt", cfg, state)
    for mp in (2, 4):
        reshard([str(root / "consolidated.pt")], mp, root / f"mp{mp}", progress=False)
    return root


def test_tp_degrees_give_the_same_logits(checkpoints):
    # The fixture's biases are ~0.02: a row-parallel bias added on every rank instead of once
    # after the all-reduce would move the logits by far more than the tolerance.
    single = tp_logits(str(checkpoints / "consolidated.pt"), 1)
    for mp in (2, 4):
        sharded = tp_logits(str(checkpoints / f"mp{mp}"), mp)
        torch.testing.assert_close(sharded, single, rtol=0, atol=1e-5)


def test_ranks_cut_their_shard_from_a_consolidated_file(checkpoints):
    single = tp_logits(str(checkpoints / "consolidated.pt"), 1)
    torch.testing.assert_close(tp_logits(str(checkpoints / "consolidated.pt"), 2), single,
                               rtol=0, atol=1e-5)

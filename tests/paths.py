"""Where the tests find tokenizer files.

``ASSETS``: the suite's own byte-level BPE, trained on first use (``opt_serving.testing.bpe``)
in metaseq's file format. Everything that needs *a* tokenizer uses it, so a fresh clone with
no ``../shared`` beside it runs the whole suite.

``real_assets()``: metaseq's own ``gpt2-vocab.json`` / ``gpt2-merges.txt``, for the few tests
that are about those files (md5s, the OpenAI-vocabulary refusal, parity with HF tokenizers).
Looked for in $OPT_SERVING_TEST_ASSETS, ``../shared/assets`` beside the checkout, and the
toolkit's ``assets/`` after ``opt-assets fetch``. When none has them the test is skipped with
the way to enable it, unless $OPT_SERVING_REQUIRE_REAL_ASSETS is set (``.ci/run`` sets it when
``../shared/assets`` exists): then it fails, so CI never loses that coverage silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from assets import FILES, asset_dir
from opt_serving.testing import bpe

REPO = Path(__file__).resolve().parents[1]
ASSETS = bpe.cached()
HOW_TO_ENABLE = ("metaseq's gpt2-vocab.json / gpt2-merges.txt not found: set "
                 "OPT_SERVING_TEST_ASSETS=DIR, put ../shared/assets beside the checkout, or run "
                 "`opt-assets fetch`")


def _find() -> Path | None:
    candidates = [Path(p) for p in [os.environ.get("OPT_SERVING_TEST_ASSETS")] if p]
    candidates += [REPO.parent / "shared" / "assets", asset_dir()]
    for folder in candidates:
        if all((folder / name).is_file() for name in FILES):
            return folder
    return None


REAL_ASSETS = _find()


def real_assets() -> Path:
    """metaseq's files, or skip (fail when they are required) with how to get them."""
    if REAL_ASSETS is not None:
        return REAL_ASSETS
    if os.environ.get("OPT_SERVING_REQUIRE_REAL_ASSETS"):
        pytest.fail(f"{HOW_TO_ENABLE} (required here: OPT_SERVING_REQUIRE_REAL_ASSETS is set)")
    pytest.skip(HOW_TO_ENABLE)

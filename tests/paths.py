"""Where the tests find metaseq's tokenizer files (never committed to this repository).

In order: $OPT_SERVING_TEST_ASSETS, ``../shared/assets`` beside the checkout (CI and the
development machines), the toolkit's own ``assets/`` once ``opt-assets fetch`` has run. With
none of them, tests that need the files fail with a message saying so.
"""

from __future__ import annotations

import os
from pathlib import Path

from assets import FILES, asset_dir

REPO = Path(__file__).resolve().parents[1]


def _find() -> Path:
    candidates = [Path(p) for p in [os.environ.get("OPT_SERVING_TEST_ASSETS")] if p]
    candidates += [REPO.parent / "shared" / "assets", asset_dir()]
    for folder in candidates:
        if all((folder / name).is_file() for name in FILES):
            return folder
    return candidates[0]


ASSETS = _find()
